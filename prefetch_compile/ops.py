"""The two custom ops that the graph pass inserts, and what they declare to the compiler.

Their declared mutations are the whole ordering contract with the compiler:

* ``wait_prefetch(layer_params)`` claims to write the layer's parameters, so
  every later reader of them depends on it (read after write).
* ``start_prefetch(slot_params, live)`` claims to write the parameters that view
  the slot being overwritten (the outgoing layer's and, when present, the
  incoming one's), so every earlier reader must finish first (write after read)
  and the incoming layer's wait comes after it (write after write). ``live``
  lists the values computed from the outgoing layer that are still needed
  later; as inputs of an opaque op they must be materialised before it, so no
  fused kernel after the copy can re-read the slot.

The layer is found from the parameter tensors themselves at run time, not
baked into the graph: Dynamo reuses one compiled graph for every block that
runs the same code (each block's parameters are graph inputs), so a graph
compiled for block 3 may well be running block 7, or a kept block, for which
the ops do nothing.
"""

from __future__ import annotations

import torch
from torch.library import custom_op

from .runtime import runtime_by_id

NAMESPACE = "prefetch_compile"


@custom_op(f"{NAMESPACE}::wait_prefetch", mutates_args=("layer_params",))
def wait_prefetch(layer_params: list[torch.Tensor], runtime_id: int) -> None:
    runtime = runtime_by_id(runtime_id)
    layer = runtime.layer_of(layer_params[0])
    if layer is not None:
        runtime.wait(layer)


@wait_prefetch.register_fake
def _wait_prefetch_fake(layer_params: list[torch.Tensor], runtime_id: int) -> None:
    return None


@custom_op(f"{NAMESPACE}::start_prefetch", mutates_args=("slot_params",))
def start_prefetch(slot_params: list[torch.Tensor], live: list[torch.Tensor], runtime_id: int) -> None:
    runtime = runtime_by_id(runtime_id)
    layer = runtime.layer_of(slot_params[0])
    if layer is not None:
        runtime.start(runtime.plan.next_in_slot(layer))


@start_prefetch.register_fake
def _start_prefetch_fake(
    slot_params: list[torch.Tensor], live: list[torch.Tensor], runtime_id: int
) -> None:
    return None


WAIT = torch.ops.prefetch_compile.wait_prefetch.default
START = torch.ops.prefetch_compile.start_prefetch.default
