"""Reasoning parsers: streamed deltas, however the output is cut, add up to the whole-output split,
and no tag text reaches either field."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scripted_model import CHAT_TEMPLATE, build_tokenizer

from slipstream.reasoning import REASONING_PARSERS, ReasoningParser, get_reasoning_parser

TAGS = ("<think>", "</think>", "<response>", "</response>")

# (parser, output, prompt opened thinking, expected reasoning, expected content)
CASES = [
    ("qwen3", "<think>\nI think 2 < 3.\n</think>\n\nThe answer is 3.", False, "I think 2 < 3.", "The answer is 3."),
    ("qwen3", "The answer is 3, no thinking.", False, None, "The answer is 3, no thinking."),
    ("qwen3", "<thinking aloud> is not a tag.", False, None, "<thinking aloud> is not a tag."),
    ("qwen3", "\n<think>x </ y</think>z", False, "x </ y", "z"),
    ("qwen3", "<think></think>\n\nJust the answer.", False, None, "Just the answer."),
    ("qwen3", "Opened by the template.\n</think>\n\nAnswer.", True, "Opened by the template.", "Answer."),
    ("qwen3", "\n\n</think>\n\nAnswer.", True, None, "Answer."),
    ("qwen3", "<think>\nCut off while thinking </thi", False, "Cut off while thinking </thi", None),
    ("deepseek_r1", "No opening tag.</think>Answer.", False, "No opening tag.", "Answer."),
    ("deepseek_r1", "<think>\nOpened.\n</think>\n\nAnswer.", False, "Opened.", "Answer."),
    ("deepseek_r1", "All of it is reasoning, cut off.", False, "All of it is reasoning, cut off.", None),
    ("ernie-45", "Reasoning <b>bold</b>.\n</think>\n\nAnswer <i>.", True, "Reasoning <b>bold</b>.", "Answer <i>."),
    ("ernie-45", "</think>Answer only.", False, None, "Answer only."),
    ("ernie-x1", "I think.\n</think>\n\n<response>\nThe answer.\n</response>", True, "I think.", "The answer."),
    ("ernie-x1", "I think.</think><response>Cut off in the answer", True, "I think.", "Cut off in the answer"),
    ("ernie-x1", "I think.</think>\nNo wrapper.", True, "I think.", "No wrapper."),
    ("ernie-x1", "r</think><response>a</response>\ntrailing text", True, "r", "a"),
    ("ernie-x1", "<think>r <resp</think>\n<respond>", False, "r <resp", "<respond>"),
]


def run_stream(parser: ReasoningParser, deltas: list[str], prompt_opened: bool) -> tuple[str | None, str | None]:
    """Feed `deltas`; checks that no reasoning follows content, returns the concatenated fields."""
    stream = parser.stream(prompt_opened)
    reasoning, content = "", ""
    for r, c in [*map(stream.feed, deltas), stream.finish()]:
        assert not (r and content), "reasoning after content started"
        reasoning, content = reasoning + r, content + c
    return reasoning or None, content or None


@pytest.mark.parametrize(("name", "text", "opened", "reasoning", "content"), CASES)
def test_extract(name, text, opened, reasoning, content):
    assert get_reasoning_parser(name).extract(text, opened) == (reasoning, content)
    for tag in TAGS:
        assert tag not in (reasoning or "") + (content or "")


@pytest.mark.parametrize(("name", "text", "opened", "reasoning", "content"), CASES)
def test_stream_every_two_cuts(name, text, opened, reasoning, content):
    """Three deltas for every pair of cut positions: each tag whole, split, or sharing a delta."""
    parser = get_reasoning_parser(name)
    for i, j in itertools.combinations_with_replacement(range(len(text) + 1), 2):
        deltas = [text[:i], text[i:j], text[j:]]
        assert run_stream(parser, deltas, opened) == (reasoning, content), deltas


@pytest.mark.parametrize(("name", "text", "opened", "reasoning", "content"), CASES)
def test_stream_char_by_char(name, text, opened, reasoning, content):
    parser = get_reasoning_parser(name)
    assert run_stream(parser, list(text), opened) == (reasoning, content)


@pytest.mark.parametrize(("name", "text", "opened", "reasoning", "content"), [c for c in CASES if "</think>" in c[1]])
def test_reasoning_ends_with_the_end_tag(name, text, opened, reasoning, content):
    """The stream reports the end of thinking on the delta that completes `</think>`, not before."""
    end = text.index("</think>") + len("</think>")
    stream = get_reasoning_parser(name).stream(opened)
    for k, ch in enumerate(text, start=1):
        stream.feed(ch)
        assert stream.reasoning_ended == (k >= end), text[:k]


def test_thinking_not_opened_is_all_answer_once_known():
    stream = get_reasoning_parser("qwen3").stream(prompt_opened=False)
    assert stream.feed("<thi") == ("", "") and not stream.reasoning_ended
    assert stream.feed("s is text") == ("", "<this is text")
    assert stream.reasoning_ended


@pytest.fixture(scope="module")
def scripted_tokenizer():
    return build_tokenizer(case[1] for case in CASES)


@pytest.fixture(scope="module")
def default_tokenizer():
    """SmolLM2's BPE tokenizer knows no think tags: it cuts them into several tokens."""
    from slipstream.model.loader import hf_directory, load_tokenizer

    return load_tokenizer(hf_directory(None))


@pytest.mark.parametrize("tokenizer", ["scripted_tokenizer", "default_tokenizer"])
def test_stream_token_by_token(tokenizer, request):
    tok = request.getfixturevalue(tokenizer)
    for name, text, opened, reasoning, content in CASES:
        pieces = [tok.decode([i]) for i in tok.encode(text, add_special_tokens=False)]
        assert "".join(pieces) == text
        assert run_stream(get_reasoning_parser(name), pieces, opened) == (reasoning, content), pieces


def test_scripted_tokenizer_keeps_think_tags_as_single_tokens(scripted_tokenizer):
    text = "I think.\n</think>\n\nAnswer."
    ids = scripted_tokenizer.encode(text, add_special_tokens=False)
    assert scripted_tokenizer.convert_ids_to_tokens(ids) == ["I", " think.", "\n", "</think>", "\n\n", "Answer."]
    assert scripted_tokenizer.decode(ids, skip_special_tokens=True) == text


FRAGMENTS = ["<think>", "</think>", "<response>", "</response>", "<", "</", "think", ">", "a", "b c", " ", "\n"]


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(sorted(REASONING_PARSERS)),
    opened=st.booleans(),
    parts=st.lists(st.sampled_from(FRAGMENTS), max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=80), max_size=6),
)
def test_stream_matches_extract_on_any_text(name, opened, parts, cuts):
    """Whatever the text, including stray and repeated tags, streaming never takes back text."""
    text = "".join(parts)
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    deltas = [text[a:b] for a, b in itertools.pairwise(bounds)]
    parser = get_reasoning_parser(name)
    assert run_stream(parser, deltas, opened) == parser.extract(text, opened)


def test_registry_names():
    assert set(REASONING_PARSERS) == {"qwen3", "deepseek-r1", "ernie-45", "ernie-x1"}
    assert type(get_reasoning_parser("DeepSeek_R1")) is type(get_reasoning_parser("deepseek-r1"))
    assert type(get_reasoning_parser("ernie_x1")) is REASONING_PARSERS["ernie-x1"]
    with pytest.raises(ValueError, match="qwen3"):
        get_reasoning_parser("no-such-parser")


def test_prompt_opens_thinking_follows_the_template(scripted_tokenizer):
    parser = get_reasoning_parser("qwen3")
    messages = [{"role": "user", "content": "Hi"}]

    def prompt(**kwargs) -> str:
        return scripted_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)

    assert scripted_tokenizer.chat_template == CHAT_TEMPLATE
    assert parser.prompt_opens_thinking(prompt())
    assert parser.prompt_opens_thinking(prompt(enable_thinking=True))
    assert not parser.prompt_opens_thinking(prompt(enable_thinking=False))
    assert not parser.prompt_opens_thinking("<|im_start|>assistant\n")
