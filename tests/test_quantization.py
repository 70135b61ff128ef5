"""`--quantization w4a8` (activations rounded to int8 per 32 values, as llama.cpp computes) has its
own fidelity bound against the exact engine on the default model, which is what test_fidelity.py
holds equal to transformers. Teacher-forced (scoring.py): both engines score the exact engine's greedy
continuations."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from scoring import agreement_and_error, scores

from slipstream import LLM, SamplingParams
from slipstream.kernels import GGUF_KERNEL_TYPES, kernels
from slipstream.kernels.selfcheck import random_gguf_weight
from slipstream.model.layers import byte_form, dequantize_blocks, served_blocks, split_gguf_blocks
from slipstream.model.runner import WEIGHT_ONLY_TYPES

# w4a8 runs only on the int8 block kernel; everything else here (wint, the block forms) runs without kernels too.
needs_kernels = pytest.mark.skipif(kernels().ops is None, reason="w4a8 needs the compiled CPU kernels")

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain gravity to a child.",
             "List three uses of copper.", "How do I reverse a list in Python?", "Tell me a short story about a cat.",
             "What causes rain?", "Give me a recipe for pancakes."]
# Measured on this model (AMD EPYC Zen 4, avx512_vnni kernels): 0.967 agreement, 0.31 max error (0.932 / 0.64 while
# the min and offset terms met the exact x rather than the rounded x's sums). A 4-bit model's top two tokens are
# often close, so some positions flip; a broken kernel scores far below (random ~0, shifted logits ~0.5).
MIN_TOP1_AGREEMENT = 0.9
MAX_LOGPROB_ERROR = 0.75


@needs_kernels
def test_w4a8_stays_within_its_fidelity_bound_of_the_exact_engine():
    exact = LLM(kv_cache_memory=128 << 20)
    greedy = exact.chat([[{"role": "user", "content": q}] for q in QUESTIONS],
                        SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    sequences = [r.prompt_token_ids + r.outputs[0].token_ids for r in greedy]
    start = [len(r.prompt_token_ids) for r in greedy]
    want = scores(exact, sequences, start)
    exact.engine.shutdown()
    got = scores(LLM(kv_cache_memory=128 << 20, quantization="w4a8"), sequences, start)  # (no --dtype needed)
    agreement, error = agreement_and_error(got, want)
    assert agreement >= MIN_TOP1_AGREEMENT, f"top-1 agreement {agreement:.3f}"
    assert error <= MAX_LOGPROB_ERROR, f"max logprob error {error:.3f}"
    assert agreement < 1 or error > 0, "w4a8 gave exactly the exact engine's numbers: was it applied?"


@needs_kernels
def test_w4a8_brings_the_dtype_it_needs(caplog):
    llm = LLM(kv_cache_memory=32 << 20, quantization="w4a8", dtype="bfloat16")
    assert llm.engine.runner.dtype == torch.float32 and "--dtype bfloat16 ignored" in caplog.text
    assert llm.generate(["Hello"], SamplingParams(max_tokens=2))[0].outputs[0].token_ids


@pytest.fixture(scope="module")
def exact_safetensors_scores(safetensors_model: Path) -> tuple[list[list[int]], list[int], Any]:
    """The exact engine's greedy continuations of four questions on the safetensors copy, and its scores of them:
    (sequences, where each continuation starts, scores)."""
    exact = LLM(str(safetensors_model), kv_cache_memory=64 << 20)
    greedy = exact.chat([[{"role": "user", "content": q}] for q in QUESTIONS[:4]],
                        SamplingParams(temperature=0, max_tokens=48, ignore_eos=True))
    sequences = [r.prompt_token_ids + r.outputs[0].token_ids for r in greedy]
    start = [len(r.prompt_token_ids) for r in greedy]
    want = scores(exact, sequences, start)
    exact.engine.shutdown()
    return sequences, start, want


@needs_kernels
def test_w4a8_rounds_a_checkpoint_without_blocks_to_4_bits(safetensors_model: Path, exact_safetensors_scores):
    """w4a8 on a safetensors checkpoint was refused ("needs a GGUF model") although wint4 rounds the same layers to
    the Q4_1 blocks w4a8's kernel takes: now it rounds them so, and multiplies them with int8 activations."""
    sequences, start, want = exact_safetensors_scores
    quantized = LLM(str(safetensors_model), kv_cache_memory=64 << 20, quantization="w4a8")
    linears = quantized.engine.runner.model.linear_layers()
    assert all(lin.weight.numel() == 0 and lin.gguf_parts[0].qtype == WEIGHT_ONLY_TYPES["wint4"]
               and lin.int8_activations for lin in linears)
    agreement, error = agreement_and_error(scores(quantized, sequences, start), want)
    print(f"w4a8 on a safetensors checkpoint: top-1 agreement {agreement:.3f}, max logprob error {error:.3f}")
    assert agreement >= MIN_TOP1_AGREEMENT and error <= MAX_LOGPROB_ERROR, (agreement, error)
    assert agreement < 1 or error > 0, "w4a8 gave exactly the exact engine's numbers: was it applied?"


def test_an_unknown_quantization_is_refused():
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        LLM(quantization="int3")


# Measured on this model (AMD EPYC, avx2 kernels): wint8 0.979 top-1 agreement / 0.197 max logprob error;
# wint4 1.000 / 0.000 (the weights were Q4_1 blocks: rounding them to Q4_1 again finds the same blocks).
WEIGHT_ONLY_BOUNDS = {"wint8": (0.95, 0.5), "wint4": (0.85, 1.5)}


@pytest.mark.parametrize("method", ["wint8", "wint4"])
def test_weight_only_quantization_stays_within_its_bound(safetensors_model: Path, exact_safetensors_scores,
                                                        method: str, caplog):
    caplog.set_level(logging.INFO, logger="slipstream.model.runner")
    sequences, start, want = exact_safetensors_scores
    alias = {"wint8": "weight_only_int8", "wint4": "weight_only_int4"}[method]  # FastDeploy's long name
    quantized = LLM(str(safetensors_model), kv_cache_memory=64 << 20, quantization=alias)
    linears = quantized.engine.runner.model.linear_layers()
    assert all(lin.weight.numel() == 0 and lin.gguf_parts[0].qtype == WEIGHT_ONLY_TYPES[method] for lin in linears)
    assert quantized.engine.numerics == f"float32 {method}"
    got = scores(quantized, sequences, start)  # prompts of 60+ tokens: the dequantized path serves their prefill
    agreement, error = agreement_and_error(got, want)
    min_agreement, max_error = WEIGHT_ONLY_BOUNDS[method]
    print(f"{method}: top-1 agreement {agreement:.3f}, max logprob error {error:.3f}")
    assert agreement >= min_agreement and error <= max_error, (agreement, error)
    # (wint4 may give exactly the exact numbers here: the weights were Q4_1 blocks, and rounding them to Q4_1
    # again finds the same blocks. That it was applied is asserted above, on the layers.)
    assert "weights: F32 x" in caplog.text and f"{GGUF_KERNEL_TYPES[WEIGHT_ONLY_TYPES[method]]} by" in caplog.text


def test_weight_only_quantization_of_a_gguf_says_it_keeps_the_blocks(caplog):
    """wint8 on a GGUF rounded nothing (its layers are blocks already) while the log and /version said
    "float32 wint8": now they say what was served."""
    caplog.set_level(logging.INFO, logger="slipstream.model.runner")
    llm = LLM(kv_cache_memory=16 << 20, quantization="wint8")
    assert llm.engine.numerics == "float32" and "are quantized GGUF blocks already" in caplog.text


@pytest.mark.parametrize("qtype", sorted(GGUF_KERNEL_TYPES))
def test_dequantized_blocks_are_the_gguf_packages_values(qtype: int):
    """What serves a weight-only layer where no block kernel does (prefill beyond 32 rows, a CPU without them)."""
    blocks, dense = random_gguf_weight(qtype, 24, 512, seed=qtype)
    assert torch.equal(dequantize_blocks(split_gguf_blocks(blocks, qtype), qtype), dense)


@pytest.mark.parametrize("qtype", sorted(GGUF_KERNEL_TYPES))
def test_the_byte_form_of_every_type_has_the_same_values(qtype: int):
    """dequantize_blocks reads every type through the byte-per-weight form: every type converts to it without
    changing a value."""
    blocks, dense = random_gguf_weight(qtype, 8, 512, seed=qtype)
    q, d, m = byte_form(split_gguf_blocks(blocks, qtype), qtype)
    assert torch.equal(dequantize_blocks((q, d, m), 7 if m.numel() else 6), dense)  # Q5_1's / Q5_0's form


@pytest.mark.parametrize("qtype", sorted(GGUF_KERNEL_TYPES))
def test_blocks_keep_their_values_in_the_type_they_are_served_as(qtype: int):
    """served_blocks may rewrite a file's blocks as another type the exact kernel multiplies faster here (Q5_0's as
    Q8_0 on AVX2): the weights stay the gguf package's values, and a type it keeps keeps its bytes."""
    blocks, dense = random_gguf_weight(qtype, 8, 512, seed=qtype)
    rows, served = served_blocks(blocks, qtype, int8_activations=False)
    assert served == kernels().exact_block_type(qtype)
    assert torch.equal(dequantize_blocks(split_gguf_blocks(rows, served), served), dense)
    assert served != qtype or rows is blocks
    rows, served = served_blocks(blocks, qtype, int8_activations=True)
    assert rows is blocks and served == qtype  # (w4a8 keeps its own layouts)
