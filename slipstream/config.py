"""Engine configuration: one dataclass, filled from the command line or `LLM(...)` keywords."""

from __future__ import annotations

from dataclasses import dataclass, fields

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
# vLLM's 8-bit caches: no fp8 kernels here; int8 with its scales takes the same bytes a row, and rounds less (7 bits
# of mantissa against e4m3's 3 / e5m2's 2). The load log names the cache's type.
KV_CACHE_DTYPE_ALIASES = {"fp8": "int8", "fp8_e4m3": "int8", "fp8_e5m2": "int8"}


@dataclass(frozen=True)
class SpeculativeConfig:
    """--speculative-config (vLLM's JSON keys): n-gram speculation ("prompt lookup"). A request's next tokens are
    guessed from its own context (the tokens that followed the last earlier occurrence of its last n tokens) and
    checked in the same forward pass as its next token: a decode step at small batches costs about the same for a few
    rows as for one (its weights are read from memory once), so each guess that stands is a step saved. A greedy
    request's output is the one without speculation (a guess stands only where it is the token the model picks); a
    sampled one's guess stands with its probability, so its draws keep their distribution. Seeded requests do not
    guess (their draws stay independent of what else runs)."""

    method: str = "ngram"
    # Tokens guessed per step, at most, and the n-grams looked up. On the benchmark's prompts (w4a8, 128 greedy tokens
    # after ~100 of random words) a guess from a 3-token match held its first token 83 % of the time and all four 54 %,
    # one from a 1-token match its first only 16 %: guessing 3 from matches of 2 or 3 tokens was 1.075x the former
    # default (2 guessed from matches of 1-3 tokens) at batch 1, 6 of 6 rounds, and the same at batch 2 (AMD EPYC Zen 3,
    # AVX2; the former default was 1.14-1.29x plain decoding on Zen 4). 4 guesses would make 5 rows a step, past the
    # block kernels' 4-row pieces (a second pass over the weights).
    num_speculative_tokens: int = 3
    prompt_lookup_max: int = 3  # longest n-gram looked up (tried first)
    prompt_lookup_min: int = 2  # shortest (lowered to prompt_lookup_max where only that is given below it)
    # Guess only while at most this many sequences run: larger batches are bound by arithmetic, not by reading the
    # weights, and checking guesses costs as much as they save there (w4a8 + int8 cache, 12 of the benchmark's
    # prompts B at a time, AMD EPYC Zen 4: 1.39-1.59x plain decoding at B = 1, 1.13-1.18x at 2, 0.98-1.12x at 3,
    # 0.96-0.99x at 4).
    disable_by_batch_size: int = 2
    # Where a sequence's own context holds no match, the outputs of this many recently finished requests are looked
    # up too (0: its own context only, as vLLM's ngram). Replayed over 24 of the benchmark's chat prompts (exact mode,
    # 128 greedy tokens each, one after another): 1.79 tokens a step against 1.35 from their own contexts alone
    # (1.63 where only the last 9 outputs are kept), the chat model's "I'm sorry for any confusion, but as a ..."
    # answers repeating each other's phrases.
    lookup_recent_outputs: int = 32

    def __post_init__(self) -> None:
        if self.method != "ngram":
            raise ValueError(f"speculative_config: method {self.method!r} is not supported: use 'ngram'")
        for name, least in (("num_speculative_tokens", 1), ("prompt_lookup_max", 1), ("prompt_lookup_min", 1),
                            ("disable_by_batch_size", 1), ("lookup_recent_outputs", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                kind = "positive" if least else "non-negative"
                raise ValueError(f"speculative_config: {name} must be a {kind} integer, not {value!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError("speculative_config: prompt_lookup_min must not exceed prompt_lookup_max")

    @classmethod
    def from_dict(cls, values: dict) -> SpeculativeConfig:
        if not isinstance(values, dict):
            raise ValueError("speculative_config must be a JSON object, e.g. {\"method\": \"ngram\"}")
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(values) - known):
            raise ValueError(f"speculative_config: unknown keys {unknown}; known: {sorted(known)}")
        lookup_max = values.get("prompt_lookup_max")
        if "prompt_lookup_min" not in values and isinstance(lookup_max, int) and lookup_max < cls.prompt_lookup_min:
            values = values | {"prompt_lookup_min": lookup_max}
        return cls(**values)


@dataclass
class EngineConfig:
    model: str | None = None  # None: the embedded default model
    tokenizer: str | None = None
    dtype: str = "auto"  # auto | bfloat16 | float32 | float16
    device: str = "auto"  # auto | cpu | cuda
    max_model_len: int | None = None  # None: the model's trained context
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None  # a step's token budget; None: 512 on a CPU, 2048 on CUDA
    # With the CPU's default budget, beside decodes prompts after a step's first share 128 tokens (llm_engine.py's
    # CPU_PROMPTS_BESIDE_DECODES): the server's choice, for first tokens sooner; an offline batch fills whole steps.
    split_prompt_bursts: bool = False
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
    # None: no speculation; "auto" (the server's default): the defaults while one sequence runs, where guessing
    # changes no output (one rank, every matmul on the CPU block kernels: LLMEngine decides), else none.
    speculative_config: SpeculativeConfig | dict | str | None = None

    def __post_init__(self) -> None:
        self.quantization = QUANTIZATION_ALIASES.get(self.quantization, self.quantization)
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            methods = ", ".join(QUANTIZATION_METHODS)
            raise ValueError(f"unknown quantization {self.quantization!r}: use one of {methods}")
        self.kv_cache_dtype = KV_CACHE_DTYPE_ALIASES.get(self.kv_cache_dtype, self.kv_cache_dtype)
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"unknown kv_cache_dtype {self.kv_cache_dtype!r}: use one of {', '.join(KV_CACHE_DTYPES)}")
        if isinstance(self.speculative_config, dict):
            self.speculative_config = SpeculativeConfig.from_dict(self.speculative_config)
        if isinstance(self.speculative_config, str) and self.speculative_config != "auto":
            raise ValueError(f"speculative_config {self.speculative_config!r}: give a JSON object, 'auto' or None")
