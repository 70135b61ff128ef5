"""Turns a batch of logits into next tokens, one row per sequence, each with its own settings.

Order of operations: logit_bias, bad words, min_tokens suppression, penalties (repetition as in
transformers; presence/frequency as in OpenAI's docs), then temperature, top-k, top-p, min-p and a
draw. Drawing is by inverse CDF, one uniform per row against its cumulative probabilities, so a
seeded row draws from its own generator and gets the same tokens whatever else shares the batch.
Returned logprobs are the model's own distribution (log-softmax of the raw logits), as vLLM and
OpenAI report them; a row that a grammar constrains first has the tokens its
grammar forbids masked out (-inf), and its logprobs are those of the masked distribution.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from slipstream.engine.sequence import Sequence, TokenLogprobs
from slipstream.engine.structured_output import StructuredOutputManager, apply_bitmask
from slipstream.kernels import kernels
from slipstream.sampling_params import SamplingParams

NEG_INF = float("-inf")
MAX_TEMPERATURE = 1e30
LARGEST_LOGIT = 1e30  # what a processor's +inf becomes: above every other logit, finite through any temperature


class Sampler:
    def __init__(self, eos_token_ids: set[int], tokenize: Callable[[str], list[list[int]]] | None = None,
                 structured_output: StructuredOutputManager | None = None) -> None:
        self.eos_token_ids = eos_token_ids
        self.tokenize = tokenize  # bad word -> its token-id variants (e.g. with and without a leading space)
        self.structured_output = structured_output
        self._bad_words_cache: dict[str, list[list[int]]] = {}

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence], guesses: list[int | None] | None = None
                 ) -> tuple[list[int], list[TokenLogprobs | None]]:
        """One token a row: row i's of seqs[i]. A row with a guess (n-gram speculation: the token guessed to come at
        its position) picks the guess where the guess stands (`_draw`), so a guess stands exactly where it is the
        row's token."""
        raw = logits
        masks = self.structured_output.bitmask(seqs) if self.structured_output is not None else None
        constrained: set[int] = set()
        if masks is not None:
            raw = raw.clone()
            apply_bitmask(raw, *masks)
            constrained = set(masks[1])
        logits = self.process_logits(raw, seqs, constrained)
        tokens = self._draw(logits, seqs, guesses or [None] * len(seqs))
        for i, seq in enumerate(seqs):
            if seq.forced_token_ids:
                tokens[i] = seq.forced_token_ids.popleft()
        return tokens.tolist(), self._logprobs(raw, tokens, seqs)

    def process_logits(self, logits: torch.Tensor, seqs: list[Sequence], constrained: set[int] = frozenset()
                       ) -> torch.Tensor:
        """Each row's logit processors applied (before temperature) to a copy of `logits`, or `logits` itself when
        no row has any (a batch of 32 rows is 6 MB to copy). Rows in `constrained` follow a grammar, which alone
        decides when they may end."""
        rows = [i for i, seq in enumerate(seqs) if seq.params.logit_bias or self.reads_the_output(seq)]
        if not rows:
            return logits
        unprocessed, logits = logits, logits.clone()
        for i in rows:
            seq = seqs[i]
            p = seq.params
            if p.logit_bias:
                ids = torch.tensor(list(p.logit_bias.keys()), dtype=torch.long, device=logits.device)
                vals = torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype, device=logits.device)
                logits[i].index_add_(0, ids, vals)
            if _bans_words(p):
                banned = self._banned_tokens(seq) + p.bad_words_token_ids
                if banned:
                    logits[i, banned] = NEG_INF
            if seq.num_output_tokens < p.min_tokens and i not in constrained:
                if stops := self._stops(p):
                    logits[i, list(stops)] = NEG_INF
            if _penalizes(p):
                self._penalize(logits[i], seq)
            _keep_drawable(logits[i], unprocessed[i])
        return logits

    def _stops(self, p: SamplingParams) -> set[int]:
        """The tokens that end a sequence, which min_tokens holds off."""
        return set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids)

    def reads_the_output(self, seq: Sequence) -> bool:
        """Whether a processor of `seq`'s row depends on the tokens generated so far (penalties, bad words, min_tokens
        still holding stops off): rows guessed ahead (n-gram speculation) could not be processed as their own steps
        would be."""
        p = seq.params
        return _bans_words(p) or _penalizes(p) or bool(seq.num_output_tokens < p.min_tokens and self._stops(p))

    def _penalize(self, row: torch.Tensor, seq: Sequence) -> None:
        p = seq.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long, device=row.device)
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and seq.num_output_tokens:
            out = torch.tensor(seq.output_token_ids, dtype=torch.long, device=row.device)
            counts = torch.bincount(out, minlength=row.shape[0])[: row.shape[0]].to(row.dtype)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)

    def _banned_tokens(self, seq: Sequence) -> list[int]:
        """Single-token bad words are always banned; for longer ones, the last token is banned when
        the output so far ends with the others."""
        out = seq.output_token_ids
        banned = []
        for word in seq.params.bad_words:
            if word not in self._bad_words_cache and self.tokenize is not None:
                self._bad_words_cache[word] = self.tokenize(word)
            for ids in self._bad_words_cache.get(word, []):
                prefix = ids[:-1]
                if not prefix or (len(out) >= len(prefix) and out[len(out) - len(prefix) :] == prefix):
                    banned.append(ids[-1])
        return banned

    def _draw(self, logits: torch.Tensor, seqs: list[Sequence], guesses: list[int | None]) -> torch.Tensor:
        argmax = kernels().elementwise("argmax_rows", logits) or (lambda t: t.argmax(dim=-1))
        tokens = argmax(logits)
        drawn = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if not drawn:
            return tokens
        dev = logits.device
        seqs = [seqs[i] for i in drawn]
        guesses = [guesses[i] for i in drawn]
        # (beyond 1e30 every finite logit divides to ~0, as at float32's largest: a uniform draw; float32 would
        # round a larger temperature to inf, and -inf / inf is NaN)
        temps = torch.tensor([min(s.params.temperature, MAX_TEMPERATURE) for s in seqs], device=dev)
        logits = logits[drawn] / temps.unsqueeze(1)  # (a copy: the rows drawn, nothing for the greedy ones)
        top_k = [s.params.top_k for s in seqs]
        if any(top_k):
            vocab = logits.shape[1]
            k = torch.tensor([min(t, vocab) if t else vocab for t in top_k], device=dev)
            kth = logits.topk(int(k.max()), dim=-1).values.gather(1, (k - 1).unsqueeze(1))
            logits.masked_fill_(logits < kth, NEG_INF)
        probs = logits.softmax(dim=-1)
        top_p = torch.tensor([s.params.top_p for s in seqs], device=dev)
        cut = (top_p < 1.0).nonzero().flatten()
        if len(cut):  # (all rows: in place, where a batch's rows are megabytes to copy)
            rows = probs if len(cut) == len(probs) else probs[cut]
            rows.masked_fill_(rows < nucleus_floor(rows, top_p[cut]).unsqueeze(1), 0.0)
            if rows is not probs:
                probs[cut] = rows
        # (the rows' masses no longer sum to 1 where top-p cut them: the draw below scales by each row's total)
        min_p = torch.tensor([s.params.min_p for s in seqs], device=dev)
        if bool((min_p > 0).any()):
            probs = probs.masked_fill(probs < min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values, 0.0)
        # Inverse CDF: one uniform per row (a seeded row's from its own generator) against the row's cumulative
        # probabilities (float32: a token's mass is off by ~1e-7 at most). The exponential race it replaces drew an
        # exponential per vocabulary entry: 1.3 ms a row per step on CPU, a sixth of a decode step at batch 1.
        u = torch.rand(len(seqs), 1)
        for i, s in enumerate(seqs):
            if s.generator is not None:
                u[i] = torch.rand(1, generator=s.generator)
        # A guessed token g stands with probability p(g) (speculative sampling's rule for a guess made with certainty:
        # min(1, p(g) / 1)); otherwise the row draws from p without g, renormalised (max(0, p - [g]) in the rule),
        # so the row's token is distributed as p either way (guesses are made for unseeded rows only: a seeded
        # request's draws do not depend on what else runs).
        checked = [i for i, g in enumerate(guesses) if g is not None]
        if checked:
            rows, guessed = torch.tensor(checked, device=dev), torch.tensor([guesses[i] for i in checked], device=dev)
            stands = torch.rand(len(checked), device=dev) * probs[rows].sum(dim=-1) < probs[rows, guessed]
            probs[rows, guessed] = 0.0
        cdf = probs.cumsum_(dim=-1)
        total = cdf[:, -1:]
        # The first token whose cumulative mass passes u x total (kept below the total: a token with mass).
        point = torch.minimum(u.to(dev) * total, torch.nextafter(total, torch.zeros_like(total)))
        tokens[drawn] = torch.searchsorted(cdf, point, right=True).squeeze(1)
        if checked:
            tokens[torch.tensor(drawn, device=dev)[rows[stands]]] = guessed[stands]
        return tokens

    def _logprobs(self, raw: torch.Tensor, tokens: torch.Tensor, seqs: list[Sequence]) -> list[TokenLogprobs | None]:
        wanted = [s.params.logprobs for s in seqs]
        if all(w is None for w in wanted):
            return [None] * len(seqs)
        rows = [i for i, w in enumerate(wanted) if w is not None]
        k = max(wanted[i] for i in rows)
        computed = iter(token_logprobs(raw[rows], tokens[rows].tolist(), k))
        out: list[TokenLogprobs | None] = []
        for w in wanted:
            lp = None if w is None else next(computed)
            if lp is not None:
                lp.top = lp.top[:w]
            out.append(lp)
        return out


# How many of a row's most likely tokens top-p looks among first; four times as many for the rows whose nucleus they
# do not hold. A sort of the whole row instead took 2 ms a row of SmolLM2's 49,152 (AMD EPYC Zen 4): 92 ms a step for
# a batch of 32 with top_p, 3-4x the decode step itself; topk of 64 is ~0.04 ms a row.
TOP_P_CANDIDATES = 64


def nucleus_floor(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Each row's smallest probability in its top-p nucleus: the most likely tokens whose mass reaches top_p, as
    transformers' TopPLogitsWarper keeps them (a token goes when the mass at or below it is at most 1 - top_p, i.e.
    when the mass above it reaches top_p). Tokens tied with the floor stay, as top-k keeps ties."""
    vocab = probs.shape[1]
    floor = torch.empty(len(probs), dtype=probs.dtype, device=probs.device)
    rows = torch.arange(len(probs), device=probs.device)
    k = TOP_P_CANDIDATES
    while len(rows):
        k = min(k, vocab)
        values = probs[rows].topk(k, dim=-1).values  # most likely first
        above = values.cumsum(dim=-1) - values  # the mass of the tokens before each
        # a prefix (`above` only grows), never empty: a top_p that float32 rounds to 0 keeps the most likely token
        kept = (above < top_p[rows].unsqueeze(1)).sum(dim=-1).clamp(min=1)
        held = (values.sum(dim=-1) >= top_p[rows]) | (k == vocab)  # the candidates hold the whole nucleus
        floor[rows[held]] = values[held].gather(1, (kept[held] - 1).unsqueeze(1)).squeeze(1)
        rows, k = rows[~held], 4 * k
    return floor


def accepted_draft(draft: list[int], tokens: list[int]) -> int:
    """How many guessed tokens the model agrees with: `tokens[i]` is what it picks after the sequence's known tokens
    and draft[:i], so each guess stands while every one before it did and it is the token picked in its place."""
    n = 0
    while n < len(draft) and draft[n] == tokens[n]:
        n += 1
    return n


def _keep_drawable(row: torch.Tensor, unprocessed: torch.Tensor) -> None:
    """A processed row that the draw can take: +inf (a positive logit over a repetition_penalty that float32 rounds
    to 0) becomes the largest logit, NaN rules its token out, and a row whose processors ruled every token out (every
    token banned) goes back to its unprocessed logits. Without this such a row's softmax was NaN, its draw ran past
    the vocabulary, and the next step's embedding lookup failed every request batched with it."""
    row.nan_to_num_(nan=NEG_INF, posinf=LARGEST_LOGIT, neginf=NEG_INF)
    if not bool(row.max() > NEG_INF):
        row.copy_(unprocessed)


def _bans_words(p: SamplingParams) -> bool:
    return bool(p.bad_words or p.bad_words_token_ids)


def _penalizes(p: SamplingParams) -> bool:
    return bool(p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty)


def token_logprobs(logits: torch.Tensor, targets: list[int], k: int) -> list[TokenLogprobs]:
    """The model's logprob and rank of each row's target token, plus the row's top-k alternatives."""
    lp = logits.log_softmax(dim=-1)
    t = torch.tensor(targets, dtype=torch.long, device=lp.device)
    chosen = lp.gather(1, t.unsqueeze(1)).squeeze(1)
    ranks = ((lp > chosen.unsqueeze(1)).sum(dim=-1) + 1).tolist()
    if k:
        top_vals, top_ids = (x.tolist() for x in lp.topk(k, dim=-1))
    else:
        top_vals = top_ids = [[] for _ in targets]
    return [
        TokenLogprobs(tok, val, rank, list(zip(ids, vals, strict=True)))
        for tok, val, rank, ids, vals in zip(targets, chosen.tolist(), ranks, top_ids, top_vals, strict=True)
    ]
