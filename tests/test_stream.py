"""SAEs trained on activations streamed off a model: the same SAEs as from a store of the same rows,
documents disjoint from the MPPC window and the held-out rows, exact resumption, groups of layers."""

import dataclasses

import pytest
import torch

from conftest import make_corpus
from univ import models, stream, trainer
from univ.cache import CacheConfig
from univ.data import DataConfig, iter_texts
from univ.fit import FitConfig, LayerData, fit, fit_stream
from univ.sae import SAE
from univ.store import Store

LAYERS = [0, 2]


def _setup(assets, tmp_path, corpus=None, **kw):
    src = models.resolve(str(assets["mamba"]))
    data = CacheConfig(models=[str(assets["mamba"])], dataset=str(corpus or assets["big_corpus"]), tokens=2000,
                       ctx_len=24, device="cpu", cache_dir=tmp_path / "cache")
    cfg = FitConfig(arch="topk", k=4, expansion=2, batch_size=128, window_rows=1024, train_tokens=4096,
                    eval_tokens=1000, batch_contexts=8, lr=3e-3, checkpoint_minutes=0, device="cpu", **kw)
    return src, data, cfg


def _weights(results):
    return {r.layer: SAE.load(r.path).state_dict() for r in results}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for layer in a:
        for name, tensor in a[layer].items():
            torch.testing.assert_close(b[layer][name], tensor, rtol=0, atol=0, msg=f"layer {layer} {name}")


def _source(results, data, tokenizer, batch_contexts=8):
    first_doc = SAE.load(results[0].path).cfg.store["stream"]["first_doc"]
    return stream.source(DataConfig(data.dataset, ctx_len=data.ctx_len, seed=data.seed), first_doc, tokenizer,
                         batch_contexts)


def test_streamed_training_equals_training_on_a_store_of_the_same_rows(assets, tmp_path):
    src, data, cfg = _setup(assets, tmp_path)
    streamed = fit_stream(cfg, src, data, LAYERS, tmp_path / "cache", progress=False)
    assert [r.train_tokens for r in streamed] == [4096, 4096]
    lm = models.load(str(assets["mamba"]), device="cpu")
    rows = {layer: [] for layer in LAYERS}
    for (window, _), _ in zip(stream.windows(lm, _source(streamed, data, lm.tokenizer), LAYERS, 1024), range(4)):
        for layer in LAYERS:
            rows[layer].append(window[layer])
    stores = []
    g = torch.Generator().manual_seed(0)
    for layer in LAYERS:
        x = torch.cat(rows[layer] + [torch.randn(455, 32, generator=g)])  # 455 held-out rows: a tenth
        store = Store.open_or_create(tmp_path / "stores" / f"resid_post.{layer}", "acts", {"layer": layer})
        for c, s in enumerate(range(0, len(x), 1500)):  # chunks that do not line up with the windows
            store.write_chunk(c, {"acts": x[s:s + 1500]}, rows=len(x[s:s + 1500]))
        store.set_complete(True)
        stores.append(LayerData(layer, store, tmp_path / "saes" / str(layer)))
    stored = fit(dataclasses.replace(cfg, eval_tokens=455), stores, progress=False)
    _assert_same(_weights(streamed), _weights(stored))


def test_training_documents_are_disjoint_from_the_window_and_the_held_out_rows(assets, tmp_path):
    corpus = tmp_path / "numbered.txt"  # every document unique, so that documents can be told apart
    corpus.write_text("\n\n".join(f"{i} {doc}" for i, doc in enumerate(make_corpus(400, seed=3))) + "\n")
    src, data, cfg = _setup(assets, tmp_path, corpus)
    results = fit_stream(dataclasses.replace(cfg, train_tokens=1024), src, data, [0], tmp_path / "cache",
                         progress=False)
    ident = SAE.load(results[0].path).cfg.store["stream"]

    def documents(key):
        tstore = Store.read(tmp_path / "cache" / "tokens" / key)
        out = set()
        for i in sorted(tstore.chunks):
            chunk = tstore.read_chunk(i)
            out |= {tuple(t[m].tolist()) for t, m in zip(chunk["tokens"], chunk["mask"]) if m.any()}
        return out

    window, held_out = documents(ident["window_tokens"]), documents(ident["held_out_tokens"])
    lm = models.load(str(assets["mamba"]), device="cpu")
    source = _source(results, data, lm.tokenizer)
    trained, wrapped = set(), None
    for pos, tokens, mask in stream._batches(source, lm.tokenizer, stream.START):
        if pos.passes == 1:
            wrapped = {tuple(t[m].tolist()) for t, m in zip(tokens, mask)}
            break
        trained |= {tuple(t[m].tolist()) for t, m in zip(tokens, mask)}
    assert window and held_out and trained
    assert not window & held_out and not window & trained and not held_out & trained
    assert wrapped <= trained  # the second pass reads the training documents again, and only them
    n_docs = len(list(iter_texts(DataConfig(str(corpus), seed=data.seed))))
    assert len(window) + len(held_out) + len(trained) > 0.95 * n_docs  # (a pass drops its last short batch)


def test_a_killed_stream_resumes_to_the_same_weights(assets, tmp_path, monkeypatch):
    src, data, cfg = _setup(assets, tmp_path)
    clean = _weights(fit_stream(cfg, src, data, LAYERS, tmp_path / "clean", progress=False))
    real, calls = trainer._train_window, []

    def dies_in_the_second_window(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(trainer, "_train_window", dies_in_the_second_window)
    with pytest.raises(KeyboardInterrupt):
        fit_stream(cfg, src, data, LAYERS, tmp_path / "killed", progress=False)
    checkpoints = list((tmp_path / "killed").rglob("checkpoint.safetensors"))
    assert len(checkpoints) == 2
    monkeypatch.setattr(trainer, "_train_window", real)
    resumed = fit_stream(cfg, src, data, LAYERS, tmp_path / "killed", progress=False)
    _assert_same(clean, _weights(resumed))
    assert not list((tmp_path / "killed").rglob("checkpoint.safetensors"))


def test_groups_of_layers_give_the_same_saes_as_one_group(assets, tmp_path, monkeypatch):
    src, data, cfg = _setup(assets, tmp_path)
    passes = []
    real = stream.windows
    monkeypatch.setattr(stream, "windows", lambda lm, source, layers, *a, **k: passes.append(layers) or real(
        lm, source, layers, *a, **k))
    one = _weights(fit_stream(cfg, src, data, LAYERS, tmp_path / "one", progress=False))
    assert all(layers == LAYERS for layers in passes)
    passes.clear()
    each = _weights(fit_stream(dataclasses.replace(cfg, group_layers=1), src, data, LAYERS, tmp_path / "each",
                               progress=False))
    assert {tuple(layers) for layers in passes} == {(0,), (2,)}
    _assert_same(one, each)
