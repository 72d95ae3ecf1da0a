"""Reading byte ranges of checkpoint files into page-aligned host memory, around the page cache.

The disk tier reads the same gigabytes again at every forward. Read through the
page cache, they would (1) sit in host memory a second time, as cached pages,
the very memory the tier exists to save, until the kernel gets round to
reclaiming them, and (2) come from memory rather than from the disk from the
second forward on, so a benchmark would measure the wrong device. ``O_DIRECT``
reads go from the device into the destination without a cached copy; they
need the buffer address, the file offset and the length aligned to the
device's logical block size. :data:`ALIGNMENT` (4096) satisfies every common
block size (512 and 4096 bytes), so callers read the aligned range around the
bytes they need into a page-aligned buffer and use a slice of it.

Where a filesystem refuses ``O_DIRECT`` (an ``EINVAL`` at open or at the first
read: some network, FUSE and overlay filesystems), the file is read through
the page cache and every range read is dropped from it right afterwards with
``posix_fadvise(POSIX_FADV_DONTNEED)``: clean pages go at once, so the cache
never holds more than the range in flight. One INFO line per file says so.

Every read first checks that the file is the one that was opened: a checkpoint
rewritten in place after loading would otherwise feed other weights to the
model without a word. (A file replaced by a rename is no risk: the open
descriptor keeps reading the old inode.)
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from .checkpoint import CheckpointError

log = logging.getLogger("prefetch_compile")

ALIGNMENT = 4096


def align_down(value: int) -> int:
    return value // ALIGNMENT * ALIGNMENT


def align_up(value: int) -> int:
    return -(-value // ALIGNMENT) * ALIGNMENT


@dataclass
class _OpenFile:
    fd: int
    direct: bool
    identity: tuple[int, int, int, int]  # device, inode, size, modification time (ns) when opened


class DirectReader:
    """The files of a checkpoint, open for aligned reads (``O_DIRECT`` where the filesystem allows it).

    ``read`` may be called from several threads at once (positional reads
    share no file offset). ``close`` closes every file; call it once no read
    is running.
    """

    def __init__(self, paths: Iterable[Path]) -> None:
        self._files: dict[Path, _OpenFile] = {}
        self._lock = threading.Lock()  # guards the switch of a file from O_DIRECT to buffered reads
        try:
            for path in sorted(set(paths)):
                self._files[path] = self._open(path)
        except BaseException:
            self.close()
            raise

    @property
    def direct(self) -> bool:
        """Whether every file is read with ``O_DIRECT``."""
        return all(file.direct for file in self._files.values())

    def read(self, path: Path, offset: int, nbytes: int, address: int) -> int:
        """Read ``nbytes`` of ``path`` from ``offset`` into host memory at ``address``; the count read.

        ``offset``, ``nbytes`` and ``address`` must be multiples of
        :data:`ALIGNMENT`. Fewer bytes than asked come back only at the end of
        the file (an aligned range may reach past it); callers check that what
        they need was read.
        """
        assert offset % ALIGNMENT == 0 and nbytes % ALIGNMENT == 0 and address % ALIGNMENT == 0
        file = self._checked(path)
        try:
            done = _read_fully(file.fd, offset, nbytes, address)
        except OSError as error:
            if not file.direct or error.errno != errno.EINVAL:
                raise CheckpointError(f"{path}: reading bytes {offset}..{offset + nbytes} failed: {error}") from error
            file = self._fall_back(path, f"an O_DIRECT read failed ({error})")
            done = _read_fully(file.fd, offset, nbytes, address)
        if not file.direct:
            os.posix_fadvise(file.fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
        return done

    def read_range(self, path: Path, offset: int, nbytes: int) -> torch.Tensor:
        """Any byte range of ``path`` (no alignment needed) as a fresh uint8 tensor; raises if the file is too short."""
        start = align_down(offset)
        bounce = torch.empty(align_up(offset + nbytes) - start + ALIGNMENT, dtype=torch.uint8)
        aligned = bounce[(-bounce.data_ptr()) % ALIGNMENT :][: align_up(offset + nbytes) - start]
        got = self.read(path, start, aligned.numel(), aligned.data_ptr())
        if got < offset + nbytes - start:
            raise CheckpointError(f"{path} ends before byte {offset + nbytes} (the file shrank since it was loaded)")
        return aligned[offset - start : offset - start + nbytes].clone()

    def close(self) -> None:
        for file in self._files.values():
            os.close(file.fd)
        self._files.clear()

    # ------------------------------------------------------------------
    def _open(self, path: Path) -> _OpenFile:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            direct = True
        except OSError as error:
            if error.errno != errno.EINVAL:
                raise CheckpointError(f"cannot open {path}: {error}") from error
            fd, direct = os.open(path, os.O_RDONLY), False
            _log_fallback(path, "the filesystem refuses O_DIRECT at open")
        return _OpenFile(fd, direct, _identity(os.fstat(fd)))

    def _fall_back(self, path: Path, why: str) -> _OpenFile:
        with self._lock:
            file = self._files[path]
            if file.direct:
                fd = os.open(path, os.O_RDONLY)
                if _identity(os.fstat(fd)) != file.identity:
                    os.close(fd)
                    raise CheckpointError(_changed(path))
                os.close(file.fd)
                file = self._files[path] = _OpenFile(fd, False, file.identity)
                _log_fallback(path, why)
            return file

    def _checked(self, path: Path) -> _OpenFile:
        file = self._files[path]
        if _identity(os.fstat(file.fd)) != file.identity:
            raise CheckpointError(_changed(path))
        return file


def _identity(stat: os.stat_result) -> tuple[int, int, int, int]:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _changed(path: Path) -> str:
    return (
        f"{path} changed since load_checkpoint() opened it (size or modification time): the disk tier reads "
        "offloaded layers from it at every forward and would now read other bytes. Load the checkpoint again"
    )


def _log_fallback(path: Path, why: str) -> None:
    log.info(
        "prefetch_compile: %s is read through the page cache (%s); each range read is dropped from the cache "
        "again with posix_fadvise(DONTNEED)",
        path,
        why,
    )


def _read_fully(fd: int, offset: int, nbytes: int, address: int) -> int:
    """``preadv`` until ``nbytes`` are read or the file ends (Linux returns at most ~2 GiB per call)."""
    target = memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")
    done = 0
    while done < nbytes:
        count = os.preadv(fd, [target[done:]], offset + done)
        done += count
        if count == 0 or count % ALIGNMENT:
            break  # the end of the file (an O_DIRECT read past it returns a short, unaligned count)
    return done
