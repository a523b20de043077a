"""The compiled decode program of a real-size model, read for large buffers: which instructions make arrays over
a size threshold (weights sliced out of their stacks, whole caches copied), counted by opcode and shape.

    python bench/decode_hlo.py [--model-type qwen3_5] [--batch 1] [--min-mb 4] [--out FILE]

Compiles for the default backend with abstract weights (no weights are made). On a GPU, copies and dynamic-slice
fusions listed here run as device-to-device memcpys (bench/DECODE_NOTES.md). ``--out`` saves the whole HLO text.
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

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bench.decode import real_config  # noqa: E402
from qwenvl_jax.config import parse_config  # noqa: E402
from qwenvl_jax.engine import Engine, EngineConfig  # noqa: E402
from qwenvl_jax.models.model import abstract_model  # noqa: E402

BYTES = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1}
INSTRUCTION = re.compile(r"%([\w.-]+) = (\w+)\[([0-9,]+)\]\{[0-9,]*\} ([\w-]+)\(")


def large_instructions(hlo: str, min_bytes: float) -> collections.Counter:
    """(opcode, name without its numeric suffix, dtype[shape]) -> count, for results of at least min_bytes."""
    found = collections.Counter()
    for name, dtype, shape, opcode in INSTRUCTION.findall(hlo):
        if dtype in BYTES and np.prod([int(d) for d in shape.split(",")]) * BYTES[dtype] >= min_bytes:
            found[(opcode, re.sub(r"[.\d]+$", "", name), f"{dtype}[{shape}]")] += 1
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-type", default="qwen3_5")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--max-len", type=int, default=648)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--min-mb", type=float, default=4.0)
    ap.add_argument("--out", help="write the optimized HLO text here")
    args = ap.parse_args()
    _, raw = real_config(args.model_type)
    graphdef, params = nnx.split(abstract_model(parse_config(raw), jnp.bfloat16))
    engine = Engine(graphdef, params, EngineConfig(max_batch=args.batch, max_len=args.max_len,
                                                   decode_steps=args.decode_steps, prompt_buckets=(args.max_len,)))
    rows = min(b for b in engine.config.decode_buckets if b >= args.batch)
    hlo = engine._decode.lower(graphdef, params, engine.state, np.ones(args.batch + 1, bool), engine._eos,
                               steps=args.decode_steps, rows=rows).compile().as_text()
    if args.out:
        pathlib.Path(args.out).write_text(hlo)
    print(f"{jax.devices()[0].device_kind}: {args.model_type} decode, batch {args.batch}; results >= {args.min_mb} MB")
    for (opcode, name, shape), count in sorted(large_instructions(hlo, args.min_mb * 1e6).items(),
                                               key=lambda kv: (kv[0][0], kv[0][1])):
        print(f"{count:4d}  {opcode:22s} {name:44s} {shape}")


if __name__ == "__main__":
    main()
