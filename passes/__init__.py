"""Graph passes of prefetch-compile (installed as ``prefetch_compile.passes``).

Plain functions over ``torch.fx`` graphs; they know nothing of streams or
memory, only of which placeholders hold which offloaded layer's parameters.
"""

from .insert_prefetch import InsertedOp, PrefetchPassResult, SlotConflictError, insert_prefetch_ops
from .param_readers import GraphReads, LayerReads, ParamInput, analyze_param_reads, node_value

__all__ = [
    "GraphReads",
    "InsertedOp",
    "LayerReads",
    "ParamInput",
    "PrefetchPassResult",
    "SlotConflictError",
    "analyze_param_reads",
    "insert_prefetch_ops",
    "node_value",
]
