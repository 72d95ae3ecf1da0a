"""What a safetensors checkpoint holds, from its headers alone, and reading one tensor's bytes.

A safetensors file is an 8-byte little-endian header length, a JSON header
mapping each tensor name to its dtype, shape and byte range, then the raw
row-major data. The headers give every name, shape and dtype without touching
the data, so a checkpoint can be checked against a model in full before a
single byte is placed.

Bytes are read with ``preadv`` straight into their destination (a block of the
host arena, a CPU tensor, or a pinned staging buffer) rather than through a
memory mapping: a mapping would count every page read into the process's
resident memory until it is unmapped, and a read is the same single copy out
of the page cache.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# safetensors dtype names; the float8 ones exist only in newer torch releases.
_DTYPES = MappingProxyType({
    name: getattr(torch, attr)
    for name, attr in {
        "BOOL": "bool",
        "U8": "uint8",
        "I8": "int8",
        "I16": "int16",
        "U16": "uint16",
        "I32": "int32",
        "U32": "uint32",
        "I64": "int64",
        "U64": "uint64",
        "F16": "float16",
        "BF16": "bfloat16",
        "F32": "float32",
        "F64": "float64",
        "C64": "complex64",
        "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2",
    }.items()
    if hasattr(torch, attr)
})


class CheckpointError(ValueError):
    """The checkpoint is unreadable or does not match the model; the message names every tensor at fault."""


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a safetensors file: where its bytes are and what they mean."""

    name: str
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # from the start of the file
    nbytes: int


def read_checkpoint_headers(checkpoint: str | os.PathLike) -> dict[str, StoredTensor]:
    """Every tensor of a safetensors file or of a Hugging Face checkpoint directory, by name.

    A directory holds either ``model.safetensors.index.json`` (sharded: its
    ``weight_map`` names each tensor's file) or a single ``model.safetensors``.
    Raises :class:`CheckpointError` for a malformed header, a tensor whose bytes
    lie beyond the end of its file (a truncated file), or an index that
    disagrees with the files it names.
    """
    path = Path(checkpoint)
    if path.is_dir():
        if (path / INDEX_NAME).is_file():
            return _read_sharded(path / INDEX_NAME)
        if (path / SINGLE_NAME).is_file():
            return read_file_header(path / SINGLE_NAME)
        raise CheckpointError(f"{path} holds neither {INDEX_NAME} nor {SINGLE_NAME}")
    if path.name.endswith(".index.json"):
        return _read_sharded(path)
    if path.is_file():
        return read_file_header(path)
    raise CheckpointError(f"checkpoint {path} does not exist")


def _not_safetensors(path: Path, prefix: bytes) -> str:
    """What to say of a file that is not safetensors, naming the format where its first bytes tell it."""
    if prefix.startswith(b"PK\x03\x04") or prefix.startswith(b"\x80"):
        kind = "a torch.save file (a zip archive or a pickle)"
        advice = (
            "load it with torch.load(path, map_location='cpu', mmap=True) and pass the resulting mapping of names to "
            "tensors to load_checkpoint"
        )
    else:
        kind = "not a safetensors file: its header does not begin with a JSON object"
        advice = "load_checkpoint reads safetensors files, Hugging Face checkpoint directories of them, or a mapping"
    return f"{path} is {kind}; {advice}"


def read_file_header(path: Path) -> dict[str, StoredTensor]:
    """The tensors of one safetensors file, checked against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path} is too short ({size} bytes) to be a safetensors file")
        (header_len,) = struct.unpack("<Q", prefix)
        if file.read(1) != b"{":  # a safetensors header is a JSON object, right after its length
            raise CheckpointError(_not_safetensors(path, prefix))
        file.seek(8)
        if 8 + header_len > size:
            raise CheckpointError(f"{path} is truncated: its header needs {8 + header_len} bytes, the file has {size}")
        try:
            header = json.loads(file.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{path} has a malformed safetensors header: {error}") from error
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a malformed safetensors header: not a JSON object")
    data_start = 8 + header_len
    tensors: dict[str, StoredTensor] = {}
    problems: list[str] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(entry.get("dtype")) if isinstance(entry, dict) else None
        if dtype is None:
            problems.append(f"{name}: unsupported dtype or malformed entry {entry!r}")
            continue
        try:
            shape = tuple(int(dim) for dim in entry["shape"])
            begin, end = (int(value) for value in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            problems.append(f"{name}: malformed header entry {entry!r}")
            continue
        expected = dtype.itemsize
        for dim in shape:
            expected *= dim
        if end - begin != expected:
            problems.append(f"{name}: {end - begin} bytes stored for shape {shape} of {dtype} ({expected} bytes)")
            continue
        if data_start + end > size:
            problems.append(f"{name}: bytes {data_start + begin}..{data_start + end} lie beyond the end of the file ({size} bytes)")
            continue
        tensors[name] = StoredTensor(name, path, dtype, shape, data_start + begin, expected)
    if problems:
        raise CheckpointError(f"{path} is truncated or corrupt:\n  " + "\n  ".join(problems))
    return tensors


def _read_sharded(index_path: Path) -> dict[str, StoredTensor]:
    try:
        weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{index_path} is not a safetensors index with a 'weight_map': {error}") from error
    tensors: dict[str, StoredTensor] = {}
    for file_name in sorted(set(weight_map.values())):
        shard = index_path.parent / file_name
        if not shard.is_file():
            held = sorted(name for name, value in weight_map.items() if value == file_name)
            raise CheckpointError(f"{index_path} names missing shard {file_name} (holding {few(held)})")
        stored = read_file_header(shard)
        repeated = sorted(stored.keys() & tensors.keys())
        if repeated:
            raise CheckpointError(f"{shard.name} repeats tensors of another shard: {few(repeated)}")
        tensors.update(stored)
    misplaced = sorted(
        name for name, file_name in weight_map.items() if name not in tensors or tensors[name].path.name != file_name
    )
    if misplaced:
        raise CheckpointError(f"{index_path} places tensors in files that do not hold them: {few(misplaced)}")
    return tensors


class FileReader:
    """Reads stored tensors' bytes into host memory; keeps each file open for the duration of a ``with`` block."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def __enter__(self) -> FileReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def read_into(self, stored: StoredTensor, address: int, nbytes: int, skip: int = 0) -> None:
        """Read ``nbytes`` of ``stored``'s data, from byte ``skip`` on, into host memory at ``address``.

        ``address`` must point at ``nbytes`` of writable host memory that stays
        alive for the call (a tensor's ``data_ptr()``).
        """
        if stored.path not in self._fds:
            self._fds[stored.path] = os.open(stored.path, os.O_RDONLY)
        fd = self._fds[stored.path]
        target = memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")
        done = 0
        while done < nbytes:
            count = os.preadv(fd, [target[done:]], stored.offset + skip + done)
            if count == 0:
                raise CheckpointError(
                    f"{stored.name}: {stored.path} ended after {skip + done} of the tensor's {stored.nbytes} bytes "
                    "(the file shrank while loading)"
                )
            done += count


def few(names: list[str], limit: int = 8) -> str:
    """Names for an error message: all of them, or the first ``limit`` and how many more."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"
