import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import make_corpus
from univ import cache as cache_stage
from univ import models
from univ.cache import CacheConfig, build_token_store, run_cache
from univ.errors import UnivError
from univ.store import Store

ROOT = Path(__file__).resolve().parents[1]


def _cfg(assets, tmp_path, *names, **kw):
    base = dict(models=[str(assets[n]) for n in names], dataset=str(assets["corpus"]), tokens=1500,
                ctx_len=24, chunk_tokens=96, batch_size=3, cache_dir=tmp_path / "cache")
    return CacheConfig(**{**base, **kw})


def _store_files(cache_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(cache_dir)): p.read_bytes() for p in sorted(cache_dir.rglob("chunk-*"))}


def _manifests(cache_dir: Path) -> dict[str, dict]:
    out = {}
    for p in sorted(cache_dir.rglob("manifest.json")):
        m = json.loads(p.read_text())
        m.pop("seconds")  # wall time differs between runs; everything else must not
        out[str(p.relative_to(cache_dir))] = m
    return out


def test_cached_rows_are_the_models_residuals_at_kept_positions(assets, tmp_path):
    result = run_cache(_cfg(assets, tmp_path, "neox", "mamba"), progress=False)
    tstore = Store.read(result.tokens_store)
    assert tstore.complete and tstore.rows == 1500  # exactly the requested kept tokens
    tokens = torch.cat([tstore.read_chunk(i)["tokens"] for i in sorted(tstore.chunks)]).long()
    mask = torch.cat([tstore.read_chunk(i)["mask"] for i in sorted(tstore.chunks)])
    assert int(mask.sum()) == 1500
    assert not mask[:, 0].any() and (tokens[:, 0] == 0).all()  # BOS first, never kept
    for summary, name in zip(result.models, ["neox", "mamba"]):
        lm = models.load(str(assets[name]), device="cpu")
        expected = lm.resid(tokens, list(range(lm.n_layers)))
        if name == "neox":  # read through LayerNorm: stored centred, as TransformerLens caches it
            expected = expected - expected.mean(-1, keepdim=True)
        assert summary.rows == 1500 and summary.d_model == 32
        for layer in range(lm.n_layers):
            store = Store.read(Path(summary.store) / f"resid_post.{layer}")
            assert store.complete and store.config["tokens_store"] == result.tokens_key
            acts = torch.cat([store.read_chunk(i)["acts"] for i in sorted(store.chunks)])
            torch.testing.assert_close(acts, expected[layer][mask], rtol=1e-5, atol=1e-5)


def test_second_run_is_a_cache_hit_without_a_forward_pass(assets, tmp_path, monkeypatch):
    cfg = _cfg(assets, tmp_path, "mamba")
    first = run_cache(cfg, progress=False)
    before = _store_files(cfg.cache_dir)

    def no_model(*a, **k):
        raise AssertionError("a cache hit must not load the model")

    monkeypatch.setattr(cache_stage.models, "load_source", no_model)
    assert run_cache(cfg, progress=False) == first
    assert _store_files(cfg.cache_dir) == before


def test_layers_can_be_added_later(assets, tmp_path):
    cfg = _cfg(assets, tmp_path, "mamba", layers="1")
    run_cache(cfg, progress=False)
    cfg.layers = "all"
    summary = run_cache(cfg, progress=False).models[0]
    assert summary.layers == "0-2"
    assert all(Store.read(Path(summary.store) / f"resid_post.{i}").complete for i in range(3))


def test_corrupt_chunk_is_named_and_recomputed(assets, tmp_path, caplog):
    cfg = _cfg(assets, tmp_path, "neox")
    summary = run_cache(cfg, progress=False).models[0]
    before = _store_files(cfg.cache_dir)
    victim = Path(summary.store) / "resid_post.1" / "chunk-000002.safetensors"
    victim.write_bytes(victim.read_bytes()[:-10])  # truncated
    run_cache(cfg, progress=False)
    assert "chunk-000002.safetensors is corrupt" in caplog.text
    assert _store_files(cfg.cache_dir) == before


def test_token_store_resumes_after_its_last_complete_chunk(assets, tmp_path):
    cfg = _cfg(assets, tmp_path, "neox")
    tok = models.load_tokenizer(models.resolve(cfg.models[0]))
    _, full = build_token_store(cfg, tok, progress=False)
    reference, manifest = _store_files(cfg.cache_dir), _manifests(cfg.cache_dir)
    # What a kill after chunk 2 leaves: a manifest with chunks 0-2 and a half-written temporary.
    full.manifest["chunks"] = [c for c in full.manifest["chunks"] if c["index"] < 3]
    full.set_complete(False)
    for p in full.path.glob("chunk-*"):
        if int(p.stem.split("-")[1]) >= 3:
            p.unlink()
    (full.path / "chunk-000003.safetensors.tmp").write_bytes(b"partial")
    build_token_store(cfg, tok, progress=False)
    assert _store_files(cfg.cache_dir) == reference
    assert _manifests(cfg.cache_dir) == manifest
    assert not list(full.path.glob("*.tmp"))


def test_models_with_different_tokenizers_cannot_share_a_token_store(assets, tmp_path):
    with pytest.raises(UnivError, match="tiny-neox.*tiny-neox-othertok.*different tokenizers"):
        run_cache(_cfg(assets, tmp_path, "neox", "neox_other"), progress=False)
    assert not (tmp_path / "cache").exists()


def _cache_cmd(model: Path, corpus: Path, cache_dir: Path) -> list[str]:
    return [sys.executable, str(ROOT / "univ.py"), "cache", "-m", str(model), "--dataset", str(corpus),
            "--tokens", "1500", "--ctx-len", "16", "--chunk-tokens", "16", "--batch-contexts", "1",
            "--cache-dir", str(cache_dir), "--format", "json"]


def test_sigkill_then_resume_gives_the_uninterrupted_store(assets, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(make_corpus(300, seed=3)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen(_cache_cmd(assets["mamba"], corpus, killed), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        manifests = list(killed.glob("acts/*/*/resid_post.2/manifest.json"))
        try:
            if manifests and len(json.loads(manifests[0].read_text())["chunks"]) >= 5:
                break
        except (json.JSONDecodeError, FileNotFoundError):
            pass
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    partial = json.loads(manifests[0].read_text())
    assert not partial["complete"], "the run finished before it could be killed"

    resumed = subprocess.run(_cache_cmd(assets["mamba"], corpus, killed), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    run_cache(CacheConfig(models=[str(assets["mamba"])], dataset=str(corpus), tokens=1500, ctx_len=16,
                          chunk_tokens=16, batch_size=1, cache_dir=clean), progress=False)
    assert _store_files(killed) == _store_files(clean)
    assert _manifests(killed) == _manifests(clean)
    assert json.loads(resumed.stdout)["cache"][0]["rows"] == 1500


def test_a_pad_setting_does_not_split_the_token_store(assets, tmp_path):
    """Checkpoints sharing one tokenizer may differ in whether PAD is set (Pythia does not set it);
    they must still land on one token store, in whatever order they are cached."""
    from transformers import AutoTokenizer

    no_pad = tmp_path / "neox-no-pad"
    shutil.copytree(assets["neox"], no_pad)
    tok = AutoTokenizer.from_pretrained(no_pad)
    tok.pad_token = None
    tok.save_pretrained(no_pad)
    assert AutoTokenizer.from_pretrained(no_pad).pad_token_id is None
    first = run_cache(_cfg(assets, tmp_path, "mamba"), progress=False)
    second = run_cache(CacheConfig(models=[str(no_pad)], dataset=str(assets["corpus"]), tokens=1500, ctx_len=24,
                                   chunk_tokens=96, batch_size=3, cache_dir=tmp_path / "cache"), progress=False)
    assert first.tokens_key == second.tokens_key


def test_store_dtype_keeps_the_fp32_forward_and_stores_bf16(assets, tmp_path):
    """The study's setting: models in fp32, activations stored in bf16 (--store-dtype)."""
    plain = run_cache(_cfg(assets, tmp_path, "mamba", dtype="fp32", layers="1"), progress=False)
    stored = run_cache(_cfg(assets, tmp_path, "mamba", dtype="fp32", store_dtype="bf16", layers="1"), progress=False)
    assert stored.models[0].store != plain.models[0].store  # its own key
    a, b = (Store.read(Path(r.models[0].store) / "resid_post.1") for r in (plain, stored))
    assert b.config["store_dtype"] == "bfloat16" and b.config["dtype"] == "float32"
    assert "store_dtype" not in a.config  # the default keeps the keys stores had before the option
    for i in a.chunks:
        fp32, bf16 = a.read_chunk(i)["acts"], b.read_chunk(i)["acts"]
        assert fp32.dtype == torch.float32 and bf16.dtype == torch.bfloat16
        assert torch.equal(fp32.to(torch.bfloat16), bf16)


def test_gpt_neox_streams_are_centred_as_transformer_lens_leaves_them(assets, tmp_path):
    """The per-token mean over d_model of a GPT-NeoX residual stream is invisible to the model
    (every block and the final norm read it through LayerNorm), so centring it, as
    TransformerLens' default processing does and as the authors cached Pythia, loses nothing.
    Mamba reads through RMSNorm, which sees the mean: never centred. --centre none stores raw."""
    lm = models.load(str(assets["neox"]), device="cpu")
    tokens = torch.randint(3, 300, (2, 12))
    centre = lambda h: h - h.mean(-1, keepdim=True)  # noqa: E731
    with torch.no_grad():
        torch.testing.assert_close(lm.logits(tokens, {0: centre}), lm.logits(tokens), rtol=1e-4, atol=1e-5)
    centred = run_cache(_cfg(assets, tmp_path, "neox", "mamba", layers="1"), progress=False)
    raw = run_cache(_cfg(assets, tmp_path, "neox", "mamba", layers="1", centre="none"), progress=False)
    neox = [Store.read(Path(r.models[0].store) / "resid_post.1") for r in (centred, raw)]
    mamba = [Store.read(Path(r.models[1].store) / "resid_post.1") for r in (centred, raw)]
    assert neox[0].config["centred"] and "centred" not in neox[1].config and neox[0].path != neox[1].path
    assert mamba[0].path == mamba[1].path and "centred" not in mamba[0].config
    for i in neox[0].chunks:
        c, r = neox[0].read_chunk(i)["acts"], neox[1].read_chunk(i)["acts"]
        torch.testing.assert_close(c, r - r.mean(-1, keepdim=True))
        assert r.mean(-1).abs().max() > 1e-3


def test_the_cpu_scan_path_is_part_of_a_mamba_stores_key(assets, tmp_path, monkeypatch):
    """--cpu-scan compiled gives Mamba's stores their own key and config entry (its last bits
    differ); the default and GPT-NeoX keep theirs."""
    seen = []
    real = cache_stage.scan_compiled.mode

    def spy(name):
        seen.append(name)
        return real(name)

    monkeypatch.setattr(cache_stage.scan_compiled, "mode", spy)
    eager = run_cache(_cfg(assets, tmp_path, "neox", "mamba", layers="1"), progress=False)
    assert set(seen) == {"eager"}
    seen.clear()
    compiled = run_cache(_cfg(assets, tmp_path, "neox", "mamba", layers="1", cpu_scan="compiled"), progress=False)
    assert set(seen) == {"compiled"}  # Mamba's forward ran under the compiled path
    assert compiled.models[0].store == eager.models[0].store  # GPT-NeoX has no scan
    assert compiled.models[1].store != eager.models[1].store
    assert Store.read(Path(compiled.models[1].store) / "resid_post.1").config["cpu_scan"] == "compiled"


def test_documents_cut_at_ctx_len_are_counted(assets, tmp_path, caplog):
    """One context per document, cut at --ctx-len (as the study did): how many documents and
    tokens that leaves out is said on stderr and kept in the token store's manifest."""
    tokenizer = assets["tokenizer"]
    for ctx_len in (8, 64):
        cfg = _cfg(assets, tmp_path / str(ctx_len), "neox", tokens=300, ctx_len=ctx_len)
        with caplog.at_level("INFO", logger="univ"):
            result = run_cache(cfg, progress=False)
        chunks = Store.read(result.tokens_store).chunks.values()
        cut_docs, cut_tokens = sum(c["cut_docs"] for c in chunks), sum(c["cut_tokens"] for c in chunks)
        contexts = sum(c["contexts"] for c in chunks)
        longest = max(len(ids) for ids in tokenizer(assets["docs"], add_special_tokens=False)["input_ids"])
        if ctx_len > longest:
            assert cut_docs == cut_tokens == 0 and "were cut" not in caplog.text
        else:
            assert 0 < cut_docs <= contexts and cut_tokens >= cut_docs
            assert f"{cut_docs} of {contexts} documents were longer than --ctx-len {ctx_len}" in caplog.text
        caplog.clear()
