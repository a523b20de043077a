"""The Triton scan with the next chunk's row factors read at the start of the step (as at 1f46380) or last, after
the state update's product is issued (bench/KERNELS_NOTES.md item 23). ncu put 7.4% of the scan's stall samples on
the step's first async-proxy fence, which sits ~50 instructions after those loads and waits for them; read last,
they have the state update's product and the next stage's copies to land before that fence. Device time per
kernel under jax.profiler, outputs checked bit for bit; writes $OUT/scan_factor_loads.json (or /tmp).

    python bench/scan_factor_loads_probe.py
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bench.prefill_share import profiled_kernel_seconds  # noqa: E402
from bench.run_info import run_info  # noqa: E402
from bench.scan_stages_probe import prefill  # noqa: E402
from pallas_kernels.gated_delta_rule import chunk  # noqa: E402

CALLS = 20
ROUNDS = 2


def main() -> None:
    out = {**run_info(), "what": __doc__.split("\n\n")[0], "rows": []}
    path = pathlib.Path(os.environ.get("OUT", "/tmp"), "scan_factor_loads.json")
    for batch, seq_len in ((1, 4096), (1, 16384), (2, 8192)):
        outputs = {}
        for round_ in range(ROUNDS):  # alternating, so drift cannot land on one setting
            for last in (False, True):
                chunk.FACTOR_LOADS_LAST = last
                jax.clear_caches()
                inputs, _, call = prefill(batch, seq_len, dict(scan="triton", block_v=32))
                outputs[last] = [np.asarray(x) for x in call(*inputs)]
                kernels = profiled_kernel_seconds(lambda: jax.block_until_ready(
                    [call(*inputs) for _ in range(CALLS)]))
                out["rows"].append({
                    "name": f"B{batch}xT{seq_len} factor loads {'last' if last else 'first'} round {round_}",
                    "scan_us": kernels["gdr_chunk_scan"] * 1e6 / CALLS,
                    "prep_us": kernels["gdr_chunk_prep"] * 1e6 / CALLS,
                })
                print(json.dumps(out["rows"][-1]), flush=True)
        out["rows"][-1]["outputs_bit_identical"] = all(
            np.array_equal(a, b) for a, b in zip(outputs[False], outputs[True]))
        print(json.dumps(out["rows"][-1]), flush=True)
        path.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
