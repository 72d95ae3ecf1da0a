"""Estimated FLOPs of one FX node, from the fake tensors recorded in its metadata.

Only matmul-like ops count (mm, addmm, bmm, baddbmm, matmul, linear,
convolutions, scaled dot-product attention): they are what hides a copy, and
everything else is noise next to them. The same names cover the three graph
levels the backend sees: ATen overloads (post-grad and AOT graphs), torch
functions and tensor methods (Dynamo graphs).
"""

from __future__ import annotations

import math
from types import MappingProxyType

import torch
from torch import fx

from .passes import node_value

# Op name -> position of the left operand, whose last dimension is the contracted one.
_MATMUL_LEFT = MappingProxyType({"mm": 0, "addmm": 1, "bmm": 0, "baddbmm": 1, "matmul": 0, "linear": 0})
_CONVOLUTIONS = frozenset({"convolution", "_convolution", "conv1d", "conv2d", "conv3d"})
_TRANSPOSED_CONVOLUTIONS = frozenset({"conv_transpose1d", "conv_transpose2d", "conv_transpose3d"})


def estimate_flops(node: fx.Node) -> int | None:
    """Multiply-adds times two for a matmul-like node, 0 for any other node, None when a shape is symbolic."""
    if node.op not in ("call_function", "call_method"):
        return 0
    name = op_name(node.target)
    if name in _MATMUL_LEFT:
        left, out = _shape(node, _MATMUL_LEFT[name]), _shape_of(node_value(node))
        if left is None or out is None:
            return None
        return 2 * math.prod(out) * (left[-1] if left else 1)
    if name in _CONVOLUTIONS or name in _TRANSPOSED_CONVOLUTIONS:
        transposed = name in _TRANSPOSED_CONVOLUTIONS or (name in ("convolution", "_convolution") and _arg(node, 6))
        # Every element of the output (input, when transposed) takes one weight slice of in/groups x kernel.
        spread = _shape(node, 0) if transposed else _shape_of(node_value(node))
        weight = _shape(node, 1)
        if spread is None or weight is None:
            return None
        return 2 * math.prod(spread) * math.prod(weight[1:])
    if "scaled_dot_product" in name:
        query, key, value = (_shape(node, index) for index in range(3))
        if query is None or key is None or value is None:
            return None
        batch, target, source = math.prod(query[:-2]), query[-2], key[-2]
        return 2 * batch * target * source * (query[-1] + value[-1])
    return 0


def op_name(target: object) -> str:
    """``mm`` for ``aten.mm.default``, ``torch.mm`` and the ``mm`` tensor method alike."""
    if isinstance(target, str):
        return target
    packet = getattr(target, "overloadpacket", target)  # an ATen overload names its packet: aten.mm
    return getattr(packet, "__name__", "")


def _arg(node: fx.Node, index: int) -> object:
    return node.args[index] if len(node.args) > index else None


def _shape(node: fx.Node, index: int) -> tuple[int, ...] | None:
    argument = _arg(node, index)
    return _shape_of(node_value(argument) if isinstance(argument, fx.Node) else None)


def _shape_of(value: object) -> tuple[int, ...] | None:
    """The static shape of a fake tensor; None for a non-tensor or a symbolic size."""
    if not isinstance(value, torch.Tensor) or not all(isinstance(size, int) for size in value.shape):
        return None
    return tuple(value.shape)
