"""Vision tower speed at real sizes (random weights): Qwen2.5-VL-7B's and Qwen3-VL-8B's towers on one image.

Prints one JSON line per (model, image size): compile seconds, median forward milliseconds (host preparation
included) and the relative error of the bfloat16 tower against the same weights in float32; ``--out`` also
writes them, with the device and versions, to a JSON file.

    python bench/vision_tower.py [--sides 32 64 128] [--out bench/results/vision_tower_h100.json]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenvl_jax.config import VisionConfig
from qwenvl_jax.models.vision import VisionModel, prepare_vision_inputs

TOWERS = {  # the hub configs' vision_config
    "qwen2_5_vl-7b": VisionConfig(family="qwen2_5_vl", depth=32, hidden_size=1280, intermediate_size=3420,
                                  num_heads=16, in_channels=3, patch_size=14, temporal_patch_size=2,
                                  spatial_merge_size=2, out_hidden_size=3584, hidden_act="silu", window_size=112,
                                  fullatt_block_indexes=(7, 15, 23, 31), tokens_per_second=2),
    "qwen3_vl-8b": VisionConfig(family="qwen3_vl", depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                                in_channels=3, patch_size=16, temporal_patch_size=2, spatial_merge_size=2,
                                out_hidden_size=4096, hidden_act="gelu_pytorch_tanh", num_position_embeddings=2304,
                                deepstack_visual_indexes=(8, 16, 24)),
}


def _run(cfg: VisionConfig, side: int, dtype: jnp.dtype, params_f32: nnx.State | None = None, repeats: int = 10):
    model = VisionModel(cfg, dtype=dtype, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    if params_f32 is not None:  # the float32 weights, rounded: the error measures the computation alone
        params = jax.tree.map(lambda a: a.astype(dtype), params_f32)
    grid = np.array([[1, side, side]])
    pixels = np.random.default_rng(0).standard_normal((side * side, cfg.patch_dim)).astype(np.float32)

    @jax.jit
    def forward(params, pixels, inputs):
        merged, deepstack = nnx.merge(graphdef, params)(pixels, inputs)
        return merged.astype(jnp.float32)

    start = time.perf_counter()
    inputs = prepare_vision_inputs(cfg, grid)
    out = jax.block_until_ready(forward(params, pixels, inputs))
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(forward(params, pixels, prepare_vision_inputs(cfg, grid)))
        times.append(time.perf_counter() - start)
    return params, np.asarray(out), compile_s, float(np.median(times)) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sides", type=int, nargs="+", default=[32, 64, 128], help="image side in patches")
    parser.add_argument("--out", help="also append the JSON lines to this file")
    args = parser.parse_args()
    jax.config.update("jax_default_matmul_precision", "highest")  # float32 reference without TF32
    rows = []
    for name, cfg in TOWERS.items():
        for side in args.sides:
            params32, ref, *_ = _run(cfg, side, jnp.float32, repeats=1)
            _, out, compile_s, ms = _run(cfg, side, jnp.bfloat16, params32)
            row = dict(model=name, patches=side * side, dtype="bfloat16", compile_s=round(compile_s, 2),
                       forward_ms=round(ms, 3), rel_err_vs_f32=float(np.abs(out - ref).max() / np.abs(ref).max()))
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                           date=time.strftime("%Y-%m-%d"), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
