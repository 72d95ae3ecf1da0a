"""Offloaded leaf tensors: the plain tensors that actually hold a parameter's bytes.

A dense parameter is its own single leaf. A tensor-subclass parameter (a
torchao quantized weight, a DTensor shard) holds no storage itself: its bytes
live in inner tensors, listed by ``__tensor_flatten__`` and possibly nested.
Offloading moves leaves, not parameters: each leaf gets its place in the
layer's block, and after offloading it is a view of the slot, installed on the
parameter (``.data``) or on its owner subclass (the inner attribute).

A leaf is named ``<parameter name>.<inner attribute path>``, e.g.
``layers.1.mlp.up_proj.weight.qdata``; a dense parameter's one leaf is named
after the parameter itself. The inner path is what AOT autograd flattens a
subclass input into, in the same order (see :func:`flatten`), so a leaf is
also exactly one placeholder of an ATen graph.
"""

from __future__ import annotations

import torch
from torch import nn

from ._torch_internals import is_traceable_wrapper_subclass

InnerPath = tuple[str, ...]


def flatten(value: object) -> list[tuple[InnerPath, object]]:
    """Every inner value of ``value`` in AOT autograd's flattening order, depth first over ``__tensor_flatten__`` attributes.

    A plain tensor (or any non-subclass value) is its own one entry with path
    ``()``. The entries may include non-tensors: a subclass can list an opaque
    object (DTensor's device mesh, in recent torch) among its inner attributes,
    and AOT gives it a placeholder too.
    """
    if not is_traceable_wrapper_subclass(value):
        return [((), value)]
    attrs, _ = value.__tensor_flatten__()
    return [((attr, *path), inner) for attr in attrs for path, inner in flatten(getattr(value, attr))]


def tensor_leaves(tensor: torch.Tensor) -> list[tuple[InnerPath, torch.Tensor]]:
    """The plain tensors holding ``tensor``'s bytes, with their inner paths (``[((), tensor)]`` for a dense tensor)."""
    return [(path, inner) for path, inner in flatten(tensor) if isinstance(inner, torch.Tensor)]


def can_offload(param: torch.Tensor) -> bool:
    """Whether the parameter's bytes can be found: a plain tensor, or a subclass that flattens into plain tensors.

    Any other subclass (one without ``__tensor_flatten__``) may keep state we
    cannot see or move, so it stays on the device.
    """
    return type(param) in (torch.Tensor, nn.Parameter) or is_traceable_wrapper_subclass(param)


def leaf_name(param_name: str, inner: InnerPath) -> str:
    return ".".join((param_name, *inner))


def get_inner(tensor: torch.Tensor, inner: InnerPath) -> torch.Tensor:
    """The leaf at ``inner`` inside ``tensor`` (``tensor`` itself for the empty path)."""
    for attr in inner:
        tensor = getattr(tensor, attr)
    return tensor


def set_inner(param: torch.Tensor, inner: InnerPath, value: torch.Tensor) -> None:
    """Make ``value`` the storage of the leaf at ``inner``, keeping the parameter object (and so its identity).

    A dense parameter takes it as ``.data``. A subclass leaf is an attribute of
    its owner, which reads it afresh on every use (and AOT's runtime wrapper
    unwraps it on every call), so replacing the attribute is enough.
    """
    if not inner:
        param.data = value
        return
    setattr(get_inner(param, inner[:-1]), inner[-1], value)


def leaf_bytes(tensor: torch.Tensor) -> int:
    """Bytes held by ``tensor`` on this process: the sum over its leaves (a DTensor's local shard only)."""
    return sum(leaf.numel() * leaf.element_size() for _, leaf in tensor_leaves(tensor))

