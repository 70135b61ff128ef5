"""Greedy decoding and logprobs of the default model (float32) match transformers token for token.

The reference is transformers' own `generate(do_sample=False)` on the GGUF, which transformers
dequantizes itself: nothing of slipstream's converter or model code is shared with it. A divergence
passes only at a genuine near-tie (the reference logprobs of both tokens within 1e-3), and nothing
is compared after it, since the two continuations then condition on different text.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from slipstream import LLM, SamplingParams

MAX_TOKENS = 64
TOL = 1e-3
TOP_K = 5
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=TOP_K)

LONG_PROMPT = (
    "The history of computing is a story of abstraction. Early machines were programmed by rewiring "
    "plugboards; then came stored programs, assemblers and compilers, each layer hiding the one below. "
    "In the 1950s FORTRAN let scientists write formulas instead of machine instructions, and COBOL did "
    "the same for business records. The 1970s brought C and Unix, which made operating systems portable "
    "across hardware. Personal computers arrived in the 1980s with graphical interfaces that replaced the "
    "command line for most people. The 1990s connected those computers through the World Wide Web, and the "
    "2000s moved much of the work into data centres that rent computing by the hour. Each step traded some "
    "efficiency for a large gain in the number of people who could build useful things. Today machine "
    "learning adds another layer: instead of writing rules, engineers collect examples and let an "
    "optimiser find the rules. Large language models are the most visible result. They are trained to "
    "predict the next word of text, yet this simple objective produces systems that can summarise, "
    "translate, answer questions and write code. Serving such models efficiently is its own engineering "
    "problem: memory for the attention cache, batching many users together, and scheduling work so that "
    "no request waits too long. In summary, the main lesson of this history is that"
)

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "中国的首都是",
    "请用一句话介绍一下长城。",
    "import numpy as np\n\n# Compute the mean of each row of a matrix\n",
    "Q: What is 17 + 25?\nA:",
    "List three primary colors:\n1.",
    "Translate to French: I love programming 🐍.",
    "SELECT name, COUNT(*) FROM orders",
    LONG_PROMPT,
]
CHAT = [{"role": "user", "content": "Write a haiku about the ocean."}]


@dataclass
class Reference:
    tokens: list[int]
    logprobs: torch.Tensor  # [len(tokens), vocab]: log-softmax of transformers' logits at each step


@pytest.fixture(scope="module")
def prompt_ids(llm_fp32) -> list[list[int]]:
    tok = llm_fp32.tokenizer
    ids = [tok.encode(p) for p in PROMPTS]
    ids.append(tok.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True, return_dict=False))
    assert max(map(len, ids)) > 200, "the long prompt must span many KV blocks"
    return ids


@pytest.fixture(scope="module")
def reference(prompt_ids, llm_fp32) -> list[Reference]:
    """transformers' greedy continuations, one prompt at a time (no padding: exact)."""
    from transformers import AutoModelForCausalLM, GgufConfig

    from slipstream.model.locate import default_model_path

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    ).eval()
    eos = sorted(llm_fp32.engine.eos_token_ids)
    refs = []
    with torch.inference_mode():
        for ids in prompt_ids:
            out = model.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=eos, pad_token_id=eos[0],
                output_logits=True, return_dict_in_generate=True,
            )
            tokens = out.sequences[0, len(ids):].tolist()
            refs.append(Reference(tokens, torch.cat(out.logits).float().log_softmax(-1)))
    return refs


def agreed_prefix(ours: list[int], ref: Reference) -> int:
    """Number of leading tokens both sides share; fails unless they agree up to a genuine near-tie."""
    for i, (a, b) in enumerate(zip(ours, ref.tokens, strict=False)):
        if a != b:
            gap = abs(ref.logprobs[i, a] - ref.logprobs[i, b]).item()
            assert gap < TOL, f"token {i}: ours {a}, transformers {b}, logprob gap {gap:.2e} is no near-tie"
            return i
    assert len(ours) == len(ref.tokens), f"lengths differ: ours {len(ours)}, transformers {len(ref.tokens)}"
    return len(ours)


def check(results, refs: list[Reference]) -> None:
    assert len(results) == len(refs)
    for result, ref in zip(results, refs, strict=True):
        agreed_prefix(result.outputs[0].token_ids, ref)


@pytest.fixture(scope="module")
def llm_cold() -> LLM:
    """No prefix caching: every prompt is prefilled from scratch."""
    return LLM(kv_cache_memory=256 << 20, enable_prefix_caching=False)


@pytest.fixture(scope="module")
def batch_results(llm_cold, prompt_ids, reference):
    return llm_cold.generate(prompt_ids, GREEDY)


def test_each_prompt_alone_matches_transformers(llm_cold, prompt_ids, reference):
    check([llm_cold.generate(ids, GREEDY)[0] for ids in prompt_ids], reference)


def test_all_prompts_in_one_batch_match_transformers(batch_results, reference):
    check(batch_results, reference)


def test_small_prefill_chunks_match_transformers(prompt_ids, reference):
    # A 32-token step budget splits every long prompt over many steps, mixed with other sequences' decodes.
    llm = LLM(kv_cache_memory=256 << 20, enable_prefix_caching=False, max_num_batched_tokens=32)
    check(llm.generate(prompt_ids, GREEDY), reference)


def test_prefix_cache_hit_matches_transformers(llm_fp32, prompt_ids, reference):
    long = [i for i, ids in enumerate(prompt_ids) if len(ids) > 2 * llm_fp32.engine.config.block_size]
    check(llm_fp32.generate([prompt_ids[i] for i in long], GREEDY), [reference[i] for i in long])
    for i in long:  # each prompt's full blocks are cached now
        again = llm_fp32.generate(prompt_ids[i], GREEDY)
        assert again[0].num_cached_tokens >= len(prompt_ids[i]) // 2
        check(again, [reference[i]])


def test_logprobs_match_transformers(batch_results, reference):
    compared = 0
    for result, ref in zip(batch_results, reference, strict=True):
        out = result.outputs[0]
        assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids)
        for i, lp in enumerate(out.logprobs[: agreed_prefix(out.token_ids, ref)]):
            want = ref.logprobs[i]
            assert lp.token_id == out.token_ids[i]
            assert abs(lp.logprob - want[lp.token_id].item()) < TOL, f"token {i}: {lp.logprob} vs {want[lp.token_id]}"
            assert len({tid for tid, _ in lp.top}) == TOP_K
            ref_top = want.topk(TOP_K)
            for rank, ((tid, value), ref_value) in enumerate(zip(lp.top, ref_top.values.tolist(), strict=True)):
                assert abs(value - want[tid].item()) < TOL, f"token {i}, rank {rank}: logprob of {tid}"
                # The same token at each rank, unless two candidates are a near-tie and swap places.
                assert abs(want[tid].item() - ref_value) < TOL, f"token {i}, rank {rank}: {tid} is not in the top"
            compared += 1
    assert compared > len(reference) * MAX_TOKENS // 2


def test_the_compiled_layer_stack_computes_what_the_python_layers_do(llm_cold, prompt_ids):
    """Steps run all layers in one compiled call; the Python layers call the same kernels one by one."""
    model = llm_cold.engine.runner.model
    if model.layer_stack(1) is None:
        pytest.skip("no compiled kernels on this machine")
    params = SamplingParams(temperature=0, max_tokens=24, logprobs=TOP_K)
    stacked = llm_cold.generate(prompt_ids[:6], params)
    saved, model._layer_stack = model._layer_stack, False  # False: "cannot build one", the Python path
    try:
        layered = llm_cold.generate(prompt_ids[:6], params)
    finally:
        model._layer_stack = saved
    for a, b in zip(stacked, layered, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert [t.logprob for t in a.outputs[0].logprobs] == [t.logprob for t in b.outputs[0].logprobs]


def test_a_call_the_layer_stack_refuses_is_raised_and_the_next_step_runs(llm_cold, prompt_ids):
    """A call the stack refuses (here one cache slot short of its rows) raises a clear error, not a crash or a
    hang, and the next steps run as before."""
    model = llm_cold.engine.runner.model
    stack = model.layer_stack(1)
    if stack is None:
        pytest.skip("no compiled kernels on this machine")
    params = SamplingParams(temperature=0, max_tokens=8)
    before = llm_cold.generate(prompt_ids[:1], params)[0].outputs[0].token_ids
    one, no_slots = torch.ones(1, dtype=torch.long), torch.empty(0, dtype=torch.long)
    with pytest.raises(RuntimeError, match="a cache slot per row"):
        stack.forward(torch.randn(1, model.args.hidden_size), one, one.view(1, 1), one, no_slots)
    assert llm_cold.generate(prompt_ids[:1], params)[0].outputs[0].token_ids == before
