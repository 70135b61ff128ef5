"""The `slipstream` command's own subcommands, run as a user runs them: the console script, a real model,
`slipstream chat` in a pseudo-terminal (pexpect)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pexpect
from prometheus_client.parser import text_string_to_metric_families
from server_utils import free_port, running_server

from slipstream import LLM, SamplingParams

CLI = [str(Path(sys.executable).parent / "slipstream")]
QUESTIONS = ["What is the capital of France?", "Name a colour.", "Say hello.", "Count to three.", "Name a fruit."]


def test_run_batch_answers_every_line_in_order_and_records_errors(tmp_path):
    lines = []
    for i in range(17):
        if i % 2:
            body = {"messages": [{"role": "user", "content": QUESTIONS[i % 5]}], "max_tokens": 6, "temperature": 0}
            lines.append({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
        else:
            body = {"prompt": QUESTIONS[i % 5], "max_tokens": 4, "temperature": 0, "n": 1 + i % 3}
            lines.append({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/completions", "body": body})
    lines = [json.dumps(line) for line in lines]
    lines.insert(3, '{"custom_id": "broken", "url": ')  # not JSON
    lines.insert(8, json.dumps({"custom_id": "no-url", "body": {}}))  # not a request
    lines.insert(12, json.dumps({"custom_id": "bad-body", "method": "POST", "url": "/v1/chat/completions",
                                 "body": {"messages": QUESTIONS[:1], "temperature": -1}}))  # a 400, as over HTTP
    requests, results = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    requests.write_text("\n".join(lines) + "\n")

    r = subprocess.run([*CLI, "run-batch", "-i", str(requests), "-o", str(results), "--kv-cache-memory", "64MiB"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "20/20" in r.stderr  # the progress bar
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(records) == 20
    assert [r["custom_id"] for r in records] == [None if i == 3 else json.loads(line)["custom_id"]
                                                 for i, line in enumerate(lines)]  # in input order
    by_id = {r["custom_id"]: r for r in records}
    assert records[3]["custom_id"] is None and records[3]["error"]["code"] == "invalid_json"
    assert by_id["no-url"]["error"] is not None and by_id["no-url"]["response"] is None
    bad = by_id["bad-body"]["response"]
    assert bad["status_code"] == 400 and bad["body"]["error"]["param"] == "temperature"

    # The answers are the engine's own: greedy, as the offline LLM gives them.
    llm = LLM(kv_cache_memory=64 << 20)
    chat = by_id["req-1"]["response"]
    assert chat["status_code"] == 200 and chat["body"]["object"] == "chat.completion"
    want = llm.chat([[{"role": "user", "content": QUESTIONS[1]}]], SamplingParams(temperature=0, max_tokens=6))
    assert chat["body"]["choices"][0]["message"]["content"] == want[0].outputs[0].text
    completion = by_id["req-2"]["response"]["body"]
    assert len(completion["choices"]) == 3 and completion["object"] == "text_completion"


def _prompt_tokens(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "slipstream:prompt_tokens_total")


def test_chat_in_a_terminal_keeps_the_conversation_until_clear():
    with running_server("--max-model-len", "512") as server:
        chat = pexpect.spawn(CLI[0], ["chat", "--url", server.base_url, "--max-tokens", "8", "--temperature", "0"],
                             encoding="utf-8", timeout=120, dimensions=(40, 200))
        chat.expect("/exit")
        turns = []
        for text in ("Hi there", "And what is your name?", "/clear", "Hi there"):
            before = _prompt_tokens(server.url)
            chat.expect_exact("> ")
            chat.sendline(text)
            if text == "/clear":
                chat.expect_exact("(conversation cleared)")
                continue
            chat.expect_exact(text + "\r\n")  # the terminal echoes the line
            chat.expect_exact("\r\n> ")  # the streamed answer, then the next prompt
            turns.append((chat.before.strip(), _prompt_tokens(server.url) - before))
            chat.sendline("")  # (an empty line asks nothing: it gives the prompt back)
        (first, first_prompt), (_, second_prompt), (again, again_prompt) = turns
        assert first and second_prompt > first_prompt  # the second turn carried the first
        assert (again, again_prompt) == (first, first_prompt)  # after /clear: a new conversation, same answer
        chat.expect_exact("> ")
        chat.sendline("/exit")
        chat.expect(pexpect.EOF)
        chat.close()
        assert chat.exitstatus == 0

        r = subprocess.run([*CLI, "complete", "--url", server.base_url, "--max-tokens", "5", "--temperature", "0",
                            "Once upon a time"], capture_output=True, text=True, timeout=120)
        want = httpx.post(f"{server.base_url}/completions", timeout=120, json={
            "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0}).json()["choices"][0]["text"]
        assert r.returncode == 0 and r.stdout == want + "\n"


def test_the_terminal_clients_say_when_no_server_answers():
    """They printed only the openai client's "Connection error."."""
    url = f"http://127.0.0.1:{free_port()}/v1"
    for command in (["complete", "Once upon a time"], ["chat"]):
        r = subprocess.run([*CLI, *command, "--url", url], capture_output=True, text=True, timeout=120, input="")
        assert r.returncode == 1 and f"cannot reach a server at {url}" in r.stderr and "slipstream serve" in r.stderr
