"""Greedy generation on the GPU equals HF's, token for token, for every family: the CPU suite's parity tests run
again where the kernels take over (flash-decoding attention, the GDN decode step in the slot pool, the MoE grouped
matmuls, cuDNN attention for bf16 only, so here XLA's in fp32). The tiny checkpoints' head sizes (16, 32) and
expert sizes suit every kernel, so none falls back to its reference."""

from tests.test_generate import (  # noqa: F401 - the fixtures and tests run here on the GPU
    pair,
    test_image_prompts_prefilled_in_chunks_and_decoded_together_match_hf,
    test_image_request_matches_hf,
    test_text_batch_of_mixed_lengths_matches_hf,
)
