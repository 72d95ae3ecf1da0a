"""What an offloaded model does when Python code, not a compiled graph, touches it.

After offloading, an offloaded parameter is a view of a device slot that holds
whichever layer was copied there last. Every path by which Python code reads or
writes parameters must know that, or it returns or stores another layer's
weights without a word. This module makes each path correct or refuses it:

* **an eager call of a block** waits for the block's layer and prefetches the
  next one (so the uncompiled model, and blocks Dynamo compiles one at a time,
  compute right), under the runtime's lock; it refuses grad mode (a backward
  would read weights overwritten since) and parameters moved out of their slot;
* **state_dict()** returns each offloaded parameter's true value, its bytes in
  the pinned host arena on a storage of their own (a CPU tensor), not the slot's
  current content;
* **load_state_dict()** writes offloaded values into the host arena (and the
  slot when the layer sits there), cast to the parameter's dtype as PyTorch
  does, and tells the runtime's edit watch (``edits.py``) that PyTorch's own
  copy into the parameter is not a user's in-place edit; ``assign=True`` is
  refused, and so is a value for a disk-resident parameter (its checkpoint
  file is never written), before any module loads;
* **copy.deepcopy / pickling** of the model, a block, or a module holding an
  offloaded parameter is refused: the copy would hold one slot's content.

While Dynamo traces, the block hooks read the block's ``OFFLOADED_FLAG`` (Dynamo
guards on it, so one compiled graph never serves both an offloaded and a kept
block) and put the ``offloaded_block`` tripwire on the block's input: the
prefetch backend removes it, any other backend's graph raises. Dynamo never
compiles a hook as a frame of its own (as it would when an offloaded block runs
eagerly after a graph break): called from eager code, a hook runs eagerly.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from . import _torch_internals
from .ops import OFFLOADED_BLOCK
from .plan import OffloadPlan
from .runtime import PrefetchRuntime

OFFLOADED_FLAG = "_prefetch_compile_offloaded"


def install_model_hooks(model: nn.Module, plan: OffloadPlan, runtime: PrefetchRuntime) -> None:
    _install_block_hooks(model, plan, runtime)
    _install_state_dict_hooks(model, plan, runtime)
    _refuse_loads_up_front(model, runtime)
    _refuse_copies(model, plan)


def _install_block_hooks(model: nn.Module, plan: OffloadPlan, runtime: PrefetchRuntime) -> None:
    blocks = model.get_submodule(plan.layer_list_path) if plan.layer_list_path else model
    for layer in plan.layers:
        block = blocks[layer.index]
        setattr(block, OFFLOADED_FLAG, layer.offloaded)
        names = sorted({placement.param_name for placement in layer.params})
        offload_index = layer.offload_index if layer.offloaded else -1
        following = plan.next_in_slot(offload_index) if layer.offloaded else -1

        def before(
            module: nn.Module, args: tuple, names: list[str] = names, name: str = layer.name, offload_index: int = offload_index
        ) -> tuple | None:
            if not getattr(module, OFFLOADED_FLAG):
                return None
            if torch.compiler.is_compiling():
                if args and isinstance(args[0], torch.Tensor):
                    return (OFFLOADED_BLOCK(args[0]), *args[1:])  # the tripwire (see ops.py)
                return None
            _enter_block(runtime, names, name, offload_index)
            return None

        def after(
            module: nn.Module, args: object, output: object, following: int = following, offload_index: int = offload_index
        ) -> None:
            if not getattr(module, OFFLOADED_FLAG) or torch.compiler.is_compiling():
                return
            _leave_block(runtime, offload_index, following)

        # Called from eager code in a compiled region (a block run eagerly after a graph break), a hook is
        # a frame Dynamo would compile: with is_compiling() true there, the eager halves below would never
        # run and the tripwire would cost a graph of its own. Traced inside a block call, it is inlined.
        block.register_forward_pre_hook(_torch_internals.never_compiled_as_a_frame(before))
        # always_call: the lock taken before the block is released even when the block raises.
        block.register_forward_hook(_torch_internals.never_compiled_as_a_frame(after), always_call=True)


# The eager halves of the block hooks, kept from Dynamo: called from eager code inside a
# compiled region (after a graph break), they would otherwise be compiled as frames of their
# own, guarded on the runtime's slot state, and recompiled at every call.
@torch.compiler.disable
def _enter_block(runtime: PrefetchRuntime, names: list[str], name: str, offload_index: int) -> None:
    # The lock first: the block's forward hook runs (always_call) when anything here raises, and releases it.
    runtime.acquire(f"eager call of {name}")
    if torch.is_grad_enabled() and any(runtime.offloaded_params[param].requires_grad for param in names):
        raise RuntimeError(
            f"{name} is offloaded and grad mode is on: a backward would read weights that later layers have "
            "overwritten in the slot. Offloaded models are for inference: use torch.no_grad() or "
            "torch.inference_mode(), or call requires_grad_(False) on the model"
        )
    runtime.check_placement(names)
    runtime.check_not_replaced(names)
    runtime.wait(offload_index)
    runtime.begin_block(offload_index)


@torch.compiler.disable
def _leave_block(runtime: PrefetchRuntime, offload_index: int, following: int) -> None:
    try:
        runtime.end_block(offload_index)
        runtime.start(following)
    finally:
        runtime.release()


def _owners(model: nn.Module, plan: OffloadPlan) -> dict[nn.Module, dict[str, str]]:
    """Each module that directly holds offloaded parameters: {attribute name: parameter name}."""
    owners: dict[nn.Module, dict[str, str]] = {}
    for layer in plan.offloaded:
        for placement in layer.params:
            module_path, _, attribute = placement.param_name.rpartition(".")
            owners.setdefault(model.get_submodule(module_path), {})[attribute] = placement.param_name
    return owners


def _install_state_dict_hooks(model: nn.Module, plan: OffloadPlan, runtime: PrefetchRuntime) -> None:
    """Hooks on the modules that own offloaded parameters, so any ``state_dict`` call that reaches them is right."""
    for owner, attributes in _owners(model, plan).items():
        # The parameters a running load_state_dict writes, from this owner's load hook to its after-load hook.
        loaded: list[str] = []

        def save(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict, attributes=attributes) -> None:
            for attribute, name in attributes.items():
                key = prefix + attribute
                if key in state_dict:
                    # As returned, not detached: host values need no grad, and the runtime watches these very
                    # tensors for writes (into a host copy: copied to the slot; into a disk-resident value's copy:
                    # refused, since it would be lost).
                    state_dict[key] = runtime.host_value(name)

        def load(
            module: nn.Module,
            state_dict: dict,
            prefix: str,
            local_metadata: dict,
            strict: bool,
            missing_keys: list,
            unexpected_keys: list,
            error_msgs: list,
            attributes=attributes,
            loaded=loaded,
        ) -> None:
            updates = {}
            for attribute, name in attributes.items():
                key = prefix + attribute
                if key not in state_dict:
                    continue
                value, param = state_dict[key], runtime.offloaded_params[name]
                if tuple(value.shape) != tuple(param.shape):
                    continue  # PyTorch reports the size mismatch itself and copies nothing
                updates[name] = value.detach().to(param.dtype)
                # PyTorch then copies the entry into the parameter: make that a copy of the slot onto itself.
                state_dict[key] = param
            if updates:
                runtime.load_weights(updates)
            loaded[:] = updates

        def after_load(module: nn.Module, incompatible_keys: object, loaded=loaded) -> None:
            # PyTorch's copy of the slot onto each parameter moved its version counter: not a user's edit.
            runtime.edits.accept(loaded)
            loaded.clear()

        owner.register_state_dict_post_hook(save)
        owner.register_load_state_dict_pre_hook(load)
        owner.register_load_state_dict_post_hook(after_load)


def _refuse_loads_up_front(model: nn.Module, runtime: PrefetchRuntime) -> None:
    """A load_state_dict that must be refused is refused before any module has loaded anything.

    Two are: ``assign=True`` over an offloaded parameter (it would put the
    parameter outside its slot), and a value for a disk-resident parameter (its
    checkpoint file is never written). Refused from the owner's own load hook,
    the modules loaded before it would keep their new values: half a model
    loaded, and nothing to say so at the next forward. PyTorch runs a module's
    load pre-hooks before it loads the module's own tensors and its children's,
    so a hook on every module above an offloaded parameter (the model itself
    included) sees the whole state dict of whichever module ``load_state_dict``
    was called on, first.
    """
    disk_resident = runtime.disk.layout.sources if runtime.disk is not None else {}
    under: dict[str, list[tuple[str, str]]] = {}  # module path -> (name relative to it, full name)
    for name in dict.fromkeys([*runtime.offloaded_params, *disk_resident]):  # in the model's order
        parts = name.split(".")
        for depth in range(len(parts)):
            under.setdefault(".".join(parts[:depth]), []).append((".".join(parts[depth:]), name))
    for path, names in under.items():

        def check(
            module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict, *args: Any, names=names
        ) -> None:
            assign = local_metadata.get("assign_to_params_buffers", False)
            for relative, name in names:
                if prefix + relative not in state_dict:
                    continue
                if assign:
                    raise RuntimeError(
                        f"load_state_dict(assign=True) would replace offloaded parameter {name} with a tensor "
                        "outside its slot; nothing was loaded. Load without assign=True (values are copied into "
                        "the host arena)"
                    )
                if name in disk_resident:
                    runtime.refuse_disk_write(name, "load_state_dict")

        model.get_submodule(path).register_load_state_dict_pre_hook(check)


def _refuse_copies(model: nn.Module, plan: OffloadPlan) -> None:
    """deepcopy and pickle look ``__deepcopy__`` / ``__reduce_ex__`` up on the instance: make both refuse."""
    modules = {model}
    for layer in plan.offloaded:
        modules.add(model.get_submodule(layer.name))
    modules.update(_owners(model, plan))
    for module in modules:
        refusal = _refusal(type(module).__name__)
        module.__dict__["__deepcopy__"] = refusal
        module.__dict__["__reduce_ex__"] = refusal


def _refusal(what: str) -> Callable[..., Any]:
    def refuse(*args: Any) -> Any:
        raise RuntimeError(
            f"this {what} is offloaded by prefetch_compile: its offloaded parameters are views of a shared device "
            "slot, so a copy or a pickle would hold whichever layer sits there now. Copy or save the model "
            "before offloading, or save model.state_dict() (it returns the true offloaded values)"
        )

    return refuse
