"""FastDeploy's and vLLM's extra request fields through the official `openai` client (`extra_body`) on a real
server with the default model: max_streaming_response_tokens, bad_words_token_ids, disable_chat_template,
prompt_logprobs (chat and completions) and include_logprobs_decode_token. (response_max_tokens needs a
thinking model: tests/test_reasoning_e2e.py.)"""

from __future__ import annotations

import openai
import pytest
from server_utils import running_server

QUESTION = [{"role": "user", "content": "Tell me about the sea."}]
GROUP = 3


@pytest.fixture(scope="module")
def client():
    with running_server("--enable-logprob", "--max-model-len", "256") as server:
        yield openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=600)


def chat(client: openai.OpenAI, **extra):
    return client.chat.completions.create(model="m", messages=QUESTION, max_tokens=12, temperature=0, extra_body=extra)


def streamed_choices(client: openai.OpenAI, **extra) -> dict[int, list]:
    """Per choice, its (content, token ids, logprob tokens) chunks, role chunk left out."""
    chunks: dict[int, list] = {}
    for event in client.chat.completions.create(model="m", messages=QUESTION, max_tokens=13, temperature=0, n=2,
                                                seed=1, stream=True, logprobs=True,
                                                extra_body={"return_token_ids": True, **extra}):
        for c in event.choices:
            ids = c.delta.model_extra.get("completion_token_ids")
            if ids is not None:
                chunks.setdefault(c.index, []).append((c.delta.content, ids, [t.token for t in c.logprobs.content]))
    return chunks


def test_max_streaming_response_tokens_groups_tokens_and_changes_nothing_else(client):
    plain, grouped = streamed_choices(client), streamed_choices(client, max_streaming_response_tokens=GROUP)
    assert plain.keys() == grouped.keys() == {0, 1}
    for i in plain:
        sizes = [len(ids) for _, ids, _ in grouped[i]]
        assert sizes == [GROUP] * (13 // GROUP) + [13 % GROUP], sizes  # the last chunk: what is left
        for part in range(3):  # content, token ids and logprobs concatenate to the same
            assert sum((list(c[part]) for c in grouped[i]), []) == sum((list(c[part]) for c in plain[i]), [])
        assert all(len(ids) == 1 for _, ids, _ in plain[i])
    text = [c.choices[0].text for c in client.completions.create(
        model="m", prompt="Once upon a time", max_tokens=7, temperature=0, stream=True,
        extra_body={"max_streaming_response_tokens": GROUP})]
    whole = client.completions.create(model="m", prompt="Once upon a time", max_tokens=7, temperature=0)
    assert len(text) == 3 and "".join(text) == whole.choices[0].text


def test_bad_words_token_ids_are_never_sampled(client):
    ids = chat(client, return_token_ids=True).choices[0].message.completion_token_ids
    banned = sorted(set(ids[:3]))
    again = chat(client, return_token_ids=True, bad_words_token_ids=banned).choices[0].message.completion_token_ids
    assert not set(again) & set(banned)


def test_disable_chat_template_takes_the_content_as_the_prompt(client):
    text = "Once upon a time, in a small village"
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": text}], max_tokens=6,
                                       temperature=0, extra_body={"disable_chat_template": True,
                                                                  "return_token_ids": True})
    completion = client.completions.create(model="m", prompt=text, max_tokens=6, temperature=0,
                                           extra_body={"return_token_ids": True})
    assert r.choices[0].message.model_extra["prompt_token_ids"] == completion.choices[0].model_extra["prompt_token_ids"]
    assert r.choices[0].message.content == completion.choices[0].text
    with pytest.raises(openai.BadRequestError, match="disable_chat_template"):
        client.chat.completions.create(model="m", messages=QUESTION * 2, max_tokens=1,
                                       extra_body={"disable_chat_template": True})


def test_prompt_logprobs_on_chat_score_the_templated_prompt_as_completions_do(client):
    r = chat(client, prompt_logprobs=2, return_token_ids=True)
    prompt = r.choices[0].message.model_extra["prompt_token_ids"]
    entries = r.model_extra["prompt_logprobs"]
    assert len(entries) == len(prompt) and entries[0] is None
    for token, entry in zip(prompt[1:], entries[1:], strict=True):
        assert str(token) in entry and 2 <= len(entry) <= 3  # the prompt's own token and the top 2
        ranks = sorted(e["rank"] for e in entry.values() if e["rank"] <= 2)
        assert ranks == [1, 2] and all(e["decoded_token"] is not None for e in entry.values())
    completion = client.completions.create(model="m", prompt=prompt, max_tokens=1, extra_body={"prompt_logprobs": 2})
    for got, want in zip(entries[1:], completion.choices[0].model_extra["prompt_logprobs"][1:], strict=True):
        assert got.keys() == want.keys()
        assert all(abs(got[t]["logprob"] - want[t]["logprob"]) < 1e-4 for t in got)
    streamed = [e.model_extra.get("prompt_logprobs") for e in client.chat.completions.create(
        model="m", messages=QUESTION, max_tokens=3, temperature=0, stream=True, extra_body={"prompt_logprobs": 2})]
    assert [p is not None for p in streamed].count(True) == 1 and next(p for p in streamed if p) == entries


def test_include_logprobs_decode_token_false_leaves_the_texts_out(client):
    with_text = chat(client, prompt_logprobs=1, logprobs=True, top_logprobs=2)
    without = chat(client, prompt_logprobs=1, logprobs=True, top_logprobs=2, include_logprobs_decode_token=False)
    for a, b in zip(with_text.choices[0].logprobs.content, without.choices[0].logprobs.content, strict=True):
        assert a.token and b.token == "" and b.bytes is None and a.logprob == b.logprob
        assert [t.logprob for t in a.top_logprobs] == [t.logprob for t in b.top_logprobs]
    entries = without.model_extra["prompt_logprobs"][1:]
    assert all(e["decoded_token"] is None for entry in entries for e in entry.values())


@pytest.mark.parametrize(("field", "value"), [("max_streaming_response_tokens", 0), ("prompt_logprobs", 21),
                                              ("response_max_tokens", 0), ("bad_words_token_ids", [10**7]),
                                              ("disable_chat_template", "sometimes")])
def test_bad_values_are_400_naming_the_field(client, field, value):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, **{field: value})
    assert e.value.body["param"] == field and field in e.value.body["message"]
