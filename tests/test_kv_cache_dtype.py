"""`--kv-cache-dtype float16` halves the bytes decode attention reads, `int8` nearly halves them again; keys and
values are rounded on the way in (int8: a scale per token and head) and computed in the model's dtype on the way
out, by the compiled kernels (on a CPU that has them) and by the PyTorch fallback (here heads of 12, which the kernels
do not take, and for int8 heads of 16: its kernel takes multiples of 32)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import save_tiny_model

from slipstream import LLM, SamplingParams
from slipstream.kernels import kernels


@pytest.mark.parametrize(
    ("dtype", "head_dim", "kv_dtype"),
    [("float32", None, "float16"), ("float32", 12, "float16"), ("bfloat16", None, "float16"),
     ("float32", 32, "int8"), ("float32", None, "int8"), ("bfloat16", 32, "int8")],
)
def test_a_rounded_kv_cache_decodes_as_a_float32_cache_does(tmp_path, dtype, head_dim, kv_dtype):
    model = save_tiny_model("llama", tmp_path / "tiny", head_dim=head_dim)
    prompts = [[1, 5, 9, 200 + i] * 6 for i in range(3)]  # 24 tokens: decode reads several blocks
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)
    runs = {}
    for cache_dtype in ("float32", kv_dtype):
        llm = LLM(str(model), dtype=dtype, kv_cache_memory=16 << 20, kv_cache_dtype=cache_dtype)
        assert llm.engine.runner.kv_cache.dtype == getattr(torch, cache_dtype)
        runs[cache_dtype] = [r.outputs[0] for r in llm.generate(prompts, params)]
        llm.engine.shutdown()
    for same, half in zip(runs["float32"], runs[kv_dtype], strict=True):
        # A random tiny model has near-ties that the caches' different rounding may flip. Up to the
        # first differing token both runs saw the same context, so their logprobs agree, the flipped
        # position included (its two top tokens were nearly tied); a cache read wrong is far off.
        pairs = list(zip(same.token_ids, half.token_ids, strict=True))
        n = next((i for i, (a, b) in enumerate(pairs) if a != b), len(pairs) - 1)
        shared = zip(same.logprobs[: n + 1], half.logprobs[: n + 1], strict=True)
        error = max(abs(a.logprob - b.logprob) for a, b in shared)
        bound = {"float16": 0.05, "int8": 0.15}[kv_dtype]  # (int8 here: 0.03-0.075)
        assert error < bound, f"max logprob difference {error:.4f} over the first {n + 1} tokens"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_auto_is_the_model_dtype_or_float16_for_half_precision_weights(tmp_path, dtype):
    llm = LLM(str(save_tiny_model("llama", tmp_path / "tiny")), dtype=dtype, kv_cache_memory=16 << 20)
    # (--dtype bfloat16 with the kernels: half-precision weights, float32 activations and a float16 cache)
    half_weights = dtype == "bfloat16" and llm.engine.runner.dtype == torch.float32
    assert llm.engine.runner.kv_cache.dtype == (torch.float16 if half_weights else getattr(torch, dtype))


@pytest.mark.skipif(kernels().ops is None, reason="w4a8 needs the compiled CPU kernels")
def test_w4a8_keeps_its_kv_cache_in_float16_unless_told():
    for kv_dtype, want in (("auto", torch.float16), ("float32", torch.float32)):
        llm = LLM(kv_cache_memory=16 << 20, quantization="w4a8", kv_cache_dtype=kv_dtype)
        assert llm.engine.runner.kv_cache.dtype == want
        llm.engine.shutdown()


@pytest.mark.skipif(kernels().ops is None, reason="w4a8 needs the compiled CPU kernels")
def test_w4a8_with_an_int8_cache_decodes_near_its_float16_cache_and_the_same_through_the_layer_stack():
    prompts = [[{"role": "user", "content": p}] for p in ("What is the capital of France?", "Who wrote Hamlet?")]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=0)
    runs = {}
    for kv_dtype in ("float16", "int8"):
        llm = LLM(kv_cache_memory=16 << 20, quantization="w4a8", kv_cache_dtype=kv_dtype)
        runs[kv_dtype] = [r.outputs[0] for r in llm.chat(prompts, params)]
    model = llm.engine.runner.model  # (the int8 one)
    assert model.layer_stack(1) is not None  # its kernels take the int8 cache
    saved, model._layer_stack = model._layer_stack, False  # the Python layers, kernel by kernel
    try:
        layered = [r.outputs[0] for r in llm.chat(prompts, params)]
    finally:
        model._layer_stack = saved
        llm.engine.shutdown()
    for a, b in zip(runs["int8"], layered, strict=True):
        assert a.token_ids == b.token_ids and [t.logprob for t in a.logprobs] == [t.logprob for t in b.logprobs]
    # The embedded model, 8 chat prompts x 96 tokens (AMD EPYC Zen 4): against w4a8's float16 cache, the first
    # differing token came after 129 of 768 tokens, logprobs up to it within 0.37.
    for half, rounded in zip(runs["float16"], runs["int8"], strict=True):
        n = next((i for i, (a, b) in enumerate(zip(half.token_ids, rounded.token_ids, strict=True)) if a != b), 31)
        shared = zip(half.logprobs[: n + 1], rounded.logprobs[: n + 1], strict=True)
        error = max(abs(a.logprob - b.logprob) for a, b in shared)
        assert n >= 1 and error < 0.5, f"first difference at token {n}, max logprob difference {error:.3f}"
