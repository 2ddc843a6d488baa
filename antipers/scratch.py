"""Tensors kept in a scratch file instead of memory: a surrogate's weight snapshots and
its optimizer's moments at SD scale on a CPU, where a copy in memory is what does not
fit.

Raw bytes at fixed offsets in one file under ``ANTIPERS_SCRATCH`` (default: the
system's temporary folder), removed on ``remove`` or when the object is collected.
Tensors are read back through one reused host buffer, so reading allocates one
tensor's worth at most (a safetensors or torch.load round trip would materialise a
second full copy), and a single entry can be rewritten in place.
"""

from __future__ import annotations

import os
import tempfile
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

import torch


class ScratchFile:
    """One scratch file of named entries (``offsets``: key -> byte offset and size)."""

    def __init__(self, path: Path, offsets: dict[str, tuple[int, int]]) -> None:
        self.path, self.offsets = path, offsets
        self._handle: BinaryIO | None = None  # kept open for entries rewritten every step
        self._finalizer = weakref.finalize(self, _unlink, path)

    @classmethod
    def write(cls, tensors: Mapping[str, torch.Tensor], prefix: str) -> ScratchFile:
        """A new file holding ``tensors`` as they are now."""
        handle, name = _create(prefix)
        offsets: dict[str, tuple[int, int]] = {}
        try:
            with os.fdopen(handle, "wb") as f:
                for key, t in tensors.items():
                    data = _bytes_of(t.detach().to("cpu"))
                    offsets[key] = (f.tell(), data.numel())
                    f.write(memoryview(data.numpy()))
        except BaseException:
            _unlink(Path(name))
            raise
        return cls(Path(name), offsets)

    @classmethod
    def allocate(cls, sizes: Mapping[str, int], prefix: str) -> ScratchFile:
        """A new file with room for entries of ``sizes`` bytes, to be written with
        ``write_entry``. The room is reserved now, so a full disk is an error here, not
        in the middle of a training step."""
        handle, name = _create(prefix)
        offsets, end = {}, 0
        for key, size in sizes.items():
            offsets[key] = (end, size)
            end += size
        try:
            if end:
                os.posix_fallocate(handle, 0, end)
        except BaseException:
            _unlink(Path(name))
            raise
        finally:
            os.close(handle)
        return cls(Path(name), offsets)

    def read_into(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Each entry's bytes copied into the tensor of the same key (shape and dtype
        as written)."""
        largest = max((self.offsets[k][1] for k in tensors), default=0)
        buffer = torch.empty(largest, dtype=torch.uint8)
        view = memoryview(buffer.numpy())
        f = self._open()
        for key, t in tensors.items():
            offset, size = self.offsets[key]
            f.seek(offset)
            done = 0
            while done < size:  # one read returns at most ~2 GiB on Linux
                got = f.readinto(view[done:size])
                if not got:
                    raise OSError(f"{self.path}: scratch file ends early at {key!r}")
                done += got
            t.copy_(buffer[:size].view(t.dtype).view(t.shape))

    def write_entry(self, key: str, tensor: torch.Tensor) -> None:
        """``tensor``'s bytes in its entry's place (the entry's size must match)."""
        offset, size = self.offsets[key]
        data = _bytes_of(tensor.detach().to("cpu"))
        if data.numel() != size:
            raise ValueError(f"{self.path}: {key!r} holds {size} bytes, got {data.numel()}")
        f = self._open()
        f.seek(offset)
        view = memoryview(data.numpy())
        done = 0
        while done < size:
            done += f.write(view[done:])

    def _open(self) -> BinaryIO:
        if self._handle is None:
            self._handle = open(self.path, "r+b", buffering=0)  # noqa: SIM115 (closed by remove)
        return self._handle

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        self._finalizer()


def _create(prefix: str) -> tuple[int, str]:
    folder = os.environ.get("ANTIPERS_SCRATCH") or None
    return tempfile.mkstemp(prefix=prefix, suffix=".bin", dir=folder)


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)
