"""The offload plan: which parameters leave the device, which slot each layer uses, and where.

The plan is pure bookkeeping over shapes and names, computed once per model.
Each offloaded layer's parameters are packed into one block (each parameter
aligned to ``ALIGNMENT`` bytes), so a layer travels host-to-device as a single
copy, and every layer that shares a slot lays its block over the same device
bytes. What is packed are the parameters' leaf tensors (see ``leaves.py``): a
dense parameter is one leaf, a tensor-subclass parameter (quantized weight,
DTensor shard) one per inner tensor.

With ``chunked_copies`` the blocks are also cut into *pieces*: the plan's
``piece_starts`` are the byte offsets at which every offloaded layer starts a
parameter, so piece *k* of any layer lies over piece *k* of every other layer of
its slot and nothing else. A copy may then bring a layer in piece by piece, each
piece once the slot's previous occupant has been read for the last time in the
same piece. Blocks keep the model's registration order (q, k, v, o, gate, up,
down for most decoder blocks); which pieces move together, and in what order,
is decided per graph by the prefetch pass from the order the forward reads
them. Layers whose packings share no boundary (different shapes) have one
piece: a whole-block copy, as without chunking.
"""

from __future__ import annotations

import bisect
import collections
import logging
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import torch
from torch import nn

from .config import OptionError, PlanOptions
from .discovery import describe_layer_list, find_layer_list, is_offloaded_layer, matches_offload_params
from .leaves import InnerPath, can_offload, leaf_bytes, leaf_name, tensor_leaves

log = logging.getLogger("prefetch_compile")

# Inductor assumes 16-byte aligned inputs; 256 also keeps every block cache-line and DMA friendly.
ALIGNMENT = 256

# chunked_copies="auto" cuts blocks into pieces only when every offloaded block is at least this large:
# below it a block copies in well under a third of a millisecond at PCIe 5 speeds (55 GB/s), and the
# extra ops and copies of a chunked schedule (a few microseconds of host time each) stop paying.
AUTO_CHUNK_MIN_BYTES = 16 * 2**20


@dataclass(frozen=True)
class ParamPlacement:
    """One offloaded leaf tensor: its name, its geometry, and its byte offset inside its layer's block."""

    name: str  # leaf name from the model root, e.g. "layers.3.mlp.up_proj.weight" or "....weight.qdata"
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    inner: InnerPath = ()  # attribute path of the leaf inside its parameter; () for a dense parameter

    @property
    def param_name(self) -> str:
        """The dotted name of the parameter this leaf belongs to."""
        if not self.inner:
            return self.name
        return self.name[: -len(".".join(self.inner)) - 1]

    def fits(self, leaf: torch.Tensor) -> bool:
        """Whether ``leaf`` has this placement's dtype and shape (what a copy into its bytes needs)."""
        return leaf.dtype == self.dtype and tuple(leaf.shape) == self.shape

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * self.dtype.itemsize


@dataclass(frozen=True)
class LayerPlan:
    """One block of the layer list, offloaded or kept."""

    index: int  # position in the model's layer list
    name: str  # dotted path of the block, e.g. "layers.3"
    offloaded: bool
    params: tuple[ParamPlacement, ...]  # the offloaded parameters (empty for kept layers)
    kept_param_bytes: int  # bytes of this block's parameters that stay on the device
    offload_index: int | None = None  # position among offloaded layers: the id used by the custom ops
    slot: int | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of this layer's packed block (the size of its single host-to-device copy)."""
        if not self.params:
            return 0
        last = self.params[-1]
        return _align(last.offset + last.nbytes)


@dataclass(frozen=True)
class OffloadPlan:
    """The whole model's plan."""

    options: PlanOptions
    layer_list_path: str
    layers: tuple[LayerPlan, ...]
    # Byte offsets at which every offloaded layer's block starts a parameter: where its copies may be cut.
    piece_starts: tuple[int, ...] = (0,)

    # Cached: the plan is frozen, and every start_prefetch asks for the slot's next layer
    # (next_in_slot), which rebuilding this tuple made most of the op's host time.
    @cached_property
    def offloaded(self) -> tuple[LayerPlan, ...]:
        return tuple(layer for layer in self.layers if layer.offloaded)

    @cached_property
    def num_slots(self) -> int:
        return min(self.options.prefetch_step, len(self.offloaded))

    def slot_bytes(self) -> list[int]:
        """Each slot is as large as the largest block that lands in it."""
        sizes = [0] * self.num_slots
        for layer in self.offloaded:
            sizes[layer.slot] = max(sizes[layer.slot], layer.nbytes)
        return sizes

    def offloaded_bytes(self) -> int:
        return sum(param.nbytes for layer in self.offloaded for param in layer.params)

    def copied_bytes_per_forward(self) -> int:
        """Bytes a forward copies: the blocks of the offloaded layers that share their slot with another layer.

        A layer alone in its slot is copied once and stays, so it costs the link nothing per forward.
        """
        sharing = collections.Counter(layer.slot for layer in self.offloaded)
        return sum(layer.nbytes for layer in self.offloaded if sharing[layer.slot] > 1)

    def next_in_slot(self, offload_index: int) -> int:
        """The offloaded layer to bring in once ``offload_index`` has been read for the last time.

        That is the next layer in the same slot (offload index ``i`` uses slot ``i mod
        num_slots``); the slot's last layer wraps around to the slot's first, which the
        next forward reads first. Wrapping to ``(i + num_slots) mod n`` instead would,
        when ``n`` is not a multiple of ``num_slots``, land in another slot whose layer
        is still unread, and cost extra copies every forward.
        """
        following = offload_index + self.num_slots
        return following if following < len(self.offloaded) else offload_index % self.num_slots

    def pieces(self, layer: LayerPlan) -> tuple[tuple[int, int], ...]:
        """(begin, end) byte range of each piece of an offloaded layer's block; the last one ends with the block."""
        return tuple(zip(self.piece_starts, (*self.piece_starts[1:], layer.nbytes)))

    def piece_of(self, placement: ParamPlacement) -> int:
        """The piece that holds a leaf (a parameter's leaves all lie in one piece)."""
        return bisect.bisect_right(self.piece_starts, placement.offset) - 1


def build_plan(model: nn.Module, options: PlanOptions) -> OffloadPlan:
    """Decide, from the model's structure and the knobs alone, what is offloaded and where it goes."""
    path, blocks = find_layer_list(model, options.layers)
    if options.offload_layers and options.offload_layers[-1] >= len(blocks):
        raise OptionError(
            f"offload_layers={list(options.offload_layers)} names layer {options.offload_layers[-1]}, "
            f"but '{path}' has {len(blocks)} layers (indices 0-{len(blocks) - 1})"
        )
    shared = _shared_parameter_ids(model)
    layers: list[LayerPlan] = []
    offload_count = 0
    for index, block in enumerate(blocks):
        prefix = f"{path}.{index}" if path else str(index)
        chosen: list[tuple[str, nn.Parameter]] = []
        kept_bytes = 0
        offloads = _offloads_layer(options, index, block, prefix)
        for local_name, param in block.named_parameters():
            wanted = offloads and matches_offload_params(
                f"{prefix}.{local_name}", options.offload_params
            )
            if wanted and not can_offload(param):
                log.info(
                    "prefetch_compile: %s.%s stays on the device: %s is a tensor subclass without "
                    "__tensor_flatten__, so its storage cannot be moved",
                    prefix,
                    local_name,
                    type(param).__name__,
                )
                wanted = False
            nbytes = leaf_bytes(param)
            # A tied parameter's other users would read a slot holding another layer; an empty one
            # has no bytes to move, and a view of no bytes has no address to check it by.
            if wanted and id(param) not in shared and nbytes:
                chosen.append((f"{prefix}.{local_name}", param))
            else:
                kept_bytes += nbytes
        if not chosen:
            layers.append(LayerPlan(index, prefix, False, (), kept_bytes))
            continue
        layers.append(
            LayerPlan(
                index=index,
                name=prefix,
                offloaded=True,
                params=_pack(chosen),
                kept_param_bytes=kept_bytes,
                offload_index=offload_count,
                slot=offload_count % options.prefetch_step,
            )
        )
        offload_count += 1
    offloaded = [layer for layer in layers if layer.offloaded]
    return OffloadPlan(options, path, tuple(layers), _piece_starts(offloaded, options))


def log_plan_choice(model: nn.Module, plan: OffloadPlan) -> None:
    """Say which layer list the plan uses, and warn when it offloads nothing or saves no device memory.

    Called where a plan is put to use (``offload()``, ``load_checkpoint()``), not in
    :func:`build_plan`, which the budget planner calls for every candidate.
    """
    blocks = list(model.get_submodule(plan.layer_list_path)) if plan.layer_list_path else list(model)
    log.info(describe_layer_list(model, plan.layer_list_path, blocks, given=plan.options.layers is not None))
    if not plan.offloaded:
        log.warning(_nothing_offloaded(plan.layer_list_path, blocks, plan.options))
    elif sum(plan.slot_bytes()) >= plan.offloaded_bytes():
        log.warning(
            "prefetch_compile: the plan saves no device memory: its %d offloaded layer(s) of '%s' take %d "
            "slot(s) of %d bytes in all, at least the %d bytes they move off the device (each slot holds "
            "a layer for good when no other layer shares it); offload more layers or lower prefetch_step",
            len(plan.offloaded),
            plan.layer_list_path,
            plan.num_slots,
            sum(plan.slot_bytes()),
            plan.offloaded_bytes(),
        )


def _offloads_layer(options: PlanOptions, index: int, block: nn.Module, fqn: str) -> bool:
    """Whether layer ``index`` is offloaded (its parameters are still filtered by ``offload_params``)."""
    if options.filter_fn is not None:
        return _ask_filter_fn(options.filter_fn, block, fqn)
    if options.offload_layers is not None:
        return index in options.offload_layers
    return is_offloaded_layer(index, options.group_size, options.num_in_group)


def _ask_filter_fn(filter_fn: Callable[[nn.Module, str], bool], block: nn.Module, fqn: str) -> bool:
    """``filter_fn``'s answer for one block, as a bool; a call that fails or answers otherwise is the option's fault.

    Truthiness is not taken for an answer: a string or a tensor returned by
    mistake would offload every block, or none, without a word.
    """
    try:
        chosen = filter_fn(block, fqn)
    except Exception as error:
        raise OptionError(
            f"filter_fn raised {type(error).__name__}: {error}, called as filter_fn(block, fqn) for block "
            f"'{fqn}' ({type(block).__name__}); it takes the block module and its dotted name, and returns a bool"
        ) from error
    if not isinstance(chosen, bool):
        raise OptionError(
            f"filter_fn must return a bool, got {chosen!r} for block '{fqn}' ({type(block).__name__})"
        )
    return chosen


def _nothing_offloaded(path: str, blocks: list[nn.Module], options: PlanOptions) -> str:
    """Why a plan moves no bytes: a model runs as if not offloaded, which nobody should learn from a profile."""
    num_blocks = len(blocks)
    picked = [
        index for index, block in enumerate(blocks) if _offloads_layer(options, index, block, f"{path}.{index}")
    ]
    if not picked and options.filter_fn is not None:
        why = f"filter_fn chose none of its {num_blocks} blocks"
    elif not picked and options.offload_layers is not None:
        why = f"offload_layers={list(options.offload_layers)} names none of its {num_blocks} blocks"
    elif not picked:
        why = (
            f"block i is offloaded when i % group_size >= group_size - num_in_group "
            f"(group_size={options.group_size}, num_in_group={options.num_in_group}), and none of its "
            f"{num_blocks} blocks is; lower group_size or raise num_in_group"
        )
    else:
        why = (
            f"no parameter of blocks {picked} matches offload_params={list(options.offload_params)} "
            "(or all are tied, or tensor subclasses that cannot move)"
        )
    return f"prefetch_compile: the plan offloads nothing from '{path}': {why}"


def _piece_starts(offloaded: list[LayerPlan], options: PlanOptions) -> tuple[int, ...]:
    """The parameter start offsets shared by every offloaded block, when the plan chunks its copies.

    Shared by all offloaded layers, not only by those of one slot: Dynamo may run
    one compiled graph for any block of the same parameter shapes, so the pieces a
    graph's ops name must be the same in every slot.
    """
    sizes = [layer.nbytes for layer in offloaded]
    if not offloaded or not chunks_copies(options.chunked_copies, options.prefetch_step, sizes):
        return (0,)
    shared: set[int] | None = None
    for layer in offloaded:
        starts = {placement.offset for placement in _first_leaves(layer.params)}
        shared = starts if shared is None else shared & starts
    return tuple(sorted(shared | {0}))


def chunks_copies(chunked_copies: bool | str, prefetch_step: int, block_bytes: list[int]) -> bool:
    """Whether a plan with these knobs and offloaded block sizes cuts its copies into chunks.

    ``"auto"``: one slot shared by several blocks, all at least ``AUTO_CHUNK_MIN_BYTES``. The budget
    planner's prediction asks the same question, so it prices the copies the plan will make.
    """
    if chunked_copies == "auto":
        return prefetch_step == 1 and len(block_bytes) > 1 and min(block_bytes) >= AUTO_CHUNK_MIN_BYTES
    return bool(chunked_copies)


def _first_leaves(placements: tuple[ParamPlacement, ...]) -> list[ParamPlacement]:
    """The first leaf of each parameter: a parameter's leaves stay in one piece, so that the parameter has one
    piece whether a graph takes it whole (Dynamo's graphs) or leaf by leaf (AOT's)."""
    firsts, previous = [], None
    for placement in placements:
        if placement.param_name != previous:
            firsts.append(placement)
            previous = placement.param_name
    return firsts


def _pack(named_params: list[tuple[str, nn.Parameter]]) -> tuple[ParamPlacement, ...]:
    placements = []
    offset = 0
    for param_name, param in named_params:
        for inner, leaf in tensor_leaves(param):
            name = leaf_name(param_name, inner)
            if not _is_dense(leaf):
                raise OptionError(
                    f"parameter {name} is not dense (shape {tuple(leaf.shape)}, stride {leaf.stride()}); "
                    "make it contiguous before offloading"
                )
            placements.append(
                ParamPlacement(name, tuple(leaf.shape), tuple(leaf.stride()), leaf.dtype, offset, inner)
            )
            offset = _align(offset + leaf.numel() * leaf.element_size())
    return tuple(placements)


def _is_dense(tensor: torch.Tensor) -> bool:
    """Whether the tensor covers exactly ``numel`` elements of storage in some dimension order."""
    expected = 1
    for size, stride in sorted(zip(tensor.shape, tensor.stride()), key=lambda pair: pair[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def _shared_parameter_ids(model: nn.Module) -> set[int]:
    """Parameters reachable under more than one name (tied weights) stay on the device.

    Offloading one would leave its other users reading a slot that holds another layer.
    """
    seen: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        seen[id(param)] = seen.get(id(param), 0) + 1
    return {key for key, count in seen.items() if count > 1}


def _align(nbytes: int) -> int:
    return (nbytes + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT
