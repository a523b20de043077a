"""qwenvl-jax: pure JAX/Pallas inference for the Qwen vision-language families."""

from qwenvl_jax.config import ModelConfig, TextConfig, VisionConfig, load_config
from qwenvl_jax.qwenvl import QwenVL, load

__all__ = ["ModelConfig", "QwenVL", "TextConfig", "VisionConfig", "load", "load_config"]
