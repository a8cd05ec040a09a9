import json

import numpy as np
import pytest

from univ.data import DataConfig, iter_contexts, iter_texts
from univ.errors import UnivError
from univ.store import Store


def test_txt_documents_are_blank_line_separated(tmp_path):
    (tmp_path / "a.txt").write_text("one doc\nstill one\n\n\ntwo\n\nthree\n")
    assert sorted(iter_texts(DataConfig(str(tmp_path / "a.txt")))) == ["one doc\nstill one", "three", "two"]


def test_jsonl_parquet_and_folders(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate("ab")))
    pq.write_table(pa.table({"body": ["c", "d", None]}), tmp_path / "d" / "y.parquet")
    assert sorted(iter_texts(DataConfig(str(tmp_path / "d" / "x.jsonl")))) == ["a", "b"]
    assert sorted(iter_texts(DataConfig(str(tmp_path / "d" / "y.parquet"), text_field="body"))) == ["c", "d"]
    with pytest.raises(UnivError, match="field"):
        list(iter_texts(DataConfig(str(tmp_path / "d"), text_field="body")))


def test_order_is_seeded(assets):
    a = list(iter_texts(DataConfig(str(assets["corpus"]), seed=1)))
    assert a == list(iter_texts(DataConfig(str(assets["corpus"]), seed=1)))
    assert a != list(iter_texts(DataConfig(str(assets["corpus"]), seed=2)))
    assert sorted(a) == sorted(assets["docs"])


def test_missing_dataset_path(tmp_path):
    with pytest.raises(UnivError, match="does not exist"):
        list(iter_texts(DataConfig(str(tmp_path / "nope.txt"))))


def test_contexts_prepend_bos_cut_and_mask(assets):
    tok = assets["tokenizer"]
    long_doc = " ".join(["river stone"] * 40)
    texts = ["a cat<|endoftext|>sat", long_doc, ""]
    out = list(iter_contexts(iter(texts), tok, 16, bos=0, pad=1, drop=[0, 1]))
    assert [n for n, _ in out] == [1, 2, 3]
    first, second, empty = (c for _, c in out)
    assert empty is None  # a document with no kept token yields no context
    ids = tok("a cat<|endoftext|>sat", add_special_tokens=False)["input_ids"]
    assert first.tokens[0] == 0 and list(first.tokens[1:1 + len(ids)]) == ids
    assert (first.tokens[1 + len(ids):] == 1).all()  # padded
    expected = np.zeros(16, bool)
    expected[1:1 + len(ids)] = np.array(ids) != 0  # the EOS inside the text is dropped too
    assert (first.mask == expected).all()
    assert second.mask[1:].all() and not second.mask[0]  # cut at ctx_len, BOS dropped
    assert list(second.tokens[1:]) == tok(long_doc, add_special_tokens=False)["input_ids"][:15]


def test_a_hub_dataset_with_a_loading_script_is_read_from_its_parquet_conversion(assets, tmp_path, monkeypatch,
                                                                                   caplog):
    """datasets >= 4 refuses script datasets (Skylion007/openwebtext among them): univ reads the
    Hub's parquet conversion instead, says so once, and keys the token store by that revision."""
    from types import SimpleNamespace

    from univ import data as data_mod
    from univ.cache import CacheConfig, run_cache

    docs = [{"text": d} for d in assets["docs"]]
    calls = []

    class Stream(list):
        def shuffle(self, seed, buffer_size):
            return self

    def load_dataset(name, split, revision=None, streaming=False):
        calls.append(revision)
        if revision is None:
            raise RuntimeError("Dataset scripts are no longer supported, but found owt.py")
        assert revision == data_mod.PARQUET_REVISION and split == "train" and streaming
        return Stream(docs)

    monkeypatch.setattr(data_mod, "_datasets", lambda: SimpleNamespace(load_dataset=load_dataset))
    data_mod.resolved.cache_clear()
    caplog.set_level("WARNING", logger="univ")
    cfg = CacheConfig(models=[str(assets["neox"])], dataset="someone/owt-with-a-script", tokens=500, ctx_len=24,
                      cache_dir=tmp_path / "cache")
    for _ in range(2):
        result = run_cache(cfg, progress=False)
    store = Store.read(result.tokens_store)
    assert store.complete and store.rows == 500
    assert store.config["data"]["revision"] == data_mod.PARQUET_REVISION
    assert [r.message for r in caplog.records].count(
        "someone/owt-with-a-script ships a loading script, which datasets no longer runs; reading its parquet "
        "conversion (revision refs/convert/parquet) instead") == 1
    assert calls.count(None) == 1
    data_mod.resolved.cache_clear()
