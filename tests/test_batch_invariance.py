"""A request's tokens and logprobs do not depend on how the engine computed its prompt: alone, again from the prefix
cache, in a batch with other requests, or cut into chunks of a small token budget. Every query row attends to the
cache through the same kernel (model/attention.py) and w4a8's int8 matmuls treat each row alone, so this holds
bitwise in slipstream's fastest mode, where rounding turned path-dependent float noise into logprobs 0.1-0.3 apart
(and a seeded request repeated could sample another answer)."""

from __future__ import annotations

import pytest

from slipstream import LLM, SamplingParams
from slipstream.kernels import kernels

pytestmark = pytest.mark.skipif(kernels().ops is None, reason="w4a8 needs the compiled CPU kernels")

# ~170 tokens with the chat template: more rows than one prompt chunk of the small budget below, and more than a
# block kernel's 64-row tile
LONG = ("I am planning a week-long trip through the north of Portugal in late spring. I will start in Porto, "
        "want to see the Douro valley, spend two nights in Braga and Guimaraes, and end near the coast. I travel "
        "by train and bus only, like old towns, small museums and local food, and dislike long days on the road. "
        "Suggest a day-by-day plan with where to sleep each night.")
OTHERS = ["What is the capital of France?", "Write a haiku about the sea.", "Name three uses of copper."]


def outputs(llm: LLM, prompts: list[str], params: SamplingParams) -> list[tuple[list[int], list[float]]]:
    results = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    return [(r.outputs[0].token_ids, [t.logprob for t in r.outputs[0].logprobs or []]) for r in results]


@pytest.mark.parametrize("kv_dtype", ["float16", "int8"])
def test_w4a8_gives_a_request_the_same_logprobs_whatever_else_the_engine_ran(kv_dtype):
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)
    seeded = SamplingParams(temperature=1.0, seed=3, max_tokens=24, ignore_eos=True, logprobs=0)
    llm = LLM(kv_cache_memory=32 << 20, quantization="w4a8", kv_cache_dtype=kv_dtype)
    alone = outputs(llm, [LONG], greedy)[0]
    assert len(llm.tokenizer.apply_chat_template([{"role": "user", "content": LONG}], return_dict=False)) > 100
    assert outputs(llm, [LONG], greedy)[0] == alone  # its prompt's blocks now come from the prefix cache
    batched = outputs(llm, [OTHERS[0], LONG, *OTHERS[1:]], greedy)
    assert batched[1] == alone
    sampled = outputs(llm, [LONG], seeded)[0]
    assert outputs(llm, [LONG, *OTHERS], seeded)[0] == sampled
    llm.engine.shutdown()
    # the prompt in chunks of 32 tokens, each attending to the chunks before it through the cache
    chunked = LLM(kv_cache_memory=32 << 20, quantization="w4a8", kv_cache_dtype=kv_dtype, max_num_batched_tokens=32,
                  enable_prefix_caching=False)
    assert outputs(chunked, [LONG], greedy)[0] == alone
    assert outputs(chunked, [LONG], seeded)[0] == sampled
    assert batched == outputs(chunked, [OTHERS[0], LONG, *OTHERS[1:]], greedy)
    chunked.engine.shutdown()
