"""Every supported architecture matches transformers: tiny random checkpoints of Llama, Qwen2, Qwen3
and ERNIE 4.5 (plus a Paddle-layout copy of the ERNIE one) go through slipstream's loader and
model; prefill logits agree within 1e-4 and greedy generation is token-identical."""

from __future__ import annotations

import pytest
import torch
from tiny_models import save_paddle_copy, save_tiny_model

from slipstream import LLM, SamplingParams
from slipstream.model.context import AttentionContext, PrefillChunk, set_context
from slipstream.model.loader import iter_weights, load_config, load_tokenizer
from slipstream.model.registry import build_model

TOL = 1e-4
MAX_TOKENS = 24
TOP_K = 5

# name -> (transformers architecture, config overrides). Each exercises what sets it apart.
MODELS = {
    "llama": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "qwen2": ("qwen2", {}),  # q/k/v bias, no o_proj bias
    "qwen3": ("qwen3", {"head_dim": 32}),  # q/k RMSNorm; head_dim decoupled from hidden / heads
    # interleaved RoPE, tied embeddings, head_dim decoupled, GQA, biases everywhere, and a
    # non-default RoPE theta that the Paddle config spells differently
    "ernie4_5": ("ernie4_5", {"head_dim": 32, "num_kv_heads": 1, "use_bias": True,
                              "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
}
# Same weights as "ernie4_5" in the Paddle layout: name -> whether q/k/v and gate/up are stored fused.
PADDLE = {"ernie4_5_paddle": True, "ernie4_5_paddle_unfused": False}
CASES = [*MODELS, *PADDLE]

PROMPTS = [
    "Hello",
    "def fibonacci(n):\n    return n",
    "中国的首都是北京。The quick brown fox jumps over the lazy dog, once upon a time in a village by the sea.",
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("tiny")
    dirs = {name: save_tiny_model(arch, root / name, **kw) for name, (arch, kw) in MODELS.items()}
    for name, fused in PADDLE.items():
        dirs[name] = save_paddle_copy(dirs["ernie4_5"], root / name, fused)
    return dirs


def _hf_name(case: str) -> str:
    return "ernie4_5" if case in PADDLE else case


@pytest.fixture(scope="module")
def references(checkpoints) -> dict[str, dict]:
    """transformers' prefill logits and greedy generations for each HF-layout checkpoint."""
    from transformers import AutoModelForCausalLM

    refs = {}
    for name in MODELS:
        directory = checkpoints[name]
        tok = load_tokenizer(directory)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        ids = [tok.encode(p) for p in PROMPTS]
        gens = []
        with torch.inference_mode():
            logits = model(torch.tensor([ids[-1]])).logits[0]
            for p in ids:
                out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                     max_new_tokens=MAX_TOKENS, do_sample=False, output_logits=True,
                                     return_dict_in_generate=True)
                gens.append((out.sequences[0, len(p):].tolist(), torch.cat(out.logits).log_softmax(-1)))
        refs[name] = {"ids": ids, "logits": logits, "generations": gens}
    return refs


def slipstream_prefill_logits(directory, ids: list[int]) -> torch.Tensor:
    """One prefill through slipstream's loader and model, without a KV cache: logits at every position."""
    model = build_model(load_config(directory), torch.float32, torch.device("cpu"), 512)
    model.load_weights(iter_weights(directory))
    n = len(ids)
    set_context(AttentionContext(slot_mapping=torch.arange(n), prefills=[PrefillChunk(0, n, n, None, None)]))
    try:
        with torch.inference_mode():
            return model.logits(model(torch.tensor(ids), torch.arange(n)))
    finally:
        set_context(None)


@pytest.mark.parametrize("case", CASES)
def test_prefill_logits_match_transformers(case, checkpoints, references):
    ref = references[_hf_name(case)]
    ours = slipstream_prefill_logits(checkpoints[case], ref["ids"][-1])
    assert ours.shape == ref["logits"].shape
    assert ref["logits"].std() > 0.5, "logits this flat would hide errors"
    torch.testing.assert_close(ours, ref["logits"], atol=TOL, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_greedy_generation_matches_transformers(case, checkpoints, references):
    ref = references[_hf_name(case)]
    llm = LLM(model=str(checkpoints[case]), kv_cache_memory=16 << 20)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=TOP_K)
    results = llm.generate(ref["ids"], params)
    for result, (tokens, logprobs) in zip(results, ref["generations"], strict=True):
        out = result.outputs[0]
        assert out.token_ids == tokens
        ours = torch.tensor([lp.logprob for lp in out.logprobs])
        torch.testing.assert_close(ours, logprobs.gather(1, torch.tensor(tokens)[:, None])[:, 0], atol=TOL, rtol=0)
        for lp, want in zip(out.logprobs, logprobs, strict=True):
            top = want.topk(TOP_K)
            assert [t for t, _ in lp.top] == top.indices.tolist()
            torch.testing.assert_close(torch.tensor([v for _, v in lp.top]), top.values, atol=TOL, rtol=0)


@pytest.mark.parametrize(("overrides", "want"), [
    ({"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 1}, 64),  # layer 1 slides
    ({"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 2}, 512),  # no layer slides
    ({}, 512),
])
def test_a_sliding_window_caps_the_context_to_what_full_attention_computes_exactly(tmp_path, overrides, want):
    model = save_tiny_model("qwen2", tmp_path / "tiny", **overrides)
    llm = LLM(str(model), kv_cache_memory=16 << 20)
    assert llm.engine.max_model_len == want
    llm.engine.shutdown()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_checkpoint_keeps_its_weights_and_stays_exact(tmp_path, dtype, caplog):
    """A bf16 / fp16 checkpoint's weights are exact in float32: exact mode keeps them as they are (half the bytes)
    where the block kernels run, and still matches transformers computing in float32 on the same weights."""
    import logging

    from transformers import AutoModelForCausalLM

    from slipstream.kernels import HALF_TYPES, kernels

    caplog.set_level(logging.INFO, logger="slipstream.model.runner")
    directory = save_tiny_model("llama", tmp_path / "half", dtype=dtype, intermediate_size=160)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids = [load_tokenizer(directory).encode(p) for p in PROMPTS]  # (the last: 50+ tokens, prefill beyond 32 rows)
    llm = LLM(model=str(directory), kv_cache_memory=16 << 20)
    if kernels().serves_gguf_blocks(llm.engine.runner.device, torch.float32, 1, False):  # (not on CUDA)
        name = {torch.bfloat16: "BF16", torch.float16: "F16"}[dtype]
        for lin in llm.engine.runner.model.linear_layers():
            (_, qtype), = lin.gguf_parts
            assert HALF_TYPES[qtype] == name and lin.weight.numel() == 0, "kept as is, no float32 copy"
        assert f"{name} by gguf_linear" in caplog.text
    results = llm.generate(ids, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=0))
    for p, result in zip(ids, results, strict=True):
        with torch.inference_mode():
            out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 max_new_tokens=MAX_TOKENS, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        tokens = out.sequences[0, len(p):].tolist()
        want = torch.cat(out.logits).log_softmax(-1).gather(1, torch.tensor(tokens)[:, None])[:, 0]
        assert result.outputs[0].token_ids == tokens
        got = torch.tensor([lp.logprob for lp in result.outputs[0].logprobs])
        torch.testing.assert_close(got, want, atol=TOL, rtol=0)
