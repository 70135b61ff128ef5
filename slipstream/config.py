"""Engine configuration: one dataclass, filled from the command line or `LLM(...)` keywords."""

from __future__ import annotations

from dataclasses import dataclass

# --quantization methods (FastDeploy's names). w4a8: a GGUF's 4-bit (and 8-bit) weight blocks times
# activations rounded to int8 in blocks of 32, as llama.cpp computes: faster, no longer exact. wint8 / wint4:
# weight-only, applied at load (each linear layer's weights rounded to Q8_0 / Q4_1 blocks of 32, activations
# stay float32): a quarter / an eighth of float32's weight memory, served by the GGUF block kernels.
QUANTIZATION_METHODS = ("w4a8", "wint8", "wint4")
QUANTIZATION_ALIASES = {"weight_only_int8": "wint8", "weight_only_int4": "wint4"}  # FastDeploy's long names
# --kv-cache-dtype: auto is the model's dtype, except float16 under w4a8 (llama.cpp's default) and with half-precision
# weights on a CPU (the kernels' cache types are float32, float16 and int8). int8: each token's keys and values of
# each KV head rounded to int8 with a scale of their own (model/kv_cache.py): about half float16's bytes, not exact.
KV_CACHE_DTYPES = ("auto", "bfloat16", "float16", "float32", "int8")


@dataclass
class EngineConfig:
    model: str | None = None  # None: the embedded default model
    tokenizer: str | None = None
    dtype: str = "auto"  # auto | bfloat16 | float32 | float16
    device: str = "auto"  # auto | cpu | cuda
    max_model_len: int | None = None  # None: the model's trained context
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes; None: a fraction of free memory
    kv_cache_fraction: float = 0.25
    kv_cache_dtype: str = "auto"  # one of KV_CACHE_DTYPES
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    tensor_parallel_size: int = 1
    seed: int = 0
    chat_template: str | None = None
    max_logprobs: int = 20
    quantization: str | None = None
    trust_remote_code: bool = False
    enable_recorder: bool = True  # the dashboard's record of steps and requests (engine/recorder.py)
    recorder_keeps_prompts: bool = False  # its request traces hold the prompt's token ids
    cpu_threads: int | None = None  # compute threads on this node (split among its ranks); None: see worker.py
    # Multi-node tensor parallelism: node 0 runs the server and rank 0, other nodes run workers only.
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None  # None: a free port (single node only)

    def __post_init__(self) -> None:
        self.quantization = QUANTIZATION_ALIASES.get(self.quantization, self.quantization)
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            methods = ", ".join(QUANTIZATION_METHODS)
            raise ValueError(f"unknown quantization {self.quantization!r}: use one of {methods}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"unknown kv_cache_dtype {self.kv_cache_dtype!r}: use one of {', '.join(KV_CACHE_DTYPES)}")
