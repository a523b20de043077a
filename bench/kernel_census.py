"""The kernels of one decode step, counted in the compiled program and traced back to source lines.

    python bench/kernel_census.py [--models qwen3_5-9b,qwen3_5-35b-a3b] [--batches 1,8] [--target h100|h200]
                                  [--fp8] [--tiny] [--out DIR]

Batch-1 decode is bound by how many kernels a step launches as much as by the bytes it reads: a small dependent
kernel costs ~1.7 us on an H200 whatever it moves (bench/NOTES.md). This compiles the engine's decode program
for a released config (bench/configs/NAME.json, the decoder alone) and reads its optimised HLO: the kernels of one
step (the on-device loop's body; of a conditional, its largest branch, and its smallest: greedy rows skip the
sampling branch) by kind (GEMM fusion, Pallas call, XLA's Triton fusions, loop and reduction fusions) and by
the source line that made each one.

On a GPU machine the attached GPU compiles. ``--target h100`` or ``h200`` compiles for that GPU on a machine
without one (XLA's deviceless compilation: needs jax's CUDA plugin, ``pip install "jax[cuda13]"``, no driver):
how a change moves the count can be read before any GPU time is spent. The memory size matters, not only the
chip: a program whose arguments come near the device's memory is rematerialised, which adds kernels
(Qwen3.5-35B-A3B at 28322db: 1660 kernels a step for an 80 GB H100, on which it does not fit, 1079 for an
H200). ``--tiny`` counts a tiny config's CPU program (checks the script; CPU fusion is not the GPU's).

Prints a table and writes bench/results/kernel_census-<target>.json (the target, jax version, commit, date, rows).
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

if sys.path[0] == str(pathlib.Path(__file__).resolve().parent):
    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])
from bench.hlo import computations  # noqa: E402
from bench.models import TINY_MODELS, bench_config, text_only  # noqa: E402
from bench.run_info import run_info, write_result  # noqa: E402
from convert.converter import with_fp8_quantization  # noqa: E402
from qwenvl_jax.config import parse_config  # noqa: E402
from qwenvl_jax.engine import Engine, EngineConfig  # noqa: E402
from qwenvl_jax.models.model import abstract_model  # noqa: E402

CONTEXT = 1024

# XLA's GpuTargetConfig for a deviceless compile: what the compiler reads of the device (SXM parts).
_TARGET = """gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth} l2_cache_size: 52428800 clock_rate_ghz: 1.98 device_memory_size: {memory}
  shared_memory_per_block_optin: 232448 cuda_compute_capability {{ major: 9 }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
runtime_version {{ major: 13 }}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 }}
device_description_str: "{name}"
"""
TARGETS = {"h100": dict(name="NVIDIA H100 80GB HBM3", bandwidth=3352320000000, memory=84929347584),
           "h200": dict(name="NVIDIA H200", bandwidth=4800000000000, memory=150754820096)}


def deviceless_gpu(target: str) -> jax.sharding.Sharding:
    """One device of a GPU topology with no GPU attached, and the two switches that make this process trace for
    it: the kernels' auto-dispatch reads jax.default_backend(), and Pallas' Triton lowering asks the attached GPU
    for its compute capability."""
    from jax._src.pallas.triton import gpu_info
    from jax.experimental.topologies import get_topology_desc

    try:
        topology = get_topology_desc("census", "cuda", target_config=_TARGET.format(**TARGETS[target]),
                                     topology="1x1x1")
    except Exception as e:  # noqa: BLE001 - the plugin's own error says little
        raise SystemExit(f"--target {target} needs jax's CUDA plugin (pip install \"jax[cuda13]\"): {e}") from e
    version = gpu_info.GpuVersion.H100 if target == "h100" else gpu_info.GpuVersion.H200
    gpu_info.get_gpu_info = lambda: gpu_info.get_gpu_info_from_version(version)
    jax.default_backend = lambda: "gpu"
    return jax.sharding.SingleDeviceSharding(topology.devices[0])


def decode_hlo(raw: dict, batch: int, dtype, sharding: jax.sharding.Sharding | None, fp8: bool = False) -> str:
    """The optimised HLO of the engine's decode program (16 steps a call) at ``batch`` rows, weights abstract
    (``fp8``: the linear layers in FP8 with block scales, as ``convert --dtype fp8`` writes them)."""
    cfg = parse_config(text_only(raw))
    if fp8:
        cfg = with_fp8_quantization(cfg)
    graphdef, params = nnx.split(abstract_model(cfg, dtype))
    engine = Engine(graphdef, params, EngineConfig(
        max_batch=batch, max_len=CONTEXT + 256, prompt_buckets=(CONTEXT,), decode_steps=16, batch_buckets=(batch,),
        prefix_cache=False, speculative_tokens=0), eos_ids=())

    def spec(x):
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

    args = ([spec(w) for w in engine._weights], jax.tree_util.tree_map(spec, engine.state),
            spec(np.zeros(batch + 1, bool)), spec(engine._eos), spec(np.int32(16)))
    return engine._decode.lower(*args, steps=16, rows=batch).compile().as_text()


def _frames(hlo: str):
    """stack_frame_id -> 'path:line' of this repository's innermost frame (the HLO's stack-frame tables)."""
    def table(name):
        m = re.search(name + r"\n(.*?)\n\n", hlo, re.S)
        return [line.split(None, 1) for line in m.group(1).splitlines()] if m else []
    files = {int(i): s.strip('"') for i, s in table("FileNames")}
    locations = {int(i): dict(re.findall(r"(\w+)=(\d+)", s)) for i, s in table("FileLocations")}
    frames = {int(i): dict(re.findall(r"(\w+)=(\d+)", s)) for i, s in table("StackFrames")}
    root = str(pathlib.Path(__file__).resolve().parents[1]) + "/"

    def where(frame: int) -> str:
        while frame in frames:
            loc = locations[int(frames[frame]["file_location_id"])]
            path = files[int(loc["file_name_id"])]
            if root in path or path.startswith(("qwenvl_jax/", "pallas_kernels/")):
                return path.split(root)[-1] + ":" + loc["line"]
            parent = int(frames[frame]["parent_frame_id"])
            if parent == frame:
                break
            frame = parent
        return "?"
    return where


def census(hlo: str) -> dict:
    """Kernels of one decode step: the largest while body's kernels, a conditional counted as its largest
    branch (the sampling branches: top-k/top-p rows), and in all as its smallest (greedy rows); by kind and by
    source line."""
    comps, where = computations(hlo), _frames(hlo)
    bodies = set(re.findall(r"body=%?([\w.\-]+)", hlo))
    if not bodies:
        raise ValueError("no while loop in the decode program")
    body = max(bodies, key=lambda b: len(comps.get(b, [])))

    def kernels(name: str, pick=max) -> list[tuple[str, str]]:
        found = []
        for line in comps.get(name, []):
            op = re.search(r"= \S+ (fusion|custom-call|conditional|copy|sort|scatter)\(", line)
            if op is None:
                continue
            if op.group(1) == "conditional":
                listed = re.search(r"branch_computations=\{([^}]*)\}", line)
                branches = re.findall(r"(?:true_computation|false_computation)=%?([\w.\-]+)", line)
                branches += re.findall(r"%([\w.\-]+)", listed.group(1)) if listed else []
                found += pick((kernels(b, pick) for b in branches), key=len, default=[])
                continue
            if op.group(1) == "fusion":
                called = re.search(r"calls=%?([\w.\-]+)", line).group(1)
                kind = re.search(r"kind=(\w+)", line).group(1)
                if "gemm" in called or "__cublas" in line:
                    kind = "gemm"
                elif '"kind":"__triton' in line:
                    kind = "triton fusion"
                source = next((l for l in comps.get(called, []) if "ROOT" in l), line)
            elif op.group(1) == "custom-call":
                target = re.search(r'custom_call_target="([^"]+)"', line).group(1)
                kind = "pallas" if "triton" in target or "mosaic" in target else target
                source = line
            else:
                kind, source = op.group(1), line
            frame = re.search(r"stack_frame_id=(\d+)", source)
            found.append((kind, where(int(frame.group(1))) if frame else "?"))
        return found

    step = kernels(body)
    return dict(kernels_per_step=len(step), kernels_smallest_branches=len(kernels(body, min)),
                by_kind=dict(collections.Counter(k for k, _ in step).most_common()),
                by_source=[[src, kind, n] for (kind, src), n in collections.Counter(step).most_common()])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="qwen3_5-9b,qwen3_vl-8b,qwen2_5_vl-7b,qwen3_5-35b-a3b")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--target", choices=sorted(TARGETS), help="compile for this GPU with none attached")
    ap.add_argument("--fp8", action="store_true", help="FP8 linear layers (convert --dtype fp8)")
    ap.add_argument("--tiny", action="store_true", help="tiny configs on the CPU (checks the script)")
    ap.add_argument("--top", type=int, default=12, help="source lines printed per row")
    ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = ap.parse_args()
    if args.tiny and args.target:
        ap.error("--tiny counts the CPU program; --target compiles for a GPU")
    sharding = deviceless_gpu(args.target) if args.target else None
    device = TARGETS[args.target]["name"] if args.target else jax.devices()[0].device_kind
    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    rows = []
    for name in args.models.split(","):
        raw = bench_config(name, args.tiny)
        for batch in (int(b) for b in args.batches.split(",")):
            row = dict(model=name, batch=batch, **census(decode_hlo(raw, batch, dtype, sharding, args.fp8)))
            rows.append(row)
            print(f"\n{name} B{batch}: {row['kernels_per_step']} kernels a step "
                  f"({row['kernels_smallest_branches']} on the smallest branches): "
                  + ", ".join(f"{k} {n}" for k, n in row["by_kind"].items()), flush=True)
            for src, kind, n in row["by_source"][:args.top]:
                print(f"  {n:5d}  {kind:<14} {src}")
    result = dict(run_info(), device=device, deviceless=bool(args.target), fp8=args.fp8, context=CONTEXT, rows=rows)
    write_result(args.out, "kernel_census", result, fp8=args.fp8, tiny=args.tiny, device=device)


if __name__ == "__main__":
    main()
