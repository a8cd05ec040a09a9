"""Activations streamed off a model, for training SAEs without a store on disk.

The corpus is read in one seeded document order and cut into three consecutive, disjoint runs
of documents:

1. the MPPC window: the token store `univ cache` builds (``tokens`` kept tokens);
2. the held-out rows: a second token store of ``eval_tokens`` kept tokens, starting at the first
   document after the window (SAE metrics and LM loss recovered are measured there);
3. the training stream: every document after those, read again from its start when the corpus
   runs out (a warning says how often).

The stream runs the model over batches of contexts and yields *windows*: ``window_rows``
consecutive kept rows of every layer asked for, which the trainer permutes (seeded by the
window's index) and cuts into batches, so that a batch mixes the rows of many documents.
A window ends wherever its rows run out, mid-batch; the position of the next row (the pass
over the corpus, the documents before its forward batch, the rows of that batch already used)
is all a checkpoint needs to resume the stream exactly: forward batches always start at the
same documents, so they compute the same numbers.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch

from . import models
from .data import DataConfig, iter_contexts, iter_texts
from .errors import UnivError

log = logging.getLogger("univ")


class Position(NamedTuple):
    """Where the next row of the stream comes from."""

    passes: int
    """Completed passes over the training documents."""
    docs: int
    """Training documents before the forward batch holding the next row."""
    rows: int
    """Rows of that batch already used."""


START = Position(0, 0, 0)


class Source(NamedTuple):
    """What the stream reads: the corpus from a document on, and how it is cut into contexts."""

    data: DataConfig
    first_doc: int
    """Documents of the corpus before the training stream (the window and the held-out rows)."""
    bos: int
    pad: int
    drop: list[int]
    batch_contexts: int
    """Contexts per forward pass."""


def source(data: DataConfig, first_doc: int, tokenizer, batch_contexts: int) -> Source:
    return Source(data, first_doc, models.bos_id(tokenizer), models.bos_id(tokenizer), models.special_ids(tokenizer),
                  batch_contexts)


def _batches(src: Source, tokenizer, start: Position) -> Iterator[tuple[Position, np.ndarray, np.ndarray]]:
    """(position of the batch's first row, tokens, mask) per forward batch, pass after pass. A
    pass's last, short batch is dropped, so that every pass cuts the same batches."""
    passes, skip = start.passes, start.docs
    while True:
        texts = itertools.islice(iter_texts(src.data), src.first_doc + skip, None)
        docs_before, batch, yielded = skip, [], 0
        for n_docs, ctx in iter_contexts(texts, tokenizer, src.data.ctx_len, src.bos, src.pad, src.drop):
            if ctx is None:
                continue
            batch.append(ctx)
            if len(batch) == src.batch_contexts:
                yield Position(passes, docs_before, 0), np.stack([c.tokens for c in batch]), np.stack([c.mask for c in batch])
                docs_before, batch, yielded = skip + n_docs, [], yielded + 1
        if skip == 0 and not yielded:
            raise UnivError(f"dataset {src.data.dataset!r} holds fewer than {src.batch_contexts} documents after "
                            "the MPPC window and the held-out rows: nothing to train on (use a larger corpus, "
                            "fewer --tokens or --sae-eval-tokens)")
        if passes == start.passes:
            log.warning("the SAE training stream reached the end of %s; it reads its training documents "
                        "again (pass %d; later passes are not reported)", src.data.dataset, passes + 2)
        passes, skip = passes + 1, 0


def windows(lm: models.LM, src: Source, layers: list[int], window_rows: int, start: Position = START,
            centre: bool = False, device: torch.device | None = None
            ) -> Iterator[tuple[dict[int, torch.Tensor], Position]]:
    """({layer: [window_rows, d]}, position after the window) for ever, from ``start``."""
    pending: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    have = 0
    first = True
    for pos, tokens, mask in _batches(src, lm.tokenizer, start):
        width = int(mask.any(0).nonzero()[0].max()) + 1  # causal: later positions change nothing
        t = torch.from_numpy(tokens[:, :width]).long()
        m = torch.from_numpy(mask[:, :width]).to(lm.device)
        acts = lm.activations("resid_post", t, layers, centre=centre)
        skip = start.rows if first else 0
        first = False
        n = int(m.sum()) - skip
        for j, layer in enumerate(layers):
            rows = acts[j][m][skip:]
            pending[layer].append(rows.to(device) if device is not None else rows)
        have += n
        while have >= window_rows:
            out = {}
            for layer, parts in pending.items():
                cat = torch.cat(parts)
                out[layer], pending[layer] = cat[:window_rows], [cat[window_rows:]]
            have -= window_rows
            # Every row left over comes from this batch (a window is emitted as soon as it fills).
            yield out, Position(pos.passes, pos.docs, skip + n - have)


@torch.no_grad()
def store_rows(lm: models.LM, tstore, layers: list[int], batch_contexts: int, centre: bool = False
               ) -> dict[int, torch.Tensor]:
    """Every kept row of a token store (the held-out rows), per layer, computed by the model."""
    parts: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for index in sorted(tstore.chunks):
        chunk = tstore.read_chunk(index)
        for b in range(0, len(chunk["tokens"]), batch_contexts):
            t, m = chunk["tokens"][b:b + batch_contexts], chunk["mask"][b:b + batch_contexts]
            width = int(m.any(0).nonzero().max()) + 1
            acts = lm.activations("resid_post", t[:, :width].long(), layers, centre=centre)
            m = m[:, :width].to(lm.device)
            for j, layer in enumerate(layers):
                parts[layer].append(acts[j][m])
    return {layer: torch.cat(p) for layer, p in parts.items()}
