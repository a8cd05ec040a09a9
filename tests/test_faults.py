"""Faults: a kill at every atomic-write boundary, damaged result files, links planted in the cache."""

import json
import os
from pathlib import Path

import pytest
import torch

from univ import files, models
from univ.cache import CacheConfig
from univ.circuit import CircuitConfig
from univ.fit import FitConfig, fit_stream
from univ.induction import induction_path, run_induction
from univ.sae import SAE

from test_cli import assert_one_line_error, run


class Killed(BaseException):
    """What a SIGKILL looks like to the code after it: nothing more runs."""


def _stream_fit(assets, cache_dir):
    src = models.resolve(str(assets["mamba"]))
    data = CacheConfig(models=[str(assets["mamba"])], dataset=str(assets["big_corpus"]), tokens=1000, ctx_len=24,
                       device="cpu", cache_dir=cache_dir)
    cfg = FitConfig(arch="topk", k=4, expansion=2, batch_size=128, window_rows=512, train_tokens=1536,
                    eval_tokens=500, batch_contexts=8, checkpoint_minutes=0, device="cpu")
    return fit_stream(cfg, src, data, [0, 2], cache_dir, progress=False)


def _weights(results):
    return {r.layer: SAE.load(r.path).state_dict() for r in results}


@pytest.mark.parametrize("when", ["before the rename", "after the rename"])
def test_a_kill_at_any_write_resumes_to_the_same_saes(assets, tmp_path, monkeypatch, when):
    """fit-sae --model, killed at each of its writes in turn (token stores, checkpoints, SAEs,
    metrics), then run again: the same SAEs and metrics as a run never killed."""
    clean = _stream_fit(assets, tmp_path / "clean")
    real = files.write_bytes
    writes = []

    def count(path, data):
        writes.append(path)
        real(path, data)

    monkeypatch.setattr(files, "write_bytes", count)
    _stream_fit(assets, tmp_path / "counted")
    assert len(writes) > 10
    for n in range(len(writes)):
        calls = []

        def dies(path, data, n=n):
            calls.append(path)
            if len(calls) == n + 1 and when == "before the rename":
                raise Killed
            real(path, data)
            if len(calls) == n + 1:
                raise Killed

        cache = tmp_path / f"killed-{n}"
        monkeypatch.setattr(files, "write_bytes", dies)
        with pytest.raises(Killed):
            _stream_fit(assets, cache)
        monkeypatch.setattr(files, "write_bytes", real)
        resumed = _stream_fit(assets, cache)
        assert [r._replace(path="") for r in resumed] == [r._replace(path="") for r in clean], n
        for layer, state in _weights(clean).items():
            for name, tensor in state.items():
                assert torch.equal(_weights(resumed)[layer][name], tensor), (n, layer, name)


def test_a_cache_killed_at_any_write_resumes_to_the_same_bytes(assets, tmp_path, monkeypatch):
    """univ cache of both families, killed at each of its writes in turn, then run again: every
    file of the cache holds the bytes an uninterrupted run wrote (manifests but their timings)."""
    from univ.cache import run_cache

    def cfg(cache):
        return CacheConfig(models=[str(assets["neox"]), str(assets["mamba"])], dataset=str(assets["corpus"]),
                           tokens=600, ctx_len=24, chunk_tokens=96, layers="0,1", cache_dir=cache)

    def contents(cache):
        out = {}
        for p in sorted(cache.rglob("*")):
            if p.is_file() and p.name != ".lock":
                data = json.loads(p.read_text()) if p.suffix == ".json" else p.read_bytes()
                if isinstance(data, dict):
                    data.pop("seconds", None)
                out[str(p.relative_to(cache))] = data
        return out

    run_cache(cfg(tmp_path / "clean"), progress=False)
    clean = contents(tmp_path / "clean")
    real, n_writes = files.write_bytes, []
    monkeypatch.setattr(files, "write_bytes", lambda p, d: n_writes.append(p) or real(p, d))
    run_cache(cfg(tmp_path / "counted"), progress=False)
    for n in range(len(n_writes)):
        calls = []

        def dies(path, data, n=n):
            calls.append(path)
            if len(calls) == n + 1:
                raise Killed
            real(path, data)

        monkeypatch.setattr(files, "write_bytes", dies)
        with pytest.raises(Killed):
            run_cache(cfg(tmp_path / f"killed-{n}"), progress=False)
        monkeypatch.setattr(files, "write_bytes", real)
        run_cache(cfg(tmp_path / f"killed-{n}"), progress=False)
        assert contents(tmp_path / f"killed-{n}") == clean, n


def _files_outside(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("not univ's to write")
    return outside


def test_unreadable_result_files_are_computed_again(assets, tmp_path):
    results = _stream_fit(assets, tmp_path / "c")
    out = results[0].path
    with open(f"{out}/metrics.json", "w") as f:
        f.write('{"l0": 1.')  # a write cut short by an older univ or a full disk
    again = _stream_fit(assets, tmp_path / "c")
    assert again == results and json.loads(open(f"{out}/metrics.json").read())["l0"] == pytest.approx(results[0].l0, abs=0.01)
    lm = models.load(str(assets["mamba"]), device="cpu")
    cfg = CircuitConfig(n_seqs=4, seq_len=12, device="cpu")
    first = run_induction(lm, cfg, tmp_path / "c")
    path = induction_path(tmp_path / "c", lm, cfg)
    path.write_text(path.read_text()[:40])
    assert run_induction(lm, cfg, tmp_path / "c") == first


def test_links_planted_in_the_cache_are_never_written_through(assets, tmp_path, capsys):
    outside = _files_outside(tmp_path)
    cache = tmp_path / "cache"
    args = ["cache", "-m", assets["mamba"], "--dataset", assets["corpus"], "--tokens", "500", "--ctx-len", "24",
            "--cache-dir", cache, "--format", "json"]
    assert run(capsys, *args)[0] == 0
    store = next((cache / "acts").glob("*/*/resid_post.0"))
    # Links where earlier univs put their temporary files, and in place of a result file.
    for name in ("manifest.json.tmp", "chunk-000000.safetensors.tmp"):
        os.symlink(outside, store / name)
    (store / "chunk-000000.safetensors").unlink()  # damaged: it must be written again
    assert run(capsys, *args)[0] == 0
    assert outside.read_text() == "not univ's to write"
    assert (store / "chunk-000000.safetensors").is_file() and not (store / "chunk-000000.safetensors").is_symlink()
    # A link in place of the lock is refused, in one line, and its target left alone.
    (store.parent / ".lock").unlink()
    os.symlink(outside, store.parent / ".lock")
    assert_one_line_error(*run(capsys, *args, "--force"), "a link there is refused")
    assert outside.read_text() == "not univ's to write"


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _sae_on_a_store(tmp_path, name, seed, config):
    from univ.sae import SAEConfig
    from univ.store import Store

    store_dir = tmp_path / "acts" / "resid_post.0"
    if not (store_dir / "manifest.json").exists():
        g = torch.Generator().manual_seed(0)
        store = Store.open_or_create(store_dir, "acts", config)
        store.write_chunk(0, {"acts": torch.randn(2000, 16, generator=g) * 3}, rows=2000)
        store.set_complete(True)
    sae = SAE(SAEConfig(arch="relu", d_in=16, d_sae=32, l1=1.0, seed=seed,
                        store={"path": str(store_dir), "config": config}))
    g = torch.Generator().manual_seed(seed)
    sae.initialise(torch.randn(500, 16, generator=g), g)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.5, generator=g)
    sae.save(tmp_path / name / "0")
    return tmp_path / name


def test_match_keys_saes_by_content_and_refuses_another_models_saes(tmp_path):
    from univ.errors import UnivError
    from univ.match import MatchConfig, compare
    from univ.match_stage import path_side

    config = {"model": {"ref": "m"}, "hook": "resid_post.0", "layer": 0, "tokens_store": "t"}
    one = _sae_on_a_store(tmp_path, "saes-one", 1, config)
    two = _sae_on_a_store(tmp_path, "saes-two", 2, config)
    cfg = MatchConfig(device="cpu")
    raw = path_side("raw", tmp_path / "acts", None, "all", cfg)
    first = compare("main", path_side("a", tmp_path / "acts", one, "all", cfg), raw, cfg, tmp_path / "out", progress=False)
    second = compare("main", path_side("a", tmp_path / "acts", two, "all", cfg), raw, cfg, tmp_path / "out", progress=False)
    assert first.path != second.path and not torch.equal(first.a_value, second.a_value)
    other = _sae_on_a_store(tmp_path / "elsewhere", "saes", 3, {**config, "model": {"ref": "another-model"}})
    with pytest.raises(UnivError, match="was trained on another-model resid_post.0, but .* holds m resid_post.0"):
        path_side("a", tmp_path / "acts", other, "all", cfg)
    # A flipped byte in a cached result is noticed and the result computed again.
    _flip_a_byte(Path(first.path) / "mppc.safetensors")
    again = compare("main", path_side("a", tmp_path / "acts", one, "all", cfg), raw, cfg, tmp_path / "out", progress=False)
    assert torch.equal(again.a_value, first.a_value)


def test_a_damaged_sae_is_refused_on_load_and_trained_again(assets, tmp_path, caplog):
    from univ.errors import UnivError

    results = _stream_fit(assets, tmp_path / "c")
    weights = Path(results[0].path) / "sae.safetensors"
    _flip_a_byte(weights)
    with pytest.raises(UnivError, match="is corrupt"):
        SAE.load(results[0].path)
    caplog.set_level("WARNING", logger="univ")
    again = _stream_fit(assets, tmp_path / "c")
    assert any("is damaged" in r.message for r in caplog.records)
    assert again == results and SAE.intact(results[0].path)


def test_edited_manifests_are_not_believed(assets, tmp_path, caplog):
    """A chunk's rows must be what its manifest says and, for activations, its token chunk's kept
    tokens; a token store marked complete must hold its tokens."""
    from univ.cache import run_cache
    from univ.store import Store

    cfg = CacheConfig(models=[str(assets["mamba"])], dataset=str(assets["corpus"]), tokens=1500, ctx_len=24,
                      chunk_tokens=96, layers="0", cache_dir=tmp_path / "c")
    first = run_cache(cfg, progress=False)
    acts = Store.read(Path(first.models[0].store) / "resid_post.0")
    expected = acts.read_chunk(1)["acts"]
    acts.manifest["chunks"][1]["rows"] += 1  # a hand-edited row count
    acts.save_manifest()
    tokens = Store.read(first.tokens_store)
    tokens.manifest["chunks"].pop()  # the last entry lost, the store still marked complete
    tokens.save_manifest()
    caplog.set_level("WARNING", logger="univ")
    again = run_cache(cfg, progress=False)
    messages = " ".join(r.message for r in caplog.records)
    assert "holds" in messages and "rows, its manifest says" in messages
    assert "is marked complete but does not hold its 1500 tokens" in messages
    assert Store.read(again.tokens_store).rows == 1500
    torch.testing.assert_close(Store.read(Path(again.models[0].store) / "resid_post.0").read_chunk(1)["acts"], expected)
