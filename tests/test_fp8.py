"""Fine-grained FP8 checkpoints (HF "quant_method": "fp8"): tiny models of every family quantized by an independent
test-side writer (tests/hf_tiny.write_fp8_checkpoint) load, convert and run; logits and greedy tokens match the
same model with the weights dequantized to fp32; unsupported quantization and malformed scales are named."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwenvl_jax as qj
from convert.converter import convert_checkpoint, plan_conversion
from convert.safetensors_io import CheckpointError, read_header, read_tensors
from qwenvl_jax.config import parse_config
from tests.hf_tiny import save_safetensors, build_hf_checkpoint, write_fp8_checkpoint

pytest.importorskip("torch")

ENGINE = dict(max_batch=2, max_len=96, prompt_buckets=(32,), decode_steps=8, vision_buckets=(64,))


def _fp8_pair(variant: str, tmp_path, block=(128, 128)):
    hf_dir = tmp_path / "hf"
    build_hf_checkpoint(variant, hf_dir)
    write_fp8_checkpoint(hf_dir, tmp_path / "fp8", tmp_path / "deq", block)
    return tmp_path / "fp8", tmp_path / "deq"


@pytest.mark.parametrize("variant, block", [("qwen2_5_vl-a", (128, 128)), ("qwen3_vl-b", (32, 32)),
                                            ("qwen3_vl_moe-a", (128, 128)), ("qwen3_5-a", (32, 32)),
                                            ("qwen3_5_moe-b", (32, 16))])
def test_fp8_logits_match_the_dequantized_model(variant, block, tmp_path):
    """32x32 and 32x16 blocks cut the tiny matrices into several blocks with a partial last one (GDN's a/b
    projections have 2-4 output rows); 128x128 is one partial block per matrix."""
    fp8_dir, deq_dir = _fp8_pair(variant, tmp_path, block)
    converted = qj.load(convert_checkpoint(fp8_dir, tmp_path / "out", dtype="float32", progress=False))
    manifest = json.loads((tmp_path / "out" / "qwenvl_jax.json").read_text())
    assert manifest["fp8_modules"] and converted.config.fp8.block == block
    fp8_arrays = [leaf for leaf in jax.tree_util.tree_leaves(converted.params) if leaf.dtype == jnp.float8_e4m3fn]
    experts = [m for m in manifest["fp8_modules"] if m.endswith(".experts")]  # two FP8 arrays each
    assert len(fp8_arrays) == len(manifest["fp8_modules"]) + len(experts)
    assert bool(experts) == ("moe" in variant)
    reference = qj.load(deq_dir, dtype="float32")
    ids = [[5, 17, 99, 3, 250, 7, 61, 400, 12]]
    np.testing.assert_allclose(converted.logits(ids), reference.logits(ids), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("variant", ["qwen3_5_moe-a"])
def test_fp8_greedy_tokens_match_the_dequantized_model(variant, tmp_path):
    fp8_dir, deq_dir = _fp8_pair(variant, tmp_path)
    ids = np.random.default_rng(2).integers(0, 400, 20).tolist()
    results = []
    for directory in (fp8_dir, deq_dir):
        model = qj.load(directory, dtype="float32")
        model.configure(**ENGINE)
        results.append(model.generate(input_ids=ids, max_new_tokens=32).token_ids)
    assert results[0] == results[1] and len(results[0]) > 8


def test_fp8_scales_of_the_wrong_shape_are_named(tmp_path):
    fp8_dir, _ = _fp8_pair("qwen3_vl-b", tmp_path, (32, 32))
    shard = fp8_dir / "model.safetensors"
    infos = read_header(shard)
    arrays = {info.name: np.array(a) for info, a in read_tensors(shard, infos)}
    name = next(n for n in arrays if n.endswith("o_proj.weight_scale_inv"))
    arrays[name] = arrays[name][:, :1]
    save_safetensors(arrays, shard)
    with pytest.raises(CheckpointError, match=r"wrong-shape tensors: .*o_proj\.weight_scale_inv"):
        plan_conversion(fp8_dir)


@pytest.mark.parametrize("raw, message", [
    ({"quant_method": "awq", "bits": 4}, r"'awq' \(a method qwenvl-jax does not run\)"),
    ({"quant_method": "gptq"}, "'gptq'"),
    ({"quant_method": "compressed-tensors"}, "'compressed-tensors'"),
    ({"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}, "only 'e4m3'"),
    ({"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [128, 128]}, "only 'dynamic'"),
    ({"quant_method": "fp8"}, "per-tensor FP8 scales are not supported"),
])
def test_unsupported_quantization_is_refused_by_name(raw, message):
    from qwenvl_jax.tiny_model import TINY_CONFIGS, hf_config_dict

    config = hf_config_dict("qwen3_vl", *TINY_CONFIGS["qwen3_vl"])
    with pytest.raises(ValueError, match=message):
        parse_config({**config, "quantization_config": raw})


@pytest.mark.parametrize("variant", ["qwen3_5_moe-b", "qwen2_5_vl-b"])
def test_converting_with_dtype_fp8_quantizes_as_the_official_format(variant, tmp_path):
    """convert --dtype fp8 on an unquantized checkpoint: the same Linears in FP8 as the test writer quantizes
    (not the vision tower, LM head, routers or shared-expert gates), the same 128x128 block values, so the
    same logits; everything else bfloat16. MoE experts are quantized per expert, gate and up apart."""
    fp8_dir, _ = _fp8_pair(variant, tmp_path)
    ours = convert_checkpoint(tmp_path / "hf", tmp_path / "ours", dtype="fp8", progress=False)
    theirs = convert_checkpoint(fp8_dir, tmp_path / "theirs", dtype="bfloat16", progress=False)
    manifests = [json.loads((d / "qwenvl_jax.json").read_text()) for d in (ours, theirs)]
    assert manifests[0]["fp8_modules"] == manifests[1]["fp8_modules"] and manifests[0]["dtype"] == "bfloat16"
    a, b = qj.load(ours, dtype="float32"), qj.load(theirs, dtype="float32")
    for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
        assert x.dtype == y.dtype
        if x.dtype == jnp.float8_e4m3fn:
            np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
    ids = [[5, 17, 99, 3, 250]]
    np.testing.assert_allclose(a.logits(ids), b.logits(ids), rtol=1e-5, atol=1e-5)
