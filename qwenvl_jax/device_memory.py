"""Out-of-memory errors that say what did not fit and how to make room.

XLA's own error names only the allocation that failed ("RESOURCE_EXHAUSTED: Out of memory while trying to allocate
2.00GiB"), often surfacing later at whatever call blocked next. A demanding case: Qwen3.5-35B-A3B's 64.7 GiB of
bf16 weights on an 80 GB H100, where JAX's GPU allocator stops at 75% of the device (59.4 GiB) unless
XLA_PYTHON_CLIENT_MEM_FRACTION is raised before jax starts, with preallocation off as well.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import jax

GIB = 2**30


def _device_line(device: jax.Device) -> str:
    stats = device.memory_stats() or {}  # None on the CPU
    if "bytes_limit" not in stats:
        return f"{device}"
    return (f"{device}: JAX lets this process allocate {stats['bytes_limit'] / GIB:.1f} GiB there, "
            f"{stats.get('bytes_in_use', 0) / GIB:.1f} GiB of it in use")


@contextlib.contextmanager
def explain_out_of_memory(what: str, needed_bytes: Callable[[], int], remedy: str) -> Iterator[None]:
    """Re-raises XLA's RESOURCE_EXHAUSTED inside the block as a MemoryError naming ``what`` (``needed_bytes()``
    of it, counted only then), the default device's allocator limit and use, and ``remedy``; other errors pass
    unchanged. The block must wait for its arrays (jax.block_until_ready): allocation failures surface when a
    computation completes."""
    try:
        yield
    except jax.errors.JaxRuntimeError as err:
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        raise MemoryError(
            f"{what} ({needed_bytes() / GIB:.2f} GiB) does not fit in device memory "
            f"({_device_line(jax.devices()[0])}). {remedy} On a GPU, JAX's allocator stops at 75% of the device "
            f"unless XLA_PYTHON_CLIENT_MEM_FRACTION (e.g. 0.95) is set before jax is imported.") from err
