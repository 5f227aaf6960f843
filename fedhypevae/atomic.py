"""Atomic file writes: a file appears complete or not at all, and an existing one is replaced, never truncated.

Every writer here writes to a temporary file in the target's directory (``.NAME.RANDOM.tmp``: same file
system, so the rename is atomic; hidden and ending in ``.tmp``, so that no ``*.npz`` or ``rank_*.pt`` pattern
picks it up), then renames it onto the target with ``os.replace``. On any error (a full disk, an interrupt)
the temporary file is removed and the target is left as it was.

  fsync=True        the data is flushed to the disk before the rename, so that a crash of the machine cannot
                    leave the name pointing at a file whose blocks were never written (checkpoints, data shards)
  owner_only=True   the file is readable by its owner only (mode 0600), whatever the umask (clients' records
                    and what is computed from them); otherwise the umask decides, as for ``open``

`atomic_path` and `atomic_open` are the two primitives (for writers that take a file name, and for writers
that take a file object); the others are the shapes this package writes: text, bytes, ``torch.save``,
``np.savez``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np


def _create_temporary(path: Path, owner_only: bool) -> Path:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, flags, 0o600 if owner_only else 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"no free temporary name beside {path}")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path, *, fsync: bool = False, owner_only: bool = False) -> Iterator[Path]:
    """A temporary file name beside `path` (the file exists, empty) for the block to write to; when the block
    ends without an error the file is renamed onto `path`. For writers that take a file name (pandas): the
    name ends in ``.tmp``, so a writer that appends its own extension (``np.savez``) needs `atomic_savez`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temporary(path, owner_only)
    try:
        yield tmp
        if fsync:
            _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_open(path, mode: str = "wb", *, fsync: bool = False, owner_only: bool = False) -> Iterator[IO]:
    """A file object open for writing (`mode` "w" or "wb") on a temporary file beside `path`; closed and
    renamed onto `path` when the block ends without an error."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes a new file: mode 'w' or 'wb', not {mode!r}")
    with atomic_path(path, fsync=fsync, owner_only=owner_only) as tmp, open(tmp, mode) as f:
        yield f


def atomic_write_text(path, text: str, *, fsync: bool = False, owner_only: bool = False) -> Path:
    with atomic_open(path, "w", fsync=fsync, owner_only=owner_only) as f:
        f.write(text)
    return Path(path)


def atomic_write_bytes(path, data: bytes, *, fsync: bool = False, owner_only: bool = False) -> Path:
    with atomic_open(path, "wb", fsync=fsync, owner_only=owner_only) as f:
        f.write(data)
    return Path(path)


def atomic_torch_save(obj, path, *, fsync: bool = False, owner_only: bool = False, crc32: bool = True) -> Path:
    """``torch.save(obj)`` to `path`, atomically. ``crc32=False`` skips the zip records' CRC-32 (torch.load never
    checks it; only unzip tools would warn): for large files, where computing it costs more than writing them."""
    import torch

    with atomic_open(path, "wb", fsync=fsync, owner_only=owner_only) as f:
        before = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(crc32 and before)
        try:
            torch.save(obj, f)
        finally:
            torch.serialization.set_crc32_options(before)
    return Path(path)


def atomic_savez(path, arrays: dict, *, fsync: bool = False, owner_only: bool = False) -> Path:
    """``np.savez(path, **arrays)``, atomically (the name is used as given: no ``.npz`` is appended)."""
    with atomic_open(path, "wb", fsync=fsync, owner_only=owner_only) as f:
        np.savez(f, **arrays)
    return Path(path)
