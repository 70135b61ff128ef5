"""Constrained decoding: the one owner of grammar state, which the scheduler and the sampler consult.

A request's `StructuredOutputsParams` becomes an xgrammar grammar, compiled against the tokenizer
in a background thread (compiled grammars are cached: the same schema compiles once), so that the
compile overlaps the request's prefill: the scheduler holds back only the chunk that would sample
(`can_sample`). Each constrained sequence then has its own matcher; before every sampling step the
sampler takes one token bitmask for the constrained rows of the batch (`bitmask`), and the engine
feeds each sampled token back (`accept`). Sequences without a grammar cost nothing.

The grammar applies to the answer: while a sequence is inside a thinking span it samples freely,
and its matcher starts at the first token after the span (as vLLM does with a reasoning parser).
Preemption keeps a sequence's tokens, so its matcher stays valid across it.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
import xgrammar as xgr

from slipstream.engine.sequence import Sequence
from slipstream.sampling_params import StructuredOutputsParams

logger = logging.getLogger(__name__)

CACHE_SIZE = 256  # compiled grammars kept (each a few hundred KiB for a JSON schema over a 50k vocabulary)


class StructuredOutputError(ValueError):
    """A schema, regex, grammar or choice list the grammar engine refuses (the API layer names the
    request field: a cached failure may come from another field than the request at hand)."""


def build_grammar(spec: StructuredOutputsParams) -> xgr.Grammar:
    """The grammar `spec` asks for; StructuredOutputError naming the request field if it is invalid."""
    try:
        if spec.json is not None:
            schema = spec.json if isinstance(spec.json, str) else json.dumps(spec.json)
            # Compact JSON: free whitespace lets a small model pad the output with newlines forever.
            return xgr.Grammar.from_json_schema(schema, any_whitespace=False)
        if spec.json_object:
            return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False)
        if spec.regex is not None:
            return xgr.Grammar.from_regex(spec.regex)
        if spec.choice is not None:
            if not spec.choice:
                raise ValueError("choice needs at least one string")
            return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c) for c in spec.choice))
        if spec.grammar is not None:
            return xgr.Grammar.from_ebnf(spec.grammar)
        tag = spec.structural_tag
        return xgr.Grammar.from_structural_tag(tag if isinstance(tag, str) else json.dumps(tag))
    except (RuntimeError, ValueError, TypeError) as exc:
        # xgrammar's messages start with a time and its source line: "[11:56:21] /project/cpp/x.cc:94: ..."
        reason = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(exc).strip()) or type(exc).__name__
        raise StructuredOutputError(f"invalid {spec.kind.replace('_', ' ')}: {reason}") from None


@dataclass
class _GrammarState:
    compiled: Future
    matcher: xgr.GrammarMatcher | None = None
    start: int | None = None  # output index of the first token the grammar constrains


class StructuredOutputManager:
    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: set[int]) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._stop_token_ids = sorted(eos_token_ids)
        self._compiler: xgr.GrammarCompiler | None = None  # built on first use: 0.3 s over a 50k vocabulary
        # One thread: a compile must not take both cores from the running batch.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="slipstream-grammar")
        self._lock = threading.Lock()
        self._compiled: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self._states: dict[str, _GrammarState] = {}
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    # ---- any thread ----

    def compile(self, spec: StructuredOutputsParams) -> Future:
        """The compiled grammar of `spec`, as a future (cached: a repeated spec shares the first one's)."""
        key = spec.key()
        with self._lock:
            future = self._compiled.get(key)
            if future is None:
                future = self._compiled[key] = self._executor.submit(self._compile, spec)
                if len(self._compiled) > CACHE_SIZE:
                    self._compiled.popitem(last=False)
            else:
                self._compiled.move_to_end(key)
        return future

    def _compile(self, spec: StructuredOutputsParams) -> xgr.CompiledGrammar:
        grammar = build_grammar(spec)
        if self._compiler is None:
            info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self._vocab_size,
                                                      stop_token_ids=self._stop_token_ids)
            self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        return self._compiler.compile_grammar(grammar)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ---- engine thread ----

    def add(self, seq: Sequence) -> None:
        if seq.params.structured_outputs is not None:
            self._states[seq.request_id] = _GrammarState(self.compile(seq.params.structured_outputs))

    def remove(self, seq: Sequence) -> None:
        self._states.pop(seq.request_id, None)

    def can_sample(self, seq: Sequence) -> bool:
        """Whether `seq` may run a step that samples: it has no grammar, or its grammar is compiled."""
        state = self._states.get(seq.request_id)
        return state is None or (state.compiled.done() and not state.compiled.cancelled()
                                 and state.compiled.exception() is None)

    def failed(self) -> list[str]:
        """Requests whose grammar failed to compile (the API layer reports the error; these end)."""
        return [rid for rid, s in self._states.items()
                if s.compiled.done() and (s.compiled.cancelled() or s.compiled.exception() is not None)]

    def _active(self, seq: Sequence) -> _GrammarState | None:
        """The grammar state of `seq` if the grammar constrains its next token."""
        state = self._states.get(seq.request_id)
        if state is None or seq.in_reasoning or seq.forced_token_ids:
            return None
        if state.matcher is None:
            state.matcher = xgr.GrammarMatcher(state.compiled.result())
        if state.start is None:
            state.start = seq.num_output_tokens
        return state

    def bitmask(self, seqs: list[Sequence]) -> tuple[torch.Tensor, list[int]] | None:
        """(bitmask rows, their batch indices) for the sequences whose next token a grammar constrains;
        None when there are none."""
        if not self._states:
            return None
        rows = [i for i, seq in enumerate(seqs) if self._active(seq) is not None]
        if not rows:
            return None
        if self._bitmask.shape[0] < len(rows):
            self._bitmask = xgr.allocate_token_bitmask(len(rows), self._vocab_size)
        for j, i in enumerate(rows):
            self._states[seqs[i].request_id].matcher.fill_next_token_bitmask(self._bitmask, j)
        return self._bitmask[: len(rows)], rows

    def accept(self, seq: Sequence, token: int) -> bool:
        """Advance `seq`'s matcher by its newly sampled `token` (already appended) if the grammar
        constrained it. False when the sequence must end: its grammar is complete (it accepted a stop
        token), or it rejects the token (a logit processor such as logit_bias left no allowed token)."""
        state = self._states.get(seq.request_id)
        if state is None or state.start is None or seq.num_output_tokens - 1 < state.start:
            return True  # no grammar, or a token sampled before the grammar began
        if not state.matcher.accept_token(token):
            logger.warning("request %s: token %d is outside its grammar (logit_bias or bad_words left no "
                           "allowed token); ending it", seq.request_id, token)
            return False
        return not state.matcher.is_terminated()


# Byte value -> what adding it does to 8 logits: 0 where the bit allows the token, -inf where it does not.
_BYTE_TO_ADDEND = torch.where(((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).bool(), 0.0, float("-inf"))


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Set the logits of the tokens each row's bitmask forbids to -inf (bit t of the mask: token t
    allowed; words are little-endian, as on x86 and ARM); bitmask row j masks logits row rows[j]. One
    table lookup and one add for the rows, on any device (2-3x faster than unpacking the bits with shifts)."""
    table = _BYTE_TO_ADDEND.to(device=logits.device, dtype=logits.dtype)
    addend = table[bitmask.to(logits.device).view(torch.uint8).long()].view(len(rows), -1)[:, : logits.shape[1]]
    logits.index_add_(0, torch.tensor(rows, dtype=torch.long, device=logits.device), addend)
