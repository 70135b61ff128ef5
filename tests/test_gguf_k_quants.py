"""A GGUF with K-quant tensors, written by the test: the embedded model's file with every layer's ffn_down
(1536 inputs: whole 256-weight super-blocks) replaced by random valid Q4_K, Q5_K or Q6_K blocks in turn, its
ffn_gate and ffn_up requantized to Q5_0 or Q5_1 (what llama-quantize falls back to for K-quant tensors whose 576
columns are not whole super-blocks), the other tensors and all metadata copied. Loaded by slipstream (mixed
per-tensor types kept, all served by the block kernels) and by transformers (GgufConfig(dequantize=True)):
greedy tokens identical and logprobs within 1e-3, as exact mode promises."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from slipstream import LLM, SamplingParams
from slipstream.kernels import GGUF_KERNEL_TYPES, kernels
from slipstream.kernels.selfcheck import random_gguf_weight
from slipstream.model.loader import default_model_path

K_TYPES = [t for t, name in GGUF_KERNEL_TYPES.items() if name.endswith("_K")]
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
NEW_TOKENS = 12


def write_k_quant_copy(src: Path, dst: Path) -> dict[str, str]:
    """`src` rewritten to `dst` with each ffn_down as K-quant blocks; returns tensor name -> type name."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, dequantize, quantize

    reader = GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(dst, arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    types: dict[str, str] = {}
    for t in reader.tensors:
        qtype = t.tensor_type
        data = np.array(t.data)
        if t.name.endswith("ffn_down.weight"):
            layer = int(t.name.split(".")[1])  # blk.N.ffn_down.weight
            qtype = GGMLQuantizationType(K_TYPES[layer % len(K_TYPES)])
            rows, cols = int(t.shape[1]), int(t.shape[0])  # GGUF shapes are innermost first
            blocks, _ = random_gguf_weight(int(qtype), rows, cols, seed=layer)
            data = blocks.numpy()
        elif t.name.endswith("attn_v.weight"):  # q/k stay Q4_1: the fused qkv mixes types, as Q4_K_M files do
            qtype = GGMLQuantizationType.Q8_0
            data = quantize(dequantize(t.data, t.tensor_type), qtype)
        elif t.name.endswith(("ffn_gate.weight", "ffn_up.weight")):  # (both parts of a fused layer: one type)
            layer = int(t.name.split(".")[1])
            qtype = GGMLQuantizationType.Q5_0 if layer % 2 == 0 else GGMLQuantizationType.Q5_1
            data = quantize(dequantize(t.data, t.tensor_type), qtype)
        types[t.name] = qtype.name
        writer.add_tensor(t.name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types


@pytest.fixture(scope="module")
def k_quant_gguf(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    path = tmp_path_factory.mktemp("k-quants") / "smollm2-k-quants.gguf"
    return path, write_k_quant_copy(default_model_path(), path)


def transformers_reference(path: Path, prompts: list[list[int]]) -> list[tuple[list[int], list[float]]]:
    """transformers' greedy continuations of each prompt (EOS held off, as ignore_eos does) and the logprob of
    each chosen token under its raw logits."""
    from transformers import AutoModelForCausalLM, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True)).eval()
    results = []
    with torch.inference_mode():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
            tokens = out.sequences[0, len(ids):].tolist()
            logprobs = torch.cat(out.logits).float().log_softmax(-1)
            results.append((tokens, [logprobs[i, t].item() for i, t in enumerate(tokens)]))
    return results


@pytest.mark.skipif(kernels().ops is None, reason="the K-quant block kernels need the compiled CPU kernels")
def test_a_k_quant_gguf_matches_transformers(k_quant_gguf, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="slipstream.model.runner")
    path, types = k_quant_gguf
    llm = LLM(str(path), kv_cache_memory=64 << 20)
    downs = [layer.mlp.down_proj for layer in llm.engine.runner.model.layers]
    assert [GGUF_KERNEL_TYPES[d.gguf_type] for d in downs] == [
        GGUF_KERNEL_TYPES[K_TYPES[i % len(K_TYPES)]] for i in range(len(downs))]  # each layer keeps its type
    ups = [layer.mlp.gate_up_proj for layer in llm.engine.runner.model.layers]
    assert [GGUF_KERNEL_TYPES[u.gguf_type] for u in ups] == ["Q5_0", "Q5_1"] * (len(ups) // 2)
    assert {layer.self_attn.qkv_proj.gguf_label for layer in llm.engine.runner.model.layers} == {"Q4_1+Q4_1+Q8_0"}
    for name in ("Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1"):
        assert f"{name} x {sum(v == name for v in types.values())}" in caplog.text  # the load report
        assert f"{name} by gguf_linear" in caplog.text
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS]
    want = transformers_reference(path, prompts)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    for result, (tokens, logprobs) in zip(llm.generate(prompts, params), want, strict=True):
        out = result.outputs[0]
        assert out.token_ids == tokens
        got = [lp.logprob for lp in out.logprobs]
        assert max(abs(g - w) for g, w in zip(got, logprobs, strict=True)) < 1e-3
    assert llm.engine.runner.model._decode_stack, "every linear layer has blocks: decode steps run in one call"
