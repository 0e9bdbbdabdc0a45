"""Files of fixed-layout numpy arrays, mapped into every process of a node: the queue of a model
generation (``core.feature_queue``) and the node's board (``core.node_board``).

A file starts with a JSON header (what a process attaching needs to rebuild the layout), then the
arrays, each at a 64-byte aligned offset. Nothing here locks: the modules that use it say who
writes which cell.
"""

from __future__ import annotations

import json
import mmap
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ArraySpec", "attach_header", "create_mapped_file", "map_arrays", "mapped_size"]

HEADER_BYTES = 4096
_ALIGN = 64

ArraySpec = tuple[str, np.dtype, tuple[int, ...]]  # name, dtype, shape


def _offsets(arrays: Sequence[ArraySpec]) -> tuple[dict[str, int], int]:
    offsets, offset = {}, HEADER_BYTES
    for name, dtype, shape in arrays:
        offsets[name] = offset
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        offset += (size + _ALIGN - 1) // _ALIGN * _ALIGN
    return offsets, offset


def mapped_size(arrays: Sequence[ArraySpec]) -> int:
    """Bytes of a file holding the header and ``arrays``."""
    return _offsets(arrays)[1]


def create_mapped_file(directory: str | Path, prefix: str, header: dict[str, Any], arrays: Sequence[ArraySpec]) -> Path:
    """A new zero-filled (sparse) file ``<prefix>-<pid>-<random>`` in ``directory`` with ``header``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"directory {directory} does not exist")
    encoded = json.dumps(header).encode()
    if len(encoded) > HEADER_BYTES:
        raise ValueError(f"a header of {len(encoded)} bytes does not fit the {HEADER_BYTES}-byte header")
    path = directory / f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with path.open("wb") as handle:
        handle.truncate(mapped_size(arrays))
        handle.write(encoded)
    return path


def attach_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a mapped file."""
    with Path(path).open("rb") as handle:
        return json.loads(handle.read(HEADER_BYTES).rstrip(b"\0"))


def map_arrays(path: str | Path, arrays: Sequence[ArraySpec]) -> tuple[mmap.mmap, dict[str, np.ndarray]]:
    """The file mapped, and a view of each array in it."""
    with Path(path).open("r+b") as handle:
        mapped = mmap.mmap(handle.fileno(), 0)
    offsets, _ = _offsets(arrays)
    views = {name: np.ndarray(shape, dtype=dtype, buffer=mapped, offset=offsets[name]) for name, dtype, shape in arrays}
    return mapped, views
