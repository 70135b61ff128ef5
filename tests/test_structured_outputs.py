"""Structured outputs: every request form (OpenAI's response_format, vLLM's structured_outputs,
FastDeploy's guided_*) on a real server over real HTTP with the official `openai` client and the
default model; the sampler's masks as a property over mixed, preempted batches; the bitmask
kernel against xgrammar's own.
"""

from __future__ import annotations

import json
import math
import re

import openai
import pytest
import torch
import xgrammar as xgr
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from server_utils import running_server

from slipstream.engine.structured_output import apply_bitmask, build_grammar
from slipstream.sampling_params import SamplingParams, StructuredOutputsParams

PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
REGEX = r"[0-9]{3}-[a-z]{2,5}"
CHOICES = ["positive", "negative", "neutral"]
GRAMMAR = 'root ::= "The answer is " ("yes" | "no") "."'
QUESTION = [{"role": "user", "content": "Describe a person: their name and age."}]


class Person(BaseModel):
    name: str
    age: int


@pytest.fixture(scope="module")
def server():
    with running_server("--max-model-len", "512", "--enable-logprob") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=600)


def check_person(text: str) -> None:
    value = json.loads(text)
    assert set(value) == {"name", "age"} and isinstance(value["name"], str) and isinstance(value["age"], int)


# Each form as (extra request fields, check of the output text).
FORMS = {
    "guided_json": ({"guided_json": PERSON_SCHEMA}, check_person),
    "guided_json_text": ({"guided_json": json.dumps(PERSON_SCHEMA)}, check_person),
    "guided_regex": ({"guided_regex": REGEX}, lambda t: re.fullmatch(REGEX, t) or pytest.fail(t)),
    "guided_choice": ({"guided_choice": CHOICES}, lambda t: t in CHOICES or pytest.fail(t)),
    "guided_grammar": ({"guided_grammar": GRAMMAR}, lambda t: t in ("The answer is yes.", "The answer is no.")
                       or pytest.fail(t)),
    "structured_outputs.json": ({"structured_outputs": {"json": PERSON_SCHEMA}}, check_person),
    "structured_outputs.regex": ({"structured_outputs": {"regex": REGEX}},
                                 lambda t: re.fullmatch(REGEX, t) or pytest.fail(t)),
    "structured_outputs.choice": ({"structured_outputs": {"choice": CHOICES}}, lambda t: t in CHOICES
                                  or pytest.fail(t)),
    "structured_outputs.grammar": ({"structured_outputs": {"grammar": GRAMMAR}},
                                   lambda t: t.startswith("The answer is ") or pytest.fail(t)),
    "response_format.json_schema": ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "person", "schema": PERSON_SCHEMA, "strict": True}}}, check_person),
    "response_format.json_object": ({"response_format": {"type": "json_object"}},
                                    lambda t: isinstance(json.loads(t), dict) or pytest.fail(t)),
}


def test_parse_returns_a_pydantic_object(client):
    completion = client.chat.completions.parse(model="default", messages=QUESTION, response_format=Person,
                                               temperature=0, max_tokens=60)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Person)


@pytest.mark.parametrize("form", FORMS)
def test_every_form_on_both_endpoints_streamed_and_not(client, form):
    extra, check = FORMS[form]
    chat = client.chat.completions.create(model="default", messages=QUESTION, temperature=0, max_tokens=80,
                                          extra_body=extra)
    assert chat.choices[0].finish_reason == "stop", chat.choices[0].message.content
    check(chat.choices[0].message.content)
    chunks = client.chat.completions.create(model="default", messages=QUESTION, temperature=0, max_tokens=80,
                                            extra_body=extra, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content

    prompt = "Here is the requested output:"
    completion = client.completions.create(model="default", prompt=prompt, temperature=0, max_tokens=80,
                                           extra_body=extra)
    assert completion.choices[0].finish_reason == "stop"
    check(completion.choices[0].text)
    chunks = client.completions.create(model="default", prompt=prompt, temperature=0, max_tokens=80,
                                       extra_body=extra, stream=True)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == completion.choices[0].text


def test_sampled_choices_logprobs_and_seeds(client):
    """n samples each follow the grammar; logprobs are those after masking (so every reported
    alternative is allowed); a seed repeats its samples."""
    kwargs = dict(model="default", messages=QUESTION, temperature=1.0, n=3, seed=7, max_tokens=60, logprobs=True,
                  top_logprobs=3, extra_body={"guided_json": PERSON_SCHEMA})
    first = client.chat.completions.create(**kwargs)
    again = client.chat.completions.create(**kwargs)
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    for choice in first.choices:
        check_person(choice.message.content)
        assert choice.message.content.startswith('{"name": "')
        # The grammar allows only tokens that begin the object: masked out, the others have no
        # probability left, and the allowed ones share all of it.
        first = choice.logprobs.content[0]
        allowed = [t for t in first.top_logprobs if t.logprob > -9999]
        assert allowed and all('{"name": "'.startswith(t.token) for t in allowed), first.top_logprobs
        assert sum(math.exp(t.logprob) for t in allowed) <= 1 + 1e-4
        assert all('{"name": "'.startswith(t.token) or t.logprob <= -9999 for t in first.top_logprobs)


def test_stop_strings_and_max_tokens_still_apply(client):
    out = client.completions.create(model="default", prompt="Numbers:", temperature=0, max_tokens=40,
                                    extra_body={"guided_regex": "[0-9]{2}( [0-9]{2}){30}"})
    assert out.choices[0].finish_reason == "length"
    assert re.fullmatch(r"[0-9]{2}( [0-9]{2})*( [0-9]?)?", out.choices[0].text)  # cut short, a prefix
    regex = "(yes|no), and then more words"
    out = client.completions.create(model="default", prompt="Answer:", temperature=0, max_tokens=40,
                                    stop=[", and"], extra_body={"guided_regex": regex})
    assert out.choices[0].finish_reason == "stop" and out.choices[0].text in ("yes", "no")


@pytest.mark.parametrize(("extra", "param"), [
    ({"guided_regex": "(ab"}, "guided_regex"),
    ({"guided_json": {"type": "no-such-type"}}, "guided_json"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_grammar": "root ::= undefined_rule"}, "guided_grammar"),
    ({"structured_outputs": {"json": {"type": "nope"}}}, "structured_outputs"),
    ({"structured_outputs": {}}, "structured_outputs"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 3}}}},
     "response_format"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, None),
    ({"structural_tag": {"type": "structural_tag", "format": {"type": "bogus"}}}, "structural_tag"),
])
def test_bad_grammars_are_400s_naming_the_field(client, server, extra, param):
    for call in (lambda: client.chat.completions.create(model="default", messages=QUESTION, extra_body=extra),
                 lambda: client.completions.create(model="default", prompt="x", extra_body=extra, stream=True)):
        with pytest.raises(openai.BadRequestError) as info:
            call()
        assert info.value.body["type"] == "invalid_request_error"
        assert info.value.body["param"] == param, info.value.body
    assert server.process.poll() is None
    ok = client.completions.create(model="default", prompt="x", max_tokens=2)
    assert ok.choices[0].text


def test_structural_tag(client):
    tag = {"type": "structural_tag", "format": {"type": "tag", "begin": "<answer>", "content": {
        "type": "json_schema", "json_schema": PERSON_SCHEMA}, "end": "</answer>"}}
    out = client.completions.create(model="default", prompt="Here:", temperature=0, max_tokens=60,
                                    extra_body={"structural_tag": tag})
    text = out.choices[0].text
    assert text.startswith("<answer>") and text.endswith("</answer>"), text
    check_person(text.removeprefix("<answer>").removesuffix("</answer>"))


def test_apply_bitmask_matches_xgrammar():
    vocab = 1000
    bitmask = torch.randint(-(2**31), 2**31 - 1, (4, xgr.get_bitmask_shape(1, vocab)[1]), dtype=torch.int32)
    logits = torch.randn(6, vocab)
    rows = [0, 2, 3, 5]
    ours, theirs = logits.clone(), logits.clone()
    apply_bitmask(ours, bitmask, rows)  # bitmask row j masks logits row rows[j]
    full = torch.zeros(6, bitmask.shape[1], dtype=torch.int32)
    full[rows] = bitmask
    xgr.apply_token_bitmask_inplace(theirs, full, indices=rows)
    assert torch.equal(ours, theirs)


# ---- the sampler's masks, as a property over mixed batches that preempt ----

SPECS = [StructuredOutputsParams(json=PERSON_SCHEMA), StructuredOutputsParams(regex=REGEX),
         StructuredOutputsParams(choice=tuple(CHOICES)), StructuredOutputsParams(json_object=True),
         StructuredOutputsParams(grammar=GRAMMAR)]


@pytest.fixture(scope="module")
def small_cache_llm():
    """The default model with a KV cache of a few blocks and no prefix cache, so a batch preempts."""
    from slipstream import LLM

    return LLM(kv_cache_memory=8 << 20, max_num_seqs=8, enable_prefix_caching=False)


# Derandomized and without shrinking: each example runs the model for a few seconds.
@settings(max_examples=3, deadline=None, derandomize=True, phases=[Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(constrained=st.lists(st.sampled_from(range(len(SPECS) + 1)), min_size=5, max_size=5),
       seed=st.integers(0, 2**16), temperature=st.sampled_from([0.7, 1.5]))
def test_constrained_sequences_never_leave_their_grammar(small_cache_llm, constrained, seed, temperature):
    llm = small_cache_llm
    engine = llm.engine
    preemptions = engine.scheduler.num_preemptions
    prompt = llm.tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    requests = {}
    # First, long unconstrained sequences that are admitted together and outgrow the cache, so that the
    # newer (constrained) sequences are preempted whatever they do.
    for i in range(3):
        engine.add_request(f"long{seed}-{i}", llm.tokenizer.encode(prompt),
                           SamplingParams(temperature=temperature, max_tokens=60, ignore_eos=True))
        requests[f"long{seed}-{i}"] = None
    for i, which in enumerate(constrained):
        spec = SPECS[which] if which < len(SPECS) else None  # the last index: unconstrained
        params = SamplingParams(temperature=temperature, seed=seed + i, max_tokens=40, structured_outputs=spec)
        engine.add_request(f"r{seed}-{i}", llm.tokenizer.encode(prompt), params)
        requests[f"r{seed}-{i}"] = spec
    tokens: dict[str, list[int]] = {rid: [] for rid in requests}
    finish: dict[str, str] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
            if out.finished:
                finish[out.request_id] = out.finish_reason
    assert engine.scheduler.num_preemptions > preemptions, "the batch was meant to preempt"
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(
        llm.tokenizer, vocab_size=engine.hf_config.vocab_size, stop_token_ids=sorted(engine.eos_token_ids)))
    for rid, spec in requests.items():
        if spec is None:
            continue
        matcher = xgr.GrammarMatcher(compiler.compile_grammar(build_grammar(spec)))
        for t in tokens[rid]:
            assert matcher.accept_token(t), (rid, spec.kind, llm.tokenizer.decode(tokens[rid]))
        assert (finish[rid] == "stop") == matcher.is_terminated(), (finish[rid], llm.tokenizer.decode(tokens[rid]))


def test_a_schema_compiles_once(small_cache_llm):
    manager = small_cache_llm.engine.structured_output
    first = manager.compile(StructuredOutputsParams(json=PERSON_SCHEMA, param="guided_json"))
    # The same schema in another form (its text, keys reordered) shares the compiled grammar.
    same = json.dumps(dict(reversed(PERSON_SCHEMA.items())))
    assert manager.compile(StructuredOutputsParams(json=same, param="response_format")) is first
    assert manager.compile(StructuredOutputsParams(regex=REGEX)) is not first
    assert first.result() is not None
