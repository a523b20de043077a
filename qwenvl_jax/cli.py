"""``qwenvl`` command line: convert, generate, chat, serve, demo.

jax and transformers (which imports torch where installed) take seconds to import, so they load only once a command
has work for them: ``--help`` and bad paths answer at once.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def _existing_file(path: str, what: str) -> str:
    """``path`` with ``~`` expanded, checked before any model loads: an error naming it unless it is a file."""
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        raise ValueError(f"{what} {path} is a directory, not a file")
    if not os.path.isfile(expanded):
        raise ValueError(f"{what} {path} does not exist")
    return expanded


def _convert(args: argparse.Namespace) -> None:
    from convert.safetensors_io import checkpoint_dir

    checkpoint_dir(args.hf_dir)  # a wrong path fails before jax loads
    from convert.converter import convert_checkpoint

    t0 = time.perf_counter()
    out = convert_checkpoint(args.hf_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite)
    print(f"converted {args.hf_dir} -> {out} ({args.dtype}) in {time.perf_counter() - t0:.1f} s")


def _load_for_generation(args: argparse.Namespace, max_batch: int = 1):
    from convert.safetensors_io import checkpoint_dir

    checkpoint_dir(args.model)  # a wrong path fails before jax and transformers load
    import qwenvl_jax as qj

    model = qj.load(args.model, dtype=args.dtype)
    # Only the options given: the others keep the library's defaults (one set of defaults for both).
    given = {"max_len": args.max_len, "decode_steps": args.decode_steps,
             "speculative_tokens": args.speculative_tokens, "prefix_cache_bytes": args.prefix_cache_bytes}
    if args.no_prefix_cache:
        given["prefix_cache"] = False
    model.configure(max_batch=max_batch, **{k: v for k, v in given.items() if v is not None})
    engine = model.engine()
    cache = "off" if engine.prefix is None else f"{engine.prefix.bytes / 2**20:.1f} MiB"
    print(f"decode state: {engine.state_bytes / 2**20:.1f} MiB for max_len {engine.config.max_len}; prefix cache: "
          f"{cache}; programs compile on first use (--warmup compiles every bucket first)", file=sys.stderr)
    if args.warmup:
        print(f"warm-up: {model.warmup():.1f} s", file=sys.stderr)
    return model


def _sampling_kwargs(args: argparse.Namespace) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                stop=args.stop or None)


def _print_stream(stream) -> object:
    while True:
        try:
            print(next(stream), end="", flush=True)
        except StopIteration as done:
            print()
            return done.value


def _generate(args: argparse.Namespace) -> None:
    images = [_existing_file(p, "--image") for p in args.image]
    videos = [_existing_file(p, "--video") for p in args.video]
    model = _load_for_generation(args)
    import numpy as np

    # .npy: decoded frames at --video-fps (2 by default); a video file: decoded with PyAV at its own frame rate
    # unless --video-fps says otherwise.
    content = [{"type": "image", "image": p} for p in images] + [
        {"type": "video", "video": np.load(p), "fps": args.video_fps or 2.0} if str(p).lower().endswith(".npy")
        else {"type": "video", "video": p, "fps": args.video_fps} for p in videos] + [
        {"type": "text", "text": args.prompt}]
    result = _print_stream(model.generate([{"role": "user", "content": content}], stream=True,
                                          **_sampling_kwargs(args)))
    s = result.stats
    print(f"[{result.finish_reason}; {s.prompt_tokens} prompt + {s.new_tokens} new tokens; "
          f"TTFT {s.ttft_s * 1e3:.1f} ms, decode {s.decode_tok_s:.1f} tok/s; compile {s.compile_s:.1f} s]",
          file=sys.stderr)


def _chat(args: argparse.Namespace) -> None:
    model = _load_for_generation(args)
    from qwenvl_jax.processing import load_image

    history: list[dict] = []
    print("chat: empty line or Ctrl-D to quit; '/image PATH' attaches an image to the next message", file=sys.stderr)
    images: list = []
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        if line == "/image" or line.startswith("/image "):
            # Read now, so that a wrong path or a file that is no image is reported when typed.
            try:
                images.append(load_image(line.removeprefix("/image").strip(), len(images)))
            except ValueError as e:
                print(f"error: {e}", file=sys.stderr)
            continue
        content = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": line}]
        images = []
        history.append({"role": "user", "content": content})
        try:
            result = _print_stream(model.generate(list(history), stream=True, **_sampling_kwargs(args)))
        except ValueError as e:
            history.pop()
            print(f"error: {e}", file=sys.stderr)
            continue
        history.append({"role": "assistant", "content": [{"type": "text", "text": result.text}]})


def _serve(args: argparse.Namespace) -> None:
    try:
        from qwenvl_jax.server import serve
    except ImportError as e:
        raise ImportError(f"qwenvl serve needs the serve extra: pip install 'qwenvl-jax[serve]' ({e})") from e
    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    model = _load_for_generation(args, max_batch=args.max_batch)
    model.require_tokenizer("to serve chat and text prompts")
    name = args.served_model_name or Path(args.model).expanduser().resolve().name
    serve(model, name=name, host=args.host, port=args.port, max_queue=args.max_queue,
          shutdown_timeout=args.shutdown_timeout)


def _demo(args: argparse.Namespace) -> None:
    import jax
    import numpy as np

    import qwenvl_jax as qj
    from convert.converter import convert_checkpoint
    from qwenvl_jax.tiny_model import write_tiny_checkpoint

    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()})")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir).expanduser() if args.workdir else Path(tmp)
        hf_dir, out_dir = work / f"tiny-{args.model_type}-hf", work / f"tiny-{args.model_type}"
        cfg = write_tiny_checkpoint(hf_dir, args.model_type, seed=args.seed)
        print(f"wrote a random {args.model_type} checkpoint ({cfg.text.num_hidden_layers} layers, "
              f"hidden {cfg.text.hidden_size}, vision depth {cfg.vision.depth}) to {hf_dir}")
        convert_checkpoint(hf_dir, out_dir, dtype="float32", overwrite=True)
        model = qj.load(out_dir)
        model.configure(max_batch=1, max_len=128, prompt_buckets=(64,), decode_steps=8, vision_buckets=(64,),
                        chunked_prefill=False)
        print(f"decode state {model.engine().state_bytes / 1024:.0f} KiB; warm-up compiled every bucket in "
              f"{model.warmup():.1f} s")
        image = np.random.default_rng(args.seed).integers(0, 256, (56, 84, 3), dtype=np.uint8)
        runs = [("text", model.generate("Tell me a story.", max_new_tokens=24)),
                ("image", model.generate("Describe this image.", images=[image], max_new_tokens=24))]
        for kind, result in runs:
            s = result.stats
            print(f"[{kind}] {result.text!r}\n  {s.prompt_tokens} prompt + {s.new_tokens} new tokens, "
                  f"finish={result.finish_reason}, TTFT {s.ttft_s * 1e3:.1f} ms, decode {s.decode_tok_s:.0f} tok/s")
        again = model.generate("Tell me a story.", max_new_tokens=24)
        if again.token_ids != runs[0][1].token_ids or not all(r.token_ids for _, r in runs):
            sys.exit("demo FAILED: greedy generation is not reproducible")
        print("demo OK (random weights: the text is noise; the pipeline is real)")


def _engine_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=["bfloat16", "float32", "float16"],
                   help="compute dtype (default: as converted; bfloat16 for an HF directory)")
    p.add_argument("--max-len", type=int,
                   help="tokens per request, prompt + generated (default: the library's, EngineConfig.max_len)")
    p.add_argument("--decode-steps", type=int,
                   help="tokens per decode call (default: the library's, EngineConfig.decode_steps)")
    p.add_argument("--speculative-tokens", type=int,
                   help="Qwen3.5: tokens drafted a step by the checkpoint's MTP head, 0 (off) to 4 (default with "
                        "an MTP head: 2, MoE models 1; none past 8 decode slots)")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="prefill every prompt from scratch (by default a prompt reuses the state of the longest "
                        "prefix an earlier request shared with it: a chat's earlier turns, a system prompt)")
    p.add_argument("--prefix-cache-bytes", type=int,
                   help="device memory for cached prefixes (default: the smaller of 2 GiB and 8 whole contexts per "
                        "slot)")
    p.add_argument("--warmup", action="store_true", help="compile every prompt/vision/decode bucket up front")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="qwenvl", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a HF checkpoint directory to our Orbax format")
    p.add_argument("hf_dir")
    p.add_argument("out_dir")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16", "fp8"],
                   help="dtype of the stored weights (default: bfloat16); fp8: linear layers in float8_e4m3fn with "
                        "128x128 block scales as in Qwen's FP8 checkpoints, the rest bfloat16")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.set_defaults(func=_convert)

    for name, helptext in (("generate", "generate from a prompt (+ images / videos)"),
                           ("chat", "interactive chat that keeps the conversation")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("model", help="converted checkpoint (or HF checkpoint) directory")
        if name == "generate":
            p.add_argument("--prompt", required=True)
            p.add_argument("--image", action="append", default=[], help="image file (repeatable)")
            p.add_argument("--video", action="append", default=[],
                           help="a video file (mp4, webm, ...; needs pip install 'qwenvl-jax[video]') or decoded "
                                "frames as .npy, uint8 [T, H, W, 3] (repeatable)")
            p.add_argument("--video-fps", type=float, default=None,
                           help="frame rate of the --video input (.npy: default 2; a file: its own rate)")
        p.add_argument("--max-new-tokens", type=int, default=256)
        p.add_argument("--temperature", type=float, default=0.0)
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--top-k", type=int, default=0)
        p.add_argument("--min-p", type=float, default=0.0)
        p.add_argument("--repetition-penalty", type=float, default=1.0)
        p.add_argument("--seed", type=int)
        p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
        _engine_arguments(p)
        p.set_defaults(func=_generate if name == "generate" else _chat)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, ...)")
    p.add_argument("model", help="converted checkpoint (or HF checkpoint) directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (decode slots; default 8)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting for a slot before new ones are refused with 429 (default 256)")
    p.add_argument("--served-model-name", help="the model name clients send (default: the directory's name)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM / Ctrl-C, seconds requests in flight get to finish before they are cancelled")
    _engine_arguments(p)
    p.set_defaults(func=_serve)

    p = sub.add_parser("demo", help="build a tiny random checkpoint, convert it and run it")
    p.add_argument("--model-type", default="qwen3_5", choices=["qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5",
                                                              "qwen3_5_moe"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="keep the checkpoints here instead of a temporary directory")
    p.set_defaults(func=_demo)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileExistsError, ImportError) as e:
        sys.exit(f"qwenvl {args.command}: error: {e}")


if __name__ == "__main__":
    main()
