"""The two custom ops that the prefetch pass inserts, and what they declare to the compiler.

Their declared mutations are the whole ordering contract with the compiler, and
they are what the ops do to the tensors they are given:

* ``wait_prefetch(layer_params)`` returns once the layer's bytes are in its slot
  (copying them itself when nobody prefetched them). From the graph's point of
  view the layer's parameters change value at that point, so it is declared to
  write them: every reader depends on it (read after write).
* ``start_prefetch(slot_params, live)`` overwrites the slot with the next layer
  that uses it. ``slot_params`` are the parameters in this graph that view that
  slot (the outgoing layer's and, when the graph reads it, the incoming one's);
  their bytes change, so the op is declared to write them: every earlier reader
  must finish first (write after read) and the incoming layer's wait comes after
  it (write after write). Parameters of the slot that the graph does not take as
  inputs cannot be read by it, so they need no edge. ``live`` lists the values
  computed from the outgoing layer that are still needed later; as inputs of an
  opaque op they must be materialised before it, so no fused kernel after the
  copy can re-read the slot.

Neither op takes a layer number or a runtime handle: Dynamo reuses one compiled
graph for every block that runs the same code (each block's parameters are
graph inputs), so a graph compiled for block 3 may well run block 7, or a kept
block, for which the ops do nothing. The layer and its runtime are read off the
first parameter (an attribute the runtime sets), which also keeps the compiled
code free of process-specific numbers, so Inductor's FX graph cache can serve it
to another process.
"""

from __future__ import annotations

import torch
from torch.library import custom_op

from .runtime import runtime_of_tensor

NAMESPACE = "prefetch_compile"


@custom_op(f"{NAMESPACE}::wait_prefetch", mutates_args=("layer_params",))
def wait_prefetch(layer_params: list[torch.Tensor]) -> None:
    runtime = runtime_of_tensor(layer_params[0])
    if runtime is not None:
        runtime.wait(runtime.locate(layer_params[0])[0])


@wait_prefetch.register_fake
def _wait_prefetch_fake(layer_params: list[torch.Tensor]) -> None:
    return None


@custom_op(f"{NAMESPACE}::start_prefetch", mutates_args=("slot_params",))
def start_prefetch(slot_params: list[torch.Tensor], live: list[torch.Tensor]) -> None:
    runtime = runtime_of_tensor(slot_params[0])
    if runtime is not None:
        runtime.start(runtime.plan.next_in_slot(runtime.locate(slot_params[0])[0]))


@start_prefetch.register_fake
def _start_prefetch_fake(slot_params: list[torch.Tensor], live: list[torch.Tensor]) -> None:
    return None


WAIT = torch.ops.prefetch_compile.wait_prefetch.default
START = torch.ops.prefetch_compile.start_prefetch.default
