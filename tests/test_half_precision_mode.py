"""`--dtype bfloat16` / `float16` on a CPU with the compiled kernels: the checkpoint's weights are rounded to that type
at load and kept in it (BF16 / F16 rows, half float32's bytes), activations stay float32 through the kernels and the
KV cache is float16; on a CPU whose bf16 dot products outrun float32's (AMX; AVX512-BF16 where the probe says so) a
prompt's rows beyond the kernels' go through oneDNN's bf16 GEMM, activations rounded to bf16 too (with AMX, a batch's
through the BF16 tiles). This rounds what a bf16 model rounds in its weights, and not all of what it rounds in its
activations, so it has its own fidelity bound against transformers computing in bfloat16 on the same checkpoint,
teacher-forced over transformers' own greedy continuations (scoring.py). Without the kernels (another CPU, CUDA), it
is the plain PyTorch model in that dtype, held to the same bound."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from scoring import agreement_and_error, greedy_sequences, scores

from slipstream import LLM
from slipstream.kernels import HALF_TYPES, dispatch, kernels
from slipstream.kernels.dispatch import native_bf16_gemm, packed_bf16_linear
from slipstream.model.loader import load_tokenizer

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain gravity to a child.",
             "List three uses of copper."]
MAX_TOKENS = 48
# Measured on the embedded model (AMD EPYC, avx2 kernels), against transformers in bfloat16: bfloat16 mode 0.990
# top-1 agreement, 0.148 max logprob error; float16 0.984 / 0.170; float32 exact mode 0.984 / 0.167 (the reference's
# bfloat16 activations are most of the difference); AMD EPYC Zen 4 (avx512_vnni kernels): 0.979 / 0.154, and on the
# four sequences as one, prefilled by the bf16 GEMM (AVX512-BF16): 0.988 / 0.273. A kernel reading the rows wrong
# scores near 0.
BOUNDS = {"bfloat16": (0.95, 0.5), "float16": (0.95, 0.5)}


@pytest.fixture(scope="module")
def bf16_reference(safetensors_model: Path):
    """transformers in bfloat16 on the checkpoint: its greedy continuations of the questions, and (top-1 token,
    logprob of the sequence's token) at each generated position."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(safetensors_model, dtype=torch.bfloat16).eval()
    tokenizer = load_tokenizer(safetensors_model)
    sequences, start, want = [], [], []
    with torch.inference_mode():
        for q in QUESTIONS:
            text = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                 tokenize=False)
            ids = tokenizer.encode(text, add_special_tokens=False)
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False)
            sequence = out[0].tolist()
            logprobs = model(torch.tensor([sequence])).logits[0].float().log_softmax(-1)
            # Position p's logits score token p + 1: the prompt's last position onwards, up to the last token.
            for pos in range(len(ids), len(sequence)):
                row = logprobs[pos - 1]
                want.append((int(row.argmax()), float(row[sequence[pos]])))
            sequences.append(sequence)
            start.append(len(ids))
        # The four as one sequence (~320 tokens: one prefill beyond the half kernel's rows), scored from the second
        # sequence's start on.
        joined = [t for sequence in sequences for t in sequence]
        logprobs = model(torch.tensor([joined])).logits[0].float().log_softmax(-1)
        joined_want = [(int(logprobs[pos - 1].argmax()), float(logprobs[pos - 1][joined[pos]]))
                       for pos in range(len(sequences[0]), len(joined))]
    return sequences, start, want, (joined, len(sequences[0]), joined_want)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_mode_stays_within_its_bound_of_transformers_bf16(safetensors_model, bf16_reference, dtype,
                                                                         caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="slipstream")
    bf16_gemm_calls = []
    monkeypatch.setattr(dispatch, "packed_bf16_linear",
                        lambda *args: bf16_gemm_calls.append(1) or packed_bf16_linear(*args))
    sequences, start, want, (joined, joined_start, joined_want) = bf16_reference
    llm = LLM(str(safetensors_model), dtype=dtype, kv_cache_memory=64 << 20)
    runner = llm.engine.runner
    if kernels().ops is not None:
        assert runner.dtype == torch.float32 and runner.kv_cache.dtype == torch.float16
        assert f"{dtype} weights, float32 activations" in caplog.text
        for lin in runner.model.linear_layers():
            assert lin.weight.numel() == 0, "the rounded weights are kept as half rows only"
            assert lin.gguf_parts[0].qtype in HALF_TYPES
    min_agreement, max_error = BOUNDS[dtype]
    for name, (got, expected) in {
        "sequences": (scores(llm, sequences, start), want),  # (~80-row prefills: the block kernel's beyond 32 rows)
        "joined": (scores(llm, [joined], [joined_start]), joined_want),
    }.items():
        agreement, error = agreement_and_error(got, expected)
        print(f"{dtype} {name}: top-1 agreement {agreement:.3f}, max logprob error {error:.3f} vs transformers bf16")
        assert agreement >= min_agreement and error <= max_error, (name, agreement, error)
    # the bf16 GEMM served the joined prefill exactly where the CPU has it
    assert bool(bf16_gemm_calls) == (kernels().ops is not None and dtype == "bfloat16" and native_bf16_gemm())


def test_bfloat16_mode_on_amx_tiles_stays_within_its_bound(safetensors_model, bf16_reference, monkeypatch):
    """Where the build multiplies BF16 rows on AMX tiles, the rounded mode takes them from 9 to 64 rows
    (dispatch.ROUNDED_TILES_MAX_ROWS: batches); here for every prefill too, so that the bound above holds them."""
    if 30 not in kernels().tile_types:
        pytest.skip("this build has no BF16 tiles (AMX)")
    monkeypatch.setattr(dispatch, "ROUNDED_TILES_MAX_ROWS", 1 << 20)
    sequences, start, want, _ = bf16_reference
    llm = LLM(str(safetensors_model), dtype="bfloat16", kv_cache_memory=64 << 20)
    assert kernels().gguf_matmul(llm.engine.runner.model.lm_head, 80) is kernels().ops.gguf_linear_rounded
    agreement, error = agreement_and_error(scores(llm, sequences, start), want)
    print(f"bfloat16 on tiles: top-1 agreement {agreement:.3f}, max logprob error {error:.3f} vs transformers bf16")
    min_agreement, max_error = BOUNDS["bfloat16"]
    assert agreement >= min_agreement and error <= max_error, (agreement, error)


def test_a_gguf_model_in_bfloat16_mode_stays_within_its_bound_of_exact_mode():
    """--dtype bfloat16 on a GGUF model (the embedded one): its blocks stay the file's weights; where the build has
    AMX tiles its matmuls round x to bf16 (one tile product a block where exact mode has three), held to the mode's
    bound against exact mode, teacher-forced over exact mode's greedy continuations."""
    exact = LLM(None, kv_cache_memory=64 << 20)
    tokenizer = exact.tokenizer
    prompts = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                              add_generation_prompt=True), add_special_tokens=False)
               for q in QUESTIONS]
    sequences, start = greedy_sequences(exact, prompts, MAX_TOKENS)
    want = scores(exact, sequences, start)
    del exact
    llm = LLM(None, dtype="bfloat16", kv_cache_memory=64 << 20)
    head, table = llm.engine.runner.model.lm_head, kernels()
    rounded = table.ops is not None and table.gguf_matmul(head, 80) is table.ops.gguf_linear_rounded
    assert rounded == bool(table.tile_types)  # (without the kernels: plain PyTorch, exact on the blocks' values)
    agreement, error = agreement_and_error(scores(llm, sequences, start), want)
    print(f"GGUF in bfloat16 mode: top-1 agreement {agreement:.3f}, max logprob error {error:.3f} vs exact mode")
    min_agreement, max_error = BOUNDS["bfloat16"]
    assert agreement >= min_agreement and error <= max_error, (agreement, error)
