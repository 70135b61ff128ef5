"""Incremental detokenisation and stop strings, with the default model's real (byte-level BPE)
tokenizer: multi-byte characters split across tokens never surface as U+FFFD, the streamed pieces
add up to the decoded text, and text held back for a possible stop string is never taken back.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slipstream import SamplingParams
from slipstream.engine.output_processor import OutputProcessor, RequestOutput
from slipstream.engine.sequence import Sequence

MULTIBYTE = ["你好，世界！今天天气很好。", "Emoji: 🎉🎈👩‍👩‍👧 done", "naïve café — 日本語とカタカナ, 한국어 🇫🇷!"]
ALPHABET = st.sampled_from(list("ab c.\n") + list("é中文字😀🎉ॐ") + ["\u0301"])
_ids = itertools.count()


@pytest.fixture(scope="module")
def tokenizer(llm_fp32):
    return llm_fp32.tokenizer


def stream(tokenizer, output_ids: list[int], params: SamplingParams) -> list[RequestOutput]:
    """Feed `output_ids` one at a time, as the engine does after each step, until the sequence finishes."""
    processor = OutputProcessor(tokenizer, {tokenizer.eos_token_id}, max_model_len=10_000)
    seq = Sequence(f"detok-{next(_ids)}", tokenizer.encode("Text:"), params)
    processor.add(seq)
    outs = []
    for token in output_ids:
        seq.token_ids.append(token)
        outs.append(processor.process(seq, token, None))
        if outs[-1].finished:
            break
    return outs


def assert_streams_text(tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    # The stop string never matches: the text held back for it must come out when generation ends.
    outs = stream(tokenizer, ids, SamplingParams(max_tokens=len(ids), stop=["\x00never matched"]))
    assert not any("\ufffd" in o.text for o in outs)
    assert "".join(o.text for o in outs) == tokenizer.decode(ids) == text
    assert outs[-1].finished and outs[-1].finish_reason == "length"


@pytest.mark.parametrize("text", MULTIBYTE)
def test_multibyte_characters_split_across_tokens(tokenizer, text):
    ids = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids)  # some character spans several tokens
    assert_streams_text(tokenizer, text)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(ALPHABET, min_size=1, max_size=40))
def test_random_text_streams_back_exactly(tokenizer, text):
    assert_streams_text(tokenizer, text)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(ALPHABET, min_size=2, max_size=40), st.data(), st.booleans(), st.booleans())
def test_stop_string_cuts_text_and_nothing_streamed_is_taken_back(tokenizer, text, data, include, longer_stop):
    start = data.draw(st.integers(0, len(text) - 1))
    stop = text[start : data.draw(st.integers(start + 1, min(len(text), start + 5)))]
    stops = [stop, "\x00never matched"] if longer_stop else [stop]
    ids = tokenizer.encode(text)
    outs = stream(tokenizer, ids, SamplingParams(max_tokens=len(ids), stop=stops, include_stop_str_in_output=include))
    full = tokenizer.decode(ids)
    cut = full.find(stop) + (len(stop) if include else 0)
    # Deltas only ever append, so equality with the final text means nothing was taken back.
    assert "".join(o.text for o in outs) == full[:cut]
    assert outs[-1].finished and (outs[-1].finish_reason, outs[-1].stop_reason) == ("stop", stop)
    assert not any(o.finished for o in outs[:-1])


def test_earliest_of_several_stop_strings_wins(tokenizer):
    text = "The quick brown fox jumps over the lazy dog."  # " brown" is one token
    outs = stream(tokenizer, tokenizer.encode(text), SamplingParams(max_tokens=50, stop=["lazy", "own", "bro"]))
    assert "".join(o.text for o in outs) == "The quick " and outs[-1].stop_reason == "bro"


@pytest.mark.parametrize("include", [False, True])
def test_eos_text_is_shown_only_with_include_stop_str_in_output(tokenizer, include):
    ids = tokenizer.encode("Fine.") + [tokenizer.eos_token_id, *tokenizer.encode(" more")]
    params = SamplingParams(max_tokens=10, skip_special_tokens=False, include_stop_str_in_output=include)
    outs = stream(tokenizer, ids, params)
    assert outs[-1].finish_reason == "stop" and outs[-1].token_ids[-1] == tokenizer.eos_token_id
    assert "".join(o.text for o in outs) == "Fine." + (tokenizer.eos_token if include else "")


def test_model_output_in_chinese_and_emoji_streams_cleanly(llm_fp32):
    engine = llm_fp32.engine
    prompts = {f"detok-{next(_ids)}": p for p in ("Emoji party: 🎉🎈", "你好，世界！今天天气")}
    for rid, prompt in prompts.items():
        engine.add_request(rid, llm_fp32.tokenizer.encode(prompt), SamplingParams(temperature=0, max_tokens=9))
    texts = dict.fromkeys(prompts, "")
    ids: dict[str, list[int]] = {rid: [] for rid in prompts}
    while engine.has_unfinished():
        for out in engine.step():
            assert "\ufffd" not in out.text
            texts[out.request_id] += out.text
            ids[out.request_id] += out.token_ids
    for rid in prompts:
        decoded = llm_fp32.tokenizer.decode(ids[rid])
        assert any("\ufffd" in llm_fp32.tokenizer.decode([t]) for t in ids[rid])  # split characters were generated
        # A character still incomplete when generation stops is not emitted at all.
        assert texts[rid] == decoded.removesuffix("\ufffd").removesuffix("\ufffd").removesuffix("\ufffd")
