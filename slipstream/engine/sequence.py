"""One generation stream: its tokens, its KV blocks and where it is in its life."""

from __future__ import annotations

import enum
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from slipstream.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclass
class TokenLogprobs:
    """Logprob of one sampled token plus the top alternatives at that position (ids, logprobs)."""

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]


@dataclass(eq=False)  # identity semantics: the scheduler finds sequences in its queues by `is`
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    group: str | None = None  # the API request it is one of the sequences of (prompts x n); None: its own id
    token_ids: list[int] = field(init=False)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache on first schedule
    block_table: list[int] = field(default_factory=list)
    num_hashed_blocks: int = 0  # leading blocks of block_table already registered in the prefix cache
    block_hashes: list[bytes] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    generator: torch.Generator | None = None
    # Tokens the engine must emit next regardless of the logits (e.g. the end of a thinking span).
    forced_token_ids: deque[int] = field(default_factory=deque)
    # Tokens guessed to come next (n-gram speculation), checked in the sequence's next step.
    draft_token_ids: list[int] = field(default_factory=list)
    num_reasoning_tokens: int = 0
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)  # of prompt tokens 1.., when asked
    in_reasoning: bool = False
    queue_time: float | None = None  # seconds from arrival to its first step, once scheduled
    answer_start: int | None = 0  # output tokens before the answer; None while a thinking span may still come

    def __post_init__(self) -> None:
        if self.group is None:
            self.group = self.request_id
        self.token_ids = list(self.prompt_token_ids)
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED
