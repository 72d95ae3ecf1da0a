"""Which offloaded layers the disk tier leaves on disk, and how each one is read back and copied.

``load_checkpoint(host_budget=...)`` bounds the host memory of the offloaded
layers: the pinned arena of the layers kept in host memory plus the disk
tier's staging ring must fit the budget. The layers beyond it stay in the
checkpoint's safetensors files and are read from there at every forward.

Why the checkpoint files and not a cache file in the block layout: a cache
would duplicate on disk exactly the bytes that did not fit in host memory
(hundreds of gigabytes for the models this is for), cost a full write pass
before the first forward, and need invalidating when the checkpoint changes.
What it would buy is small: a layer's tensors sit next to each other in every
checkpoint writer's layout (Hugging Face sorts a shard's tensors by name, so
one layer is one run of bytes), so reading a layer from the shards is one or
two large reads either way, and the alignment that ``O_DIRECT`` needs costs at
most one page at each end of a read. The header of every shard gives each
tensor's offset, so a checkpoint whose tensors are in any order, or a layer
split across shards, reads the same way, only in more pieces.

Which layers: the fewest that bring the rest within the budget, spread evenly
over the offloaded layers (``k`` of ``n`` at positions ``floor((j + 1/2) n / k)``),
so that the disk reads of the next disk-resident layers overlap the copies of
the host-resident ones in between and the disk never sees a burst.

How a layer is read: its tensors' byte ranges, grouped per file and merged
where their page-aligned ranges touch, are its *extents*: one ``O_DIRECT``
read each, back to back into a page-aligned staging buffer. Each tensor then
lies in the staging buffer at some offset and goes to its offset in the
layer's packed block (the plan's layout, which the slot holds) with one
host-to-device copy per tensor: a *piece*. The file's bytes are copied as they
are, so a disk-resident parameter must be dense and row-major, as a
safetensors file stores it.

The staging ring holds ``staging_buffers`` buffers (:data:`STAGING_BUFFERS`
by default), each as large as the largest disk-resident layer's extents; that
is the tier's whole host-memory cost beyond the arena, and the budget counts
it. Two is the least that overlaps anything: one layer is read while the one
before it is copied. Each further buffer lets the reader run one more layer
ahead, which pays only where it would otherwise stop: every buffer filled and
not yet taken (the host is busy elsewhere for longer than a read), or the next
buffer's copy not finished yet (the copy stream is held up, say behind the
compute that frees its slot). When the disk is the slower side neither should
happen, and more buffers are host memory better spent on the arena; whether it
happens on a real machine is measured, not argued: ``benchmarks/disk_tier.py``
reports the reader's read, idle and copy-wait seconds
(:class:`~prefetch_compile.disk_tier.StreamStats`) per ring depth, so the depth
is the caller's choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from .checkpoint import StoredTensor
from .config import OptionError, require_int
from .direct_io import align_down, align_up
from .plan import LayerPlan, OffloadPlan, ParamPlacement
from .runtime import format_bytes

# The least ring that overlaps reading with copying (one layer read while the one before it is copied),
# and the default depth (see the module docstring).
MIN_STAGING_BUFFERS = STAGING_BUFFERS = 2


@dataclass(frozen=True)
class Extent:
    """One ``O_DIRECT`` read: a page-aligned byte range of one file, into the staging buffer at ``staging_offset``."""

    path: Path
    file_offset: int
    nbytes: int
    staging_offset: int
    needed: int  # bytes from file_offset up to the end of the last tensor in it: a shorter read means a truncated file
    names: tuple[str, ...]  # the tensors it holds, for error messages


@dataclass(frozen=True)
class Piece:
    """One host-to-device copy: ``nbytes`` from the staging buffer to the layer's block."""

    staging_offset: int
    block_offset: int
    nbytes: int


@dataclass(frozen=True)
class DiskLayer:
    """How one disk-resident offloaded layer is read and copied."""

    offload_index: int
    name: str
    extents: tuple[Extent, ...]
    pieces: tuple[Piece, ...]

    @property
    def staging_bytes(self) -> int:
        return sum(extent.nbytes for extent in self.extents)

    @property
    def nbytes(self) -> int:
        """The parameter bytes the layer brings in (what a forward reads of it)."""
        return sum(piece.nbytes for piece in self.pieces)


@dataclass(frozen=True)
class DiskLayout:
    """The disk tier of one model: its layers (by offload index) and its staging ring."""

    host_budget: int
    layers: Mapping[int, DiskLayer]
    staging_bytes: int  # one staging buffer
    staging_buffers: int  # the ring's depth
    sources: Mapping[str, StoredTensor]  # where each disk-resident parameter is stored

    @property
    def ring_bytes(self) -> int:
        return self.staging_bytes * self.staging_buffers

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers.values())


def plan_disk_tier(
    plan: OffloadPlan, stored: Mapping[str, StoredTensor], host_budget: int, staging_buffers: int = STAGING_BUFFERS
) -> DiskLayout | None:
    """The disk tier that fits ``plan``'s offloaded layers and a ring of ``staging_buffers`` into ``host_budget`` bytes.

    None when the arena fits the budget whole. Raises :class:`OptionError`
    for a ring depth below two, when even the staging ring alone does not
    fit, and for a disk-resident parameter that the file's bytes cannot fill
    as they are.
    """
    require_int("staging_buffers", staging_buffers, minimum=MIN_STAGING_BUFFERS)
    offloaded = plan.offloaded
    reads = {layer.offload_index: read_layout(layer, stored) for layer in offloaded}
    for count in range(len(offloaded) + 1):
        chosen = [offloaded[position] for position in spread(len(offloaded), count)]
        staging = max((reads[layer.offload_index].staging_bytes for layer in chosen), default=0)
        on_disk = {layer.offload_index for layer in chosen}
        host = sum(layer.nbytes for layer in offloaded if layer.offload_index not in on_disk)
        if host + staging * staging_buffers <= host_budget:
            break
    else:
        fewer = f", or pass fewer staging_buffers (at least {MIN_STAGING_BUFFERS})" if staging_buffers > MIN_STAGING_BUFFERS else ""
        raise OptionError(
            f"host_budget={format_bytes(host_budget)} is too small: with all {len(offloaded)} offloaded layers on "
            f"disk, the staging ring alone needs {staging_buffers} x {format_bytes(staging)} = "
            f"{format_bytes(staging * staging_buffers)} (staging_buffers={staging_buffers}, each buffer as large as "
            f"the largest layer as read from disk); raise host_budget to at least that{fewer}"
        )
    if not chosen:
        return None
    for layer in chosen:
        _check_copyable(layer)
    return DiskLayout(
        host_budget,
        {layer.offload_index: reads[layer.offload_index] for layer in chosen},
        staging,
        staging_buffers,
        {placement.name: stored[placement.name] for layer in chosen for placement in layer.params},
    )


def spread(total: int, count: int) -> list[int]:
    """``count`` of the positions ``0 .. total-1``, evenly spaced (distinct, since the step is at least 1)."""
    return [int((j + 0.5) * total / count) for j in range(count)]


def read_layout(layer: LayerPlan, stored: Mapping[str, StoredTensor]) -> DiskLayer:
    """The extents (reads) and pieces (copies) that bring ``layer`` from its files into its block."""
    entries = sorted(((stored[p.name], p) for p in layer.params), key=lambda pair: (str(pair[0].path), pair[0].offset))
    groups: list[list[tuple[StoredTensor, ParamPlacement]]] = []
    for entry, placement in entries:
        last = groups[-1][-1][0] if groups else None
        # Merge when the aligned ranges touch: the next tensor starts in the page where the last one ends, or the next.
        if last is not None and last.path == entry.path and align_down(entry.offset) <= align_up(last.offset + last.nbytes):
            groups[-1].append((entry, placement))
        else:
            groups.append([(entry, placement)])
    extents, pieces, staging = [], [], 0
    for group in groups:
        first, end = group[0][0].offset, max(entry.offset + entry.nbytes for entry, _ in group)
        start = align_down(first)
        extent = Extent(group[0][0].path, start, align_up(end) - start, staging, end - start, tuple(e.name for e, _ in group))
        extents.append(extent)
        for entry, placement in group:
            pieces.append(Piece(staging + entry.offset - start, placement.offset, entry.nbytes))
        staging += extent.nbytes
    return DiskLayer(layer.offload_index, layer.name, tuple(extents), tuple(pieces))


def _check_copyable(layer: LayerPlan) -> None:
    for placement in layer.params:
        if placement.inner or not _is_row_major(placement.shape, placement.stride):
            raise OptionError(
                f"{placement.name} would be read from disk, but the model holds it with strides {placement.stride} "
                f"(row-major is {_row_major(placement.shape)}) and the disk tier copies the file's row-major bytes as "
                "they are; make the parameter contiguous in the model, or raise host_budget to keep its layer in host memory"
            )


def _is_row_major(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """Row-major up to the strides of size-1 dimensions, which address nothing."""
    return all(size == 1 or got == want for size, got, want in zip(shape, stride, _row_major(shape)))


def _row_major(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))
