import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import build_neox
from univ.correlate import correlation, cross_moment, encode_window, pair_max
from univ.errors import UnivError
from univ.match import MatchConfig, Side, compare
from univ.store import Store

from test_cli import assert_one_line_error, run


def _encode(x: torch.Tensor, sparse: bool):
    return encode_window(iter(x.split(37)), x.shape[1], sparse, "cpu")


def _corr(a, b, sparse=True):
    ea, eb = _encode(a, sparse), _encode(b, sparse)
    return correlation(ea, eb, cross_moment(ea, eb)).numpy()


def test_correlations_equal_numpy_corrcoef_on_sparse_data():
    g = torch.Generator().manual_seed(0)
    a = torch.relu(torch.randn(500, 7, generator=g) - 1.2) * 3
    b = torch.relu(torch.randn(500, 5, generator=g) - 1.0)
    b[:, 0] += a[:, 2]  # a real correlation
    expected = np.corrcoef(a.double().numpy().T, b.double().numpy().T)[:7, 7:]
    for sparse in (True, False):
        np.testing.assert_allclose(_corr(a, b, sparse), expected, atol=1e-6)


def test_correlations_stay_exact_with_a_large_mean_and_small_variance():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(4000, 3, generator=g)
    a = 3000.0 + base * 0.5
    b = 3000.0 + (base[:, :2] + 0.3 * torch.randn(4000, 2, generator=g)) * 0.5
    expected = np.corrcoef(a.double().numpy().T, b.double().numpy().T)[:3, 3:]
    np.testing.assert_allclose(_corr(a, b, sparse=False), expected, atol=1e-6)
    # The float32 one-pass formula is far off here: the test is not a formality.
    n = len(a)
    cov32 = (a.T @ b) / n - a.mean(0)[:, None] * b.mean(0)[None, :]
    one_pass = cov32 / (a.std(0, unbiased=False)[:, None] * b.std(0, unbiased=False)[None, :])
    assert np.abs(one_pass.numpy() - expected).max() > 1e-2


def test_dead_features_score_zero_and_are_flagged():
    a = torch.zeros(50, 3)
    a[:, 0] = torch.arange(50.0)
    b = torch.arange(50.0)[:, None].repeat(1, 2)
    ea, eb = _encode(a, True), _encode(b, True)
    pm = pair_max(ea, eb)
    assert ea.fires.tolist() == [True, False, False]
    assert pm.a_value[0] == pytest.approx(1.0) and pm.a_value[1] == 0 and pm.a_value[2] == 0


def test_rare_co_firing_features_keep_their_correlation_and_only_constants_score_zero():
    """The authors' floor is on sqrt((nΣa² − (Σa)²)(nΣb² − (Σb)²)): at n = 1M it never touches two
    features that fire together on 3 tokens (a floor on var_a·var_b per token would give ~0.3)."""
    n = 1_000_000
    a, b = torch.zeros(n, 3), torch.zeros(n, 2)
    a[[10, 20, 30], 0] = 0.3
    b[[10, 20, 30], 0] = torch.tensor([0.3, 0.3, 0.2])
    b[[10, 999_999], 1] = 0.3
    a[:, 2] = 0.7  # constant but not dead
    expected = np.corrcoef(a[:, 0].double().numpy(), b.double().numpy().T)[0, 1:]
    assert expected[0] > 0.9
    corr = _corr(a, b)
    np.testing.assert_allclose(corr[0], expected, atol=1e-9)
    assert (corr[1:] == 0).all()  # the dead feature and the constant one
    ea, eb = _encode(a, True), _encode(b, True)
    assert ea.constant.tolist() == [False, True, True] and ea.fires.tolist() == [True, False, True]
    assert pair_max(ea, eb).a_value[0].item() == pytest.approx(expected[0], abs=1e-9)


def _synthetic_pair(tmp_path, n=6000, d=48, shared=12, private=6, seed=0, tokens_key="tok"):
    """Two 'models' that embed the same sparse latents through different random linear maps,
    plus latents of their own; their 'SAEs' are the exact sparse codes."""
    g = torch.Generator().manual_seed(seed)

    def latents(k):
        return torch.relu(torch.randn(n, k, generator=g) - 1.5) * (1 + torch.rand(k, generator=g))

    z_shared = latents(shared)
    sides = []
    for name in ("a", "b"):
        z = torch.cat([z_shared, latents(private)], 1)
        M = torch.randn(shared + private, d, generator=g)
        x = z @ M
        store = Store.open_or_create(tmp_path / name, "acts", {"layer": 0, "tokens_store": tokens_key})
        for c, s in enumerate(range(0, n, 2048)):
            store.write_chunk(c, {"acts": x[s:s + 2048]}, rows=len(x[s:s + 2048]))
        store.set_complete(True)
        decoder = torch.linalg.pinv(M)
        sides.append(Side(name, {0: store}, {0: lambda x, p=decoder: torch.relu(x @ p)}, {"seed": seed, "name": name}))
    return sides


def test_shared_features_match_and_private_ones_do_not(tmp_path):
    a, b = _synthetic_pair(tmp_path)
    c = compare("main", a, b, MatchConfig(device="cpu"), tmp_path / "out", progress=False)
    assert c.a_fires.all() and c.b_fires.all()
    assert (c.a_value[0, :12] > 0.99).all() and (c.b_value[0, :12] > 0.99).all()  # shared, both ways
    assert (c.a_value[0, 12:] < 0.5).all() and (c.b_value[0, 12:] < 0.5).all()   # private
    assert (c.a_index[0, :12] == torch.arange(12)).all()
    summary = c.summary(dead_as_zero=False)
    assert summary[0]["alive"] == 18 and summary[0][">=0.9"] == pytest.approx(12 / 18, abs=1e-4)
    assert json.loads((tmp_path / "out").rglob("summary.json").__next__().read_text())["summary"] == summary
    # A random-init-style control: unrelated latents everywhere.
    _, other = _synthetic_pair(tmp_path / "ctrl", seed=5)
    ctrl = compare("control", a, other, MatchConfig(device="cpu"), tmp_path / "out", progress=False)
    assert ctrl.a_value.max() < 0.5


def test_refuses_stores_from_different_token_stores(tmp_path):
    a, _ = _synthetic_pair(tmp_path / "1", tokens_key="one")
    _, b = _synthetic_pair(tmp_path / "2", tokens_key="two")
    with pytest.raises(UnivError, match="different token stores"):
        compare("main", a, b, MatchConfig(device="cpu"), tmp_path / "out", progress=False)


def test_match_cli_runs_every_reference_point_on_tiny_models(assets, tmp_path, capsys):
    build_neox(tmp_path / "neox-seed2", assets["tokenizer"], seed=2)
    args = ["match", "--model-a", assets["neox"], "--model-b", assets["mamba"], "--model-c", tmp_path / "neox-seed2",
            "--baseline", "random-init", "--skyline", "sae-seed", "--skyline", "model-seed", "--neurons",
            "--dataset", assets["big_corpus"], "--tokens", "3000", "--neuron-tokens", "1500", "--ctx-len", "24",
            "--arch", "topk", "--k", "4", "--expansion", "2", "--sae-batch-size", "128", "--sae-train-tokens", "4096", "--sae-eval-tokens", "1000",
            "--cache-dir", tmp_path / "cache", "--format", "json"]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    tables = json.loads(out)
    names = [r["comparison"] for r in tables["summary"]]
    assert names == [n for n in ("main", "random-init", "sae-seed", "model-seed", "neurons", "neurons random-init")
                     for _ in range(2)]
    for row in tables["summary"]:
        assert 0 < row["alive"] <= row["features"] and -1 <= row["median"] <= 1
    by_name = {r["comparison"]: r for r in tables["summary"]}
    assert by_name["random-init"]["mean"] != by_name["main"]["mean"]  # a different model, not a copy
    neurons = [r for r in tables["summary"] if r["comparison"] == "neurons"][0]
    assert neurons["features"] == 2 * 64  # GPT-NeoX MLP post-activations: intermediate_size 64, two layers
    depth = tables["depth map (mean best correlation of A-layer features within each B layer)"]
    assert len(depth) == 2 and len(depth[0]) == 1 + 3
    assert run(capsys, *args)[1] == out  # a rerun is a cache hit with the same tables


def test_match_bad_inputs(assets, tmp_path, capsys):
    base = ["match", "--cache-dir", tmp_path / "c"]
    cases = [
        (base, "give --model-a and --model-b"),
        ([*base, "--model-a", assets["neox"]], "give both"),
        ([*base, "--model-a", assets["neox"], "--model-b", assets["mamba"], "--baseline", "shuffled"], "unknown baseline"),
        ([*base, "--model-a", assets["neox"], "--model-b", assets["mamba"], "--skyline", "model-seed"], "--model-c"),
        ([*base, "--model-a", assets["neox"], "--model-b", assets["neox_other"], "--dataset", assets["corpus"],
          "--tokens", "1000", "--ctx-len", "24"], "different tokenizers"),
    ]
    for args, fragment in cases:
        assert_one_line_error(*run(capsys, *args), fragment)


def test_raw_feature_scale_correlates_what_lm_saes_returns(tmp_path):
    """Default 'raw': A's SAE features times ‖x‖/√d (lm_saes' encode). B holds exactly those values as
    plain activations, so with 'raw' every live A feature finds its copy at r = 1; 'normalised'
    correlates encode(x) alone, which the per-token factor makes differ."""
    from univ.match_stage import path_side
    from univ.sae import SAE, SAEConfig

    g = torch.Generator().manual_seed(3)
    x = torch.randn(3000, 16, generator=g) * (0.2 + 5 * torch.rand(3000, 1, generator=g))  # norms vary a lot
    sae = SAE(SAEConfig(arch="relu", d_in=16, d_sae=24, l1=1.0,
                        store={"path": str(tmp_path / "a"), "config": {"layer": 0, "tokens_store": "t"}}))
    sae.initialise(x, g)
    with torch.no_grad():
        sae.b_enc.fill_(0.05)
    raw = sae.encode(x) * x.norm(dim=-1, keepdim=True) / 4.0
    torch.testing.assert_close(sae.features(x), raw)
    torch.testing.assert_close(sae.features(x, "normalised"), sae.encode(x))
    for name, acts in (("a", x), ("b", raw)):
        store = Store.open_or_create(tmp_path / name / "resid_post.0", "acts", {"layer": 0, "tokens_store": "t"})
        store.write_chunk(0, {"acts": acts}, rows=len(acts))
        store.set_complete(True)
    sae.save(tmp_path / "saes" / "0")
    values = {}
    for scale in ("raw", "normalised"):
        cfg = MatchConfig(device="cpu", feature_scale=scale)
        a = path_side("a", tmp_path / "a", tmp_path / "saes", "all", cfg)
        b = path_side("b", tmp_path / "b", None, "all", cfg)
        c = compare("main", a, b, cfg, tmp_path / "out", progress=False)
        alive = c.a_fires[0]
        assert alive.sum() > 10
        values[scale] = c.a_value[0][alive]
        assert json.loads((Path(c.path) / "summary.json").read_text())["feature_scale"] == {"a": scale, "b": None}
    assert (values["raw"] > 1 - 1e-6).all()
    assert (values["normalised"] < 0.99).any()


def test_an_interrupted_match_resumes_after_its_last_finished_layer_pair(tmp_path, monkeypatch):
    from univ import match as match_mod

    a, b = _synthetic_pair(tmp_path)
    a.stores[1], a.encoders[1] = a.stores[0], a.encoders[0]  # two layers of A: two pairs
    clean = compare("main", a, b, MatchConfig(device="cpu"), tmp_path / "clean", progress=False)
    real, calls = match_mod.pair_max, []

    def dies_on_the_second_pair(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(match_mod, "pair_max", dies_on_the_second_pair)
    with pytest.raises(KeyboardInterrupt):
        compare("main", a, b, MatchConfig(device="cpu"), tmp_path / "out", progress=False)
    calls.clear()
    resumed = compare("main", a, b, MatchConfig(device="cpu"), tmp_path / "out", progress=False)
    assert len(calls) == 1  # the first pair was read back, not computed again
    for name in ("a_value", "a_index", "b_value", "depth"):
        assert torch.equal(getattr(resumed, name), getattr(clean, name)), name
    assert not (Path(resumed.path) / "pairs").exists()


def test_a_match_that_cannot_fit_is_refused_with_its_numbers(tmp_path, monkeypatch):
    a, b = _synthetic_pair(tmp_path)
    monkeypatch.setattr("univ.match.os.sysconf", lambda name: 1)
    with pytest.raises(UnivError, match=r"a layer pair needs .* GiB \(18 x 18 features\) and 0.0 GiB are free"):
        compare("main", a, b, MatchConfig(device="cpu"), tmp_path / "out", progress=False)


def test_examples_are_each_features_top_rows_density_and_quantiles(tmp_path):
    """Collected while encoding (no second pass), they equal what the full feature matrix says."""
    from univ.examples import TOP_K, Examples

    a, b = _synthetic_pair(tmp_path)
    c = compare("main", a, b, MatchConfig(device="cpu", batch_rows=1000), tmp_path / "out", progress=False)
    x = torch.cat([a.stores[0].read_chunk(i)["acts"] for i in sorted(a.stores[0].chunks)])
    f = a.encoders[0](x)
    ex = Examples.load(Path(c.path) / c.examples["a"][0])
    assert ex.n == len(f) == 6000
    values, rows = f.topk(TOP_K, dim=0)
    fired = values > 0
    assert torch.equal(ex.top_rows.long(), torch.where(fired, rows, -1))
    assert torch.allclose(ex.top_values, torch.where(fired, values, 0.0))
    assert torch.equal(ex.count, (f != 0).sum(0))
    for j in range(f.shape[1]):
        nz = f[:, j][f[:, j] != 0].numpy()
        expected = np.quantile(nz, [0.5, 0.9, 0.99], method="lower")
        assert np.allclose(ex.quantiles[:, j].numpy(), expected), j
    # Shared by any comparison that encodes the same side; a comparison loaded back knows its files.
    again = compare("again", a, b, MatchConfig(device="cpu"), tmp_path / "out", progress=False)
    assert (Path(again.path) / again.examples["a"][0]).resolve() == (Path(c.path) / c.examples["a"][0]).resolve()


def test_simplicity_proxies_and_their_rank_correlation():
    from univ.examples import Examples, WindowTokens, proxies, ranks, spearman

    # Feature 0 fires on one token id in one context, feature 1 on four ids in four contexts,
    # feature 2 never fires.
    ids = np.array([7, 7, 7, 7, 1, 2, 3, 4])
    context = np.array([0, 0, 0, 0, 1, 2, 3, 4])
    window = WindowTokens(ids, context)
    rows = torch.tensor([[0, 4, -1], [1, 5, -1], [2, 6, -1], [3, 7, -1]], dtype=torch.int32)
    ex = Examples(8, torch.where(rows >= 0, 1.0, 0.0), rows, torch.tensor([4, 4, 0]), torch.zeros(3, 3))
    p = proxies(ex, window)
    assert p["token_entropy"][0] == 0 and p["token_entropy"][1] == pytest.approx(2.0)
    assert p["context_spread"][0] == pytest.approx(0.25) and p["context_spread"][1] == pytest.approx(1.0)
    assert p["density"].tolist() == [0.5, 0.5, 0.0] and p["token_entropy"][2].isnan()
    assert ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert spearman(np.array([1.0, 2, 3, 4]), np.array([10.0, 20, 35, 40])) == pytest.approx(1.0)
    assert spearman(np.array([1.0, 2, 3, 4]), np.array([4.0, 3, 2, 1])) == pytest.approx(-1.0)
    assert spearman(np.array([1.0, np.nan]), np.array([1.0, 2.0])) is None
