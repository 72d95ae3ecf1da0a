"""Small models for the CPU tests: each block reads its weights in a different way."""

from __future__ import annotations

import torch
from torch import nn


class LinearBlock(nn.Module):
    """Plain Linear + elementwise weight: direct reads, and a weight fused into a pointwise tail."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.gain = nn.Parameter(torch.randn(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x)) * self.gain + x


class Int8Block(nn.Module):
    """Weight-only int8 dequantisation: int8 weight times a per-row scale, then a matmul."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.qweight = nn.Parameter(torch.randint(-127, 127, (width, width), dtype=torch.int8), requires_grad=False)
        self.scale = nn.Parameter(torch.rand(width, 1) / 64 + 1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.qweight.to(x.dtype) * self.scale
        return x + torch.tanh(x @ weight.t())


class CastBlock(nn.Module):
    """A float64 master weight cast to the activation dtype before use."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width, width, dtype=torch.float64) / width**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.sin(x @ self.weight.to(x.dtype))


class TransposedCopyBlock(nn.Module):
    """A transposed contiguous copy of the weight, then a matmul, then an elementwise use of the copy."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width, width) / width**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        transposed = self.weight.t().contiguous()
        return x + (x @ transposed) * transposed.sum(0)


class PackedUint8Block(nn.Module):
    """Two 4-bit values packed per uint8, unpacked with shifts, plus an fp8 and a bf16 weight."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.packed = nn.Parameter(torch.randint(0, 256, (width, width // 2), dtype=torch.uint8), requires_grad=False)
        self.fp8_gain = nn.Parameter(torch.rand(width).to(torch.float8_e4m3fn), requires_grad=False)
        self.bf16_bias = nn.Parameter(torch.randn(width, dtype=torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = (self.packed & 0x0F).to(x.dtype) - 8
        high = (self.packed >> 4).to(x.dtype) - 8
        weight = torch.stack([low, high], dim=-1).reshape(x.shape[-1], -1) / 64
        return x + torch.tanh(x @ weight) * self.fp8_gain.to(x.dtype) + self.bf16_bias.to(x.dtype)


BLOCK_KINDS = {
    "linear": LinearBlock,
    "int8": Int8Block,
    "cast": CastBlock,
    "transposed": TransposedCopyBlock,
    "packed": PackedUint8Block,
}


class Stack(nn.Module):
    """An embedding-free stack: input projection, a ModuleList of blocks, output head.

    ``break_after`` inserts a Dynamo graph break after those block indices;
    ``break_inside`` breaks inside that block's forward (between two of its reads).
    """

    def __init__(
        self,
        kinds: list[str],
        width: int = 16,
        break_after: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.layers = nn.ModuleList(BLOCK_KINDS[kind](width) for kind in kinds)
        self.head = nn.Linear(width, 4)
        self.break_after = set(break_after)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index in self.break_after:
                torch._dynamo.graph_break()
        return self.head(x)


class HeterogeneousStack(nn.Module):
    """Blocks of different widths (so different byte sizes share slots), with projections between."""

    def __init__(self, widths: list[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(w_in, w_out), nn.GELU()) for w_in, w_out in zip(widths, widths[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class SplitReadBlock(nn.Module):
    """A block whose two weights are read on both sides of a graph break."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.first = nn.Linear(width, width)
        self.second = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.first(x))
        torch._dynamo.graph_break()
        return x + self.second(x)


class SplitStack(nn.Module):
    def __init__(self, layers: int, width: int = 16) -> None:
        super().__init__()
        self.layers = nn.ModuleList(SplitReadBlock(width) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class Expert(nn.Module):
    """One feed-forward expert."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


class MoEBlock(nn.Module):
    """A mixing projection, a top-2 router and a ModuleList of experts, as pre-fusion HF Mixtral held them.

    ``sparse=False`` runs every expert on every token and masks the result (no
    data-dependent control flow); ``sparse=True`` runs each expert only on the
    tokens routed to it, found with ``nonzero`` as HF does, which makes Dynamo
    break the graph at each expert. ``break_after_mix`` breaks the graph between the
    mixing projection and the router: Dynamo then compiles the block on its own,
    a module with a list (its experts) that is not the model.
    """

    def __init__(self, width: int, num_experts: int, sparse: bool = False, break_after_mix: bool = False) -> None:
        super().__init__()
        self.mix = nn.Linear(width, width)
        self.router = nn.Linear(width, num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(width) for _ in range(num_experts))
        self.sparse = sparse
        self.break_after_mix = break_after_mix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.mix(x)).reshape(-1, x.shape[-1])
        if self.break_after_mix:
            torch._dynamo.graph_break()
        weights, chosen = torch.softmax(self.router(hidden), dim=-1).topk(2, dim=-1)
        out = torch.zeros_like(hidden)
        for index, expert in enumerate(self.experts):
            routed = chosen == index  # (tokens, 2)
            if self.sparse:
                tokens, position = torch.nonzero(routed, as_tuple=True)
                out = out.index_add(0, tokens, expert(hidden[tokens]) * weights[tokens, position, None])
            else:
                out = out + expert(hidden) * (weights * routed).sum(-1, keepdim=True)
        return x + out.reshape(x.shape)


class MoEStack(nn.Module):
    """Fewer layers than experts per layer: the experts list is the longest ModuleList."""

    def __init__(
        self, layers: int = 4, num_experts: int = 8, width: int = 16, sparse: bool = False, break_after_mix: bool = False
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(width, width)
        self.layers = nn.ModuleList(MoEBlock(width, num_experts, sparse, break_after_mix) for _ in range(layers))
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)
