"""`slipstream bench`: the offline throughput run on the real engine and the serving client against a real
slipstream server process over HTTP."""

from __future__ import annotations

import contextlib
import io
import json

import httpx
import pytest
from server_utils import running_server

from slipstream.bench import main
from slipstream.bench.report import emit


def run_json(*argv: str) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([*argv, "--json"]) == 0
    return json.loads(out.getvalue())


@pytest.fixture(scope="module")
def throughput() -> dict:
    return run_json("throughput", "--num-prompts", "2", "--input-len", "8", "--output-len", "4",
                    "--kv-cache-memory", "64MiB")


def test_throughput_generates_exactly_the_requested_tokens(throughput):
    assert throughput["num_prompts"] == 2
    assert throughput["output_tokens"] == 2 * 4  # ignore_eos: no request stops early
    assert throughput["dtype"] == "float32"
    assert throughput["output_tok_per_s"] > 0
    assert throughput["total_tok_per_s"] == pytest.approx(throughput["output_tok_per_s"] * (8 + 4) / 4)
    assert 0 < throughput["ttft_ms"]["p50"] <= throughput["elapsed_s"] * 1000
    assert throughput["decode_tok_per_s_per_seq"] == pytest.approx(1000 / throughput["tpot_ms"]["mean"])
    # The float32 weights alone (135M parameters) are over 500 MiB resident.
    assert throughput["peak_rss_mib"] > 500


def test_text_report_lists_every_figure(throughput, capsys):
    emit("Offline Throughput Benchmark", throughput, as_json=False)
    text = capsys.readouterr().out
    assert "Offline Throughput Benchmark" in text
    assert "output_tokens:" in text and "ttft_ms p99:" in text and "peak_rss_mib:" in text


@pytest.fixture(scope="module")
def server():
    with running_server() as running:
        yield running.url


def test_serve_chat_closed_loop(server):
    r = run_json("serve", "--base-url", server, "--num-prompts", "4", "--max-concurrency", "2",
                 "--input-len", "40", "--output-len", "6")
    assert (r["completed"], r["failed"]) == (4, 0)
    assert r["endpoint"] == "chat" and r["max_concurrency"] == 2 and r["request_rate"] is None
    assert r["output_tokens"] == 4 * 6  # exact: the server honours ignore_eos and min_tokens
    # Prompts are sized with the server's own tokenizer and chat template.
    assert r["mean_input_tokens"] == 40
    assert r["ttft_ms"]["mean"] > 0 and r["itl_ms"]["p50"] > 0
    assert r["ttft_ms"]["mean"] < r["e2el_ms"]["mean"]
    assert r["output_tok_per_s"] == pytest.approx(r["output_tokens"] / r["duration_s"])


def test_serve_completions_with_poisson_arrivals(server):
    models = httpx.get(f"{server}/v1/models", trust_env=False).json()["data"]
    r = run_json("serve", "--base-url", server, "--model", models[0]["id"], "--endpoint", "completions",
                 "--num-prompts", "3", "--request-rate", "20", "--input-len", "24", "--output-len", "5")
    assert (r["completed"], r["failed"]) == (3, 0)
    assert r["request_rate"] == 20 and r["model"] == models[0]["id"]
    assert r["output_tokens"] == 3 * 5
    assert r["mean_input_tokens"] == 24
    assert r["tpot_ms"]["mean"] > 0 and r["ttft_ms"]["p50"] < r["e2el_ms"]["p50"]


def test_serve_fails_loudly_when_the_server_rejects_requests(server):
    with pytest.raises(SystemExit, match="400"):
        main(["serve", "--base-url", server, "--num-prompts", "1", "--extra-body", '{"max_tokens": 0}'])
