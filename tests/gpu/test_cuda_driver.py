"""The driver's host-to-device copy that the runtime issues its copies with (prefetch_compile.cuda_driver)."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

import prefetch_compile
from prefetch_compile.cuda_driver import HostToDevice
from prefetch_compile.memory import register_pinned, unregister_pinned

llama_like = pytest.importorskip("llama_like")


def test_a_copy_lands_on_the_stream_it_is_given_and_nowhere_else():
    """Bytes from a registered host buffer reach the device range named, in order after the stream's earlier work."""
    host = torch.arange(1 << 16, dtype=torch.int32)
    register_pinned(host.view(torch.uint8))
    try:
        device = torch.full(((1 << 16) + 8,), -1, dtype=torch.int32, device="cuda")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            device.fill_(-2)  # queued first on the same stream: the copy must land after it
        status = HostToDevice().copy(device[4:].data_ptr(), host.data_ptr(), host.nbytes, stream.cuda_stream)
        assert status == 0
        stream.synchronize()
        assert torch.equal(device[4:-4].cpu(), host)
        assert device[:4].eq(-2).all() and device[-4:].eq(-2).all()  # the bytes outside the range are untouched
    finally:
        unregister_pinned(host.view(torch.uint8))


def test_a_refused_copy_is_raised_with_the_driver_error_and_what_was_copied():
    driver = HostToDevice()
    host = torch.zeros(16, dtype=torch.uint8)
    status = driver.copy(0, host.data_ptr(), 16, torch.cuda.current_stream().cuda_stream)  # no device memory at 0
    assert status != 0
    error = driver.error(status, 16, "layers.3")
    assert "copying 16 bytes of layers.3 to the device failed: cuMemcpyHtoDAsync returned CUDA_ERROR_" in str(error)


def test_a_forward_in_a_thread_that_made_no_cuda_call_before_copies_correctly():
    """The driver acts in the calling thread's current context, which the runtime's event record binds first."""
    shape = llama_like.LlamaShape(vocab=512, hidden=256, intermediate=1024, heads=8, kv_heads=2, layers=6)
    model = llama_like.build(shape, device="cuda", dtype=torch.float32, seed=0)
    resident = torch.compile(copy.deepcopy(model))
    compiled = torch.compile(model, backend="prefetch_offload", options={"group_size": 2, "prefetch_step": 1})
    x = torch.randint(0, 512, (2, 32), device="cuda")
    results: list[torch.Tensor] = []
    errors: list[BaseException] = []

    def forwards() -> None:
        try:
            with torch.inference_mode():
                for _ in range(3):
                    results.append(compiled(x).cpu())
        except BaseException as error:  # noqa: BLE001  (re-raised in the test's thread)
            errors.append(error)

    thread = threading.Thread(target=forwards)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    with torch.inference_mode():
        want = resident(x).cpu()
    runtime = prefetch_compile.runtime_of(model)
    assert runtime.counters.copies > 0 and runtime.counters.ensure_misses == 0
    for got in results:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
