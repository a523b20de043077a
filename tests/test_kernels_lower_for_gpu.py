"""The Pallas kernels lowered for CUDA on a machine without a GPU: the interpreter tests run the kernels' logic,
not their Triton or Mosaic GPU lowering, so a kernel that only the GPU compiler path rejects (an unsupported op,
block shape, layout or indexing) would pass CI and fail on the first GPU. Lowering stops at Triton IR and
Mosaic GPU's MLIR (PTX needs the GPU's compiler); the GPU compute capability the Triton lowering asks the
runtime for is given as a Hopper's."""

import functools
import types

import pytest

import jax
import jax.numpy as jnp
from jax import export

from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.gated_delta_rule.chunk import chunk_prefill
from pallas_kernels.gated_delta_rule.recurrent import recurrent_decode, recurrent_tokens
from pallas_kernels.moe_matmul import default_tiling as default_moe_tiling
from pallas_kernels.moe_matmul import moe_experts, moe_experts_pallas
from pallas_kernels.prefill_attention import prefill_attention
from pallas_kernels.skinny_matmul import default_tiling, skinny_matmul_pallas
from pallas_kernels.vision_rotary import apply_vision_rotary_pallas

TRITON_CALL = "__gpu$xla.gpu.triton"


@pytest.fixture
def hopper(monkeypatch):
    """Pallas' Triton lowering reads the compute capability from the local GPU; there is none here."""
    registration = pytest.importorskip("jax._src.pallas.triton.pallas_call_registration")
    if not hasattr(registration, "gpu_info_lib"):
        pytest.skip("this jax's Pallas Triton lowering does not read the GPU through gpu_info_lib")
    monkeypatch.setattr(registration.gpu_info_lib, "get_gpu_info",
                        lambda: types.SimpleNamespace(compute_capability=90))


def lowered_for_cuda(fn, *shapes, donate_argnums=()) -> str:
    exported = export.export(
        jax.jit(fn, donate_argnums=donate_argnums), platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)],
    )(*shapes)
    return exported.mlir_module()


def triton_kernels_in(fn, *shapes) -> int:
    return lowered_for_cuda(fn, *shapes).count(f"stablehlo.custom_call @{TRITON_CALL}")


def spec(shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


def qwen3_5_chunk_shapes(batch, seq_len, dtype):
    """chunk_prefill's arguments at Qwen3.5's GDN heads: 16 key and 32 value heads of 128."""
    hk, hv, d = 16, 32, 128
    return (spec((batch, seq_len, hk, d), dtype), spec((batch, seq_len, hk, d), dtype),
            spec((batch, seq_len, hv, d), dtype), spec((batch, seq_len, hv), jnp.float32),
            spec((batch, seq_len, hv), dtype), spec((batch, hv, d, d), jnp.float32), spec((batch,), jnp.int32))


@pytest.mark.parametrize(
    "batch, seq_len, dtype, prep_heads",
    [(1, 4096, jnp.bfloat16, None), (1, 512, jnp.bfloat16, None), (8, 200, jnp.bfloat16, 2),
     (2, 130, jnp.float32, 2)],
)
def test_chunk_kernels_lower_to_triton(hopper, batch, seq_len, dtype, prep_heads):
    """Qwen3.5's GDN heads (16 key, 32 value heads of 128): prep and scan at the tilings the GPU picks (one
    and two value heads per prep program; 32- and 64-wide scan tiles, 2 and 3 stages) and fp32."""
    fn = functools.partial(chunk_prefill, scale=128**-0.5, prep_heads=prep_heads, scan="triton")
    assert triton_kernels_in(fn, *qwen3_5_chunk_shapes(batch, seq_len, dtype)) == 2


def test_wide_bf16_chunk_scan_lowers_to_mosaic_gpu_with_the_state_aliased(hopper):
    """At B8 (past two waves of 32-wide programs) the scan is the Mosaic GPU one: the prep stays one Triton
    kernel, the scan becomes one Mosaic GPU kernel, and its state result aliases its state operand (the
    mutable-array route), so a donated state is updated in place."""
    fn = functools.partial(chunk_prefill, scale=128**-0.5)
    module = lowered_for_cuda(fn, *qwen3_5_chunk_shapes(8, 200, jnp.bfloat16), donate_argnums=5)
    assert module.count(f"stablehlo.custom_call @{TRITON_CALL}") == 1
    mosaic_calls = [line for line in module.splitlines() if "stablehlo.custom_call @mosaic_gpu" in line]
    assert len(mosaic_calls) == 1
    assert "output_operand_alias<output_tuple_indices = [1]" in mosaic_calls[0]


@pytest.mark.parametrize("batch", [1, 64])
def test_decode_kernel_lowers_to_triton(hopper, batch):
    hk, hv, d = 16, 32, 128
    fn = functools.partial(recurrent_decode, scale=d**-0.5)
    shapes = (spec((batch, hk, d)), spec((batch, hk, d)), spec((batch, hv, d)), spec((batch, hv), jnp.float32),
              spec((batch, hv)), spec((batch, hv, d, d), jnp.float32), spec((batch,), jnp.int32))
    assert triton_kernels_in(fn, *shapes) == 1


@pytest.mark.parametrize("batch, tokens, advance", [(1, 3, False), (8, 3, True), (64, 5, True)])
def test_tokens_kernel_lowers_to_triton_with_the_pool_aliased(hopper, batch, tokens, advance):
    """The speculative verify pass (outputs) and commit (the pool advanced in place) at Qwen3.5's GDN heads,
    over a pool with a spare slot; T is not a power of two."""
    hk, hv, d = 16, 32, 128
    fn = functools.partial(recurrent_tokens, scale=d**-0.5, outputs=not advance, advance=advance)
    shapes = (spec((batch, tokens, hk, d)), spec((batch, tokens, hk, d)), spec((batch, tokens, hv, d)),
              spec((batch, tokens, hv), jnp.float32), spec((batch, tokens, hv)),
              spec((batch + 1, hv, d, d), jnp.float32), spec((batch,), jnp.int32))
    module = lowered_for_cuda(fn, *shapes, donate_argnums=5)
    calls = [line for line in module.splitlines() if f"stablehlo.custom_call @{TRITON_CALL}" in line]
    assert len(calls) == 1
    assert ("output_operand_alias" in calls[0]) == advance


@pytest.mark.parametrize("k, n", [(4096, 1024), (4096, 32), (3584, 512)])
def test_skinny_matmul_lowers_to_triton(hopper, k, n):
    """The one-row decode matmul at the default tiling of Qwen's narrow projections (k/v, GDN gates)."""
    fn = functools.partial(skinny_matmul_pallas, tiling=default_tiling(k, n))
    assert triton_kernels_in(fn, spec((1, k)), spec((k, n))) == 1


@pytest.mark.parametrize("rows, k, n", [(1, 4096, 12288), (8, 12288, 4096)])
def test_fp8_skinny_matmul_lowers_to_triton(hopper, rows, k, n):
    """FP8 weights (float8_e4m3fn, 128x128 block scales) converted to bf16 tile by tile inside the kernel."""
    fn = functools.partial(skinny_matmul_pallas, tiling=default_tiling(k, n, fp8=True), scale_block=(128, 128))
    shapes = (spec((rows, k)), spec((k, n), jnp.float8_e4m3fn), spec((k // 128, n // 128), jnp.float32))
    assert triton_kernels_in(fn, *shapes) == 1


@pytest.mark.parametrize("head_dim", [80, 72])
def test_vision_rotary_kernel_lowers_to_triton(hopper, head_dim):
    tokens, heads, positions = 1000, 16, 64
    shapes = (spec((tokens, heads, head_dim)), spec((tokens, heads, head_dim)), spec((tokens, 2), jnp.int32),
              spec((positions, head_dim // 4), jnp.float32), spec((positions, head_dim // 4), jnp.float32))
    assert triton_kernels_in(apply_vision_rotary_pallas, *shapes) == 1


@pytest.mark.parametrize("batch, num_heads, head_dim", [(1, 16, 256), (64, 16, 256), (1, 28, 128), (64, 28, 128)])
def test_decode_attention_kernel_lowers_to_triton_on_the_whole_cache(hopper, batch, num_heads, head_dim):
    """Qwen3.5-9B's attention (16 query, 4 kv heads of 256) and Qwen2.5-VL-7B's (28, 4 of 128) over a
    4096-position cache with a spare slot: two Triton kernels (the attention over the splits, their merge),
    and the cache reaches the first as the argument itself (a slice of the first B slots before the call would
    be a copy of the cache)."""
    num_kv_heads, max_len = 4, 4096
    cache = spec((batch + 1, max_len, num_kv_heads, head_dim))
    shapes = (spec((batch, num_heads, head_dim)), cache, cache, spec((batch,), jnp.int32))
    fn = functools.partial(decode_attention, impl="pallas")
    assert triton_kernels_in(fn, *shapes) == 2
    cache_type = f"tensor<{batch + 1}x{max_len}x{num_kv_heads}x{head_dim}xbf16>"
    users = [line for line in lowered_for_cuda(fn, *shapes).splitlines() if cache_type in line]
    assert users and all("func.func" in line or " call @" in line or TRITON_CALL in line for line in users)


@pytest.mark.parametrize(
    "batch, seq_len, num_heads, head_dim, num_slots",
    [(1, 2048, 16, 256, 2), (2, 1024, 28, 128, 3)],
)
def test_prefill_attention_kernel_lowers_to_triton_on_the_whole_cache(
    hopper, batch, seq_len, num_heads, head_dim, num_slots
):
    """Chunked prefill at Qwen3.5-9B's attention (16 query, 4 kv heads of 256; a 2048-token chunk) and
    Qwen2.5-VL-7B's (28, 4 of 128; two rows of 1024) over a 32K-position cache: one Triton kernel, and both
    caches reach it as the arguments themselves (a gather of the rows' slots before the call would copy them)."""
    num_kv_heads, max_len = 4, 32768 + 64
    cache = spec((num_slots, max_len, num_kv_heads, head_dim))
    rows = spec((batch,), jnp.int32)
    shapes = (spec((batch, seq_len, num_heads, head_dim)), cache, cache, rows, rows, rows)
    fn = functools.partial(prefill_attention, impl="pallas")
    assert triton_kernels_in(fn, *shapes) == 1
    cache_type = f"tensor<{num_slots}x{max_len}x{num_kv_heads}x{head_dim}xbf16>"
    users = [line for line in lowered_for_cuda(fn, *shapes).splitlines() if cache_type in line]
    assert any(TRITON_CALL in line for line in users)
    assert all("func.func" in line or " call @" in line or TRITON_CALL in line for line in users)


@pytest.mark.parametrize("tokens", [1, 64, 1024])
def test_moe_expert_kernels_lower_to_triton(hopper, tokens):
    """Qwen3.5-35B-A3B's routed experts (top-8 of 256, D 2048, F 512) at decode (16-row blocks) and, at 1024
    tokens, prefill (64-row blocks): the gate/up and the down kernel."""
    d, f, e, k = 2048, 512, 256, 8
    fn = functools.partial(moe_experts, impl="pallas")
    shapes = (spec((tokens, d)), spec((tokens, k), jnp.int32), spec((tokens, k)), spec((e, d, 2 * f)),
              spec((e, f, d)))
    assert triton_kernels_in(fn, *shapes) == 2


@pytest.mark.parametrize("tokens", [1, 1024])
def test_fp8_moe_expert_kernels_lower_to_triton(hopper, tokens):
    """The same experts in FP8 (float8_e4m3fn tiles converted in the kernels, 128x128 block scales)."""
    d, f, e, k = 2048, 512, 256, 8
    tiling = default_moe_tiling(tokens, k, e)
    fn = functools.partial(moe_experts_pallas, tiling=tiling, scale_block=(128, 128))
    shapes = (spec((tokens, d)), spec((tokens, k), jnp.int32), spec((tokens, k)),
              spec((e, d, 2 * f), jnp.float8_e4m3fn), spec((e, f, d), jnp.float8_e4m3fn),
              (spec((e, d // 128, 2 * f // 128), jnp.float32), spec((e, f // 128, d // 128), jnp.float32)))
    assert triton_kernels_in(fn, *shapes) == 2
