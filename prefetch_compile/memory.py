"""Host and device storage for offloaded weights: one pinned host arena, one device slot pool.

Both are flat byte buffers carved into per-layer blocks, so that a layer moves
with a single copy and no allocator ever sees per-parameter requests. The host
arena is page-locked with ``cudaHostRegister`` rather than allocated through
PyTorch's pinned allocator, which rounds every request up to a power of two and
can nearly double the host memory of a large model.
"""

from __future__ import annotations

import mmap
import weakref
from typing import Collection

import torch

from .plan import LayerPlan, OffloadPlan, ParamPlacement


class HostArena:
    """All host-resident offloaded layers' blocks, back to back, in one host allocation.

    Host-resident means all offloaded layers unless a disk tier keeps some
    (``on_disk``, offload indices) in the checkpoint files instead.

    The allocation is an anonymous mapping, so a page costs host memory only
    once it is written: filling the arena while the source weights are freed
    one by one never holds the model and the arena at once. It is page-locked
    by :meth:`pin` once filled, because page-locking faults in every page.
    """

    def __init__(self, plan: OffloadPlan, on_disk: Collection[int] = ()) -> None:
        self.block_offsets: dict[int, int] = {}
        total = 0
        for layer in plan.offloaded:
            if layer.offload_index in on_disk:
                continue  # the disk tier's (see disk_tier.py): no block here
            self.block_offsets[layer.offload_index] = total
            total += layer.nbytes
        self.nbytes = total
        self.buffer = lazy_host_buffer(total)
        self.pinned = False

    def block(self, layer: LayerPlan) -> torch.Tensor:
        start = self.block_offsets[layer.offload_index]
        return self.buffer[start : start + layer.nbytes]

    def pin(self) -> None:
        """Page-lock the arena for asynchronous copies to a CUDA device (once, after filling it)."""
        if self.nbytes and not self.pinned:
            register_pinned(self.buffer)
            self.pinned = True
            weakref.finalize(self, unregister_pinned, self.buffer)


def lazy_host_buffer(nbytes: int) -> torch.Tensor:
    """``nbytes`` of host memory whose pages are committed only when first written.

    An explicit private anonymous mapping makes this hold at any size;
    ``torch.empty`` has it only when malloc happens to serve the request with
    ``mmap``. The tensor keeps the mapping alive; it is unmapped when the
    tensor's storage is freed.
    """
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(mapping, dtype=torch.uint8)


class PinnedStaging:
    """A few page-locked host buffers of ``nbytes`` each, through which bytes bound for a CUDA device pass.

    Used as a context manager: the pages are locked on entry and unlocked and
    unmapped on exit, so the staging memory lasts only as long as a load.
    """

    def __init__(self, nbytes: int, count: int) -> None:
        self.buffers = [lazy_host_buffer(nbytes) for _ in range(count)]
        self._registered: list[torch.Tensor] = []

    def __enter__(self) -> list[torch.Tensor]:
        for buffer in self.buffers:
            register_pinned(buffer)
            self._registered.append(buffer)
        return self.buffers

    def __exit__(self, *exc_info: object) -> None:
        """Callers synchronise the copies that read the buffers before leaving the ``with`` block."""
        for buffer in self._registered:
            unregister_pinned(buffer)
        self._registered.clear()
        self.buffers.clear()


class SlotPool:
    """``plan.num_slots`` device buffers; every layer in slot s lays its block over buffer s."""

    def __init__(self, plan: OffloadPlan, device: torch.device) -> None:
        allocated_before = _allocated(device)
        self.buffers = [torch.empty(size, dtype=torch.uint8, device=device) for size in plan.slot_bytes()]
        # What the device allocator charged (it rounds large blocks up to 2 MiB), not just what was asked for.
        self.nbytes = _allocated(device) - allocated_before if device.type == "cuda" else sum(plan.slot_bytes())

    def block(self, layer: LayerPlan) -> torch.Tensor:
        return self.buffers[layer.slot][: layer.nbytes]


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def param_view(block: torch.Tensor, placement: ParamPlacement) -> torch.Tensor:
    """The tensor of one parameter inside a layer's byte block, with the parameter's own strides."""
    raw = block[placement.offset : placement.offset + placement.nbytes]
    return raw.view(placement.dtype).as_strided(placement.shape, placement.stride)


def aliased_param_view(block: torch.Tensor, placement: ParamPlacement) -> torch.Tensor:
    """``param_view`` over a storage of its own that starts at the leaf's first byte and aliases the block.

    For the inner tensors of a tensor-subclass parameter. Fake-tensor conversion
    (Dynamo, at every compile) cannot rebuild a subclass whose inner tensor has a
    nonzero storage offset: it fails with "Attempted to set the storage of a tensor
    on device cpu to a storage on different device meta" (seen with DTensor on
    torch 2.13). DLPack gives the leaf's bytes a storage of their own (and keeps
    the slot alive), so the offset is 0 while the bytes stay the slot's.
    """
    raw = torch.from_dlpack(block[placement.offset : placement.offset + placement.nbytes])
    return raw.view(placement.dtype).as_strided(placement.shape, placement.stride)


def register_pinned(buffer: torch.Tensor) -> None:
    cudart = torch.cuda.cudart()
    status = cudart.cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0)
    if int(status) != 0:
        raise RuntimeError(
            f"cudaHostRegister failed with error {int(status)} for {buffer.numel()} bytes of host memory; "
            "the offloaded weights could not be page-locked"
        )


def unregister_pinned(buffer: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())
