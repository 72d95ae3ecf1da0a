"""Host and device storage for offloaded weights: one pinned host arena, one device slot pool.

Both are flat byte buffers carved into per-layer blocks, so that a layer moves
with a single copy and no allocator ever sees per-parameter requests. The host
arena is page-locked with ``cudaHostRegister`` rather than allocated through
PyTorch's pinned allocator, which rounds every request up to a power of two and
can nearly double the host memory of a large model.
"""

from __future__ import annotations

import weakref

import torch

from .plan import LayerPlan, OffloadPlan, ParamPlacement


class HostArena:
    """All offloaded layers' blocks, back to back, in one host allocation (page-locked on CUDA)."""

    def __init__(self, plan: OffloadPlan, pin: bool) -> None:
        self.block_offsets: dict[int, int] = {}
        total = 0
        for layer in plan.offloaded:
            self.block_offsets[layer.offload_index] = total
            total += layer.nbytes
        self.nbytes = total
        self.buffer = torch.empty(total, dtype=torch.uint8)
        self.pinned = False
        if pin and total:
            _register_pinned(self.buffer)
            self.pinned = True
            weakref.finalize(self, _unregister_pinned, self.buffer)

    def block(self, layer: LayerPlan) -> torch.Tensor:
        start = self.block_offsets[layer.offload_index]
        return self.buffer[start : start + layer.nbytes]


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


def _register_pinned(buffer: torch.Tensor) -> None:
    cudart = torch.cuda.cudart()
    status = cudart.cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0)
    if int(status) != 0:
        raise RuntimeError(
            f"cudaHostRegister failed with error {int(status)} for {buffer.numel()} bytes of host memory; "
            "the offloaded weights could not be page-locked"
        )


def _unregister_pinned(buffer: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())
