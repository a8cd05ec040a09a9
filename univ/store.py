"""The on-disk cache format: keyed folders of safetensors chunks plus one manifest.json each.

A store is a folder holding ``chunk-NNNNNN.safetensors`` files and ``manifest.json``. The
manifest records the full config that produced the store, the format and univ versions,
every chunk's file name, row count and sha256, and whether the store is complete. Chunks are
written under a temporary name and renamed; the manifest is replaced atomically after every
chunk, so a store killed at any moment is a valid, incomplete store that can be resumed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from . import __version__, files
from .errors import UnivError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
log = logging.getLogger("univ")


_VERIFIED: set[tuple] = set()


class CorruptChunk(UnivError):
    """A chunk file is missing, truncated, or its sha256 differs from the manifest."""


def config_key(config: dict) -> str:
    """Short stable hash of a JSON-able config (keys sorted, format version included)."""
    blob = json.dumps({"format_version": FORMAT_VERSION, **config}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def slug(text: str) -> str:
    """A readable, filesystem-safe prefix for a key folder."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:48] or "x"


def chunk_name(index: int) -> str:
    return f"chunk-{index:06d}.safetensors"


def ensure_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UnivError(f"cache dir {directory} is not writable: {e.strerror}") from None


class Store:
    """One folder of chunks and its manifest."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def read(cls, path: Path) -> Store:
        """Open an existing store; a clear error when its manifest is unreadable or too new."""
        mpath = path / MANIFEST
        if not mpath.is_file():
            raise UnivError(f"{path} is not a univ store (no {MANIFEST})")
        try:
            manifest = json.loads(mpath.read_text())
            version = manifest["format_version"]
            manifest["chunks"], manifest["config"]  # noqa: B018 - presence check
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            raise UnivError(f"{mpath} is corrupt; delete {path} and the next run rebuilds it") from None
        if version > FORMAT_VERSION:
            raise UnivError(
                f"{path} was written with cache format {version} by univ {manifest.get('univ_version')}; "
                f"this univ ({__version__}) reads format {FORMAT_VERSION}: upgrade univ"
            )
        return cls(path, manifest)

    @classmethod
    def open_or_create(cls, path: Path, kind: str, config: dict, force: bool = False) -> Store:
        """The store at path if its config matches, else a new empty one (old chunks overwritten)."""
        if (path / MANIFEST).exists() and not force:
            store = cls.read(path)
            if store.config != config:
                fix = "rerun with --force to replace it" if kind == "acts" else "delete it and the next run rebuilds it"
                raise UnivError(f"{path} holds a store with another config; {fix}")
            return store
        path.mkdir(parents=True, exist_ok=True)
        store = cls(path, {
            "format_version": FORMAT_VERSION,
            "univ_version": __version__,
            "kind": kind,
            "config": config,
            "chunks": [],
            "complete": False,
            "rows": 0,
            "seconds": 0.0,
        })
        store.save_manifest()
        return store

    # -- manifest --------------------------------------------------------------------------
    @property
    def config(self) -> dict:
        return self.manifest["config"]

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    @property
    def chunks(self) -> dict[int, dict]:
        return {c["index"]: c for c in self.manifest["chunks"]}

    @property
    def rows(self) -> int:
        return sum(c["rows"] for c in self.manifest["chunks"])

    def save_manifest(self) -> None:
        self.manifest["chunks"].sort(key=lambda c: c["index"])
        self.manifest["rows"] = self.rows
        files.write_bytes(self.path / MANIFEST, (json.dumps(self.manifest, indent=1) + "\n").encode())

    def set_complete(self, complete: bool = True, **extra) -> None:
        self.manifest["complete"] = complete
        self.manifest.update(extra)
        self.save_manifest()

    def add_seconds(self, seconds: float) -> None:
        self.manifest["seconds"] = round(self.manifest.get("seconds", 0.0) + seconds, 3)

    # -- chunks ----------------------------------------------------------------------------
    def write_chunk(self, index: int, tensors: dict[str, torch.Tensor], rows: int, **extra) -> None:
        """Write one chunk atomically, then record it in the manifest."""
        data = st_save({k: v.contiguous() for k, v in tensors.items()})
        files.write_bytes(self.path / chunk_name(index), data)
        entry = {"index": index, "file": chunk_name(index), "rows": rows,
                 "sha256": hashlib.sha256(data).hexdigest(), **extra}
        self.manifest["chunks"] = [c for c in self.manifest["chunks"] if c["index"] != index] + [entry]
        self.save_manifest()

    def _checked_bytes(self, index: int) -> bytes:
        entry = self.chunks.get(index)
        if entry is None:
            raise CorruptChunk(f"{self.path}: chunk {index} is not in the manifest")
        path = self.path / entry["file"]
        try:
            data = path.read_bytes()
        except OSError:
            raise CorruptChunk(f"{path} is missing") from None
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CorruptChunk(f"{path} is corrupt (sha256 differs from the manifest)")
        return data

    def read_chunk(self, index: int) -> dict[str, torch.Tensor]:
        """A chunk's tensors, only after its bytes match the manifest's sha256 and its rows the
        manifest's count."""
        tensors = st_load(self._checked_bytes(index))
        held = _rows_held(tensors)
        if held is not None and held != self.chunks[index]["rows"]:
            raise CorruptChunk(f"{self.path / chunk_name(index)} holds {held} rows, its manifest says "
                               f"{self.chunks[index]['rows']}")
        return tensors

    def _signature(self) -> tuple:
        """What a chunk's bytes could not change without changing: names, sizes, mtimes."""
        stats = []
        for c in self.manifest["chunks"]:
            try:
                st = (self.path / c["file"]).stat()
                stats.append((c["file"], c["sha256"], st.st_size, st.st_mtime_ns))
            except OSError:
                return ()
        return (str(self.path), *stats)

    def verify(self) -> list[int]:
        """Indices of the chunks that are present and intact. Damaged ones are warned about
        and dropped from the manifest, so that they are recomputed and never read. Hashing is
        skipped for files this process already checked and that have not changed since (the
        stages of one `univ all` would otherwise re-read every store several times)."""
        signature = self._signature()
        if signature and signature in _VERIFIED:
            return sorted(self.chunks)
        good, bad = [], []
        for index in sorted(self.chunks):
            try:
                self.read_chunk(index)
                good.append(index)
            except CorruptChunk as e:
                log.warning("%s; it will be recomputed", e)
                bad.append(index)
        if bad:
            self.manifest["chunks"] = [c for c in self.manifest["chunks"] if c["index"] not in bad]
            self.set_complete(False)
        else:
            _VERIFIED.add(signature)
        return good

    def clean_temporaries(self) -> None:
        files.remove_temporaries(self.path)


def _rows_held(tensors: dict[str, torch.Tensor]) -> int | None:
    """Rows a chunk holds: activation rows, or a token chunk's kept tokens (None: unknown kind)."""
    if "acts" in tensors:
        return int(tensors["acts"].shape[0])
    if "mask" in tensors:
        return int(tensors["mask"].sum())
    return None


class Lock:
    """An exclusive lock on a store folder, so that two univ processes never write one store."""

    def __init__(self, path: Path):
        self.path = path / ".lock"

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:  # never truncate, never follow a link: the lock file's content is not ours to touch
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise UnivError(f"cannot open the lock {self.path} ({e.strerror}; a link there is refused)") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise UnivError(f"{self.path.parent} is being written by another univ process") from None
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def tokens_dir(cache_dir: Path, tokens_key: str) -> Path:
    return cache_dir / "tokens" / tokens_key


def acts_dir(cache_dir: Path, model_key: str, tokens_key: str, hook: str) -> Path:
    return cache_dir / "acts" / model_key / tokens_key / hook


HOOKS = ("resid_post", "neurons")


def resid_hook(layer: int, kind: str = "resid_post") -> str:
    """Store name of a hook: 'resid_post.l' (the stream after block l, 0-based) or 'neurons.l'."""
    return f"{kind}.{layer}"
