"""The engine core: requests in, token outputs out. `step()` is schedule -> run -> postprocess."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slipstream.config import EngineConfig, SpeculativeConfig
from slipstream.engine.block_manager import BlockManager
from slipstream.engine.ngram_proposer import NgramProposer
from slipstream.engine.output_processor import OutputProcessor, RequestOutput
from slipstream.engine.recorder import EngineRecorder
from slipstream.engine.scheduler import Scheduler
from slipstream.engine.sequence import Sequence
from slipstream.engine.structured_output import StructuredOutputManager
from slipstream.kernels import kernels
from slipstream.model.layers import LinearBase, ParallelLMHead
from slipstream.model.llama import ModelArgs, attention_window, check_tp_compatible
from slipstream.model.loader import hf_directory, load_config, load_tokenizer
from slipstream.model.parallel import init_distributed
from slipstream.model.registry import check_supported
from slipstream.model.runner import ModelRunner, resolve_device, trained_context
from slipstream.model.sampler import Sampler
from slipstream.model.worker import WorkerGroup, free_port, thread_binding_warning, threads_per_rank
from slipstream.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class ContextLengthError(ValueError):
    """The prompt does not fit the context; carries both numbers for the API error."""

    def __init__(self, num_tokens: int, max_model_len: int) -> None:
        super().__init__(
            f"This model's maximum context length is {max_model_len} tokens, but the prompt has "
            f"{num_tokens} tokens; shorten the prompt"
        )
        self.num_tokens = num_tokens
        self.max_model_len = max_model_len


class TokenIdError(ValueError):
    """A token id outside the vocabulary; `field` names the request field (prompt, stop_token_ids, ...)."""

    def __init__(self, field: str, vocab_size: int) -> None:
        super().__init__(f"{field}: token ids must be in [0, {vocab_size})")
        self.field = field
        self.vocab_size = vocab_size


def _eos_token_ids(model_dir: Path, hf_config, tokenizer) -> set[int]:
    ids: set[int] = set()
    gen = model_dir / "generation_config.json"
    sources = [getattr(hf_config, "eos_token_id", None), tokenizer.eos_token_id]
    if gen.is_file():
        sources.append(json.loads(gen.read_text()).get("eos_token_id"))
    for s in sources:
        if isinstance(s, int):
            ids.add(s)
        elif isinstance(s, list):
            ids.update(s)
    return ids


@dataclass
class ReasoningSpan:
    """How the engine recognises a thinking span in a request's output and, once the thinking
    budget (SamplingParams.reasoning_max_tokens) is spent, ends it by forcing `end_token_ids`."""

    end_token_ids: list[int]
    start_token_ids: list[int] = field(default_factory=list)
    opened_by_prompt: bool = False


# The token budget of a step when none is given: smaller on a CPU, where a step of many prompts that arrived together
# (a burst, a closed loop's clients in step) holds every one of them to the end of the whole step: in 512-token steps
# those admitted first decode while the others prefill. Exact mode, 100-token prompts, 128-token answers, closed loop
# (AMX Xeon, 2 cores), budget 2048 / 1024 / 512 / 256: TTFT p50 at 16 clients 753 / 532 / 386 / 305 ms, at 32 1302 /
# 738 / 470 / 434 ms; output tok/s 408 / 427 / 424 / 427 and 506 / 515 / 511 / 474 (at 256 the decodes crowd out the
# prompts). Two more runs of 2048 / 512 alternated: TTFT 853, 769 / 479, 673 ms at 16 clients, 1282, 1260 / 672, 796
# at 32; tok/s 444, 419 / 428, 408 and 505, 506 / 522, 492.
CPU_STEP_TOKENS = 512
GPU_STEP_TOKENS = 2048
# Beside decodes, a CPU step takes one prompt's chunk (up to half a GPU step's work: a long prompt beside a stream) and
# other prompts' only up to this many tokens in all: a burst's prompts then prefill about one to a step, each step
# short, where 512-token steps held four or five prompts to the end of one long step (and their clients, in step, came
# back together). Exact mode, the closed loop above (AMX Xeon, 2 cores), two runs each alternated, before / after: TTFT
# p50 at 16 clients 478, 474 / 227, 299 ms, at 32 596, 572 / 352, 253 ms; output tok/s 479, 490 / 466, 453 and 554,
# 559 / 558, 544. (A budget of 128 tokens for every step did as well for a burst, but cut a long prompt into chunks
# as small.) The server's choice only (EngineConfig.split_prompt_bursts): an offline batch of 64 prompts ramps up its
# decode batch that much slower, 13.5-13.9 -> 14.6-14.7 s (`slipstream bench throughput --num-prompts 64
# --max-num-seqs 64`); holding the cap to a backlog that fits one step kept that, but lost most of the TTFT gain
# (the closed loop's clients come back in groups of more than a step's tokens).
CPU_PROMPTS_BESIDE_DECODES = 128

# Prompt rows' attention does this share of the arithmetic a second per core that their matmuls do (CPU kernels, AMD
# EPYC Zen 3, the embedded model: a 512-token chunk costs 1.7 ms a token at the start of a prompt, 1.25 ms more a
# token for every 1000 tokens before it, against 3900 by the count of multiply-adds; Intel Xeon with AMX, once the
# kernel took a chunk's rows in tiles: 0.72 ms a token at the start, 0.54 ms more a 1000 tokens before, 0.34).
ATTENTION_EFFICIENCY = 0.35


def attention_context_cost(hf_config) -> float:
    """How many earlier tokens a prompt token attends to at the cost of its own matmuls (the scheduler's measure of
    a chunk's work): multiply-adds of a token's linear layers over those of attention to one earlier token."""
    hidden, layers = hf_config.hidden_size, hf_config.num_hidden_layers
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hidden // heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    per_layer = hidden * (2 * heads + 2 * kv_heads) * head_dim + 3 * hidden * hf_config.intermediate_size
    matmuls = layers * per_layer + hidden * hf_config.vocab_size
    return ATTENTION_EFFICIENCY * matmuls / (layers * heads * head_dim * 2)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        t0 = time.monotonic()
        self.config = config
        self.model_dir = hf_directory(config.model)
        self.hf_config = load_config(self.model_dir)
        check_supported(self.hf_config)
        self.tokenizer = load_tokenizer(self.model_dir, config.tokenizer)
        if config.chat_template:
            path = Path(config.chat_template)
            self.tokenizer.chat_template = path.read_text() if path.is_file() else config.chat_template
        trained = trained_context(self.hf_config)
        self.max_model_len = config.max_model_len or trained
        if self.max_model_len > trained:
            logger.warning("--max-model-len %d exceeds the model's trained context %d; using %d",
                           self.max_model_len, trained, trained)
            self.max_model_len = trained
        window = attention_window(self.hf_config)
        if window is not None and self.max_model_len > window:
            logger.warning("the model attends within a sliding window of %d tokens, which slipstream does not "
                           "implement (full attention is the same up to the window); max_model_len %d -> %d",
                           window, self.max_model_len, window)
            self.max_model_len = window
        self.eos_token_ids = _eos_token_ids(self.model_dir, self.hf_config, self.tokenizer)
        self.structured_output = StructuredOutputManager(self.tokenizer, self.hf_config.vocab_size,
                                                         self.eos_token_ids)
        self.sampler = Sampler(self.eos_token_ids, self._bad_word_variants, self.structured_output)
        torch.set_num_threads(threads_per_rank(config))
        if (binding := thread_binding_warning()) and resolve_device(config.device).type == "cpu":
            logger.warning(binding)
        self.workers = self._start_tensor_parallel() if config.tensor_parallel_size > 1 else None
        self.runner = ModelRunner(config, self.hf_config, self.model_dir, self.max_model_len, self.sampler)
        bs = config.block_size
        self.max_model_len = min(self.max_model_len, self.runner.num_blocks * bs)
        self.block_manager = BlockManager(self.runner.num_blocks, bs, config.enable_prefix_caching)
        cpu_default = config.max_num_batched_tokens is None and self.runner.device.type == "cpu"
        budget = config.max_num_batched_tokens or (CPU_STEP_TOKENS if cpu_default else GPU_STEP_TOKENS)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, budget,
                                   config.enable_chunked_prefill, self.structured_output.can_sample,
                                   # (half a step's work, of a step of GPU_STEP_TOKENS at least: a CPU's smaller
                                   # steps split a burst of prompts, not a long prompt's chunks beside a stream)
                                   prefill_beside_decodes=max(budget, GPU_STEP_TOKENS) // 2,
                                   context_cost=attention_context_cost(self.hf_config),
                                   more_prompts_beside_decodes=CPU_PROMPTS_BESIDE_DECODES
                                   if cpu_default and config.split_prompt_bursts else None)
        self.output_processor = OutputProcessor(self.tokenizer, self.eos_token_ids, self.max_model_len)
        self.speculation = config.speculative_config
        if self.speculation == "auto":
            # Guessing changes no output where each row's products are summed as a lone row's are: one rank's CPU
            # block kernels, for a step's up to 4 rows (a dense GEMM may sum 4 rows in another order than 1, and so do
            # exact mode's tiles from 9 rows). One sequence only: exact mode's rows cost more than w4a8's (alternated
            # in-process on the benchmark's chat prompts, AMD EPYC Zen 3, AVX2: 1.16x at batch 1, 4 of 4 rounds; 0.93x
            # at batch 2).
            matmuls = [m for m in self.runner.model.modules() if isinstance(m, LinearBase | ParallelLMHead)]
            blocks = bool(matmuls) and all(getattr(m, "gguf_parts", None) is not None for m in matmuls)
            rows_independent = self.runner.device.type == "cpu" and config.tensor_parallel_size == 1 and blocks
            self.speculation = SpeculativeConfig(disable_by_batch_size=1) if rows_independent else None
        self.proposer = NgramProposer(self.speculation) if self.speculation else None
        self.num_draft_tokens = self.num_accepted_tokens = 0  # guesses checked, and agreed with
        self.recorder = EngineRecorder(config.recorder_keeps_prompts) if config.enable_recorder else None
        self.seqs: dict[str, Sequence] = {}
        self.last_batch_size = 0  # sequences in the last step
        self.reasoning: dict[str, ReasoningSpan] = {}  # requests whose thinking span is not over
        self.load_seconds = time.monotonic() - t0
        # What the model computes in, as /version reports it: "float32", "bfloat16 weights, float32 activations",
        # "float32 w4a8", ...
        self.numerics = " ".join(filter(None, [self.runner.numerics(), self.runner.quantization]))
        kernel_note = f", CPU kernels {kernels().describe()}" if self.runner.device.type == "cpu" else ""
        spec = self.speculation
        spec_note = (f", n-gram speculation ({spec.num_speculative_tokens} tokens at batch <= "
                     f"{spec.disable_by_batch_size})" if spec else "")
        logger.info(
            "loaded %s: %s%s on %s (%d threads), %d KV blocks x %d tokens (%.0f MiB, %s), max model len %d%s, "
            "in %.1f s",
            self.model_dir, self.numerics, kernel_note, self.runner.device, torch.get_num_threads(),
            self.runner.num_blocks, bs, self.runner.kv_cache_bytes / 2**20,
            str(self.runner.kv_cache.dtype).removeprefix("torch."), self.max_model_len, spec_note,
            self.load_seconds,
        )

    def _start_tensor_parallel(self) -> WorkerGroup:
        c = self.config
        check_tp_compatible(ModelArgs.from_hf_config(self.hf_config), c.tensor_parallel_size)
        if c.master_port is None:
            if c.nnodes > 1:
                raise ValueError("--master-port is required with --nnodes > 1")
            c.master_port = free_port()
        workers = WorkerGroup(c, self.model_dir, self.max_model_len)
        init_distributed(0, c.tensor_parallel_size, c.master_addr, c.master_port, resolve_device(c.device))
        return workers

    def dead_workers(self) -> list[str]:
        """Tensor-parallel worker processes of this node that have exited (the engine is then unusable)."""
        return self.workers.dead() if self.workers else []

    def rank_states(self) -> dict[int, bool]:
        """Whether each tensor-parallel rank of this node (node 0: the engine is rank 0) lives, by rank."""
        return {0: True, **(self.workers.alive() if self.workers else {})}

    def shutdown(self) -> None:
        self.structured_output.shutdown()
        if self.workers is not None:
            if not self.dead_workers():
                self.runner.stop_workers()
            self.workers.join()
            torch.distributed.destroy_process_group()
            self.workers = None

    def _bad_word_variants(self, word: str) -> list[list[int]]:
        variants = {tuple(self.tokenizer.encode(w, add_special_tokens=False)) for w in (word, " " + word.lstrip())}
        return [list(v) for v in variants if v]

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: float | None = None, reasoning: ReasoningSpan | None = None,
                    tags: dict[str, object] | None = None, group: str | None = None) -> None:
        """Queue a request; `tags` are what the dashboard shows of where it came from (endpoint, tools...); `group`:
        the API request it is one sequence of (default: its own), which the scheduler admits in turn with others."""
        if request_id in self.seqs:
            raise ValueError(f"request id {request_id!r} is already running")
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ContextLengthError(len(prompt_token_ids), self.max_model_len)
        vocab = self.hf_config.vocab_size
        for name, ids in (("prompt", prompt_token_ids), ("stop_token_ids", params.stop_token_ids),
                          ("logit_bias", params.logit_bias), ("bad_words_token_ids", params.bad_words_token_ids)):
            if any(t < 0 or t >= vocab for t in ids):
                raise TokenIdError(name, vocab)
        if params.logprobs is not None and params.logprobs > self.config.max_logprobs:
            raise ValueError(f"logprobs must be at most {self.config.max_logprobs}")
        seq = Sequence(request_id, list(prompt_token_ids), params, group=group)
        if arrival_time is not None:
            seq.arrival_time = arrival_time
        if reasoning is not None:
            self.reasoning[request_id] = reasoning
            seq.in_reasoning = reasoning.opened_by_prompt
            seq.answer_start = None
        self.seqs[request_id] = seq
        self.structured_output.add(seq)
        self.output_processor.add(seq)
        self.scheduler.add(seq)
        if self.recorder is not None:
            self.recorder.add(seq, tags)

    def abort_request(self, request_id: str, reason: str = "abort") -> RequestOutput | None:
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.finish(seq)
        self.reasoning.pop(request_id, None)
        self.structured_output.remove(seq)
        if self.proposer is not None:
            self.proposer.finish(seq)
        if self.recorder is not None:
            self.recorder.finish(seq, time.monotonic(), reason)
        return self.output_processor.abort(seq, reason)

    def _track_reasoning(self, seq: Sequence) -> None:
        """Count thinking tokens (the closing tag's own tokens excluded) and end thinking at the budget."""
        span = self.reasoning[seq.request_id]
        out = seq.output_token_ids
        if not seq.in_reasoning:
            if span.start_token_ids and out == span.start_token_ids:
                seq.in_reasoning = True
            elif len(out) >= len(span.start_token_ids):
                del self.reasoning[seq.request_id]  # this answer does not think
                seq.answer_start = 0
            return
        seq.num_reasoning_tokens += 1
        end = span.end_token_ids
        if out[-len(end) :] == end:
            seq.in_reasoning = False
            seq.num_reasoning_tokens -= len(end)
            seq.answer_start = len(out)
            del self.reasoning[seq.request_id]
            return
        budget = seq.params.reasoning_max_tokens
        if budget is not None and seq.num_reasoning_tokens >= budget and not seq.forced_token_ids:
            seq.forced_token_ids.extend(end)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        # A grammar that failed to compile ends its request (the API layer has reported why).
        outputs = [out for rid in self.structured_output.failed() if (out := self.abort_request(rid)) is not None]
        batch = self.scheduler.schedule()
        if not batch:
            return outputs
        self.last_batch_size = len(batch)
        start = time.monotonic()
        for s in batch:
            if s.seq.queue_time is None:
                s.seq.queue_time = start - s.seq.arrival_time
        try:
            results = self.runner.run(batch)
        except Exception as exc:
            if self.workers is not None:  # the ranks are out of step: nothing more can run
                raise
            # One bad batch (a kernel fault, an out-of-memory) fails its requests, not the server: their
            # blocks go back to the pool (none was cached yet) and the next step runs the others.
            logger.exception("an engine step failed; ending the %d requests in it", len(batch))
            for s in batch:
                if (out := self.abort_request(s.seq.request_id, "error")) is not None:
                    out.error = f"{type(exc).__name__}: {exc}"
                    outputs.append(out)
            return outputs
        end = time.monotonic()
        if self.recorder is not None:
            self.recorder.step(batch, start, end, [s.seq for s, _, _ in results], self.scheduler.preempted)
        for s in batch:
            s.seq.num_computed_tokens += s.num_new_tokens
        for s, tokens, logprobs in results:
            seq = s.seq
            seq.num_computed_tokens -= len(s.draft) - (len(tokens) - 1)  # the rejected guesses' keys are not its
            self.num_draft_tokens += len(s.draft)
            self.num_accepted_tokens += len(tokens) - 1
            for token, token_logprobs in zip(tokens, logprobs, strict=True):
                seq.token_ids.append(token)
                if not self.structured_output.accept(seq, token):  # its grammar is complete (or refused it)
                    seq.finish_reason = "stop"
                if seq.request_id in self.reasoning:
                    self._track_reasoning(seq)
                outputs.append(self.output_processor.process(seq, token, token_logprobs))
                if seq.finish_reason is not None:
                    break
        for s in batch:
            self.block_manager.cache_full_blocks(s.seq)
            if s.seq.finish_reason is not None:
                if self.recorder is not None:
                    self.recorder.finish(s.seq, end, s.seq.finish_reason)
                self.scheduler.finish(s.seq)
                del self.seqs[s.seq.request_id]
                self.reasoning.pop(s.seq.request_id, None)
                self.structured_output.remove(s.seq)
                if self.proposer is not None:
                    self.proposer.finish(s.seq)
        if self.proposer is not None:
            self._guess_next_tokens()
        return outputs

    def _guess_next_tokens(self) -> None:
        """N-gram speculation: each running sequence's guesses for its next step, while the batch is small."""
        running = self.scheduler.running
        small = len(running) <= self.speculation.disable_by_batch_size
        for seq in running:
            seq.draft_token_ids = self.proposer.propose(seq, self._guess_limit(seq)) if small else []

    def _guess_limit(self, seq: Sequence) -> int:
        """How many tokens may be guessed after `seq`'s: none where a guess could not be checked as the one token
        after the others would be (its grammar, logit processors that look at the output so far, a thinking span
        the engine may end) or where its draws must not depend on what else runs (a seed), else as many as its
        length limits leave room for."""
        p = seq.params
        if (seq.generator is not None or p.structured_outputs is not None or seq.request_id in self.reasoning
                or seq.forced_token_ids or self.sampler.reads_the_output(seq)):
            return 0
        limit = self.max_model_len - seq.num_tokens
        if p.max_tokens is not None:
            limit = min(limit, p.max_tokens - seq.num_output_tokens - 1)
        return limit

    def stats(self) -> dict[str, float]:
        bm = self.block_manager
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_cache_usage": bm.usage,
            "kv_blocks_total": bm.num_blocks,
            "kv_blocks_free": bm.num_free_blocks,
            "kv_blocks_cached": bm.num_cached_free,
            "prefix_cache_queries": bm.prefix_queries,
            "prefix_cache_hits": bm.prefix_hits,
            "num_preemptions": self.scheduler.num_preemptions,
            "spec_draft_tokens": self.num_draft_tokens,
            "spec_accepted_tokens": self.num_accepted_tokens,
            "batch_size": self.last_batch_size if self.scheduler.running else 0,
        }
