"""What the kernels' tiling rules need to know about the GPU."""

from __future__ import annotations

import jax


def multiprocessors() -> int:
    """SMs of the default device (132 on an H100 SXM or H200 when the backend does not say)."""
    return getattr(jax.devices()[0], "core_count", None) or 132
