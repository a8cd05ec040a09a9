import json

import pytest
import torch

from univ import fit as fit_mod
from univ import models, trainer
from univ.cache import CacheConfig, run_cache
from univ.errors import UnivError
from univ.fit import FitConfig, LayerData, fit, stores_at
from univ.sae_metrics import loss_recovered
from univ.sae import SAE
from univ.store import Store

from test_cli import assert_one_line_error, run


def make_sparse_store(path, n=40_000, d=32, n_true=64, active=3, seed=0, chunk=8192):
    """Activations that are sparse non-negative combinations of known unit directions,
    written by hand in univ's documented store format."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(n_true, d, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    store = Store.open_or_create(path, "acts", {"layer": 0, "hook": "synthetic"})
    for c, start in enumerate(range(0, n, chunk)):
        m = min(chunk, n - start)
        idx = torch.rand(m, n_true, generator=g).argsort(1)[:, :active]
        coef = torch.zeros(m, n_true).scatter_(1, idx, 0.5 + torch.rand(m, active, generator=g))
        store.write_chunk(c, {"acts": coef @ D}, rows=m)
    store.set_complete(True)
    return D


def _fit_cfg(**kw):
    base = dict(expansion=4, batch_size=256, eval_tokens=4096, window_rows=8192, device="cpu",
                lr=3e-3, train_tokens=200_000, l1=1.0, k=3)
    return FitConfig(**{**base, **kw})


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_both_architectures_recover_a_known_sparse_dictionary(tmp_path, arch):
    D = make_sparse_store(tmp_path / "store")
    [result] = fit(_fit_cfg(arch=arch), [LayerData(0, stores_at(tmp_path / "store")[0], tmp_path / "saes")],
                   progress=False)
    sae = SAE.load(result.path)
    learned = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    best_cos = (D @ learned.T).max(1).values
    assert best_cos.mean() > 0.95, best_cos
    assert (best_cos > 0.9).float().mean() > 0.9
    assert result.explained_variance > 0.8
    assert result.l0 < 12
    saved = json.loads((tmp_path / "saes").glob("*/metrics.json").__next__().read_text())
    assert saved["eval_rows"] == 4000  # held out: a tenth of the store, never trained on


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    make_sparse_store(tmp_path / "store", n=20_000)
    cfg = dict(arch="topk", train_tokens=40_000, checkpoint_minutes=0)
    store = stores_at(tmp_path / "store")[0]
    [clean] = fit(_fit_cfg(**cfg), [LayerData(0, store, tmp_path / "clean")], progress=False)

    real, calls = trainer._train_window, []

    def dies_in_third_window(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(trainer, "_train_window", dies_in_third_window)
    with pytest.raises(KeyboardInterrupt):
        fit(_fit_cfg(**cfg), [LayerData(0, store, tmp_path / "killed")], progress=False)
    assert list((tmp_path / "killed").glob("*/checkpoint.safetensors"))
    monkeypatch.setattr(trainer, "_train_window", real)
    [resumed] = fit(_fit_cfg(**cfg), [LayerData(0, store, tmp_path / "killed")], progress=False)
    a, b = SAE.load(clean.path), SAE.load(resumed.path)
    for name, tensor in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[name], tensor, rtol=0, atol=0)
    assert not list((tmp_path / "killed").glob("*/checkpoint.*"))


def test_non_finite_loss_stops_and_keeps_the_checkpoint(tmp_path):
    make_sparse_store(tmp_path / "store", n=20_000)
    store = Store.read(tmp_path / "store")
    bad = store.read_chunk(1)["acts"]
    bad[5, 3] = float("nan")
    store.write_chunk(1, {"acts": bad}, rows=len(bad))
    with pytest.raises(UnivError, match=r"layer 0: the loss became non-finite at step \d+"):
        fit(_fit_cfg(checkpoint_minutes=0), [LayerData(0, store, tmp_path / "saes")], progress=False)
    assert list((tmp_path / "saes").glob("*/checkpoint.safetensors"))
    assert not list((tmp_path / "saes").glob("*/sae.safetensors"))


def test_loss_recovered_is_one_for_identity_and_zero_for_zero(assets, tmp_path):
    result = run_cache(CacheConfig(models=[str(assets["neox"])], dataset=str(assets["corpus"]), tokens=1500,
                                   ctx_len=24, cache_dir=tmp_path / "c"), progress=False)
    lm = models.load(str(assets["neox"]), device="cpu")
    tstore = Store.read(result.tokens_store)
    assert loss_recovered(lm, 0, lambda h: h, tstore, 300, 8) == pytest.approx(1.0, abs=1e-6)
    assert loss_recovered(lm, 0, torch.zeros_like, tstore, 300, 8) == pytest.approx(0.0, abs=1e-6)
    half = loss_recovered(lm, 0, lambda h: 0.5 * h, tstore, 300, 8)
    assert half != pytest.approx(1.0, abs=1e-3) and half != pytest.approx(0.0, abs=1e-3)


@pytest.mark.parametrize("family", ["neox", "mamba"])
def test_fit_sae_cli_streams_every_layer_then_hits(assets, tmp_path, capsys, monkeypatch, family):
    args = ["fit-sae", "-m", assets[family], "--dataset", assets["big_corpus"], "--tokens", "3000", "--ctx-len", "24",
            "--expansion", "2", "--sae-batch-size", "128", "--sae-eval-tokens", "1000", "--sae-train-tokens", "6400",
            "--window-rows", "1024", "--arch", "topk", "--k", "4", "--cache-dir", tmp_path / "cache", "--format", "json"]
    code, _, err = run(capsys, "cache", "-m", assets[family], "--dataset", assets["big_corpus"], "--tokens", "3000",
                       "--ctx-len", "24", "--cache-dir", tmp_path / "cache")
    assert code == 0, err
    code, out, err = run(capsys, *args)
    assert code == 0, err
    # fit-sae found `univ cache`'s token store (the MPPC window) and added only the held-out rows'.
    assert len(list((tmp_path / "cache" / "tokens").iterdir())) == 2
    rows = json.loads(out)["fit-sae"]
    n_layers = models.resolve(str(assets[family])).n_layers
    assert [r["layer"] for r in rows] == list(range(n_layers))
    for r in rows:
        assert r["d_sae"] == 64 and r["l0"] <= 4 and r["loss_recovered"] is not None
        assert r["train_tokens"] == 6400 and 0 < r["explained_variance"] <= 1

    def no_training(*a, **k):
        raise AssertionError("a finished SAE must be a cache hit")

    monkeypatch.setattr(trainer, "train", no_training)
    monkeypatch.setattr(fit_mod.models, "load_source", no_training)
    assert run(capsys, *args)[1] == out
    monkeypatch.chdir(tmp_path)  # the same cache given by a relative path: still a hit
    relative = [a if a != tmp_path / "cache" else "cache" for a in args]
    assert run(capsys, *relative)[1] == out.replace(str(tmp_path / "cache"), "cache")


def test_fit_sae_bad_inputs(assets, tmp_path, capsys):
    make_sparse_store(tmp_path / "store", n=20_000)
    intstore = Store.open_or_create(tmp_path / "ints", "acts", {"layer": 0})
    intstore.write_chunk(0, {"acts": torch.zeros(50, 4, dtype=torch.int32)}, rows=50)
    intstore.set_complete(True)
    base = ["fit-sae", "--acts", tmp_path / "store", "--cache-dir", tmp_path / "c", "--sae-batch-size", "256"]
    cases = [
        (["fit-sae", "--cache-dir", tmp_path / "c"], "give either --model"),
        (["fit-sae", "--acts", tmp_path / "nowhere"], "does not exist"),
        (["fit-sae", "--acts", tmp_path / "ints"], "2-D float tensor"),
        ([*base, "--arch", "topk", "--k", "0"], "--k must be"),
        ([*base, "--arch", "topk", "--k", "128", "--expansion", "4"], "--k must be"),
        ([*base, "--expansion", "0.5"], "--expansion must be at least 1"),
        ([*base, "--layers", "3"], "out of range"),
        ([*base, "--arch", "gated"], "architecture"),
    ]
    for args, fragment in cases:
        assert_one_line_error(*run(capsys, *args), fragment)


def test_train_tokens_are_trained_in_full_when_the_store_is_smaller_than_a_window(tmp_path):
    make_sparse_store(tmp_path / "store", n=20_000)  # 18,000 training rows, windows of 65,536
    [r] = fit(_fit_cfg(arch="topk", train_tokens=200_000, window_rows=65_536),
              [LayerData(0, stores_at(tmp_path / "store")[0], tmp_path / "saes")], progress=False)
    trained = SAE.load(r.path).cfg.store["train"]
    assert trained["tokens"] == 200_000 // 256 * 256 and r.train_tokens == 200_000


def test_doubtful_saes_are_named():
    """An SAE trained for a handful of steps, or firing on a large share of its latents, is reported
    with a warning rather than silently (the metrics of such SAEs mean little)."""
    from univ.fit import SAEResult, doubts

    def result(layer, train_tokens, l0, d_sae=4096):
        return SAEResult(layer, "resid_post", "relu", d_sae, train_tokens, l0, 0.9, 0.0, None, "")

    assert doubts([result(0, 100_000_000, 50), result(1, 100_000_000, 60)], 4096) == []
    [short] = doubts([result(0, 4 * 4096, 50)], 4096)
    assert "trained for 4 steps" in short
    [dense] = doubts([result(0, 100_000_000, 50), result(1, 100_000_000, 1900)], 4096)
    assert "1 of 2 SAEs" in dense and "L0 1900 of 4096" in dense
