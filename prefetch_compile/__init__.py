"""prefetch-compile: run a model larger than its GPU through torch.compile.

Some layers' weights live in pinned host memory; a copy stream brings each one
into a small pool of device slots just before it is needed, while the layers
before it compute. Use it as a torch.compile backend::

    compiled = torch.compile(model, backend="prefetch_offload",
                             options={"group_size": 4, "num_in_group": 1, "prefetch_step": 1})

or place a model that does not fit first: :func:`load_checkpoint` fills a model
built on the meta device straight from its checkpoint, :func:`offload` places a
model already in memory.
"""

from .checkpoint import CheckpointError
from .config import OptionError, PlanOptions
from .disk_tier import StreamStats
from .edits import InPlaceEditError
from .loading import load_checkpoint
from .offload import offload, runtime_of
from .runtime import OffloadStats, PrefetchRuntime

__all__ = [
    "CheckpointError",
    "InPlaceEditError",
    "OffloadStats",
    "OptionError",
    "PlanOptions",
    "PrefetchRuntime",
    "StreamStats",
    "load_checkpoint",
    "offload",
    "runtime_of",
]
