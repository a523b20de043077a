"""``qwenvl`` command line: convert, demo."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def _convert(args: argparse.Namespace) -> None:
    from convert.converter import convert_checkpoint

    t0 = time.perf_counter()
    out = convert_checkpoint(args.hf_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite)
    print(f"converted {args.hf_dir} -> {out} ({args.dtype}) in {time.perf_counter() - t0:.1f} s")


def _demo(args: argparse.Namespace) -> None:
    import jax
    import numpy as np
    from transformers import AutoTokenizer

    import qwenvl_jax as qj
    from convert.converter import convert_checkpoint
    from qwenvl_jax.tiny_model import write_tiny_checkpoint

    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()})")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        hf_dir, out_dir = work / f"tiny-{args.model_type}-hf", work / f"tiny-{args.model_type}"
        cfg = write_tiny_checkpoint(hf_dir, args.model_type, seed=args.seed)
        print(f"wrote a random {args.model_type} checkpoint ({cfg.text.num_hidden_layers} layers, "
              f"hidden {cfg.text.hidden_size}) to {hf_dir}")
        convert_checkpoint(hf_dir, out_dir, dtype="float32", overwrite=True)
        model = qj.load(out_dir)
        tok = AutoTokenizer.from_pretrained(out_dir)
        prompts = ["Hello, world!", "The quick brown fox jumps over the lazy dog."]
        enc = tok(prompts, padding=True, padding_side="left", return_tensors="np")
        logits = model.logits(enc["input_ids"], enc["attention_mask"])
        alone = model.logits(tok(prompts[:1], return_tensors="np")["input_ids"])
        n = int(enc["attention_mask"][0].sum())
        drift = float(np.abs(logits[0, -n:] - alone[0]).max())
        for prompt, row in zip(prompts, logits):
            print(f"{prompt!r}: next-token argmax {tok.decode(int(row[-1].argmax()))!r}")
        print(f"padded-batch vs single-prompt logits max |diff| = {drift:.2e}")
        if not np.isfinite(logits).all() or drift > 1e-4:
            sys.exit("demo FAILED: logits are not finite or depend on padding")
        print("demo OK")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="qwenvl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a HF checkpoint directory to our Orbax format")
    p.add_argument("hf_dir")
    p.add_argument("out_dir")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.set_defaults(func=_convert)

    p = sub.add_parser("demo", help="build a tiny random checkpoint, convert it and run it")
    p.add_argument("--model-type", default="qwen3_5", choices=["qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5",
                                                              "qwen3_5_moe"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="keep the checkpoints here instead of a temporary directory")
    p.set_defaults(func=_demo)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileExistsError) as e:
        sys.exit(f"qwenvl {args.command}: error: {e}")


if __name__ == "__main__":
    main()
