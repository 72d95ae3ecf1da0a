"""The two custom ops that the prefetch pass inserts, and what they declare to the compiler.

Their declared mutations are the whole ordering contract with the compiler, and
they are what the ops do to the tensors they are given:

* ``wait_prefetch(chunk_params)`` returns once the bytes of those parameters of
  one layer (all of the layer's in the graph, or one chunk of them) are in its
  slot, copying them itself when nobody prefetched them. From the graph's point
  of view these parameters change value at that point, so it is declared to
  write them: every reader depends on it (read after write).
* ``start_prefetch(released, incoming, live)`` overwrites the bytes of the slot
  that ``released`` (parameters of the outgoing layer, the whole layer's or one
  chunk's) occupy with the same bytes of the next layer that uses the slot.
  Their values change, and so do those of ``incoming``: the incoming layer's
  parameters in this graph that lie in those bytes. The op is declared to write
  both: every earlier reader of the released parameters must finish first
  (write after read) and the incoming chunk's wait comes after it (write after
  write). Parameters that the graph does not take as inputs cannot be read by
  it, so they need no edge. ``live`` lists the values computed from the released
  parameters that are still needed later; as inputs of an opaque op they must
  be materialised before it, so no fused kernel after the copy can re-read the
  slot.

A third op, ``offloaded_block(hidden)``, is a tripwire: an offloaded block's hook
puts it on the block's input whenever Dynamo traces the block. The backend
removes it; a graph compiled by any other backend keeps it, and it raises at
the first call, because such a graph would read the slots without waiting.

Neither prefetch op takes a layer number, a chunk number or a runtime handle:
Dynamo reuses one compiled graph for every block that runs the same code (each
block's parameters are graph inputs), so a graph compiled for block 3 may well
run block 7, or a kept block, for which the ops do nothing. The layer and its
runtime are read off the first parameter (an attribute the runtime sets), and
the chunk off the first and last parameter (the pass lists them in the order of
the plan's pieces, which are the same for every layer), which also keeps the
compiled code free of process-specific numbers, so Inductor's FX graph cache
can serve it to another process.
"""

from __future__ import annotations

import torch

from .runtime import OWNER_ATTRIBUTE

NAMESPACE = "prefetch_compile"


# The bodies read the owner attribute directly rather than through runtime_of_tensor: the runtime's
# op methods tell its own parameters from a copy's, and each Python frame counts between kernel launches.
def wait_prefetch(chunk_params: list[torch.Tensor]) -> None:
    runtime = getattr(chunk_params[0], OWNER_ATTRIBUTE, None)
    if runtime is not None:
        runtime.wait_op(chunk_params[0], chunk_params[-1])


def start_prefetch(released: list[torch.Tensor], incoming: list[torch.Tensor], live: list[torch.Tensor]) -> None:
    runtime = getattr(released[0], OWNER_ATTRIBUTE, None)
    if runtime is not None:
        runtime.start_op(released[0], released[-1])


def offloaded_block(hidden: torch.Tensor) -> torch.Tensor:
    raise RuntimeError(
        "an offloaded model ran inside a graph compiled by another torch.compile backend: its offloaded "
        "weights would be read from slots that hold other layers. Compile it with "
        'backend="prefetch_offload" (or do not offload it)'
    )


def _no_result(*args: object) -> None:
    return None


def _same_as(hidden: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(hidden)


# Registered with the plain library API rather than ``torch.library.custom_op``: the
# latter wraps every call in an autograd.Function and an ADInplaceOrView step, some
# 40-80 us of host time per call, while the ops run once per layer in every forward
# that is not a CUDA graph replay. One CompositeExplicitAutograd kernel serves CPU and
# CUDA; inference only, so no autograd formula is needed (the backend refuses grad mode).
_LIBRARY = torch.library.Library(NAMESPACE, "DEF")
_LIBRARY.define("wait_prefetch(Tensor(a!)[] chunk_params) -> ()")
_LIBRARY.define("start_prefetch(Tensor(a!)[] released, Tensor(b!)[] incoming, Tensor[] live) -> ()")
_LIBRARY.define("offloaded_block(Tensor hidden) -> Tensor")
_LIBRARY.impl("wait_prefetch", wait_prefetch, "CompositeExplicitAutograd")
_LIBRARY.impl("start_prefetch", start_prefetch, "CompositeExplicitAutograd")
torch.library.register_fake(f"{NAMESPACE}::wait_prefetch", _no_result, lib=_LIBRARY)
torch.library.register_fake(f"{NAMESPACE}::start_prefetch", _no_result, lib=_LIBRARY)
_LIBRARY.impl("offloaded_block", offloaded_block, "CompositeExplicitAutograd")
torch.library.register_fake(f"{NAMESPACE}::offloaded_block", _same_as, lib=_LIBRARY)

WAIT = torch.ops.prefetch_compile.wait_prefetch.default
START = torch.ops.prefetch_compile.start_prefetch.default
# Put by an offloaded block's hook into every graph Dynamo traces through the block; the
# prefetch pass takes it out, and under any other backend it raises instead of computing.
OFFLOADED_BLOCK = torch.ops.prefetch_compile.offloaded_block.default
