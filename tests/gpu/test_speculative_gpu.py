"""Speculative decoding on the GPU: the CPU suite's exactness tests run again where the kernels take over (the
verify pass's chunked attention over the cache and GDN chunk kernel with per-row lengths, the MTP head's decode
attention, the MoE grouped matmuls), for the dense and MoE Qwen3.5 variants."""

from tests.test_speculative import (  # noqa: F401 - the fixtures and tests run here on the GPU
    model,
    test_greedy_output_is_unchanged_by_any_drafts,
    test_mtp_drafts_match_a_cache_free_reference,
)
