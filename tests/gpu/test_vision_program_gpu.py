"""The engine's vision program is compiled without XLA's Triton GEMM fusions (engine.VISION_COMPILER_OPTIONS):
on an H100 the autotuner fused the RMSNorm into Qwen2.5-VL's 3420-wide MLP GEMMs as Triton kernels at 30-41% of
the matmul rate (bench/NOTES.md). Compiled here for a two-block tower of Qwen2.5-VL-7B's widths at 4096 patches,
weights abstract: XLA's default picks Triton GEMM fusions there, the engine's program has none."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwenvl_jax.config import parse_config
from qwenvl_jax.engine import Engine, EngineConfig
from qwenvl_jax.models.model import abstract_model
from qwenvl_jax.models.vision import prepare_vision_inputs
from qwenvl_jax.tiny_model import tiny_config

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")

TRITON_GEMM = re.compile(r'"kind":"__triton_(?:nested_)?gemm')


def test_vision_program_runs_its_gemms_outside_triton_fusions():
    raw = tiny_config("qwen2_5_vl")
    raw["vision_config"].update(hidden_size=1280, intermediate_size=3420, num_heads=16)
    cfg = parse_config(raw)
    graphdef, params = nnx.split(abstract_model(cfg, jnp.bfloat16))
    engine = Engine(graphdef, params, EngineConfig(max_batch=1, max_len=64, prompt_buckets=(64,), prefix_cache=False,
                                                   speculative_tokens=0), eos_ids=())
    grid = np.array([[1, 64, 64]])
    args = ([jax.ShapeDtypeStruct(w.shape, w.dtype) for w in engine._weights],
            jax.ShapeDtypeStruct((64 * 64, cfg.vision.patch_dim), jnp.float32),
            prepare_vision_inputs(cfg.vision, grid))

    default = jax.jit(engine._vision.__wrapped__).lower(*args).compile().as_text()
    if not TRITON_GEMM.search(default):
        pytest.skip("XLA's default compile chose no Triton GEMM fusion for this tower: nothing to compare")
    engines = engine._vision.lower(*args).compile().as_text()
    assert not TRITON_GEMM.search(engines), TRITON_GEMM.findall(engines)[:5]
