"""qwenvl-jax: pure JAX/Pallas inference for the Qwen vision-language families.

``QwenVL`` and ``load`` are imported on first use: they bring in jax, which takes seconds, and ``qwenvl --help`` or
the jax-free modules (config, the CLI's argument checks) should not wait for it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from qwenvl_jax.config import ModelConfig, TextConfig, VisionConfig, load_config

if TYPE_CHECKING:
    from qwenvl_jax.qwenvl import QwenVL, load

__all__ = ["ModelConfig", "QwenVL", "TextConfig", "VisionConfig", "load", "load_config"]


class _NoTorchNotice(logging.Filter):
    """Drops transformers' import-time notice that PyTorch is absent: we use only its tokenizers and image
    processors, which need no torch, so the notice is noise on every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "PyTorch was not found" not in record.getMessage()


logging.getLogger("transformers").addFilter(_NoTorchNotice())


def __getattr__(name: str) -> Any:
    if name in ("QwenVL", "load"):
        from qwenvl_jax.qwenvl import QwenVL, load

        return {"QwenVL": QwenVL, "load": load}[name]
    raise AttributeError(f"module 'qwenvl_jax' has no attribute {name!r}")
