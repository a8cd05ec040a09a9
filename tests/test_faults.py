"""Faults: a kill at every atomic-write boundary, damaged result files, links planted in the cache."""

import json
import os

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
