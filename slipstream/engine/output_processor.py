"""Owns detokenisation and stopping: turns sampled tokens into text deltas, decides when a
sequence is done (EOS, stop token, stop string, length) and holds back text that might still
become a stop string, so a stream never shows a stop string it then takes back."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from slipstream.engine.sequence import Sequence, TokenLogprobs

# Tokens of prompt context the detokenizer starts from, so the first output token gets its
# leading space right (SentencePiece strips it at the start of a decode).
_CONTEXT_TOKENS = 6


@dataclass
class RequestOutput:
    """What one step produced for one request: deltas since the previous output."""

    request_id: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None
    arrival_times: list[float]  # seconds since the request arrived, one per new token
    finished: bool = False
    finish_reason: str | None = None  # stop | length | abort | error
    error: str | None = None  # with finish_reason error: what failed
    stop_reason: str | int | None = None
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    num_reasoning_tokens: int = 0
    queue_time: float | None = None  # seconds from arrival to the request's first step (None: never ran)
    # With SamplingParams.prompt_logprobs, on the first output only: one entry per prompt token,
    # None for the first (nothing scores it).
    prompt_logprobs: list[TokenLogprobs | None] | None = None


def merge_outputs(first: RequestOutput, later: RequestOutput) -> RequestOutput:
    """One output for two consecutive deltas of a request (FastDeploy's max_streaming_response_tokens)."""
    return RequestOutput(
        request_id=first.request_id, prompt_token_ids=first.prompt_token_ids, text=first.text + later.text,
        token_ids=first.token_ids + later.token_ids,
        logprobs=None if first.logprobs is None else first.logprobs + (later.logprobs or []),
        arrival_times=first.arrival_times + later.arrival_times, finished=later.finished,
        finish_reason=later.finish_reason, error=later.error, stop_reason=later.stop_reason,
        num_output_tokens=later.num_output_tokens, num_cached_tokens=later.num_cached_tokens,
        num_reasoning_tokens=later.num_reasoning_tokens, queue_time=later.queue_time,
        prompt_logprobs=first.prompt_logprobs if first.prompt_logprobs is not None else later.prompt_logprobs,
    )


@dataclass
class _Detokenizer:
    prefix_offset: int
    read_offset: int
    text: str = ""  # full output text so far (stop strings already cut)
    sent: int = 0  # characters of `text` already handed out
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[TokenLogprobs] = field(default_factory=list)
    pending_times: list[float] = field(default_factory=list)
    prompt_logprobs_sent: bool = False


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: set[int], max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.state: dict[str, _Detokenizer] = {}

    def add(self, seq: Sequence) -> None:
        n = seq.num_prompt_tokens
        self.state[seq.request_id] = _Detokenizer(max(0, n - _CONTEXT_TOKENS), n)

    def _decode_step(self, seq: Sequence, st: _Detokenizer) -> str:
        skip = seq.params.skip_special_tokens
        ids = seq.token_ids
        prefix = self.tokenizer.decode(ids[st.prefix_offset : st.read_offset], skip_special_tokens=skip)
        full = self.tokenizer.decode(ids[st.prefix_offset :], skip_special_tokens=skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            st.prefix_offset, st.read_offset = st.read_offset, len(ids)
            return full[len(prefix) :]
        return ""

    def _stop_token(self, seq: Sequence, token: int) -> bool:
        """Whether `token` (EOS or a stop token id) ends the sequence; sets the finish reason if so."""
        p = seq.params
        if seq.num_output_tokens < p.min_tokens:
            return False
        if not p.ignore_eos and token in self.eos_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", None
        elif token in p.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        return seq.finish_reason is not None

    def _check_stop_string(self, seq: Sequence, st: _Detokenizer, new_chars: int) -> None:
        """Look for a stop string ending in the new text (it may have begun in earlier tokens)."""
        p = seq.params
        if not p.stop or not new_chars or seq.num_output_tokens < p.min_tokens:
            return
        start = max(0, len(st.text) - new_chars - max(map(len, p.stop)) + 1)
        hits = [(i, s) for s in p.stop if (i := st.text.find(s, start)) >= 0]
        if hits:
            i, s = min(hits)
            st.text = st.text[: i + len(s)] if p.include_stop_str_in_output else st.text[:i]
            seq.finish_reason, seq.stop_reason = "stop", s

    def _check_length(self, seq: Sequence) -> None:
        p = seq.params
        all_full = p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens
        answer_full = (p.response_max_tokens is not None and seq.answer_start is not None
                       and seq.num_output_tokens - seq.answer_start >= p.response_max_tokens)
        if all_full or answer_full or seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"

    def process(self, seq: Sequence, token: int, logprobs: TokenLogprobs | None) -> RequestOutput:
        """Account for one new token of `seq` (already appended to it); returns the output to send."""
        st = self.state[seq.request_id]
        st.pending_ids.append(token)
        st.pending_times.append(time.monotonic() - seq.arrival_time)
        if logprobs is not None:
            st.pending_logprobs.append(logprobs)
        if self._stop_token(seq, token):
            # As in vLLM: the text of the token that stopped generation is shown only on request.
            if seq.params.include_stop_str_in_output:
                st.text += self._decode_step(seq, st)
        else:
            delta = self._decode_step(seq, st)
            st.text += delta
            self._check_stop_string(seq, st, len(delta))
            if seq.finish_reason is None:
                self._check_length(seq)
        return self._emit(seq, st)

    def _emit(self, seq: Sequence, st: _Detokenizer) -> RequestOutput:
        finished = seq.finish_reason is not None
        end = len(st.text)
        if not finished and seq.params.stop:
            end = max(st.sent, end - max(map(len, seq.params.stop)) + 1)
        out = RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_token_ids,
            text=st.text[st.sent : end],
            token_ids=st.pending_ids,
            logprobs=st.pending_logprobs if seq.params.logprobs is not None else None,
            arrival_times=st.pending_times,
            finished=finished,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            num_output_tokens=seq.num_output_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            num_reasoning_tokens=seq.num_reasoning_tokens,
            queue_time=seq.queue_time,
        )
        if seq.params.prompt_logprobs is not None and not st.prompt_logprobs_sent:
            out.prompt_logprobs = [None, *seq.prompt_logprobs]
            st.prompt_logprobs_sent = True
        st.sent = end
        st.pending_ids, st.pending_logprobs, st.pending_times = [], [], []
        if finished:
            del self.state[seq.request_id]
        return out

    def abort(self, seq: Sequence, reason: str = "abort") -> RequestOutput | None:
        st = self.state.get(seq.request_id)
        if st is None:
            return None
        seq.finish_reason = reason
        return self._emit(seq, st)
