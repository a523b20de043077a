"""What the benchmarks share: released checkpoints' configs (bench/configs/), random weights made on the device,
random text requests, the copy bandwidth and matmul rate every roofline is measured against, FLOP counts, and GPU
kernel times from jax.profiler."""

from __future__ import annotations

import collections
import json
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenvl_jax.engine import Request
from qwenvl_jax.sampling import SamplingParams
from qwenvl_jax.tiny_model import TINY_CONFIGS, hf_config_dict

CONFIGS = pathlib.Path(__file__).parent / "configs"


def released_names() -> list[str]:
    return sorted(p.stem for p in CONFIGS.glob("*.json"))


def released_config(name: str) -> dict:
    """A released checkpoint's ``config.json`` (bench/configs/NAME.json, copied from the hub), e.g. qwen3_5-9b."""
    path = CONFIGS / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"no config {name!r} in {CONFIGS}; known: {', '.join(released_names())}")
    return json.loads(path.read_text())


# Each released model's family, whose tiny config (qwenvl_jax/tiny_model.py) stands in for it under `--tiny`.
TINY_MODELS = {"qwen3_5-9b": "qwen3_5", "qwen3_vl-8b": "qwen3_vl", "qwen2_5_vl-7b": "qwen2_5_vl",
               "qwen3_5-35b-a3b": "qwen3_5_moe"}


def bench_config(name: str, tiny: bool = False) -> dict:
    """``released_config(name)``, or with ``tiny`` the tiny config of its family (a script checked on the CPU)."""
    if not tiny:
        return released_config(name)
    if name not in TINY_MODELS:
        raise ValueError(f"no tiny config for {name!r}; known: {', '.join(TINY_MODELS)}")
    return hf_config_dict(TINY_MODELS[name], *TINY_CONFIGS[TINY_MODELS[name]])


def text_only(raw: dict) -> dict:
    """The same checkpoint as its ``*_text`` model type: the decoder alone, no vision tower to allocate."""
    text = {k: v for k, v in raw.items() if k != "vision_config"}
    return dict(text, model_type=raw["model_type"] + "_text")


def random_params(model, key: jax.Array):
    """Random weights for every leaf, made on the device one leaf at a time (norm scales near 1)."""
    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    for i, (path, var) in enumerate(flat):
        spec = var.get_value()
        x = 0.02 * jax.random.normal(jax.random.fold_in(key, i), spec.shape, jnp.float32)
        if len(spec.shape) == 1 or (path[-1] == "weight" and "norm" in str(path[-2])):
            x = x + 1.0
        var.set_value(x.astype(spec.dtype))
    return graphdef, nnx.from_flat_state(flat)


def loop_seconds_per_pass(loop, x) -> float:
    """Device seconds per pass of ``loop(x, n)`` (a jitted loop of n passes): the slope between loops of 10 and
    20 passes in one call each (median of 5), so dispatch and launch costs cancel."""

    def median_s(n: int) -> float:
        jax.block_until_ready(loop(x, n))
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            jax.block_until_ready(loop(x, n))
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    return (median_s(20) - median_s(10)) / 10


def copy_bandwidth(n_bytes: int = 1 << 30) -> float:
    """Bytes read + written per second by an on-device elementwise pass over `n_bytes`."""
    passes = jax.jit(lambda a, n: jax.lax.fori_loop(0, n, lambda i, b: b * 0.5 + 1.0, a))
    return 2 * n_bytes / loop_seconds_per_pass(passes, jnp.ones((n_bytes // 4,), jnp.float32))


def matmul_rate(n: int = 8192) -> float:
    """bf16 FLOP/s of an [n, n] x [n, n] product on the device."""
    a = (jax.random.normal(jax.random.key(0), (n, n), jnp.float32) / n**0.5).astype(jnp.bfloat16)
    products = jax.jit(lambda x, k: jax.lax.fori_loop(0, k, lambda i, y: y @ a, x))
    return 2 * n**3 / loop_seconds_per_pass(products, a)


def prefill_flops(cfg, params, tokens: int) -> int:
    """One dense text prefill of ``tokens``: every projection weight once per token, causal attention in the
    full-attention layers, the chunked delta rule in the linear ones (the LM head runs on the last token only)."""
    weights = sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(params["language_model"])
                  if x.ndim >= 2 and "embed_tokens" not in jax.tree_util.keystr(path))
    text = cfg.text
    full = text.layer_types.count("full_attention")
    linear = text.layer_types.count("linear_attention")
    attention = full * 2 * tokens * tokens * text.num_attention_heads * text.head_dim  # QK^T + PV, half masked
    return 2 * tokens * weights + attention + linear * delta_rule_flops(text, tokens)


def delta_rule_flops(text, tokens: int) -> int:
    """One Gated DeltaNet layer's chunked delta rule at batch 1, at the model's head count and dims."""
    from bench.kernels import chunk_flops

    return chunk_flops(1, tokens, num_v_heads=text.linear_num_value_heads, dk=text.linear_key_head_dim,
                       dv=text.linear_value_head_dim)


def random_text_request(rng: np.random.Generator, vocab: int, prompt: int, max_new: int) -> Request:
    """A greedy text-only request of `prompt` random token ids (text positions on all three mRoPE axes)."""
    ids = rng.integers(0, vocab, prompt).astype(np.int32)
    pos = np.broadcast_to(np.arange(prompt, dtype=np.int32), (3, prompt)).copy()
    return Request(ids, pos, 0, SamplingParams(), max_new)


def gpu_kernel_seconds(trace_dir: str) -> dict[str, float]:
    """Device seconds per kernel name in a jax.profiler trace (every GPU plane's stream lines; empty on CPU)."""
    from jax.profiler import ProfileData

    totals: dict[str, float] = collections.defaultdict(float)
    for path in pathlib.Path(trace_dir).rglob("*.xplane.pb"):
        for plane in ProfileData.from_file(str(path)).planes:
            if not plane.name.startswith("/device:GPU"):
                continue
            for line in plane.lines:
                if line.name.startswith("Stream"):
                    for event in line.events:
                        totals[event.name] += event.duration_ns * 1e-9
    return dict(totals)


def profiled_kernel_seconds(run) -> dict[str, float]:
    """GPU kernel seconds by name while `run()` executes under jax.profiler."""
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            run()
        return gpu_kernel_seconds(trace_dir)
