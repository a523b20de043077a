"""Tensor and expert parallel on real GPUs (needs a machine of 2 or more): logits of tiny models on every mesh
that fits equal one device's (fp32 at full precision, the Pallas kernels per device), and greedy tokens with an
image are the same."""

import numpy as np
import pytest

import jax

import qwenvl_jax as qj
from tests.hf_tiny import build_hf_checkpoint

pytestmark = pytest.mark.skipif(len(jax.devices()) < 2, reason="needs 2 or more GPUs")

IMAGE = np.random.default_rng(1).integers(0, 256, (50, 90, 3), dtype=np.uint8)
ENGINE = dict(max_batch=2, max_len=128, prompt_buckets=(96,), decode_steps=8, vision_buckets=(64,))


@pytest.mark.parametrize("variant", ["qwen3_5-a", "qwen3_vl_moe-a", "qwen2_5_vl-a"])
def test_sharded_logits_and_tokens_equal_one_device(variant, tmp_path):
    build_hf_checkpoint(variant, tmp_path / variant)
    ids = [[5, 17, 99, 3, 250, 7, 61, 400, 12]]
    messages = [{"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "Hm?"}]}]
    with jax.default_matmul_precision("highest"):
        one = qj.load(tmp_path / variant, dtype="float32")
        want = one.logits(ids)
        one.configure(**ENGINE)
        tokens = one.generate(messages, max_new_tokens=16).token_ids
        meshes = [(tp, 1) for tp in (2, 4, 8) if tp <= len(jax.devices())]
        if "moe" in variant:
            meshes.append((1, 2))
        for tp, ep in meshes:
            model = qj.load(tmp_path / variant, dtype="float32", tensor_parallel=tp, expert_parallel=ep)
            err = float(np.max(np.abs(model.logits(ids) - want)) / np.max(np.abs(want)))
            assert err < 1e-4, (tp, ep, err)
            model.configure(**ENGINE)
            assert model.generate(messages, max_new_tokens=16).token_ids == tokens, (tp, ep)
