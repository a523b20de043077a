"""Prefill and vision against the compute roofline, on released architectures with random bf16 weights (issue 25).

    python bench/prefill.py [--sections text,image,vision,batch] [--hf] [--tiny] [--out DIR]

Every figure goes through the public API (``QwenVL.generate(input_ids=..., max_new_tokens=1)``, HF-named vision
arrays, no tokenizer), warmed up once, median of ``--repeats`` runs. The FLOP floor is the FLOPs counted for the
work over the bf16 matmul rate measured in the same run.

- text: time to first token of one text prompt of 1K, 4K, 16K and 32K tokens (Qwen3.5-9B and Qwen3-VL-8B
  decoders; the prompt is its own bucket, so one prefill call) against its FLOP floor.
- image: one 1024x1024 image + 200 text tokens, and four of them + 200 tokens (Qwen3-VL-8B, Qwen2.5-VL-7B):
  vision tower + prefill, ours and (``--hf``) HF transformers' ``generate(max_new_tokens=1)``.
- vision: the vision tower alone on one image of 1K, 4K and 16K patches against its FLOP floor.
- batch: 64 prompts of 200-2000 random tokens submitted at once (max_batch 64, prompt buckets 256 / 512 / 1024 /
  2048): prefill tokens/s (time until every first token), beside the same prompts one at a time, and the
  single-prompt tokens/s of the text section's longest prompt; ``--hf``: HF prefilling them in batches of 8
  (over the batches that start within ``--hf-batch-seconds``; its GDN layers in flash-linear-attention's kernels
  where that is installed, which the JSON records).

``--tiny`` runs tiny configs of the same families on the CPU to check the script. Prints tables and writes
bench/results/prefill-<device>.json (device, jax version, commit, date, every figure).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch and JAX may share the GPU

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

# Run as a script, the repo root replaces the script's directory: bench/kernels.py would shadow the `kernels`
# package that transformers imports.
if sys.path[0] == str(pathlib.Path(__file__).resolve().parent):
    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])
from bench.models import matmul_rate, prefill_flops, random_params, released_config, text_only  # noqa: E402
from bench.run_info import run_info, write_result  # noqa: E402
from convert.converter import with_fp8_quantization  # noqa: E402
from qwenvl_jax.config import ModelConfig, parse_config  # noqa: E402
from qwenvl_jax.engine import VisionPayload  # noqa: E402
from qwenvl_jax.models.model import abstract_model  # noqa: E402
from qwenvl_jax.models.vision import prepare_vision_inputs  # noqa: E402
from qwenvl_jax.qwenvl import QwenVL  # noqa: E402
from qwenvl_jax.tiny_model import tiny_config  # noqa: E402

TEXT_MODELS = ("qwen3_5-9b", "qwen3_vl-8b")
IMAGE_MODELS = ("qwen3_vl-8b", "qwen2_5_vl-7b")
BATCH_MODEL = "qwen3_5-9b"


def model_config(name: str, tiny: bool) -> dict:
    raw = released_config(name)
    return tiny_config(raw["model_type"]) if tiny else raw


def build(raw: dict, dtype, workdir: pathlib.Path, fp8: bool = False) -> QwenVL:
    """A QwenVL handle over random weights, its directory holding config.json alone (eos ids, no tokenizer);
    ``fp8``: linear layers and experts in FP8, as ``convert --dtype fp8`` stores them."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(raw))
    cfg = parse_config(raw)
    if fp8:
        cfg = with_fp8_quantization(cfg)
    graphdef, params = random_params(abstract_model(cfg, dtype), jax.random.key(0))
    return QwenVL(cfg, nnx.merge(graphdef, params), workdir)


def median_ttft(model: QwenVL, repeats: int, **inputs) -> float:
    """Seconds to the first token of generate(max_new_tokens=1), after one run that compiles."""
    model.generate(max_new_tokens=1, **inputs)
    return float(np.median([model.generate(max_new_tokens=1, **inputs).stats.ttft_s for _ in range(repeats)]))


def seconds(fn, repeats: int) -> float:
    """Median wall seconds of fn() after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


# ------------------------------------------------------------------------------------------------- images


def image_grid(cfg: ModelConfig, side_px: int) -> tuple[int, int, int]:
    """(t, h, w) patches of one side_px x side_px image after HF's smart_resize (sides rounded to the merged
    patch; the released processors' pixel limits leave 1024 x 1024 as it is)."""
    v = cfg.vision
    factor = v.patch_size * v.spatial_merge_size
    side = max(factor, round(side_px / factor) * factor)
    return 1, side // v.patch_size, side // v.patch_size


def image_inputs(cfg: ModelConfig, images: int, side_px: int, text_tokens: int, rng: np.random.Generator) -> dict:
    """input_ids with each image's placeholder run (vision start, pads, vision end) after the text, and random
    pixel patches in HF's layout."""
    grid = image_grid(cfg, side_px)
    merged = grid[1] * grid[2] // cfg.vision.spatial_merge_size**2
    ids = list(rng.integers(0, 1000, text_tokens))
    for _ in range(images):
        ids += [cfg.vision_start_token_id] + [cfg.image_token_id] * merged + [cfg.vision_end_token_id]
    patches = rng.standard_normal((images * grid[1] * grid[2], cfg.vision.patch_dim)).astype(np.float32)
    return dict(input_ids=np.array(ids, np.int32), pixel_values=patches, image_grid_thw=np.array([grid] * images))


def hf_figure(row: dict, key: str, measure) -> bool:
    """row[key] = measure(), or row["hf_error"] when HF cannot run the case (reported, not fatal)."""
    try:
        row[key] = measure()
        return True
    except Exception as err:  # noqa: BLE001 - any failure of the peer is a result to report
        row["hf_error"] = f"{type(err).__name__}: {err}"[:500]
        return False


def hf_model(raw: dict):
    """HF's model for this config with random bf16 weights, built on the GPU: initialising 8B parameters on the
    host took minutes, long enough to time out the image section."""
    import torch
    import transformers

    with torch.device("cuda"):
        model = transformers.AutoModelForImageTextToText.from_config(
            transformers.AutoConfig.for_model(**raw), dtype=torch.bfloat16)
    return model.eval()


def hf_image_ttft(raw: dict, inputs: dict, repeats: int) -> float:
    import torch

    model = hf_model(raw)
    ids = torch.tensor(inputs["input_ids"][None], device="cuda", dtype=torch.long)  # HF writes int64 positions
    kwargs = dict(pixel_values=torch.tensor(inputs["pixel_values"], device="cuda", dtype=torch.bfloat16),
                  image_grid_thw=torch.tensor(inputs["image_grid_thw"], device="cuda", dtype=torch.long),
                  mm_token_type_ids=(ids == raw["image_token_id"]).long())
    try:
        def run():
            with torch.no_grad():
                model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0, **kwargs)
            torch.cuda.synchronize()

        return seconds(run, repeats)
    finally:
        del model
        torch.cuda.empty_cache()


def vision_flops(cfg: ModelConfig, params, grids: np.ndarray) -> int:
    """The vision tower on these grids: every block and merger weight once per patch (merger: per merged token),
    attention within each segment (QK^T and PV over its tokens, every block; window blocks over their windows)."""
    v = cfg.vision
    visual = params["visual"]
    weights = lambda tree: sum(x.size for x in jax.tree_util.tree_leaves(tree) if x.ndim >= 2)  # noqa: E731
    patches = int(np.prod(grids, axis=1).sum())
    merged = patches // v.spatial_merge_size**2
    mergers = weights(visual["merger"]) + (weights(visual["deepstack_merger_list"])
                                           if "deepstack_merger_list" in visual else 0)
    layout = prepare_vision_inputs(v, grids)
    full = int((layout.full.lengths_s.astype(np.int64) ** 2).sum())
    window = full if layout.window is None else int((layout.window.lengths_s.astype(np.int64) ** 2).sum())
    full_blocks = v.depth if layout.window is None else len(v.fullatt_block_indexes)
    attention = 4 * v.hidden_size * (full_blocks * full + (v.depth - full_blocks) * window)
    return (2 * patches * (weights(visual["blocks"]) + weights(visual["patch_embed"])) + 2 * merged * mergers
            + attention)


# ------------------------------------------------------------------------------------------------- sections


def text_section(args, rate: float, dtype, work: pathlib.Path) -> list[dict]:
    rows = []
    for name in TEXT_MODELS:
        raw = text_only(model_config(name, args.tiny))
        model = build(raw, dtype, work / name, fp8=args.fp8)
        rng = np.random.default_rng(0)
        for prompt in args.text_prompts:
            model.configure(max_batch=1, max_len=prompt + 8, prompt_buckets=(prompt,), prefix_cache=False)
            ids = rng.integers(0, 1000, prompt).astype(np.int32)
            ttft = median_ttft(model, args.repeats, input_ids=ids)
            floor = prefill_flops(model.config, model.params, prompt) / rate
            rows.append(dict(model=name, prompt=prompt, ttft_ms=1e3 * ttft, floor_ms=1e3 * floor,
                             x_floor=ttft / floor, tok_s=prompt / ttft))
            print(json.dumps(rows[-1]), flush=True)
        del model
    return rows


def image_section(args, rate: float, dtype, work: pathlib.Path) -> list[dict]:
    rows = []
    for name in IMAGE_MODELS:
        raw = model_config(name, args.tiny)
        model = build(raw, dtype, work / name)
        rng = np.random.default_rng(1)
        cases = [(n, image_inputs(model.config, n, args.image_side, 200, rng)) for n in (1, 4)]
        for images, inputs in cases:
            tokens = len(inputs["input_ids"])
            bucket = -(-tokens // 256) * 256
            model.configure(max_batch=1, max_len=bucket + 8, prompt_buckets=(bucket,), prefix_cache=False)
            ttft = median_ttft(model, args.repeats, **inputs)
            patches = int(np.prod(inputs["image_grid_thw"], axis=1).sum())
            rows.append(dict(model=name, images=images, patches=patches, prompt=tokens, ttft_ms=1e3 * ttft,
                             floor_ms=1e3 * (prefill_flops(model.config, model.params, tokens)
                                             + vision_flops(model.config, model.params, inputs["image_grid_thw"])) / rate))
            print(json.dumps(rows[-1]), flush=True)
        del model
        if args.hf:
            for row, (_, inputs) in zip(rows[-len(cases):], cases):
                if hf_figure(row, "hf_ttft_ms", lambda: 1e3 * hf_image_ttft(raw, inputs, args.repeats)):
                    row["ours_over_hf"] = row["ttft_ms"] / row["hf_ttft_ms"]
                print(json.dumps(row), flush=True)
    return rows


def vision_section(args, rate: float, dtype, work: pathlib.Path) -> list[dict]:
    rows = []
    for name in IMAGE_MODELS:
        raw = model_config(name, args.tiny)
        model = build(raw, dtype, work / name)
        v = model.config.vision
        engine = model.engine()
        rng = np.random.default_rng(2)
        for side in args.vision_sides:  # patches a side of one image: 32 -> 1K patches, 128 -> 16K
            grids = np.array([[1, side, side]])
            payload_patches = rng.standard_normal((side * side, v.patch_dim)).astype(np.float32)
            payload = VisionPayload(payload_patches, grids, np.arange(side * side // v.spatial_merge_size**2))
            run = lambda: jax.block_until_ready(engine._vision_embeds(payload)[0])  # noqa: E731
            forward = seconds(run, args.repeats)
            floor = vision_flops(model.config, model.params, grids) / rate
            rows.append(dict(model=name, patches=side * side, forward_ms=1e3 * forward, floor_ms=1e3 * floor,
                             x_floor=forward / floor))
            print(json.dumps(rows[-1]), flush=True)
        del model, engine
    return rows


def batch_section(args, rate: float, dtype, work: pathlib.Path, text_rows: list[dict]) -> list[dict]:
    raw = text_only(model_config(BATCH_MODEL, args.tiny))
    model = build(raw, dtype, work / "batch")
    rng = np.random.default_rng(3)
    lengths = rng.integers(args.batch_min, args.batch_max + 1, args.batch_requests)
    prompts = [rng.integers(0, 1000, n).astype(np.int32) for n in lengths]
    buckets = tuple(b for b in (256, 512, 1024, 2048) if b < args.batch_max) + (args.batch_max,)
    total = int(lengths.sum())
    out = dict(model=BATCH_MODEL, requests=len(prompts), tokens=total, buckets=buckets)
    for key, max_batch in (("together", len(prompts)), ("one_at_a_time", 1)):
        model.configure(max_batch=max_batch, max_len=args.batch_max + 8, prompt_buckets=buckets,
                        prefill_tokens=args.prefill_tokens, prefix_cache=False)
        model.warmup(progress=False)
        elapsed = seconds(lambda: model.generate(input_ids=prompts, max_new_tokens=1), 1)
        out[f"{key}_s"], out[f"{key}_tok_s"] = elapsed, total / elapsed
        print(json.dumps(out), flush=True)
    single = [r for r in text_rows if r["model"] == BATCH_MODEL]
    if single:
        longest = max(single, key=lambda r: r["prompt"])
        out.update(single_prompt=longest["prompt"], single_tok_s=longest["tok_s"],
                   together_over_single=out["together_tok_s"] / longest["tok_s"])
    out["floor_tok_s"] = total / (sum(prefill_flops(model.config, model.params, int(n)) for n in lengths) / rate)
    del model
    if args.hf:
        hf_figure(out, "hf_tok_s", lambda: hf_batch_tok_s(out, model_config(BATCH_MODEL, args.tiny), prompts,
                                                          args.hf_batch_seconds))
    print(json.dumps(out), flush=True)
    return [out]


def hf_batch_tok_s(out: dict, raw: dict, prompts: list[np.ndarray], budget_s: float, batch: int = 8) -> float:
    """HF's tokens/s for generate(max_new_tokens=1) over the prompts in left-padded batches of ``batch``, after
    one warm-up batch, over the batches that start within ``budget_s`` (HF's Qwen3.5 runs its GDN layers in
    flash-linear-attention's kernels when installed, else in a torch reference whose 64 prompts did not finish
    in 400 s); ``out`` gains how many prompts were timed and which GDN path ran."""
    import importlib.util

    import torch

    model = hf_model(raw)
    out["hf_gdn"] = "flash-linear-attention" if importlib.util.find_spec("fla") else "torch reference"

    def run(part: list[np.ndarray]) -> None:
        width = max(len(p) for p in part)
        ids = torch.zeros((len(part), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(part):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        with torch.no_grad():
            model.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=1, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()

    try:
        run(prompts[:batch])
        done, start = 0, time.perf_counter()
        while done < len(prompts) and time.perf_counter() - start < budget_s:
            part = prompts[done:done + batch]
            run(part)
            done += len(part)
        out["hf_prompts_timed"] = done
        return sum(len(p) for p in prompts[:done]) / (time.perf_counter() - start)
    finally:
        del model
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="text,image,vision,batch")
    ap.add_argument("--text-prompts", default="1024,4096,16384,32768")
    ap.add_argument("--image-side", type=int, default=1024, help="image side in pixels")
    ap.add_argument("--vision-sides", default="32,64,128", help="patches a side of the vision section's images")
    ap.add_argument("--batch-requests", type=int, default=64)
    ap.add_argument("--batch-min", type=int, default=200)
    ap.add_argument("--batch-max", type=int, default=2000)
    ap.add_argument("--prefill-tokens", type=int, default=8192, help="EngineConfig.prefill_tokens of the batch")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hf", action="store_true", help="also time HF transformers (needs torch with CUDA)")
    ap.add_argument("--hf-batch-seconds", type=float, default=120.0,
                    help="HF's batched prefill is timed over the batches of 8 prompts that start within this")
    ap.add_argument("--fp8", action="store_true", help="the text section with FP8 linear layers (convert --dtype fp8)")
    ap.add_argument("--tiny", action="store_true", help="tiny configs on the CPU (checks the script)")
    ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = ap.parse_args()
    args.text_prompts = [int(x) for x in args.text_prompts.split(",")]
    args.vision_sides = [int(x) for x in args.vision_sides.split(",")]
    sections = args.sections.split(",")
    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    rate = matmul_rate(512 if args.tiny else 8192)
    device = jax.devices()[0].device_kind
    print(f"{device}: bf16 matmul {rate / 1e12:.0f} TFLOP/s", flush=True)

    result = dict(**run_info(), tiny=args.tiny, fp8=args.fp8, matmul_flop_s=rate)
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp)
        if "text" in sections:
            result["text"] = text_section(args, rate, dtype, work)
        if "image" in sections:
            result["image"] = image_section(args, rate, dtype, work)
        if "vision" in sections:
            result["vision"] = vision_section(args, rate, dtype, work)
        if "batch" in sections:
            result["batch"] = batch_section(args, rate, dtype, work, result.get("text", []))

    for r in result.get("text", []):
        print(f"text  {r['model']:>14} {r['prompt']:>6} tokens: TTFT {r['ttft_ms']:8.1f} ms = {r['x_floor']:.2f} x "
              f"floor ({r['floor_ms']:.1f} ms)")
    for r in result.get("image", []):
        hf = f", HF {r['hf_ttft_ms']:.1f} ms (ours {r['ours_over_hf']:.2f}x)" if "hf_ttft_ms" in r else ""
        print(f"image {r['model']:>14} {r['images']} x {r['patches'] // r['images']} patches + text, {r['prompt']} "
              f"tokens: TTFT {r['ttft_ms']:8.1f} ms (floor {r['floor_ms']:.1f}){hf}")
    for r in result.get("vision", []):
        print(f"tower {r['model']:>14} {r['patches']:>6} patches: {r['forward_ms']:8.1f} ms = {r['x_floor']:.2f} x "
              f"floor ({r['floor_ms']:.1f} ms)")
    for r in result.get("batch", []):
        print(f"batch {r['model']:>14} {r['requests']} prompts, {r['tokens']} tokens: together "
              f"{r['together_tok_s']:.0f} tok/s, one at a time {r['one_at_a_time_tok_s']:.0f}, single prompt "
              f"{r.get('single_tok_s', float('nan')):.0f} (ratio {r.get('together_over_single', float('nan')):.2f}), "
              f"floor {r['floor_tok_s']:.0f}, HF {r.get('hf_tok_s', float('nan')):.0f} "
              f"({r.get('hf_prompts_timed', 0)} prompts, GDN: {r.get('hf_gdn', '-')})")
    write_result(args.out, "prefill", result, fp8=args.fp8, tiny=args.tiny)


if __name__ == "__main__":
    main()
