"""Finding a model's repeated blocks and the parameters of each that may be offloaded.

Offloading works at the granularity of the model's repeated blocks (decoder
layers): they are what runs one after another, so one block's weights can be
copied while the block before it computes.

Models hold many ``nn.ModuleList``s, and the longest is not always the stack:
a mixture-of-experts layer may hold a list of 8 to 128 experts, a T5 block a
list of its 2 or 3 sub-layers, while the model has fewer layers than that.
The stack that the forward iterates over is the list whose blocks hold the
bulk of the weights, and it is never nested inside another such list.
"""

from __future__ import annotations

import gc
import logging

from torch import nn

from .config import OptionError

log = logging.getLogger("prefetch_compile")


def find_layer_list(model: nn.Module, path: str | None = None) -> tuple[str, list[nn.Module]]:
    """Return the dotted path and the blocks of the model's layer list.

    With ``path`` given, that attribute is used (an ``nn.ModuleList`` or
    ``nn.Sequential``). Otherwise, among the ``nn.ModuleList``s whose blocks all
    own parameters, the outermost ones (not inside another such list) compete,
    and the one whose blocks hold the most parameter bytes wins (ties: the first
    in module order). Lists of two or more blocks are preferred to single-block
    lists, which wrap a stack rather than form one.
    """
    if path is not None:
        try:
            container = model.get_submodule(path)
        except AttributeError as error:
            raise OptionError(f"layers={path!r} names no submodule of {type(model).__name__}") from error
        if not isinstance(container, (nn.ModuleList, nn.Sequential)):
            raise OptionError(
                f"layers={path!r} is a {type(container).__name__}; it must be an nn.ModuleList or nn.Sequential"
            )
        return path, list(container)

    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and all(any(True for _ in block.parameters()) for block in module)
    ]
    if not candidates:
        if isinstance(model, nn.Sequential) and len(model) > 1:
            hint = (
                "the model is itself the block stack, and layers names a submodule: wrap it, "
                "nn.Sequential(model), and pass layers='0'"
            )
        else:
            hint = (
                "pass options={'layers': 'dotted.path.to.blocks'} (an nn.ModuleList, or an nn.Sequential, "
                "which is used only when named)"
            )
        raise OptionError(f"found no nn.ModuleList of blocks with parameters in {type(model).__name__}; {hint}")
    stacks = [(name, module) for name, module in candidates if len(module) > 1] or candidates
    outermost = [(name, module) for name, module in stacks if not any(_inside(name, other) for other, _ in stacks)]
    name, module = max(outermost, key=lambda item: parameter_bytes(item[1]))
    return name, list(module)


def describe_layer_list(model: nn.Module, path: str, blocks: list[nn.Module], given: bool) -> str:
    """One log line: which block list the plan uses, how many blocks, and what share of the weights they hold."""
    total = parameter_bytes(model)
    held = parameter_bytes(*blocks)
    share = f"{100 * held / total:.0f}%" if total else "0%"
    how = (
        "named by the plan's layers option: the caller's, or a budget plan's"
        if given
        else "found: the outermost nn.ModuleList holding the most parameters"
    )
    return f"prefetch_compile: layer list '{path}' with {len(blocks)} blocks holding {share} of the parameter bytes ({how})"


def parameter_bytes(*modules: nn.Module) -> int:
    """Bytes of the distinct parameters under ``modules`` (a tied weight counts once)."""
    seen: dict[int, int] = {}
    for module in modules:
        for param in module.parameters():
            seen[id(param)] = param.numel() * param.element_size()
    return sum(seen.values())


def enclosing_modules(module: nn.Module) -> list[nn.Module]:
    """Every live ``nn.Module`` that holds ``module`` somewhere below it, nearest first.

    A module does not know its parents, and Dynamo names only the module whose
    frame it compiles: after a graph break inside a model's layer loop that may be
    one block. The garbage collector knows every live module, so one pass over
    them maps each child to its holders, and the ancestors follow from that map.
    """
    holders: dict[int, list[nn.Module]] = {}
    for candidate in gc.get_objects():
        if issubclass(type(candidate), nn.Module):  # type(), not isinstance: no __class__ lookups on odd objects
            for child in vars(candidate).get("_modules", {}).values():
                if child is not None:
                    holders.setdefault(id(child), []).append(candidate)
    found: dict[int, nn.Module] = {id(module): module}
    frontier = [module]
    while frontier:
        frontier = [holder for child in frontier for holder in holders.get(id(child), ()) if id(holder) not in found]
        found.update((id(holder), holder) for holder in frontier)
    del found[id(module)]
    return list(found.values())


def _inside(name: str, other: str) -> bool:
    """Whether the module at dotted path ``name`` lies strictly below the one at ``other``."""
    return name != other and (other == "" or name.startswith(other + "."))


def is_offloaded_layer(index: int, group_size: int, num_in_group: int) -> bool:
    """The reference's rule: offload the last ``num_in_group`` of every ``group_size`` layers."""
    return index % group_size >= group_size - num_in_group


def matches_offload_params(param_name: str, patterns: tuple[str, ...]) -> bool:
    """Whether a parameter's dotted name contains one of ``patterns`` as whole name components.

    ``mlp`` matches ``mlp.up_proj.weight`` and ``up_proj`` matches it too, but
    ``up_proj`` does not match ``gate_up_proj.weight``. No patterns match everything.
    """
    if not patterns:
        return True
    dotted = f".{param_name}."
    return any(f".{pattern.strip('.')}." in dotted for pattern in patterns)
