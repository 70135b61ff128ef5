"""A test-only model that follows scripts, to drive the real pipeline with a "thinking" model.

No small thinking model can be fetched here, so tests build one: `save_scripted_model` writes a
Hugging Face directory (config.json, model.safetensors, a tokenizer with `<think>`/`</think>` tokens
and a chat template with an `enable_thinking` branch) that `slipstream` loads like any other model.
Only the weights are chosen; engine, KV cache, sampler and server run unchanged.

`ScriptedForCausalLM` is a trigram model built as a transformer. Its one attention layer reads the
previous token out of the paged KV cache (keys and queries encode positions, so position p attends
to p - 1 only); the (previous, current) token pair then indexes a table of next tokens, falling back
to a table keyed by the current token alone, then to EOS. The tables come from scripts: each script is
a text whose every token follows from the two before it. A template's prompt ending the way a script
does thus continues along that script, and a forced token continues from wherever it leads.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from slipstream.model.attention import PagedAttention

ARCHITECTURE = "ScriptedForCausalLM"
BOS, EOS, UNK = "<|im_start|>", "<|im_end|>", "<unk>"
THINK_TAGS = ("<think>", "</think>")
# A word with its leading space, or a run of whitespace: one token each.
PIECE = r" ?\S+|\s+"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
    "{% else %}<think>\n{% endif %}{% endif %}"
)
SCRIPT_LOGIT = 30.0  # the scripted token's logit; every other token's is 0
# The fault-injection hook: a forward pass over this word (a prompt holding it) raises.
FAULT = "FAULT"


def build_tokenizer(texts: Iterable[str]):
    """A word-level tokenizer whose vocabulary is every piece of `texts` (other pieces are `<unk>`).
    `<think>`/`</think>` are added tokens that stay in decoded text, as in Qwen3's tokenizer."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tags = [BOS, EOS, *THINK_TAGS]
    tag_re = re.compile("|".join(map(re.escape, tags)))
    pieces = {p for text in texts for part in tag_re.split(text) for p in re.findall(PIECE, part)}
    vocab = {UNK: 0} | {p: i for i, p in enumerate(sorted(pieces), start=1)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PIECE), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (BOS, EOS)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TAGS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK,
                                   chat_template=CHAT_TEMPLATE)


def next_token_tables(scripts: list[list[int]], vocab_size: int, eos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[V, V] next token after each (previous, current) pair (-1: unscripted) and [V] next token after
    each token where every script agrees (else EOS)."""
    after_pair = torch.full((vocab_size, vocab_size), -1, dtype=torch.long)
    followers: dict[int, set[int]] = {}
    for ids in scripts:
        for cur, nxt in itertools.pairwise(ids):
            followers.setdefault(cur, set()).add(nxt)
        for i in range(1, len(ids) - 1):
            prev, cur, nxt = ids[i - 1 : i + 2]
            if after_pair[prev, cur] not in (-1, nxt):
                raise ValueError(f"scripts disagree on the token after ({prev}, {cur})")
            after_pair[prev, cur] = nxt
    after_token = torch.full((vocab_size,), eos, dtype=torch.long)
    for cur, nxt in followers.items():
        if len(nxt) == 1:
            after_token[cur] = next(iter(nxt))
    return after_pair, after_token


def save_scripted_model(path: Path, scripts: list[str], texts: Iterable[str] = ()) -> Path:
    """Write a scripted model into `path`. `texts` (e.g. prompts) only add to the vocabulary."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer([*scripts, *texts, f"{FAULT} {FAULT}"])
    tokenizer.save_pretrained(path)
    vocab_size, eos = len(tokenizer), tokenizer.eos_token_id
    ids = [tokenizer.encode(s, add_special_tokens=False) for s in scripts]
    after_pair, after_token = next_token_tables(ids, vocab_size, eos)
    save_file({"next_after_pair": after_pair, "next_after_token": after_token}, path / "model.safetensors")
    config = {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",  # any registered type, so AutoConfig loads the file
        "vocab_size": vocab_size,
        "hidden_size": 2 * vocab_size,
        "num_hidden_layers": 1,
        "num_attention_heads": 1,
        "num_key_value_heads": 1,
        "max_position_embeddings": 4096,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": eos,
        "fault_token_ids": tokenizer.convert_tokens_to_ids([FAULT, f" {FAULT}"]),
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def save_scripted_model_from_tokens(path: Path, scripts: list[list[str]], texts: Iterable[str] = ()) -> Path:
    """`save_scripted_model` with each script given as the texts of its tokens rather than as one text, so that a
    script may write a word as several tokens (a tag split in two, as subword tokenizers do) where encoding the
    text would give one token. Each token text must be one piece (`PIECE`) or one of the tags."""
    from safetensors.torch import save_file
    from transformers import PreTrainedTokenizerFast

    tags = {BOS, EOS, *THINK_TAGS}
    for token in (t for s in scripts for t in s):
        if token not in tags and not re.fullmatch(PIECE, token):
            raise ValueError(f"{token!r} is not one token of the scripted tokenizer")
    save_scripted_model(path, [], texts=[*(t for s in scripts for t in s), *texts])
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    ids = [tokenizer.convert_tokens_to_ids(s) for s in scripts]
    if any(tokenizer.unk_token_id in s for s in ids):
        raise ValueError("a token text holds a tag among other text")
    after_pair, after_token = next_token_tables(ids, len(tokenizer), tokenizer.eos_token_id)
    save_file({"next_after_pair": after_pair, "next_after_token": after_token}, path / "model.safetensors")
    return path


class ScriptedForCausalLM(nn.Module):
    def __init__(self, vocab_size: int, max_positions: int, dtype: torch.dtype, fault_ids: list[int]) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.register_buffer("fault_ids", torch.tensor(fault_ids, dtype=torch.long), persistent=False)
        self.dtype = dtype
        # Frequencies pi / 2**m: any offset d != 0 below 2**(m_max) is an odd multiple of pi at some m,
        # so the score of a wrong position trails the right one by at least 2 * scale.
        num_freqs = math.ceil(math.log2(max(max_positions, 2))) + 1
        self.register_buffer("freqs", math.pi / 2 ** torch.arange(num_freqs, dtype=torch.float32), persistent=False)
        head_dim = max(vocab_size, 2 * num_freqs)
        # Squared code norm (times SDPA's 1/sqrt(head_dim)) so that the margin is 40 nats.
        self.code_scale = math.sqrt(20.0 * math.sqrt(head_dim))
        self.attn = PagedAttention(num_heads=1, num_kv_heads=1, head_dim=head_dim)
        self.register_buffer("next_after_pair", torch.full((vocab_size, vocab_size), -1, dtype=torch.long))
        self.register_buffer("next_after_token", torch.zeros(vocab_size, dtype=torch.long))

    def _position_code(self, positions: torch.Tensor) -> torch.Tensor:
        angles = positions.float().unsqueeze(-1) * self.freqs
        code = torch.cat([angles.cos(), angles.sin()], dim=-1) * self.code_scale
        return F.pad(code, (0, self.attn.head_dim - code.shape[-1])).to(self.dtype).unsqueeze(1)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Hidden state [T, 2V]: one-hot of the current token, then (near) one-hot of the previous one."""
        if torch.isin(input_ids, self.fault_ids).any():
            raise RuntimeError(f"injected fault: the batch holds {FAULT}")
        current = F.one_hot(input_ids, self.vocab_size).to(self.dtype)
        value = F.pad(current, (0, self.attn.head_dim - self.vocab_size)).unsqueeze(1)
        previous = self.attn(self._position_code(positions - 1), self._position_code(positions), value)
        return torch.cat([current, previous[:, : self.vocab_size]], dim=-1)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        current = hidden[:, : self.vocab_size].argmax(-1)
        previous = hidden[:, self.vocab_size :].argmax(-1)
        nxt = self.next_after_pair[previous, current]
        nxt = torch.where(nxt >= 0, nxt, self.next_after_token[current])
        return F.one_hot(nxt, self.vocab_size).float() * SCRIPT_LOGIT

    def attention_layers(self) -> list[PagedAttention]:
        return [self.attn]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        tables = dict(weights)
        self.next_after_pair.copy_(tables["next_after_pair"])
        self.next_after_token.copy_(tables["next_after_token"])


def build_scripted_model(hf_config, dtype: torch.dtype, device: torch.device, max_positions: int) -> nn.Module:
    with torch.device(device):
        model = ScriptedForCausalLM(hf_config.vocab_size, max(max_positions, hf_config.max_position_embeddings),
                                    dtype, getattr(hf_config, "fault_token_ids", []))
    return model.eval()


def register() -> None:
    """Make slipstream build `ScriptedForCausalLM` checkpoints (tests and their server launcher only)."""
    from slipstream.model.registry import MODEL_REGISTRY

    MODEL_REGISTRY[ARCHITECTURE] = build_scripted_model
