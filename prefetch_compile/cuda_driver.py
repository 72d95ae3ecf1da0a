"""The CUDA driver's asynchronous host-to-device copy, called by address.

Why not ``Tensor.copy_``: a copying ``start_prefetch`` runs between an Inductor
graph's kernel launches, and there ``copy_(non_blocking=True)`` of one pinned
range costs several times the ``cudaMemcpyAsync`` it ends in (35.5 µs against
14.5 under the profiler on the H100, BENCHMARKS.md): the dispatcher, a
TensorIterator, the device guard, and the pinned allocator's lookup of the
source. It also copies only on the current stream, which the runtime had to set
and restore around each copy. The runtime's copies always run between buffers
that never move (the host arena or a disk staging buffer, and a slot), so their
addresses are known once, and one driver call per memcpy is all a copy needs.

The driver library is the one the CUDA build of torch already loaded
(``libcuda.so.1``). Its calls act in the calling thread's current context: the
runtime calls it right after a torch event record, which binds the primary
context of the current device, and makes the runtime's device current first
when another one is.
"""

from __future__ import annotations

import ctypes
from typing import Callable


class HostToDevice:
    """``cuMemcpyHtoDAsync``: ``copy(target, source, nbytes, stream)`` returns the driver's status, 0 on success.

    The status is returned rather than checked here: the runtime calls ``copy``
    once per memcpy between kernel launches, and a checking wrapper would add a
    Python frame to each call. :meth:`error` turns a nonzero status into the
    exception to raise.
    """

    def __init__(self) -> None:
        try:
            library = ctypes.CDLL("libcuda.so.1")
        except OSError as error:
            raise RuntimeError(
                f"prefetch_compile copies through the CUDA driver, and libcuda.so.1 could not be loaded: {error}"
            ) from error
        copy = library.cuMemcpyHtoDAsync_v2
        copy.argtypes = (ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
        copy.restype = ctypes.c_int
        self.copy: Callable[[int, int, int, int], int] = copy
        self._error_name = library.cuGetErrorName
        self._error_name.argtypes = (ctypes.c_int, ctypes.POINTER(ctypes.c_char_p))
        self._error_name.restype = ctypes.c_int

    def error(self, status: int, nbytes: int, what: str) -> RuntimeError:
        """The exception for a copy of ``nbytes`` bytes of ``what`` that the driver refused with ``status``."""
        name = ctypes.c_char_p()
        known = self._error_name(status, ctypes.byref(name)) == 0 and name.value is not None
        return RuntimeError(
            f"copying {nbytes} bytes of {what} to the device failed: cuMemcpyHtoDAsync returned "
            f"{name.value.decode() if known else status}"
        )
