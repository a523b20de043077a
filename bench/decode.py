"""End-to-end generation benchmark on one device: our engine vs HF transformers, against the weight-read roofline.

    python bench/decode.py [--model-type qwen3_5] [--batch 1,8] [--prompt 512] [--new 128] [--hf] [--tiny]

The model is the real architecture (HF's default config of the family, e.g. Qwen3.5-9B's text stack) with random
bf16 weights made on the device: speed does not depend on weight values. Reported per batch size: TTFT for one
prompt, decode tokens/s (steady state, K tokens per call, host reading tokens one call behind), and the roofline
= weight bytes / copy bandwidth measured in the same run (batch-1 decode reads every weight once per token).
``--hf`` times HF transformers' ``generate`` on the same GPU (torch, random weights, same config). ``--tiny`` runs a
tiny config on the CPU to check the script itself.

Prints a table and writes bench/results/decode-<device>.json (device, jax version, commit, date, every figure).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch and JAX may share the GPU

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bench.run_info import run_info  # noqa: E402
from qwenvl_jax.cache import tree_bytes  # noqa: E402
from qwenvl_jax.config import parse_config  # noqa: E402
from qwenvl_jax.engine import Engine, EngineConfig, Request  # noqa: E402
from qwenvl_jax.models.model import abstract_model  # noqa: E402
from qwenvl_jax.sampling import SamplingParams  # noqa: E402
from qwenvl_jax.tiny_model import TINY_CONFIGS, hf_config_dict  # noqa: E402


# Text/vision dimensions of released checkpoints (their config.json); the MoE families use HF's default config.
PRESETS: dict[str, tuple[str, dict, dict]] = {
    "qwen2_5_vl": ("Qwen2.5-VL-7B", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                         num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                         rope_parameters=dict(rope_type="default", rope_theta=1e6,
                                                              mrope_section=[16, 24, 24])),
                   dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                        patch_size=14, window_size=112, fullatt_block_indexes=[7, 15, 23, 31])),
    "qwen3_vl": ("Qwen3-VL-8B", dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                                     rope_parameters=dict(rope_type="default", rope_theta=5e6, mrope_section=[24, 20, 20],
                                                          mrope_interleaved=True)),
                 dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                      patch_size=16, num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24])),
    "qwen3_5": ("Qwen3.5-9B (HF default)", {}, dict(out_hidden_size=4096)),
    "qwen3_vl_moe": ("HF default Qwen3-VL-MoE", {}, {}),
    "qwen3_5_moe": ("HF default Qwen3.5-MoE", {}, {}),
}


def real_config(model_type: str) -> tuple[str, dict]:
    """(name, config.json dict) of the preset, vision width matched to the text width."""
    name, text, vision = PRESETS[model_type]
    raw = hf_config_dict(model_type, dict(text), dict(vision))
    raw["vision_config"]["out_hidden_size"] = raw["text_config"]["hidden_size"]
    return name, raw


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


def copy_bandwidth(n_bytes: int = 1 << 30) -> float:
    """Bytes read + written per second by an on-device elementwise pass over `n_bytes`: the slope between loops
    of 10 and 20 passes in one call, so dispatch and launch costs cancel."""
    x = jnp.ones((n_bytes // 4,), jnp.float32)
    passes = jax.jit(lambda a, n: jax.lax.fori_loop(0, n, lambda i, b: b * 0.5 + 1.0, a))

    def median_s(n: int) -> float:
        jax.block_until_ready(passes(x, n))
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            jax.block_until_ready(passes(x, n))
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    return 2 * n_bytes * 10 / (median_s(20) - median_s(10))


def random_text_request(rng: np.random.Generator, vocab: int, prompt: int, max_new: int) -> Request:
    """A greedy text-only request of `prompt` random token ids (text positions on all three mRoPE axes)."""
    ids = rng.integers(0, vocab, prompt).astype(np.int32)
    pos = np.broadcast_to(np.arange(prompt, dtype=np.int32), (3, prompt)).copy()
    return Request(ids, pos, 0, SamplingParams(), max_new)


def time_ours(engine: Engine, vocab: int, batch: int, prompt: int, new: int) -> dict:
    rng = np.random.default_rng(0)

    def requests(n: int, max_new: int) -> list[Request]:
        return [random_text_request(rng, vocab, prompt, max_new) for _ in range(n)]

    # TTFT: one prompt, until its first token event. The run goes on after it: the engine queues a decode call
    # behind every prefill before it has read the first token, so timing the whole run would add that call.
    t0, ttft = time.perf_counter(), None
    for _ in engine.run(requests(1, 1)):
        ttft = time.perf_counter() - t0 if ttft is None else ttft
    # Decode: `batch` requests; the clock starts once every first token has arrived.
    seen, first_done, count = set(), None, 0
    t_start = time.perf_counter()
    for ev in engine.run(requests(batch, new)):
        count += len(ev.tokens)
        seen.add(ev.request_index)
        if first_done is None and len(seen) == batch:
            first_done, count_at_first = time.perf_counter(), count
    elapsed = time.perf_counter() - first_done
    return dict(ttft_ms=1e3 * ttft, decode_tok_s=(count - count_at_first) / elapsed,
                batch_total_s=time.perf_counter() - t_start)


def time_hf(raw: dict, batch: int, prompt: int, new: int) -> dict:
    import torch
    import transformers

    cfg = transformers.AutoConfig.for_model(**raw)
    model = transformers.AutoModelForImageTextToText.from_config(cfg, dtype=torch.bfloat16).cuda().eval()
    ids = torch.randint(0, raw["text_config"]["vocab_size"], (batch, prompt), device="cuda")
    gen = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **gen)  # warm-up
        times = {}
        for n in (1, new):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, **gen)
            torch.cuda.synchronize()
            times[n] = time.perf_counter() - t0
    del model
    torch.cuda.empty_cache()
    return dict(ttft_ms=1e3 * times[1], decode_tok_s=batch * (new - 1) / (times[new] - times[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-type", default="qwen3_5")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--hf", action="store_true", help="also time HF transformers (needs torch with CUDA)")
    ap.add_argument("--tiny", action="store_true", help="tiny config (check the script on a CPU)")
    ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = ap.parse_args()
    batches = [int(b) for b in args.batch.split(",")]

    if args.tiny:
        text, vision = TINY_CONFIGS[args.model_type]
        name, raw = f"tiny {args.model_type}", hf_config_dict(args.model_type, text, vision)
    else:
        name, raw = real_config(args.model_type)
    cfg = parse_config(raw)
    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    model = abstract_model(cfg, dtype)
    graphdef, params = random_params(model, jax.random.key(0))
    text_bytes = tree_bytes(params["language_model"]) + (tree_bytes(params["lm_head"]) if "lm_head" in params else 0)
    # Batch-1 decode reads the decoder and LM head once per token; an untied embedding table only by one row.
    embed_bytes = tree_bytes(params["language_model"]["embed_tokens"])
    decode_bytes = text_bytes - (0 if cfg.text.tie_word_embeddings else embed_bytes)
    bandwidth = copy_bandwidth(1 << 24 if args.tiny else 1 << 30)
    device = jax.devices()[0].device_kind
    print(f"{device}: {name} text params {text_bytes / 1e9:.2f} GB ({jnp.dtype(dtype).name}), "
          f"copy bandwidth {bandwidth / 1e9:.0f} GB/s, roofline {bandwidth / decode_bytes:.1f} tok/s at batch 1")

    rows = []
    for batch in batches:  # ours at every batch first: a slow HF run (Triton autotuning) cannot cost our rows
        config = EngineConfig(max_batch=batch, max_len=args.prompt + args.new + 8, prompt_buckets=(args.prompt,),
                              decode_steps=args.decode_steps, chunked_prefill=False)
        engine = Engine(graphdef, params, config, eos_ids=())
        compile_s = engine.warmup(progress=False, vision=False)
        rows.append(dict(batch=batch, compile_s=compile_s, state_mb=engine.state_bytes / 2**20,
                         roofline_tok_s=batch * bandwidth / decode_bytes,
                         ours=time_ours(engine, cfg.text.vocab_size, batch, args.prompt, args.new)))
        del engine
        print(json.dumps(rows[-1]), flush=True)
    if args.hf:
        del params  # room for torch's copy of the weights
        for row in rows:
            row["hf"] = time_hf(raw, row["batch"], args.prompt, args.new)
            print(json.dumps(row), flush=True)

    print(f"\n{'batch':>5} {'ours TTFT ms':>13} {'ours tok/s':>11} {'HF TTFT ms':>11} {'HF tok/s':>9} {'roofline':>9}")
    for r in rows:
        hf = r.get("hf", {})
        print(f"{r['batch']:>5} {r['ours']['ttft_ms']:>13.1f} {r['ours']['decode_tok_s']:>11.1f} "
              f"{hf.get('ttft_ms', float('nan')):>11.1f} {hf.get('decode_tok_s', float('nan')):>9.1f} "
              f"{r['roofline_tok_s']:>9.1f}")
    result = dict(**run_info(), model_type=args.model_type, model=name, tiny=args.tiny, prompt=args.prompt,
                  new=args.new, decode_steps=args.decode_steps, text_param_bytes=text_bytes,
                  decode_bytes_per_step=decode_bytes, copy_bandwidth_bytes_s=bandwidth, rows=rows)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"decode-{args.model_type}{'-tiny' if args.tiny else ''}-{device.replace(' ', '_')}.json"
    (out / name).write_text(json.dumps(result, indent=1))
    print(f"wrote {out / name}")


if __name__ == "__main__":
    main()
