"""Corpus reading and tokenization into fixed-length contexts with one shared keep-mask.

A context is one document: BOS, then the document's tokens, cut at ``ctx_len`` and padded.
The mask keeps every real token that is not BOS, EOS or PAD, so that two models reading the
same contexts produce activations for the same tokens, row for row.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import hub
from .errors import UnivError

log = logging.getLogger("univ")
_WARNED: set[Path] = set()

LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
HF_SHUFFLE_BUFFER = 10_000
TOKENIZE_BATCH = 64
PARQUET_REVISION = "refs/convert/parquet"
"""The Hub's parquet conversion of a dataset, readable where its loading script no longer is."""


@dataclass(frozen=True)
class DataConfig:
    """What text to read and how to cut it; all of it is part of the token store's key."""

    dataset: str
    """Hugging Face dataset name, or a local .txt / .jsonl / .parquet file or folder of them."""
    split: str = "train"
    """Dataset split (Hugging Face datasets only)."""
    revision: str | None = None
    """Dataset revision on the Hub, e.g. 'refs/convert/parquet' for a script-based dataset."""
    text_field: str = "text"
    """Field holding the text (.jsonl, .parquet and Hugging Face datasets)."""
    ctx_len: int = 1024
    """Tokens per context, BOS included; longer documents are cut."""
    seed: int = 42
    """Seed of the document order."""


def is_local(dataset: str) -> bool:
    return Path(dataset).expanduser().exists() or dataset.startswith((".", "/", "~")) or dataset.endswith(LOCAL_SUFFIXES)


def _local_files(root: Path) -> list[Path]:
    if root.is_file():
        files = [root]
    else:
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
    for f in files:
        if f.suffix not in LOCAL_SUFFIXES:
            raise UnivError(f"{f}: unsupported file type (use {', '.join(LOCAL_SUFFIXES)})")
    return files


def _read_local(path: Path, text_field: str) -> list[str]:
    """.txt: documents separated by blank lines; .jsonl: one object per line; .parquet: a column."""
    if path.suffix == ".txt":
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if path not in _WARNED:
                _WARNED.add(path)
                log.warning("%s is not valid UTF-8 (first at byte %d); undecodable bytes are replaced", path, e.start)
            text = raw.decode("utf-8", errors="replace")
        return [d.strip() for d in text.replace("\r\n", "\n").split("\n\n") if d.strip()]
    if path.suffix == ".jsonl":
        docs = []
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise UnivError(f"{path} is not UTF-8 text (byte {e.start}); JSON Lines must be UTF-8") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)[text_field]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UnivError(f"{path}:{n}: not a JSON object with a {text_field!r} field") from None
            if not isinstance(doc, str):
                raise UnivError(f"{path}:{n}: {text_field!r} is a {type(doc).__name__}, not text")
            docs.append(doc)
        return docs
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=[text_field])
    except Exception as e:  # pyarrow raises several types for a bad file or column
        raise UnivError(f"{path}: cannot read column {text_field!r}: {e}".splitlines()[0]) from None
    docs = [t for t in table.column(text_field).to_pylist() if t is not None]
    if any(not isinstance(t, str) for t in docs):
        raise UnivError(f"{path}: column {text_field!r} is not text ({table.schema.field(text_field).type})")
    return [t for t in docs if t]


def iter_texts(cfg: DataConfig) -> Iterator[str]:
    """Documents in a seeded order. Local corpora are read whole and shuffled; Hub datasets stream."""
    if is_local(cfg.dataset):
        root = Path(cfg.dataset).expanduser()
        if not root.exists():
            raise UnivError(f"dataset path {cfg.dataset!r} does not exist")
        docs = [d for f in _local_files(root) for d in _read_local(f, cfg.text_field)]
        random.Random(cfg.seed).shuffle(docs)
        yield from docs
        return
    yield from _iter_hub(cfg)


def _datasets():
    try:
        import datasets
    except ImportError:
        raise UnivError("reading a Hugging Face dataset needs the 'datasets' package (pip install datasets)") from None
    return datasets


def _refuses_scripts(e: Exception) -> bool:
    return isinstance(e, RuntimeError) and "Dataset scripts are no longer supported" in str(e)


@functools.lru_cache(maxsize=None)
def resolved(cfg: DataConfig) -> DataConfig:
    """The revision that will be read: a Hub dataset that still ships a loading script (as
    Skylion007/openwebtext, the study's corpus) is refused by datasets >= 4, so its parquet
    conversion is read instead, said once. Local corpora and given revisions are left as they are."""
    if is_local(cfg.dataset) or cfg.revision is not None:
        return cfg
    hub.go_offline_unless_reachable()
    try:
        _datasets().load_dataset(cfg.dataset, split=cfg.split, streaming=True)
    except Exception as e:  # any other failure is reported when the dataset is read
        if _refuses_scripts(e):
            log.warning("%s ships a loading script, which datasets no longer runs; reading its parquet conversion "
                        "(revision %s) instead", cfg.dataset, PARQUET_REVISION)
            return dataclasses.replace(cfg, revision=PARQUET_REVISION)
    return cfg


def _iter_hub(cfg: DataConfig) -> Iterator[str]:
    hub.go_offline_unless_reachable()
    datasets = _datasets()
    try:
        ds = datasets.load_dataset(cfg.dataset, split=cfg.split, revision=cfg.revision, streaming=True)
        ds = ds.shuffle(seed=cfg.seed, buffer_size=HF_SHUFFLE_BUFFER)
        for row in ds:
            if cfg.text_field not in row:
                raise UnivError(f"dataset {cfg.dataset!r} has no field {cfg.text_field!r} (use --text-field)")
            yield row[cfg.text_field]
    except UnivError:
        raise
    except Exception as e:  # datasets wraps network and format errors in many types
        if hub.unreachable():
            raise UnivError(f"dataset {cfg.dataset!r} is not in the local Hugging Face cache and the Hub cannot be "
                            f"reached from this machine; {hub.OFFLINE_HINT}") from None
        raise UnivError(f"cannot read dataset {cfg.dataset!r}: {type(e).__name__}: {e}".splitlines()[0]) from None


class Context:
    """One row of the token store: ``tokens`` int32 [ctx_len] and ``mask`` bool [ctx_len]."""

    __slots__ = ("tokens", "mask", "cut")

    def __init__(self, tokens: np.ndarray, mask: np.ndarray, cut: int = 0):
        self.tokens = tokens
        self.mask = mask
        self.cut = cut
        """Tokens of the document beyond ctx_len, dropped."""


def iter_contexts(texts: Iterator[str], tokenizer, ctx_len: int, bos: int, pad: int,
                  drop: list[int]) -> Iterator[tuple[int, Context | None]]:
    """(documents consumed so far, context) per document; None for a document with no kept token."""
    drop_arr = np.asarray(drop, dtype=np.int64)
    n_docs = 0
    batch: list[str] = []

    def flush():
        nonlocal n_docs
        # verbose=False: transformers' warning about the model's maximum length does not apply here,
        # where every document is cut at ctx_len on purpose.
        ids_list = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"] if batch else []
        for ids in ids_list:
            n_docs += 1
            row = np.full(ctx_len, pad, dtype=np.int32)
            seq = [bos, *ids[: ctx_len - 1]]
            row[: len(seq)] = seq
            mask = np.zeros(ctx_len, dtype=bool)
            mask[: len(seq)] = ~np.isin(row[: len(seq)], drop_arr)
            yield n_docs, (Context(row, mask, max(0, len(ids) - (ctx_len - 1))) if mask.any() else None)
        batch.clear()

    for text in texts:
        batch.append(text)
        if len(batch) == TOKENIZE_BATCH:
            yield from flush()
    yield from flush()
