"""Leaf helpers every farmer module may import (this one imports no farmer module): atomic file writes,
parameter counts, and :class:`FarmerError`.

An atomic write goes to a hidden temporary sibling (named after the process, so concurrent writers never share
one), is flushed to disk, then ``os.replace``-d over the target, and the directory entry is flushed too: a
reader, or a run killed at any moment, sees the old file or the new one, never a torn one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from torch import nn


class FarmerError(RuntimeError):
    """A failure the user can act on, said by its message (data that cannot be fetched, a full disk, a run
    directory in use, diverged training): the ``farmer`` command prints it in one line, where an unexpected
    RuntimeError (a bug) keeps its traceback."""


def fsync_directory(path: Path) -> None:
    """Flush a directory's entries (a rename into it, say) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, content: bytes | str | Callable[[IO[bytes]], object]) -> Path:
    """Replace ``path`` atomically by ``content``: bytes, text (UTF-8), or a function writing to a binary
    handle (``np.savez`` given a handle adds no ``.npz`` suffix). The temporary is removed on failure."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            if callable(content):
                content(handle)
            else:
                handle.write(content.encode() if isinstance(content, str) else content)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    return path


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """``data`` as indented JSON with sorted keys and a final newline, written atomically."""
    return write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (elements, not tensors) of ``module``; works on the meta device."""
    return sum(p.numel() for p in module.parameters())
