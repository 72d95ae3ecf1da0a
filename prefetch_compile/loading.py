"""``load_checkpoint()``: fill a model built on the meta device straight from a checkpoint, already offloaded.

Building a large model on the host and then offloading it holds the whole
model in host memory; a real checkpoint never needs to be. The plan needs only
names, shapes and dtypes, which a meta model has, so the loader plans first,
then reads every tensor once into its final place: an offloaded parameter
into its block of the host arena, everything else onto the device.

Host memory while loading is the arena (the offloaded bytes, written page by
page) plus the staging bound of :data:`STAGING_BYTES` x 2 when the device is a
GPU, plus one temporary copy of a tensor in two rare cases: a parameter the
model keeps in a non-contiguous layout, and a second copy of a tied weight
(checked equal to the first).

Nothing is attached to the model until every tensor has been placed and the
checkpoint has matched the model in full: a checkpoint rejected half-way
leaves the model's parameters on the meta device, unusable and saying so.

With ``host_budget`` the arena holds only the offloaded layers that fit the
budget next to the disk tier's staging ring; the others are not read at all
while loading: they stay in the checkpoint files and are streamed from there
at every forward (:mod:`prefetch_compile.disk_layout` says which ones and why
from the files, :mod:`prefetch_compile.disk_tier` how).
"""

from __future__ import annotations

import contextlib
import logging
import dataclasses
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from .checkpoint import CheckpointError, FileReader, StoredTensor, few, read_checkpoint_headers
from .config import OptionError, parse_bytes, plan_options
from .disk_layout import STAGING_BUFFERS, DiskLayout, plan_disk_tier
from .disk_tier import DiskTier
from .memory import HostArena, PinnedStaging, param_view
from .offload import _check_device, _check_not_offloaded, assemble_runtime
from .plan import OffloadPlan, build_plan, log_plan_choice
from .runtime import PrefetchRuntime, format_bytes

log = logging.getLogger("prefetch_compile")

# Bytes bound for a GPU pass through two page-locked buffers of this size, so
# that reading the next chunk from disk overlaps the copy of the last one.
STAGING_BYTES = 64 << 20

Checkpoint = str | os.PathLike | Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]
Source = StoredTensor | torch.Tensor


@dataclass
class _Target:
    """One tensor of the model to fill: all its names (tied weights have several) and where its bytes go."""

    names: tuple[str, ...]
    meta: torch.Tensor  # the model's tensor on the meta device: shape, dtype, kind
    destination: torch.Tensor | None = None  # a view of the host arena, or a fresh tensor on the device
    offloaded: bool = False
    on_disk: bool = False  # offloaded to the disk tier: left in the checkpoint file, nothing to place
    written_as: str | None = None  # the checkpoint name it was filled from; a tied weight's other names are checked


@torch.inference_mode(False)  # the parameters and the arena it makes count their writes (see edits.py)
def load_checkpoint(
    model: nn.Module,
    checkpoint: Checkpoint,
    device: str | torch.device = "cuda",
    *,
    init_buffers: Callable[[nn.Module], None] | None = None,
    host_budget: int | str | None = None,
    staging_buffers: int | None = None,
    **plan: Any,
) -> PrefetchRuntime:
    """Load ``checkpoint`` into ``model`` (built on the meta device), offloaded as :func:`offload` would.

    ``checkpoint`` is a safetensors file, a Hugging Face checkpoint directory
    (``model.safetensors`` or shards with ``model.safetensors.index.json``),
    a mapping of names to tensors, or any iterable of ``(name, tensor)``. ``plan`` are the plan
    knobs of :func:`offload` (the fields of :class:`PlanOptions`; no budget). Every tensor is read once into its final place; the whole
    model is never in host memory (see the module docstring for the bound).

    Names, shapes and dtypes must match the model's state dict exactly (no
    casting: build the meta model in the checkpoint's dtype). A safetensors
    checkpoint is checked in full from its headers before anything is read; an
    iterable or a mapping is checked tensor by tensor, in its order, and stops at
    the first problem.
    Either way a mismatch raises :class:`CheckpointError` naming the tensors,
    and the model is left unloaded (its parameters on the meta device).

    Tied weights stay tied; a checkpoint may hold any one of their names (as
    Hugging Face checkpoints do) or several equal copies.

    Buffers that are not in the state dict (non-persistent ones, such as a
    rotary embedding's ``inv_freq``, computed in ``__init__``) keep the model's
    value, moved to the device. On a model built under ``torch.device("meta")``
    they have none: each module owning such a buffer is given CPU storage for
    it and passed to ``init_buffers(module)``, which must compute it; by
    default a Hugging Face model's own ``_init_weights``, which is what
    ``from_pretrained`` does for the same buffers. A buffer left uncomputed
    raises :class:`CheckpointError`.

    ``host_budget`` (bytes, or a string such as ``"40GiB"``) bounds the host
    memory of the offloaded layers, for a model larger than host memory: the
    layers beyond it stay in the checkpoint's safetensors files and are read
    from there, ahead of use, at every forward (see README, "A model larger
    than host memory"). It needs a safetensors checkpoint, not an iterable.
    A disk-resident layer is staged whole, so with ``host_budget`` copies are
    never chunked (``chunked_copies=True`` is refused).

    ``staging_buffers`` (with ``host_budget`` only; default
    :data:`~prefetch_compile.disk_layout.STAGING_BUFFERS`, at least 2) is the
    depth of the disk tier's staging ring: how many disk-resident layers the
    reader thread may hold read ahead. Each buffer is as large as the largest
    disk-resident layer and counts in ``host_budget``, so a deeper ring leaves
    fewer layers in host memory.
    """
    if staging_buffers is not None and host_budget is None:
        raise OptionError(
            f"staging_buffers={staging_buffers!r} only applies with a host_budget (it is the depth of the disk "
            "tier's staging ring); pass host_budget as well, or drop staging_buffers"
        )
    if "budget" in plan:
        raise OptionError(
            "load_checkpoint takes plan knobs, not a device-memory budget (the budget planner needs the weights to "
            "time the layers): load with plan knobs, or build the model, then offload(model, device, budget=...); "
            "host_budget bounds the host memory instead"
        )
    options = plan_options(plan)
    if host_budget is not None:
        if options.chunked_copies is True:
            raise OptionError(
                "chunked_copies=True and host_budget cannot be combined: a disk-resident layer is read into its "
                "staging buffer and copied whole; drop one of them"
            )
        options = dataclasses.replace(options, chunked_copies=False)
    device = _check_device(torch.device(device))
    _check_not_offloaded(model)
    targets = _targets(model)
    plan = build_plan(model, options)
    log_plan_choice(model, plan)
    stored = None
    if isinstance(checkpoint, (str, os.PathLike)):
        stored = read_checkpoint_headers(checkpoint)
        _check_all(targets, stored)
    layout = _disk_layout(plan, stored, host_budget, STAGING_BUFFERS if staging_buffers is None else staging_buffers)
    _materialise_buffers(model, targets, init_buffers)

    host = HostArena(plan, on_disk=layout.layers if layout else ())
    _assign_destinations(targets, plan, host, device, layout)
    placed = [target for target in targets.values() if not target.on_disk]
    progress = _Progress(sum(_nbytes(target.meta) for target in placed), device)
    if stored is not None:
        _place_files(targets, stored, device, progress)
    else:
        _place_iterable(targets, checkpoint.items() if isinstance(checkpoint, Mapping) else checkpoint, progress)
    progress.finish(len(placed), _describe(checkpoint, stored))
    offloaded = _attach(model, targets, device)
    disk = DiskTier(layout, plan, device) if layout else None
    return assemble_runtime(model, plan, device, host, offloaded, disk)


def _disk_layout(
    plan: OffloadPlan, stored: dict[str, StoredTensor] | None, host_budget: int | str | None, staging_buffers: int
) -> DiskLayout | None:
    if host_budget is None:
        return None
    budget = parse_bytes(host_budget, "host_budget")
    if stored is None:
        raise OptionError(
            "host_budget needs a safetensors checkpoint (a file or a directory) to read the layers beyond the budget "
            "back from at every forward; an iterable of tensors can be read only once"
        )
    layout = plan_disk_tier(plan, stored, budget, staging_buffers)
    if layout is None:
        log.info(
            f"prefetch_compile: host_budget={format_bytes(budget)} holds all {len(plan.offloaded)} offloaded layers "
            f"({format_bytes(sum(layer.nbytes for layer in plan.offloaded))}); nothing is read from disk"
        )
    return layout


# ------------------------------------------------------------------ what to fill
def _targets(model: nn.Module) -> dict[int, _Target]:
    """Every tensor of the state dict, once, keyed by identity; tied names share one target."""
    targets: dict[int, _Target] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{name}: extra state of type {type(tensor).__name__} cannot be loaded")
        if isinstance(tensor, nn.Parameter) and not tensor.is_meta:
            raise CheckpointError(
                f"{name} is on {tensor.device}; load_checkpoint() fills a model built on the meta device "
                "(use offload() for a model whose weights are already real)"
            )
        target = targets.setdefault(id(tensor), _Target((), tensor))
        target.names += (name,)
    return targets


def _check_all(targets: dict[int, _Target], stored: dict[str, StoredTensor]) -> None:
    """Compare a checkpoint's headers with the model; raise one error naming every problem."""
    known = {name for target in targets.values() for name in target.names}
    unexpected = sorted(stored.keys() - known)
    missing = [target.names[0] for target in targets.values() if not any(name in stored for name in target.names)]
    problems = []
    if unexpected:
        problems.append(f"unexpected (not in the model): {few(unexpected)}")
    if missing:
        problems.append(f"missing (in the model, not in the checkpoint): {few(missing)}")
    for target in targets.values():
        for name in target.names:
            if name in stored and (problem := _mismatch(name, stored[name].shape, stored[name].dtype, target.meta)):
                problems.append(problem)
    if problems:
        raise CheckpointError("checkpoint does not match the model, nothing was loaded:\n  " + "\n  ".join(problems))


def _mismatch(name: str, shape: tuple[int, ...], dtype: torch.dtype, meta: torch.Tensor) -> str | None:
    """What is wrong with a checkpoint tensor for the model's tensor, or None."""
    if shape != tuple(meta.shape):
        return f"{name}: shape {shape} in the checkpoint, {tuple(meta.shape)} in the model"
    if dtype != meta.dtype:
        return (
            f"{name}: dtype {dtype} in the checkpoint, {meta.dtype} in the model "
            f"(build the model in the checkpoint's dtype, e.g. model.to({dtype}) on the meta device)"
        )
    return None


def _materialise_buffers(model: nn.Module, targets: dict[int, _Target], init_buffers: Callable[[nn.Module], None] | None) -> None:
    """Compute the non-persistent buffers that a meta-built model lacks (see :func:`load_checkpoint`)."""
    in_state_dict = {name for target in targets.values() for name in target.names}
    lacking = [
        (name, buffer)
        for name, buffer in model.named_buffers(remove_duplicate=False)
        if buffer.is_meta and name not in in_state_dict
    ]
    if not lacking:
        return
    init = init_buffers if init_buffers is not None else getattr(model, "_init_weights", None)
    if init is None:
        raise CheckpointError(
            f"buffers {few([name for name, _ in lacking])} are on the meta device and not in the checkpoint; "
            "build the model with real buffers or pass init_buffers=fn(module) to compute them"
        )
    owners: dict[int, nn.Module] = {}
    for name, buffer in lacking:
        owner = _owner(model, name)
        owner.register_buffer(name.rpartition(".")[2], torch.full_like(buffer, _sentinel(buffer.dtype), device="cpu"), persistent=False)
        owners[id(owner)] = owner
    try:
        with torch.no_grad():
            for owner in owners.values():
                init(owner)
        uncomputed = [name for name, _ in lacking if _holds_sentinel(model.get_buffer(name))]
        if uncomputed:
            raise CheckpointError(f"init_buffers left buffers {few(uncomputed)} uncomputed")
    except BaseException:
        for name, buffer in lacking:  # back to the meta device: never a half-computed buffer that looks real
            _owner(model, name).register_buffer(name.rpartition(".")[2], buffer, persistent=False)
        raise


def _owner(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name.rpartition(".")[0])


def _sentinel(dtype: torch.dtype) -> float | int | bool:
    """A value that marks a buffer as not yet computed (NaN for floats, the minimum for integers)."""
    if dtype.is_floating_point or dtype.is_complex:
        return math.nan
    return False if dtype == torch.bool else torch.iinfo(dtype).min


def _holds_sentinel(buffer: torch.Tensor) -> bool:
    if buffer.dtype == torch.bool:
        return False  # no value marks a boolean buffer; trust the initialiser
    sentinel = _sentinel(buffer.dtype)
    return bool(buffer.isnan().any()) if isinstance(sentinel, float) else bool((buffer == sentinel).any())


# ------------------------------------------------------------------ placing bytes
def _assign_destinations(
    targets: dict[int, _Target], plan: OffloadPlan, host: HostArena, device: torch.device, layout: DiskLayout | None
) -> None:
    placements = {placement.name: (layer, placement) for layer in plan.offloaded for placement in layer.params}
    for target in targets.values():
        found = next((placements[name] for name in target.names if name in placements), None)
        if found is not None:
            layer, placement = found
            target.offloaded = True
            target.on_disk = layout is not None and layer.offload_index in layout.layers
            target.destination = None if target.on_disk else param_view(host.block(layer), placement)
        else:
            target.destination = torch.empty(target.meta.shape, dtype=target.meta.dtype, device=device)


def _place_files(targets: dict[int, _Target], stored: dict[str, StoredTensor], device: torch.device, progress: _Progress) -> None:
    """Read each stored tensor into its destination, file by file in byte order, so reads stay sequential."""
    by_name = {name: target for target in targets.values() for name in target.names}
    ordered = sorted(
        (entry for entry in stored.values() if not by_name[entry.name].on_disk),
        key=lambda entry: (str(entry.path), entry.offset),
    )
    staging_buffers = PinnedStaging(STAGING_BYTES, 2) if device.type == "cuda" else contextlib.nullcontext([])
    with FileReader() as reader, staging_buffers as staging:
        try:
            for entry in ordered:
                _write(by_name[entry.name], entry.name, entry, reader, staging)
                progress.advance(entry.nbytes)
        finally:
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # no copy may still read the staging buffers once they are released


def _place_iterable(targets: dict[int, _Target], checkpoint: Iterable[tuple[str, torch.Tensor]], progress: _Progress) -> None:
    by_name = {name: target for target in targets.values() for name in target.names}
    seen: set[str] = set()
    for count, (name, tensor) in enumerate(checkpoint):
        target = by_name.get(name)
        problem = (
            f"{name}: not in the model" if target is None
            else f"{name}: given twice" if name in seen
            else _mismatch(name, tuple(tensor.shape), tensor.dtype, target.meta)
        )
        if problem:
            raise CheckpointError(f"checkpoint rejected at its tensor {count}, nothing was loaded into the model: {problem}")
        seen.add(name)
        _write(target, name, tensor, None, [])
        progress.advance(_nbytes(tensor))
    missing = [target.names[0] for target in targets.values() if target.written_as is None]
    if missing:
        raise CheckpointError(f"checkpoint ended without {few(missing)}; nothing was loaded into the model")


def _write(target: _Target, name: str, source: Source, reader: FileReader | None, staging: list[torch.Tensor]) -> None:
    """Fill ``target`` from ``source``; a tied weight's later copies are only checked equal to the first."""
    if target.written_as is None:
        _copy(target.destination, source, reader, staging)
        target.written_as = name
        return
    again = torch.empty_like(target.destination)
    _copy(again, source, reader, staging)
    if not torch.equal(again, target.destination):
        raise CheckpointError(
            f"{name} is tied to {target.written_as} in the model but differs from it in the checkpoint; "
            "nothing was loaded into the model"
        )


def _copy(destination: torch.Tensor, source: Source, reader: FileReader | None, staging: list[torch.Tensor]) -> None:
    if isinstance(source, torch.Tensor):
        destination.copy_(source)
    elif destination.device.type == "cuda":
        _read_through_staging(reader, source, destination, staging)
    elif destination.is_contiguous():
        reader.read_into(source, destination.data_ptr(), source.nbytes)
    else:
        contiguous = torch.empty(source.shape, dtype=source.dtype)
        reader.read_into(source, contiguous.data_ptr(), source.nbytes)
        destination.copy_(contiguous)


def _read_through_staging(reader: FileReader, source: StoredTensor, destination: torch.Tensor, staging: list[torch.Tensor]) -> None:
    """Disk to device in chunks, the buffers used in turn: reading the next chunk overlaps copying the last.

    A buffer is refilled only once its previous copy has finished, and all
    copies have finished on return, so the next tensor may reuse any buffer.
    """
    flat = destination.reshape(-1).view(torch.uint8)  # a fresh contiguous tensor: reshape is a view
    chunk = staging[0].numel()
    copied: list[torch.cuda.Event | None] = [None] * len(staging)
    for number, start in enumerate(range(0, source.nbytes, chunk)):
        turn = number % len(staging)
        if copied[turn] is not None:
            copied[turn].synchronize()
        size = min(chunk, source.nbytes - start)
        reader.read_into(source, staging[turn].data_ptr(), size, skip=start)
        flat[start : start + size].copy_(staging[turn][:size], non_blocking=True)
        copied[turn] = torch.cuda.Event()
        copied[turn].record()
    for event in copied:
        if event is not None:
            event.synchronize()


# ------------------------------------------------------------------ handing over
def _attach(model: nn.Module, targets: dict[int, _Target], device: torch.device) -> dict[str, nn.Parameter]:
    """Put the placed tensors into the model under all their names; returns the offloaded parameters."""
    offloaded: dict[str, nn.Parameter] = {}
    for target in targets.values():
        if isinstance(target.meta, nn.Parameter):
            # Offloaded parameters get a placeholder here; assemble_runtime points them at their slot.
            data = torch.empty(0, dtype=target.meta.dtype, device=device) if target.offloaded else target.destination
            value = nn.Parameter(data, requires_grad=target.meta.requires_grad)
        else:
            value = target.destination
        for name in target.names:
            _set(model, name, value)
            if target.offloaded:
                offloaded[name] = value
    moved: dict[int, torch.Tensor] = {}
    for name, buffer in model.named_buffers(remove_duplicate=False):
        if buffer.device != device:
            _set(model, name, moved.setdefault(id(buffer), buffer.to(device)))
    return offloaded


def _set(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, local = _owner(model, name), name.rpartition(".")[2]
    if isinstance(value, nn.Parameter):
        owner.register_parameter(local, value)
    else:
        setattr(owner, local, value)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _describe(checkpoint: Checkpoint, stored: dict[str, StoredTensor] | None) -> str:
    if stored is None:
        return "an iterable"
    files = {entry.path for entry in stored.values()}
    return f"{len(files)} file(s) under {os.fspath(checkpoint)}"


class _Progress:
    """Logs each further tenth of the bytes placed once a load has run for a few seconds, and a summary at the end."""

    QUIET_SECONDS = 3.0

    def __init__(self, total: int, device: torch.device) -> None:
        self.total = total
        self.device = device
        self.done = 0
        self.began = time.perf_counter()
        self._next_tenth = 1

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        reached = self.done * 10 // max(self.total, 1)
        if reached >= self._next_tenth:
            self._next_tenth = reached + 1
            elapsed = time.perf_counter() - self.began
            if elapsed >= self.QUIET_SECONDS:
                log.info(
                    f"prefetch_compile: loading {reached * 10}% ({format_bytes(self.done)} of "
                    f"{format_bytes(self.total)}) in {elapsed:.1f} s"
                )

    def finish(self, count: int, source: str) -> None:
        elapsed = time.perf_counter() - self.began
        log.info(
            f"prefetch_compile: loaded {count} tensors, {format_bytes(self.done)} from {source} onto {self.device} "
            f"and its host arena in {elapsed:.1f} s ({format_bytes(self.done / max(elapsed, 1e-9))}/s)"
        )
