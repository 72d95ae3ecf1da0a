"""Graph passes of prefetch-compile (installed as ``prefetch_compile.passes``).

Plain functions over ``torch.fx`` graphs; they know nothing of streams or
memory, only of which placeholders hold which offloaded layer's parameters.
"""

from .insert_prefetch import Chunk, InsertedOp, PrefetchPassResult, SlotConflictError, insert_prefetch_ops
from .param_readers import GraphReads, LayerReads, ParamInput, PieceReads, analyze_param_reads, node_value

__all__ = [
    "Chunk",
    "GraphReads",
    "InsertedOp",
    "LayerReads",
    "ParamInput",
    "PieceReads",
    "PrefetchPassResult",
    "SlotConflictError",
    "analyze_param_reads",
    "insert_prefetch_ops",
    "node_value",
]
