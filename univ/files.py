"""How univ writes and reads its files: every write goes to a new temporary file beside the
target (created exclusively, so never one already there and never through a link), is fsynced,
then renamed over the target. A kill or a full disk leaves the old file or the new one, never a
part of one; a cache handed over by someone else cannot make univ write through a link it planted.
A result file that cannot be read (damaged, or partial from an older univ) counts as absent, so
the stage that writes it computes it again."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

TMP_SUFFIX = ".tmp"
_UMASK = os.umask(0)
os.umask(_UMASK)


def write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # as open() would make it: mkstemp's 0600 hides the report from others
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # replaces a link at path itself, never what it points to
    except OSError as e:  # a full disk, say: name the file univ was writing
        Path(tmp).unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    write_bytes(path, (json.dumps(obj, indent=1, default=str) + "\n").encode())


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def read_json(path: Path):
    """The file's JSON, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def remove_temporaries(directory: Path) -> None:
    """Temporary files a killed writer left behind."""
    for tmp in Path(directory).glob(f"*{TMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)
