"""Run by tests/test_sharding.py in a process of its own with 8 fake CPU devices (the device count is fixed when
JAX starts): tiny models of every family on tensor- and expert-parallel meshes against one device,
and the collectives of their compiled decode programs (``sharding_check.py FAMILIES [GENERATE]``), or the host
memory of restoring a converted checkpoint onto a mesh (``sharding_check.py restore DIR TP``). Prints one JSON
line per check."""

import json
import os
import re
import sys
import tempfile
from pathlib import Path

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

import qwenvl_jax as qj  # noqa: E402
from qwenvl_jax.config import load_config  # noqa: E402
from qwenvl_jax.models.model import abstract_model  # noqa: E402
from qwenvl_jax.sharding import TENSOR  # noqa: E402
from tests.compilations import compilations  # noqa: E402
from tests.hf_tiny import build_hf_checkpoint  # noqa: E402

MESHES = {"dense": [(2, 1), (4, 1), (8, 1)], "moe": [(8, 1), (1, 2), (2, 2)]}
ENGINE = dict(max_batch=2, max_len=128, prompt_buckets=(96,), decode_steps=8, vision_buckets=(64,))
IMAGE = np.random.default_rng(1).integers(0, 256, (50, 90, 3), dtype=np.uint8)


def main(variants: list[str], generate: list[str]) -> None:
    """The mesh checks of ``variants`` (greedy generation too for ``generate``), then ``collectives``: one
    process, so the checkpoints and the runtime are made once."""
    work = Path(tempfile.mkdtemp())
    ids = [[5, 17, 99, 3, 250, 7, 61, 400, 12]]
    messages = [{"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "Hm?"}]}]
    for variant in variants:
        build_hf_checkpoint(variant, work / variant)
        one = qj.load(work / variant, dtype="float32")
        want = one.logits(ids)
        tokens = None
        if variant in generate:
            one.configure(**ENGINE)
            tokens = one.generate(messages, max_new_tokens=16).token_ids
        for tp, ep in MESHES["moe" if "moe" in variant else "dense"]:
            model = qj.load(work / variant, dtype="float32", tensor_parallel=tp, expert_parallel=ep)
            specs = {str(leaf.sharding.spec) for leaf in jax.tree_util.tree_leaves(model.params)}
            row = dict(variant=variant, tp=tp, ep=ep, logits_err=float(np.max(np.abs(model.logits(ids) - want))),
                       split=any(TENSOR in s for s in specs) if tp > 1 else any("expert" in s for s in specs))
            if variant in generate and (tp, ep) in ((2, 1), (2, 2)):
                model.configure(**ENGINE)
                row["tokens_equal"] = model.generate(messages, max_new_tokens=16).token_ids == tokens
                model.clear_prefix_cache()  # the same path again: nothing may compile
                with compilations() as compiles:
                    row["tokens_again_equal"] = model.generate(messages, max_new_tokens=16).token_ids == tokens
                row["compiles_again"] = compiles.count
                cached = model.generate(messages, max_new_tokens=16)  # the prompt from the prefix cache
                row["tokens_cached_equal"] = cached.token_ids == tokens
                row["cached_tokens"] = cached.stats.cached_tokens
            print(json.dumps(row), flush=True)
    collectives(work)


def _status_kib(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def restore(checkpoint: str, tp: int) -> None:
    """Loads a converted checkpoint onto a TP mesh in this fresh process: the resident memory it added at its peak
    (VmHWM after, less VmRSS before: an over-estimate if an earlier peak was higher), against the bytes the devices
    hold (fake CPU devices live in host memory) and the largest array."""
    jax.device_put(np.ones(8), jax.devices()[1]).block_until_ready()  # the runtime's own allocations come first
    abstract_model(load_config(checkpoint), np.float32)  # and those of tracing the model's shapes
    warm = Path(tempfile.mkdtemp()) / "warm"  # and Orbax's first restore (thread pools, event loop: ~60 MB)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(warm, {"a": np.ones(8)})
    checkpointer.wait_until_finished()
    checkpointer.restore(warm)
    before = _status_kib("VmRSS")
    model = qj.load(checkpoint, tensor_parallel=tp)
    leaves = jax.tree_util.tree_leaves(model.params)
    jax.block_until_ready(leaves)
    device_bytes = sum(s.data.nbytes for leaf in leaves for s in leaf.addressable_shards)
    print(json.dumps(dict(peak_added=(_status_kib("VmHWM") - before) * 1024, device_bytes=device_bytes,
                          model_bytes=sum(leaf.nbytes for leaf in leaves),
                          largest=max(leaf.nbytes for leaf in leaves),
                          split=all(len({s.index for s in leaf.addressable_shards}) == tp
                                    for leaf in leaves if leaf.ndim == 2 and leaf.nbytes > 2**20))), flush=True)


COLLECTIVE = re.compile(r"= (\w+)\[([\d,]*)\][^ ]* (all-reduce|all-gather|collective-permute|all-to-all|"
                        r"reduce-scatter)(?:-start)?\(.*?op_name=\"([^\"]*)\"")
# (variant, tensor_parallel, expert_parallel) of the collectives check.
DECODE_MESHES = (("qwen3_vl-a", 2, 1), ("qwen3_5-a", 2, 1), ("qwen3_5_moe-a", 2, 2))


def collectives(work: Path) -> None:
    """Every collective of each compiled decode program (2 steps, 2 rows): its kind, element count and the op it
    came from, with the model's layer counts to hold them against (checkpoints in ``work``, built if missing)."""
    for variant, tp, ep in DECODE_MESHES:
        if not (work / variant).exists():
            build_hf_checkpoint(variant, work / variant)
        model = qj.load(work / variant, dtype="float32", tensor_parallel=tp, expert_parallel=ep)
        model.configure(max_batch=2, max_len=64, prompt_buckets=(16,), decode_steps=2)
        engine = model.engine()
        hlo = engine._decode.lower(engine._weights, engine.state, np.ones(3, bool), engine._eos, np.int32(2),
                                   steps=2, rows=2).compile().as_text()
        text = model.config.text
        found = [dict(kind=kind, elements=int(np.prod([int(d) for d in dims.split(",") if d])), op=op)
                 for _, dims, kind, op in COLLECTIVE.findall(hlo)]
        print(json.dumps(dict(variant=variant, tp=tp, ep=ep, layers=text.num_hidden_layers,
                              gdn_layers=sum(t == "linear_attention" for t in text.layer_types),
                              moe_layers=text.num_hidden_layers if text.num_experts else 0,
                              gdn_head_blocks=text.gdn_head_blocks,
                              vocab=text.vocab_size, slots=engine.state.lengths.shape[0],
                              largest_weight=max(leaf.size for leaf in jax.tree_util.tree_leaves(model.params)
                                                 if leaf.ndim == 2),
                              collectives=found)), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "restore":
        restore(sys.argv[2], int(sys.argv[3]))
    else:
        main(sys.argv[1].split(","), sys.argv[2].split(",") if len(sys.argv) > 2 else [])
