"""`--kv-cache-dtype float16` halves the bytes decode attention reads; keys and values are rounded to
float16 on the way in and computed in the model's dtype on the way out, by the compiled kernels
(on a CPU that has them) and by the PyTorch fallback (here heads of 12, which the kernels do not take)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import save_tiny_model

from slipstream import LLM, SamplingParams
from slipstream.kernels import kernels


@pytest.mark.parametrize(("dtype", "head_dim"), [("float32", None), ("float32", 12), ("bfloat16", None)])
def test_a_float16_kv_cache_decodes_as_a_float32_cache_does(tmp_path, dtype, head_dim):
    model = save_tiny_model("llama", tmp_path / "tiny", head_dim=head_dim)
    prompts = [[1, 5, 9, 200 + i] * 6 for i in range(3)]  # 24 tokens: decode reads several blocks
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)
    runs = {}
    for kv_dtype in ("float32", "float16"):
        llm = LLM(str(model), dtype=dtype, kv_cache_memory=16 << 20, kv_cache_dtype=kv_dtype)
        assert llm.engine.runner.kv_cache.dtype == getattr(torch, kv_dtype)
        runs[kv_dtype] = [r.outputs[0] for r in llm.generate(prompts, params)]
        llm.engine.shutdown()
    for same, half in zip(runs["float32"], runs["float16"], strict=True):
        # A random tiny model has near-ties that the caches' different rounding may flip. Up to the
        # first differing token both runs saw the same context, so their logprobs agree, the flipped
        # position included (its two top tokens were nearly tied); a cache read wrong is far off.
        pairs = list(zip(same.token_ids, half.token_ids, strict=True))
        n = next((i for i, (a, b) in enumerate(pairs) if a != b), len(pairs) - 1)
        shared = zip(same.logprobs[: n + 1], half.logprobs[: n + 1], strict=True)
        error = max(abs(a.logprob - b.logprob) for a, b in shared)
        assert error < 0.05, f"max logprob difference {error:.4f} over the first {n + 1} tokens"


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
