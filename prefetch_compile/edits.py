"""In-place edits of offloaded parameters: seen through PyTorch's version counters, then kept or refused.

An offloaded parameter is a view of its slot, and the slot holds whichever of
the layers sharing it was copied there last; the true value lives in the host
arena. An in-place edit (``with torch.no_grad(): param.mul_(2)``,
``param.copy_(...)``, ``param[0] = ...``, ``torch.nn.init.*``) writes the
slot's bytes only: the next copy into the slot loses it, and while another
layer sits there it overwrites that layer's weights instead.

PyTorch counts the in-place writes to every tensor (``tensor._version``,
shared by its views and by ``detach()``), and the runtime's own copies write
through other views of the slot, never through a parameter. A counter that
moved is therefore a user's edit. :class:`EditWatch` keeps the counters as the
runtime last saw them; the runtime compares them each time it is entered (a
compiled graph, a CUDA graph replay, an eager block call) and before it reads
or writes host values (``state_dict``, ``load_state_dict``, ``load_weights``).
No Python runs between two such points that could move a slot's owner, so the
owner the runtime sees is the one the edit wrote over: the edit is kept
(written to the host arena) when that was the edited layer itself, and refused
with :class:`InPlaceEditError` otherwise. One look costs one counter read per
offloaded tensor; none is made per op.

Not seen: writes that bypass the parameter's counter, through ``param.data``
(a new tensor with a counter of its own), ``untyped_storage()``, ``numpy()``
or a DLPack alias.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch

from .leaves import get_inner
from .plan import LayerPlan, OffloadPlan, ParamPlacement

Leaf = tuple[LayerPlan, ParamPlacement]


class InPlaceEditError(RuntimeError):
    """An in-place edit of an offloaded parameter that could not reach its host copy."""


@dataclass(frozen=True)
class _Watched:
    tensor: torch.Tensor
    leaves: tuple[Leaf, ...]  # the leaves whose bytes an in-place op on ``tensor`` writes


class EditWatch:
    """The version counter of every offloaded parameter (and leaf), as the runtime last saw it."""

    def __init__(self, placements: Mapping[str, Sequence[Leaf]], params: Mapping[str, torch.Tensor]) -> None:
        watched: list[_Watched] = []
        self._positions: dict[str, list[int]] = {}  # parameter name -> its entries in ``watched``
        for name, leaves in placements.items():
            param = params[name]
            # A dense parameter is its own one leaf. A subclass parameter's wrapper counts the ops on the
            # parameter, its leaves (plain tensors) the ops on them; both are watched.
            entries = [_Watched(param, tuple(leaves))]
            entries += [
                _Watched(get_inner(param, placement.inner), ((layer, placement),))
                for layer, placement in leaves
                if placement.inner
            ]
            self._positions[name] = list(range(len(watched), len(watched) + len(entries)))
            watched += entries
        self._watched = tuple(watched)
        self._tensors = tuple(entry.tensor for entry in watched)
        self._seen = self._versions()

    def _versions(self) -> list[int]:
        return [tensor._version for tensor in self._tensors]

    def _chosen(self, names: Iterable[str]) -> list[int]:
        return [position for name in names for position in self._positions.get(name, ())]

    def changed(self, names: Iterable[str] | None = None) -> list[Leaf]:
        """The leaves written in place since the last look (at ``names`` only, if given); they count as seen now."""
        if names is None:
            now = self._versions()
            if now == self._seen:  # the usual case: one list comparison
                return []
            positions = [position for position, (version, seen) in enumerate(zip(now, self._seen)) if version != seen]
        else:
            positions = [
                position for position in self._chosen(names) if self._tensors[position]._version != self._seen[position]
            ]
        self._mark_seen(positions)
        return list(dict.fromkeys(leaf for position in positions for leaf in self._watched[position].leaves))

    def accept(self, names: Iterable[str]) -> None:
        """Count the current versions of ``names`` as seen: they were written by ``load_state_dict`` itself."""
        self._mark_seen(self._chosen(names))

    def _mark_seen(self, positions: Iterable[int]) -> None:
        for position in positions:
            self._seen[position] = self._tensors[position]._version


class CopyWatch:
    """Values of offloaded parameters handed out by ``state_dict()`` / ``host_value``, watched for writes.

    Two kinds are handed out, and a write into either must not pass unseen:

    * a disk-resident parameter's value is read from the checkpoint file into a
      fresh tensor, and the disk tier never writes the file, so a write into it
      (``model.state_dict()[name].copy_(w)``, which changes a model that is not
      offloaded) would change nothing: the runtime refuses it;
    * a host-resident parameter's value is its host copy's bytes, on a storage of
      its own (so, with a version counter of its own), so a write into it changes
      the host copy, and the runtime copies the layers sitting in their slots in again.

    Each value is kept with its version counter as handed out; one that moved is
    a write, reported once by the next look (:meth:`written`) and watched on from
    its new version. A value is held strongly until the model's next call
    (:meth:`let_go`): in that idiom the dict is a temporary, freed as soon as the
    write is done, and a value held weakly would be gone, its write unseen. From
    then on it is held weakly, so a dict the caller keeps is watched for as long
    as it lives and a dropped one is freed. The latest value of each parameter is
    the one held, so repeated ``state_dict()`` calls between two forwards hold
    one set of values, not one per call.
    """

    def __init__(self) -> None:
        self._held: dict[str, tuple[torch.Tensor, int]] = {}
        self._watched: list[tuple[weakref.ref[torch.Tensor], int, str]] = []

    def add(self, name: str, value: torch.Tensor) -> None:
        if name in self._held:  # an earlier value, already looked at by this hand-out: watched weakly from now on
            earlier, version = self._held[name]
            self._watched.append((weakref.ref(earlier), version, name))
        self._held[name] = (value, value._version)

    def written(self) -> list[str]:
        """The names whose values were written since the last look (each once); dead values are dropped."""
        if not self._held and not self._watched:  # the usual case, at every runtime entry
            return []
        written = []
        for name, (value, version) in self._held.items():
            if value._version != version:
                written.append(name)
                self._held[name] = (value, value._version)
        watched = []
        for ref, version, name in self._watched:
            value = ref()
            if value is None:
                continue
            if value._version != version:
                written.append(name)
            watched.append((ref, value._version, name))
        self._watched = watched
        return written

    def let_go(self) -> None:
        """Hold the values weakly (at a call of the model, after a look: a temporary's write came before it)."""
        if self._held:  # at every call: nothing to do, usually
            self._watched += [(weakref.ref(value), version, name) for name, (value, version) in self._held.items()]
            self._held = {}


def check_counted(plan: OffloadPlan, params: Mapping[str, torch.Tensor]) -> None:
    """Refuse offloaded parameters without a version counter: parameters made under ``torch.inference_mode()``.

    Such a parameter is an inference tensor, whose in-place writes PyTorch does not
    count, so :class:`EditWatch` could not see an edit that the next copy into its
    slot would lose. Checked before anything is moved, so a refused model is left
    as it was.
    """
    for layer in plan.offloaded:
        for placement in layer.params:
            if get_inner(params[placement.param_name], placement.inner).is_inference():
                raise ValueError(
                    f"{placement.param_name} is an inference tensor (the model was built or loaded under "
                    "torch.inference_mode()), whose in-place writes PyTorch does not count, so an edit of it "
                    "after offloading could be lost unseen; build or load the model outside inference_mode "
                    "(calling it under inference_mode is fine)"
                )


def refusal(refused: Sequence[tuple[str, str]], on_disk: Sequence[str] = ()) -> InPlaceEditError:
    """The error for edits that could not be kept: (leaf name, why) each; ``on_disk``: those of disk-resident layers.

    A disk-resident layer's weights cannot be written by any call (the files are
    never written), so the usual advice to write them with ``load_weights`` is
    replaced for those.
    """
    lines = "\n".join(f"  {name}: {why}" for name, why in refused)
    advice = (
        "Write offloaded weights with runtime.load_weights({name: value}) or model.load_state_dict(...), or edit "
        "them before offloading"
    )
    if on_disk:
        advice = (
            f"{', '.join(on_disk)} can change only by writing the checkpoint and loading it again (the disk tier "
            "refuses every write)" + ("" if len(on_disk) == len(refused) else f"; for the others: {advice}")
        )
    return InPlaceEditError(
        f"in-place edit of {len(refused)} offloaded parameter(s) could not be kept, and was undone:\n{lines}\n"
        "An offloaded parameter is a view of a device slot shared with other layers; an edit is kept only "
        "while the slot holds the parameter's own layer. Nothing else changed: the slot's bytes are copied in "
        f"again before they are read, and the parameters keep their values. {advice}"
    )
