"""Tensor parallelism on CPU (gloo): the same tokens and logprobs as one rank."""

from __future__ import annotations

import pytest

from slipstream import LLM, SamplingParams

PROMPTS = [
    "The history of the Roman Empire",
    "def quicksort(arr):",
    "北京是中国的首都，",
    "Write a haiku about the sea.",
    "List three primary colors:",
]
PARAMS = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module")
def tp1_results(llm_fp32):
    return llm_fp32.generate(PROMPTS, PARAMS)


# n-gram speculation at any batch size: the ranks run guessing decodes as causal chunks, whose rows must give the
# logits of plain decoding there too
@pytest.mark.parametrize("speculative_config", [None, {"method": "ngram", "num_speculative_tokens": 3,
                                                       "disable_by_batch_size": 8}], ids=["plain", "guessing"])
def test_tp3_matches_tp1_on_default_model(tp1_results, speculative_config):
    llm = LLM(kv_cache_memory=128 << 20, tensor_parallel_size=3, speculative_config=speculative_config)
    try:
        results = llm.generate(PROMPTS, PARAMS)
        assert (llm.engine.num_draft_tokens > 0) == (speculative_config is not None)
    finally:
        llm.engine.shutdown()
    for ref, got in zip(tp1_results, results, strict=True):
        a, b = ref.outputs[0], got.outputs[0]
        assert b.token_ids == a.token_ids
        for la, lb in zip(a.logprobs, b.logprobs, strict=True):
            assert abs(la.logprob - lb.logprob) < 1e-4
            assert [t for t, _ in la.top] == [t for t, _ in lb.top]


@pytest.mark.parametrize("size", [2, 8])
def test_sizes_that_do_not_split_the_heads_are_refused(size):
    with pytest.raises(ValueError, match=rf"--tensor-parallel-size {size}.*9 attention heads and 3 KV heads"):
        LLM(kv_cache_memory=128 << 20, tensor_parallel_size=size)
