"""Vision tower speed at real sizes (random weights): the towers of released checkpoints on one image.

    python bench/vision_tower.py [--models qwen2_5_vl-7b,qwen3_vl-8b] [--sides 32 64 128] [--profile]
                                 [--compare-options JSON] [--tiny] [--out DIR]

Per model (bench/configs/NAME.json's vision_config) and image side (in patches): compile seconds, median forward
milliseconds (host preparation included), the host preparation's own milliseconds, the median with the inputs
already on the device (``resident_ms``: the host's share is the difference), and the relative error of the
bfloat16 tower against the same weights in float32 (sides up to REF_MAX_SIDE). ``--profile`` adds the GPU kernel
milliseconds of one forward by kernel name (jax.profiler) and writes the compiled program's HLO
(vision-hlo-MODEL-SIDE.txt beside the JSON) to map those names to ops. ``--compare-options`` times each bf16 row
again compiled with those XLA options (an A/B in one run; the row gains ``options_*`` figures). ``--tiny`` runs
the tiny vision configs of the same families (qwenvl_jax/tiny_model.py) at small sides, to check the script on
the CPU.

Prints one JSON line per row and writes bench/results/vision_tower-<device>.json (device, jax version, commit,
date, rows).
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Run as a script, the repo root replaces the script's directory: bench/kernels.py would shadow the `kernels`
# package that transformers imports.
if sys.path[0] == str(pathlib.Path(__file__).resolve().parent):
    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])
from bench.models import profiled_kernel_seconds, released_config  # noqa: E402
from bench.run_info import run_info, write_result  # noqa: E402
from qwenvl_jax.config import VisionConfig, parse_config  # noqa: E402
from qwenvl_jax.models.vision import VisionModel, prepare_vision_inputs  # noqa: E402

DEFAULT_MODELS = "qwen2_5_vl-7b,qwen3_vl-8b"
REF_MAX_SIDE = 64  # largest image side (patches) with a float32 reference error


def tower_config(name: str, tiny: bool) -> VisionConfig:
    """The released checkpoint's vision config, or with ``tiny`` the tiny one of its model type."""
    raw = released_config(name)
    if tiny:
        from qwenvl_jax.tiny_model import TINY_CONFIGS, hf_config_dict

        raw = hf_config_dict(raw["model_type"], *TINY_CONFIGS[raw["model_type"]])
    return parse_config(raw).vision


def _run(cfg: VisionConfig, side: int, dtype: jnp.dtype, params_f32: nnx.State | None = None, repeats: int = 10,
         hlo_path: pathlib.Path | None = None, compiler_options: dict | None = None):
    model = VisionModel(cfg, dtype=dtype, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    if params_f32 is not None:  # the float32 weights, rounded: the error measures the computation alone
        params = jax.tree.map(lambda a: a.astype(dtype), params_f32)
    grid = np.array([[1, side, side]])
    pixels = np.random.default_rng(0).standard_normal((side * side, cfg.patch_dim)).astype(np.float32)

    @functools.partial(jax.jit, compiler_options=compiler_options)
    def forward(params, pixels, inputs):
        merged, deepstack = nnx.merge(graphdef, params)(pixels, inputs)
        return merged.astype(jnp.float32)

    start = time.perf_counter()
    inputs = prepare_vision_inputs(cfg, grid)
    out = jax.block_until_ready(forward(params, pixels, inputs))
    compile_s = time.perf_counter() - start
    def median_ms(fn) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return round(float(np.median(times)) * 1e3, 3)

    # The same call on inputs already on the device (resident): the difference is the host's share (upload, tables).
    resident = jax.device_put((pixels, inputs))
    timing = dict(compile_s=round(compile_s, 2),
                  forward_ms=median_ms(lambda: jax.block_until_ready(
                      forward(params, pixels, prepare_vision_inputs(cfg, grid)))),
                  prepare_ms=median_ms(lambda: prepare_vision_inputs(cfg, grid)),
                  resident_ms=median_ms(lambda: jax.block_until_ready(forward(params, *resident))))
    if hlo_path is not None:
        hlo_path.write_text(forward.lower(params, pixels, inputs).compile().as_text())
        kernels = profiled_kernel_seconds(lambda: jax.block_until_ready(forward(params, pixels, inputs)))
        ranked = sorted(((t * 1e3, name) for name, t in kernels.items()), reverse=True)
        timing.update(profile_ms_total=round(sum(t for t, _ in ranked), 3),
                      profile_ms=[[name, round(t, 4)] for t, name in ranked[:40]])
    return params, np.asarray(out), timing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=DEFAULT_MODELS, help="bench/configs names, comma-separated")
    parser.add_argument("--sides", type=int, nargs="+", help="image side in patches (default 32 64 128; tiny 8 16)")
    parser.add_argument("--tiny", action="store_true", help="tiny vision configs on the CPU (checks the script)")
    parser.add_argument("--profile", action="store_true", help="GPU kernel time by name, and the HLO beside the JSON")
    parser.add_argument("--compare-options", type=json.loads, metavar="JSON",
                        help='XLA options to time each bf16 row with as well, e.g. \'{"xla_gpu_enable_triton_gemm": '
                             'false}\' (the row gains options_* figures)')
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"), help="directory")
    args = parser.parse_args()
    sides = args.sides or ([8, 16] if args.tiny else [32, 64, 128])
    jax.config.update("jax_default_matmul_precision", "highest")  # float32 reference without TF32
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models.split(","):
        cfg = tower_config(name, args.tiny)
        for side in sides:
            # The float32 reference runs XLA's attention (the kernels take half precision): past REF_MAX_SIDE its
            # score matrices over all patches do not fit an 80 GB GPU (128 x 128 patches asked for 32 GB more).
            params32, ref = None, None
            if side <= REF_MAX_SIDE:
                params32, ref, _ = _run(cfg, side, jnp.float32, repeats=1)
            hlo_path = out / f"vision-hlo-{name}-{side}.txt" if args.profile else None
            _, got, timing = _run(cfg, side, jnp.bfloat16, params32, repeats=2 if args.tiny else 10, hlo_path=hlo_path)
            err = None if ref is None else float(np.abs(got - ref).max() / np.abs(ref).max())
            row = dict(model=f"tiny {cfg.family}" if args.tiny else name, patches=side * side, dtype="bfloat16",
                       **timing, rel_err_vs_f32=err)
            if args.compare_options:
                hlo_path = out / f"vision-hlo-{name}-{side}-options.txt" if args.profile else None
                _, got_o, timing_o = _run(cfg, side, jnp.bfloat16, params32, repeats=2 if args.tiny else 10,
                                          hlo_path=hlo_path, compiler_options=args.compare_options)
                row.update(options=args.compare_options, **{f"options_{k}": v for k, v in timing_o.items()},
                           options_max_diff=float(np.abs(got_o - got).max() / np.abs(got).max()))
            print(json.dumps(row), flush=True)
            rows.append(row)
    write_result(out, "vision_tower", dict(**run_info(), tiny=args.tiny, rows=rows), tiny=args.tiny)


if __name__ == "__main__":
    main()
