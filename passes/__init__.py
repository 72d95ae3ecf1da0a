"""Graph passes of prefetch-compile (installed as ``prefetch_compile.passes``).

Plain functions over ``torch.fx`` graphs; they know nothing of streams or
memory, only of which placeholders hold the parameters of which offload index.
"""

from .prefetch import Chunk, InsertedOp, PrefetchPassResult, SlotConflictError, prefetch_pass
from .param_readers import GraphReads, OffloadReads, ParamInput, PieceReads, analyze_param_reads, node_value

__all__ = [
    "Chunk",
    "GraphReads",
    "InsertedOp",
    "OffloadReads",
    "ParamInput",
    "PieceReads",
    "PrefetchPassResult",
    "SlotConflictError",
    "analyze_param_reads",
    "node_value",
    "prefetch_pass",
]
