"""Tensor and expert parallelism (qwenvl_jax.sharding) on 8 fake CPU devices, in a process of its own
(tests/sharding_check.py): logits of every family on TP 2/4/8 (and EP, alone and with TP, for the MoE families)
equal one device's; greedy generation with an image is token-exact and compiles nothing when repeated."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

FAMILIES = "qwen2_5_vl-b,qwen3_vl-a,qwen3_vl_moe-b,qwen3_5-a,qwen3_5_moe-a"
GENERATE = "qwen3_vl-a,qwen3_5_moe-a"


def test_meshes_match_one_device():
    script = Path(__file__).with_name("sharding_check.py")
    done = subprocess.run([sys.executable, str(script), FAMILIES, GENERATE], capture_output=True, text=True,
                          timeout=1200, cwd=script.parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert {r["variant"] for r in rows} == set(FAMILIES.split(","))
    for r in rows:
        assert r["logits_err"] < 1e-4, r
        assert r["split"], r  # the parameters really are split over the mesh
    generated = [r for r in rows if "tokens_equal" in r]
    assert len(generated) == 2
    for r in generated:
        assert r["tokens_equal"] and r["tokens_again_equal"] and r["compiles_again"] == 0, r


def test_a_mesh_larger_than_the_devices_is_refused():
    from qwenvl_jax.sharding import make_mesh

    with pytest.raises(ValueError, match="needs 16 devices"):
        make_mesh(8, 2)
