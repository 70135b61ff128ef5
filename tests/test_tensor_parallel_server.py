"""Tensor parallelism through the real server: a tiny ERNIE 4.5 (16 heads, 2 KV heads, head_dim 128
like the real 0.3B) split 2, 4 and 8 ways on this 2-core machine, two "nodes" on 127.0.0.1, and a
worker that dies."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch

from slipstream import LLM, SamplingParams, StructuredOutputsParams
from tests.server_utils import DEFAULT_ARGS, free_port, running_server
from tests.tiny_models import save_tiny_model

PROMPTS = ["The quick brown fox", "def fibonacci(n):", "中国的首都是"]
MESSAGES = [{"role": "user", "content": "Once upon a time"}]


@pytest.fixture(scope="module")
def ernie_dir(tmp_path_factory):
    return save_tiny_model("ernie4_5", tmp_path_factory.mktemp("ernie"), num_layers=2, hidden_size=1024,
                           num_heads=16, num_kv_heads=2, head_dim=128, intermediate_size=256,
                           tie_word_embeddings=True)


@pytest.fixture(scope="module")
def reference(ernie_dir):
    """transformers' greedy tokens and log-softmax at each step, float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ernie_dir)
    model = AutoModelForCausalLM.from_pretrained(ernie_dir, dtype=torch.float32).eval()
    out = []
    for prompt in PROMPTS:
        ids = tok.encode(prompt, return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=8, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
        tokens = gen.sequences[0, ids.shape[1]:].tolist()
        logprobs = [lg[0].log_softmax(-1) for lg in gen.logits]
        out.append((ids[0].tolist(), tokens, logprobs))
    return out


@pytest.mark.parametrize("size", [2, 4])
def test_tiny_ernie_matches_transformers(ernie_dir, reference, size):
    llm = LLM(str(ernie_dir), kv_cache_memory=64 << 20, tensor_parallel_size=size)
    try:
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=5)
        results = llm.generate([ids for ids, _, _ in reference], params)
    finally:
        llm.engine.shutdown()
    for (_, tokens, ref_lps), result in zip(reference, results, strict=True):
        out = result.outputs[0]
        assert out.token_ids == tokens
        for lp, ref in zip(out.logprobs, ref_lps, strict=True):
            assert abs(lp.logprob - ref[lp.token_id].item()) < 1e-4
            for token_id, value in lp.top:
                assert abs(value - ref[token_id].item()) < 1e-4


def test_structured_outputs_under_tensor_parallelism(ernie_dir):
    """The grammar lives with the sampler on rank 0: a constrained batch decodes the same on 2 ranks as on 1."""
    regex = "[a-z]{2,6} [a-z]{2,6}"
    params = SamplingParams(temperature=0, max_tokens=24, structured_outputs=StructuredOutputsParams(regex=regex))
    texts = []
    for size in (1, 2):
        llm = LLM(str(ernie_dir), kv_cache_memory=64 << 20, tensor_parallel_size=size)
        try:
            texts.append([(r.outputs[0].text, r.outputs[0].finish_reason) for r in llm.generate(PROMPTS, params)])
        finally:
            llm.engine.shutdown()
    assert texts[0] == texts[1]
    assert all(re.fullmatch(regex, text) and reason == "stop" for text, reason in texts[0]), texts[0]


def _chat(base_url: str) -> tuple[str, list[int]]:
    client = openai.OpenAI(base_url=base_url, api_key="null")
    r = client.chat.completions.create(model="null", messages=MESSAGES, max_tokens=8, temperature=0,
                                       extra_body={"return_token_ids": True, "ignore_eos": True})
    return r.choices[0].message.content, r.choices[0].message.completion_token_ids


@pytest.fixture(scope="module")
def tp1_answer(ernie_dir):
    with running_server("--model", str(ernie_dir)) as server:
        return _chat(server.base_url)


def test_tp8_on_two_cores_answers_like_tp1(ernie_dir, tp1_answer):
    with running_server("--model", str(ernie_dir), "--tensor-parallel-size", "8") as server:
        assert _chat(server.base_url) == tp1_answer
        ranks = httpx.get(f"{server.url}/v1/engine/stats", timeout=30).json()["health"]["ranks"]
        assert ranks == [{"rank": r, "alive": True} for r in range(8)]  # the dashboard's per-rank state


def test_two_nodes_on_loopback_answer_like_tp1(ernie_dir, tp1_answer):
    port = str(free_port())
    node = ["--model", str(ernie_dir), "--tensor-parallel-size", "2", "--nnodes", "2", "--master-addr",
            "127.0.0.1", "--master-port", port]
    worker = subprocess.Popen([sys.executable, "-m", "slipstream.entrypoints.openai.api_server", *DEFAULT_ARGS,
                               *node, "--node-rank", "1"])
    try:
        with running_server(*node, "--node-rank", "0") as server:
            assert _chat(server.base_url) == tp1_answer
        assert worker.wait(timeout=60) == 0  # node 0 stopping stops node 1's workers
    finally:
        if worker.poll() is None:
            worker.kill()


def _alive(pid: int) -> bool:
    """Running, not merely a zombie waiting to be reaped."""
    try:
        return "Z" not in open(f"/proc/{pid}/stat").read().split()[2]
    except FileNotFoundError:
        return False


def _children(pid: int) -> dict[int, str]:
    out = subprocess.run(["ps", "-ww", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return {int(pid): args for pid, args in (line.split(None, 1) for line in out.splitlines())}


def test_a_dead_worker_takes_the_server_down(ernie_dir):
    with running_server("--model", str(ernie_dir), "--tensor-parallel-size", "2") as server:
        children = _children(server.process.pid)
        workers = [pid for pid, args in children.items() if "spawn_main" in args]
        assert len(workers) == 1, f"one tensor-parallel worker expected among {children}"
        os.kill(workers[0], signal.SIGKILL)
        deadline = time.monotonic() + 60
        saw_503 = False
        while server.process.poll() is None and time.monotonic() < deadline:
            try:
                saw_503 |= httpx.get(f"{server.url}/health", timeout=2).status_code == 503
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        assert server.process.wait(timeout=30) != 0
        assert "tensor-parallel worker exited" in server.log()
        assert saw_503 or "stopping" in server.log()
        # The other rank and multiprocessing's resource tracker are gone too (they notice their parent's exit
        # a moment after it, so give them a few seconds; an orphan would stay for good).
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in children if _alive(pid)], children


def test_sigterm_exits_0_and_leaves_no_process(ernie_dir):
    with running_server("--model", str(ernie_dir), "--tensor-parallel-size", "2") as server:
        assert _chat(server.base_url)
        children = _children(server.process.pid)
        assert any("spawn_main" in args for args in children.values()), children
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0, server.log()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in children if _alive(pid)], children
