"""Thinking models end to end: the real server process with `--reasoning-parser qwen3` over a scripted
"thinking" model (tests/scripted_model.py: real engine, KV cache, sampler, parser and SSE; only the
weights are chosen), driven by the official `openai` client. The model follows its script, so every
field has one right value, derived here from the script. Then the seed's Python example against the
default (non-thinking) model with the same parser.
"""

from __future__ import annotations

import re

import openai
import pytest
from scripted_model import CHAT_TEMPLATE, EOS, save_scripted_model
from scripted_server import running_scripted_server
from server_utils import SEED_MESSAGES, running_server

from slipstream.model.loader import load_tokenizer

THINKING = "Two plus two means adding two to two, which makes four.\n"
ANSWER = "The answer is four."
QUESTION = [{"role": "user", "content": "What is two plus two?"}]
SCRIPTS = [
    # Thinking, whether the template opened it (prompt ends in "<think>\n") or the model does ("assistant\n").
    f"assistant\n<think>\n{THINKING}</think>\n\n{ANSWER}{EOS}",
    # The template's non-thinking path: thinking opened and closed empty, then the answer.
    f"<think>\n\n</think>\n\n{ANSWER}{EOS}",
]
# The scripted template without its thinking branch: the model then opens thinking itself.
PLAIN_TEMPLATE = CHAT_TEMPLATE.split("{% if enable_thinking")[0] + "{% endif %}"
TAGS = ("<think>", "</think>")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_scripted_model(tmp_path_factory.mktemp("scripted"), SCRIPTS, texts=["user\n", QUESTION[0]["content"]])


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def client(model_dir):
    with running_scripted_server("--model", str(model_dir), "--reasoning-parser", "qwen3",
                                 "--kv-cache-memory", "16MiB", "--trust-request-chat-template") as server:
        yield openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=600)


def chat(client: openai.OpenAI, **extra):
    return client.chat.completions.create(model="scripted", messages=QUESTION, temperature=0, extra_body=extra)


def stream_chat(client: openai.OpenAI, **extra):
    """(reasoning, content, usage) of a streamed chat; checks that reasoning deltas all come first and
    that no delta carries tag text."""
    chunks = client.chat.completions.create(model="scripted", messages=QUESTION, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body=extra)
    reasoning, content, usage = "", "", None
    for chunk in chunks:
        usage = chunk.usage or usage
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        r, c = delta.reasoning_content or "", delta.content or ""
        assert not (r and content), "reasoning after the answer started"
        assert not any(tag in r + c for tag in TAGS)
        reasoning, content = reasoning + r, content + c
    return reasoning or None, content or None, usage


def test_non_stream_splits_reasoning_and_content_exactly(client, tokenizer):
    r = chat(client, return_token_ids=True)
    message = r.choices[0].message
    assert (message.reasoning_content, message.content) == (THINKING.strip(), ANSWER)
    assert r.choices[0].finish_reason == "stop"
    ids = message.completion_token_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == f"{THINKING}</think>\n\n{ANSWER}"
    assert r.usage.completion_tokens == len(ids)
    thinking_tokens = len(tokenizer.encode(THINKING, add_special_tokens=False))
    assert r.usage.completion_tokens_details.reasoning_tokens == thinking_tokens


@pytest.mark.parametrize("extra", [{}, {"reasoning_max_tokens": 5}, {"enable_thinking": False},
                                   {"chat_template": PLAIN_TEMPLATE}], ids=["thinking", "budget", "off", "model-opens"])
def test_stream_and_non_stream_agree(client, extra):
    whole = chat(client, **extra)
    message = whole.choices[0].message
    reasoning, content, usage = stream_chat(client, **extra)
    assert (reasoning, content) == (message.reasoning_content, message.content)
    assert content == ANSWER
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.completion_tokens_details.reasoning_tokens == whole.usage.completion_tokens_details.reasoning_tokens


@pytest.mark.parametrize(("extra", "thinks"), [
    ({"enable_thinking": False}, False),
    ({"chat_template_kwargs": {"enable_thinking": False}}, False),
    ({"enable_thinking": True, "chat_template_kwargs": {"enable_thinking": False}}, False),
    ({"enable_thinking": False, "chat_template_kwargs": {"enable_thinking": True}}, True),
    ({"enable_thinking": True}, True),
])
def test_enable_thinking(client, extra, thinks):
    """extra_body merges into the top level; chat_template_kwargs wins over it."""
    r = chat(client, **extra)
    message = r.choices[0].message
    assert message.content == ANSWER
    assert message.reasoning_content == (THINKING.strip() if thinks else None)
    assert (r.usage.completion_tokens_details.reasoning_tokens > 0) == thinks


@pytest.mark.parametrize("template", [None, PLAIN_TEMPLATE], ids=["template-opens", "model-opens"])
def test_reasoning_max_tokens_ends_thinking_after_exactly_that_many_tokens(client, tokenizer, template):
    budget = 5
    r = chat(client, reasoning_max_tokens=budget, return_token_ids=True, chat_template=template)
    message = r.choices[0].message
    ids = message.completion_token_ids
    start, end = (tokenizer.convert_tokens_to_ids(tag) for tag in TAGS)
    thinking = ids[1 if ids[0] == start else 0 : ids.index(end)]  # the forced `</think>` follows them
    assert len(thinking) == budget == r.usage.completion_tokens_details.reasoning_tokens
    assert message.reasoning_content == tokenizer.decode(thinking).strip()
    assert THINKING.startswith(message.reasoning_content) and len(message.reasoning_content) < len(THINKING.strip())
    assert message.content == ANSWER  # the model answers after the forced end of thinking
    assert r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("extra", [{}, {"enable_thinking": False}, {"reasoning_max_tokens": 5}],
                         ids=["thinking", "off", "budget"])
def test_response_max_tokens_bounds_the_answer_after_the_thinking(client, tokenizer, extra):
    """FastDeploy's response_max_tokens: the thinking is whole (or at its own budget), the answer stops
    after that many tokens of its own."""
    full = chat(client, return_token_ids=True, **extra)
    ids = full.choices[0].message.completion_token_ids
    end = tokenizer.convert_tokens_to_ids(TAGS[1])
    thinking_end = ids.index(end) + 1 if end in ids else 0  # the answer starts after `</think>`, if any
    r = chat(client, response_max_tokens=2, **extra)
    message = r.choices[0].message
    assert message.reasoning_content == full.choices[0].message.reasoning_content
    assert r.usage.completion_tokens == thinking_end + 2 and r.choices[0].finish_reason == "length"
    assert message.content == tokenizer.decode(ids[thinking_end : thinking_end + 2]).strip() and ANSWER.startswith(
        message.content)
    assert stream_chat(client, response_max_tokens=2, **extra)[:2] == (message.reasoning_content, message.content)


@pytest.mark.parametrize("extra", [{}, {"enable_thinking": False}, {"reasoning_max_tokens": 5}],
                         ids=["thinking", "off", "budget"])
def test_a_grammar_constrains_the_answer_not_the_thinking(client, extra):
    """The regex admits only the answer: were it applied to the thinking, no thinking could be written."""
    guided = {"guided_regex": re.escape(ANSWER), **extra}
    whole = chat(client, **guided)
    message = whole.choices[0].message
    assert message.content == ANSWER and whole.choices[0].finish_reason == "stop"
    plain = chat(client, **extra).choices[0].message
    assert message.reasoning_content == plain.reasoning_content
    assert stream_chat(client, **guided)[:2] == (message.reasoning_content, ANSWER)


def test_completions_leave_the_text_as_is(client, tokenizer):
    prompt = tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    r = client.completions.create(model="scripted", prompt=prompt, max_tokens=40, temperature=0)
    assert r.choices[0].text == f"{THINKING}</think>\n\n{ANSWER}"


@pytest.fixture(scope="module")
def default_server():
    with running_server("--reasoning-parser", "qwen3", "--max-model-len", "64") as server:
        yield server


def test_seed_python_example_with_enable_thinking_on_a_non_thinking_model(default_server, capsys):
    """The seed's example as written (port adjusted) plus extra_body={"enable_thinking": True}: the default
    model does not think, so the whole answer is content and no chunk has reasoning_content."""
    host, port = "127.0.0.1", default_server.url.rsplit(":", 1)[1]
    client = openai.Client(base_url=f"http://{host}:{port}/v1", api_key="null")
    response = client.chat.completions.create(
        model="null",
        messages=SEED_MESSAGES,
        stream=True,
        extra_body={"enable_thinking": True},
    )
    deltas = []
    for chunk in response:
        if chunk.choices[0].delta:
            print(chunk.choices[0].delta.content, end='')
            deltas.append(chunk.choices[0].delta)
    print('\n')
    assert capsys.readouterr().out.strip()
    assert all(isinstance(d.content, str) for d in deltas)  # the example prints every delta's content
    assert all(d.reasoning_content is None for d in deltas)
