"""Every private PyTorch API the project touches, in one place.

These differ between torch releases (2.11 on the GPU machine, 2.13 in CI); a
change there should need an edit here only.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import fx, nn


def frame_modules() -> Iterator[nn.Module]:
    """nn.Modules in scope of the code Dynamo is compiling, innermost first.

    First the locals of the frame being compiled (``self`` of a forward), then
    those of its callers: when Dynamo skips a model's forward (say, for a graph
    break inside its layer loop) and compiles each block alone, the model itself
    is only found in the caller's frame.
    """
    from torch._dynamo.symbolic_convert import InstructionTranslator

    translator = InstructionTranslator.current_tx()
    if translator is not None:
        yield from (value for value in translator.f_locals.values() if isinstance(value, nn.Module))
    frame = sys._getframe(1)
    while frame is not None:
        yield from (value for value in frame.f_locals.values() if isinstance(value, nn.Module))
        frame = frame.f_back


def is_traceable_wrapper_subclass(value: object) -> bool:
    """Whether ``value`` is a tensor subclass that Dynamo and AOT autograd see through ``__tensor_flatten__``."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass as check

    return check(value)


def aot_placeholder_sources(dynamo_inputs: Sequence[Any]) -> list[tuple[int, tuple[str, ...] | None]]:
    """For each placeholder of AOT autograd's graph, the Dynamo input it comes from and the inner path inside it.

    AOT replaces each traceable subclass input by its inner values, depth first
    in ``__tensor_flatten__`` order, followed by one placeholder per symbolic
    size, then per symbolic stride, of the subclass (path ``None``). Plain
    inputs map to themselves (path ``()``). ``dynamo_inputs`` must be Dynamo's
    fake values (``example_value`` of its placeholders), whose sizes say which
    are symbolic; the real example inputs do not.

    This mirrors ``unwrap_tensor_subclasses(..., append_symints=True)`` of
    ``torch/_functorch/_aot_autograd/subclass_utils.py``; the backend checks each
    placeholder's fake value against the input it is mapped to, so a change of
    that order fails loudly instead of misplacing an offloaded weight.
    """
    from .leaves import flatten

    sources: list[tuple[int, tuple[str, ...] | None]] = []
    for index, value in enumerate(dynamo_inputs):
        sources.extend((index, path) for path, _ in flatten(value))
        if is_traceable_wrapper_subclass(value):
            symbolic = [s for s in (*value.size(), *value.stride()) if _is_symbolic(s)]
            sources.extend((index, None) for _ in symbolic)
    return sources


def _is_symbolic(size: object) -> bool:
    return isinstance(size, torch.SymInt) and not size.node.is_nested_int()


def static_fake(tensor: torch.Tensor) -> torch.Tensor:
    """A fake of ``tensor`` with static sizes, strides and storage offset, in the fake mode Dynamo is tracing with."""
    from torch._guards import TracingContext

    return TracingContext.get().fake_mode.from_tensor(tensor.detach(), static_shapes=True)


def inductor_freezing_enabled() -> bool:
    import torch._inductor.config as inductor_config

    return bool(inductor_config.freezing)


def compile_with_inductor(gm: fx.GraphModule, example_inputs: list[Any], graph_pass: Callable[[fx.Graph], None]) -> Callable:
    """Inductor, with ``graph_pass`` run on the post-grad ATen graph (after the user's own post pass, if any)."""
    import torch._inductor.config as inductor_config
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.custom_graph_pass import CustomGraphPass

    user_pass = inductor_config.post_grad_custom_post_pass

    class PostGradPass(CustomGraphPass):
        def __call__(self, graph: fx.Graph) -> None:
            if user_pass is not None:
                user_pass(graph)
            graph_pass(graph)

        def uuid(self) -> None:
            # The pass depends on live runtime state (which tensors are offloaded), so
            # results must not be shared through Inductor's FX graph cache.
            return None

    return compile_fx(gm, example_inputs, config_patches={"post_grad_custom_post_pass": PostGradPass()})


def compile_with_aot_eager(gm: fx.GraphModule, example_inputs: list[Any], graph_pass: Callable[[fx.Graph], None]) -> Callable:
    """AOT autograd's ATen graph, run by the FX interpreter after ``graph_pass``: Inductor's IR, without Inductor."""
    from torch._dynamo.backends.common import aot_autograd

    def forward_compiler(aten_gm: fx.GraphModule, aten_inputs: list[Any]) -> Callable:
        graph_pass(aten_gm.graph)
        aten_gm.recompile()
        return aten_gm

    return aot_autograd(fw_compiler=forward_compiler)(gm, example_inputs)
