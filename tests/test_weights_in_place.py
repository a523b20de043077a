"""The prefill and decode programs read every weight where it lives: the lowered program slices no weight matrix
out of a larger array, and no instruction of the optimised one writes a weight-shaped copy of a weight. Layer
scans over stacked weights made XLA copy each layer's weights out of the stack every decode step on an H100
(bench/NOTES.md).
Dense families in fp32 on the CPU (no dtype converts); the MoE expert path on a GPU is a Pallas kernel that
takes the expert weights whole (tests/test_kernels_lower_for_gpu.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bench.hlo import materialised_weights, sliced_weight_matrices, weight_shapes
from qwenvl_jax.config import parse_config
from qwenvl_jax.engine import Engine, EngineConfig
from qwenvl_jax.models.model import abstract_model
from qwenvl_jax.sampling import request_keys, sampling_arrays
from qwenvl_jax.tiny_model import TINY_CONFIGS, hf_config_dict


def test_the_check_finds_a_materialised_weight():
    """A transposed copy of a weight is found, an activation of another shape is not."""
    w = jax.ShapeDtypeStruct((64, 96), jnp.float32)
    x = jax.ShapeDtypeStruct((2, 64), jnp.float32)
    copying = jax.jit(lambda w, x: (x @ w, jnp.transpose(w) + 1.0)).lower(w, x).compile().as_text()
    reading = jax.jit(lambda w, x: x @ w).lower(w, x).compile().as_text()
    shapes = weight_shapes({"w": w})
    assert [op[2] for op in materialised_weights(copying, shapes)] == ["f32[96,64]"]
    assert materialised_weights(reading, shapes) == []
    # The outputs of a multi-output fusion, as XLA's GPU rewrite of one-row dots writes x * W (H200 HLO, 2026-12).
    fused = ("%p0 = bf16[4096,1024]{1,0} parameter(0)\n%p1 = bf16[1,4096]{1,0} parameter(1)\n"
             "%loop_multiply_fusion.109 = (bf16[4096,1024]{1,0}, bf16[4096,1024]{1,0}) fusion(%p0, %p1), "
             "kind=kLoop, calls=%fused_multiply.109\n")
    found = materialised_weights(fused, weight_shapes({"w": jax.ShapeDtypeStruct((4096, 1024), jnp.bfloat16)}))
    assert [op[0] for op in found] == ["loop_multiply_fusion.109#0", "loop_multiply_fusion.109#1"]


@pytest.mark.parametrize("model_type, speculative_tokens",
                         [("qwen3_5", 0), ("qwen3_5", 2), ("qwen3_vl", 0), ("qwen2_5_vl", 0)])
def test_decode_and_prefill_programs_copy_no_weight(model_type, speculative_tokens):
    """Also with speculative decoding (the MTP head and the verify pass)."""
    cfg = parse_config(hf_config_dict(model_type, *TINY_CONFIGS[model_type])).with_mtp_layers(
        1 if speculative_tokens else 0)
    graphdef, params = nnx.split(abstract_model(cfg, jnp.float32))
    engine = Engine(graphdef, params, EngineConfig(max_batch=2, max_len=64, prompt_buckets=(16,), decode_steps=2,
                                                   speculative_tokens=speculative_tokens))
    shapes = weight_shapes(params)
    assert len(shapes) >= 5
    decode = engine._decode.lower(engine._weights, engine.state, np.ones(3, bool), engine._eos, np.int32(2),
                                  steps=2, rows=2)
    prefill = engine._prefill.lower(
        engine._weights, engine.state, np.zeros((1, 16), np.int32), np.zeros((3, 1, 16), np.int32),
        np.array([5], np.int32), np.array([0], np.int32), np.array([0], np.int32), np.array([0], np.int32),
        sampling_arrays([], 1), request_keys([0]), np.array([4], np.int32), engine._eos, None,
        (np.zeros((3, 1), np.int32), np.full((1, 64), -1, np.int32)) if speculative_tokens else None,
        fresh=True, final=True)
    for program in (decode, prefill):
        # As written (a stacked-layer scan slices each layer's matrices out; the CPU fuses those slices, a GPU
        # copied them) and as compiled here.
        assert sliced_weight_matrices(program.as_text(), shapes) == []
        assert materialised_weights(program.compile().as_text(), shapes) == []
