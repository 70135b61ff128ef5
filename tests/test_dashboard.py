"""The serving observatory on a real server (default model, an API key set): Debian's chromium, driven by
Playwright, opens /dashboard while `slipstream bench serve` loads the server at two concurrency levels. The
numbers on the page move, agree with /metrics, and finished requests appear in the timeline with their finish
reason; the JSON API behind the page is checked directly, and so are the API key, the one shared event stream
and --disable-dashboard. Screenshots go to $SLIPSTREAM_TEST_ARTIFACTS (default: test-artifacts/)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from server_utils import running_server
from test_server_under_load import gauges as all_gauges

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
KEY = "dashboard-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ARTIFACTS = Path(os.environ.get("SLIPSTREAM_TEST_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts"))
OUTPUT_LEN = 32

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="Debian's chromium is not installed (`make test` installs it as root)")


@pytest.fixture(scope="module")
def server():
    with running_server("--api-key", KEY, "--max-model-len", "1024", "--max-num-seqs", "8") as s:
        yield s


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        errors: list[str] = []
        tab = browser.new_page(viewport={"width": 1280, "height": 1000})
        tab.on("pageerror", lambda e: errors.append(str(e)))
        tab.goto(f"{server.url}/dashboard#key={KEY}")
        tab.wait_for_function("document.getElementById('health').textContent === 'ok'", timeout=30_000)
        yield tab
        assert not errors, errors
        browser.close()


def gauges(url: str) -> dict[str, float]:
    """/metrics, with the counters that have no sample before the first request at 0."""
    return {"generation_tokens_total": 0.0, "prompt_tokens_total": 0.0, **all_gauges(url)}


def on_page(page, testid: str) -> int:
    return int(page.get_by_test_id(testid).inner_text())


def start_load(server, concurrency: int, num_prompts: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "slipstream.entrypoints.cli", "bench", "serve", "--base-url", server.url,
         "--api-key", KEY, "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency),
         "--input-len", "64", "--output-len", str(OUTPUT_LEN), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def watch_under_load(server, page, concurrency: int, num_prompts: int) -> dict[str, list[int]]:
    """Run the benchmark while sampling the page; a screenshot half-way. Returns the sampled values."""
    load = start_load(server, concurrency, num_prompts)
    seen: dict[str, list[int]] = {"generation": [], "running": []}
    shot = False
    while load.poll() is None:
        seen["generation"].append(on_page(page, "generation-tokens"))
        seen["running"].append(on_page(page, "running"))
        if not shot and seen["generation"][-1] >= num_prompts * OUTPUT_LEN // 2 + seen["generation"][0]:
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=ARTIFACTS / f"dashboard-c{concurrency}.png", full_page=True)
            shot = True
        time.sleep(0.25)
    out, _ = load.communicate()
    assert load.returncode == 0, out
    assert shot, seen
    return seen


def settled(server, page) -> None:
    """Wait until the page shows what /metrics says once the load is over (the stream updates at 2 Hz)."""
    deadline = time.monotonic() + 10
    while True:
        m = gauges(server.url)
        shown = (on_page(page, "generation-tokens"), on_page(page, "running"))
        if shown == (m["generation_tokens_total"], m["num_requests_running"]) or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert shown == (m["generation_tokens_total"], m["num_requests_running"]) and shown[1] == 0, (shown, m)


@pytest.mark.parametrize("concurrency", [1, 6])
def test_the_page_follows_a_load(server, page, concurrency: int) -> None:
    num_prompts = 6 if concurrency == 1 else 18
    before = gauges(server.url)["generation_tokens_total"]
    seen = watch_under_load(server, page, concurrency, num_prompts)
    generation = seen["generation"]
    assert len(set(generation)) >= 3 and generation == sorted(generation), "the token count did not move"
    assert (2 if concurrency > 1 else 1) <= max(seen["running"]) <= concurrency
    settled(server, page)
    assert gauges(server.url)["generation_tokens_total"] == before + (num_prompts + 1) * OUTPUT_LEN  # + warm-up
    # Finished requests are in the timeline with their finish reason; a click shows their settings.
    rows = page.locator("#timeline g.req[data-finish-reason='length']")
    assert rows.count() >= num_prompts
    rows.first.dispatch_event("click")
    detail = page.locator("#detail").inner_text()
    assert "(length)" in detail and f'"max_tokens":{OUTPUT_LEN}' in detail and '"endpoint":"chat"' in detail
    assert "prompt:" not in detail  # no prompt text without --dashboard-show-prompts


def test_the_json_api(server) -> None:
    for path in ("/v1/engine/stats", "/v1/engine/requests", "/v1/engine/stream"):
        r = httpx.get(server.url + path, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/dashboard", timeout=30).status_code == 200  # the page holds no data
    body = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 5, "temperature": 0,
            "response_format": {"type": "json_object"}}
    assert httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=AUTH, timeout=120).status_code == 200
    [latest] = httpx.get(f"{server.url}/v1/engine/requests?limit=1", headers=AUTH, timeout=30).json()["requests"]
    assert latest["state"] == "finished" and latest["finish_reason"] in ("length", "stop")
    assert latest["params"]["constrained"] == "json_object" and latest["tags"] == {
        "endpoint": "chat", "stream": False, "tools": 0}
    assert latest["arrival"] <= latest["scheduled"] <= latest["chunks"][0][0] <= latest["first_token"]
    assert latest["first_token"] <= latest["finished"] <= time.time()
    # (a grammar still compiling holds the prompt's last token back: then that is a chunk of its own)
    assert sum(n for _, _, n in latest["chunks"]) == latest["prompt_tokens"] - latest["cached_tokens"] > 0
    stats = httpx.get(f"{server.url}/v1/engine/stats", headers=AUTH, timeout=30).json()
    m = gauges(server.url)
    assert stats["totals"]["generation_tokens"] == m["generation_tokens_total"]
    assert stats["totals"]["prompt_tokens"] == m["prompt_tokens_total"]
    kv = stats["kv_cache"]
    assert kv["blocks_used"] == 0 and kv["blocks_cached"] > 0
    assert kv["blocks_used"] + kv["blocks_cached"] + kv["blocks_free"] == kv["blocks_total"]
    assert stats["health"] == {"status": "ok", "error": None, "ranks": [{"rank": 0, "alive": True}]}
    assert stats["recorder"]["latency"]["ttft"]["count"] >= 1
    for bad in ("0", "201", "x", "-1"):
        r = httpx.get(f"{server.url}/v1/engine/requests?limit={bad}", headers=AUTH, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "limit"


def test_viewers_share_one_stream(server) -> None:
    """Every viewer gets the very same events (one producer), whatever the number of viewers."""

    def frames(n: int) -> list[str]:
        out: list[str] = []
        with httpx.stream("GET", f"{server.url}/v1/engine/stream", headers=AUTH, timeout=30) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith("data: "):
                    out.append(line)
                    if len(out) == n:
                        break
        return out

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(frames, [4] * 4))
    times = [{json.loads(f[6:])["stats"]["time"]: f for f in r} for r in results]
    common = set.intersection(*(set(t) for t in times))
    assert common, "the viewers saw no event in common"
    for t in common:
        assert len({tt[t] for tt in times}) == 1  # byte for byte the same event


def test_disable_dashboard() -> None:
    with running_server("--disable-dashboard", "--max-model-len", "512") as s:
        for path in ("/dashboard", "/v1/engine/stats", "/v1/engine/requests", "/v1/engine/stream"):
            r = httpx.get(s.url + path, timeout=30)
            assert r.status_code == 404 and "error" in r.json()
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
        assert httpx.post(f"{s.url}/v1/chat/completions", json=body, timeout=120).status_code == 200
