"""What a server does about connections that hold resources without being served (the hostile-traffic probe's
findings): sockets that never send a request, or send its head a byte at a time, each hold a file descriptor; a
client that stops reading its stream held its --max-concurrency slot (and its request generated into memory) for
ever; a stream abandoned before its first event held its slot until the engine got to it. Real server processes,
raw sockets."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
from server_utils import running_server

from slipstream.entrypoints.openai.connections import OPEN_FILES_TARGET, REQUEST_HEAD_TIMEOUT_S

SEND_TIMEOUT_S = 3


def with_open_files_limit(soft: int, hard: int) -> tuple[str, ...]:
    """A launcher for running_server: the server under these limits on open files."""
    return ("-c", f"import resource, runpy; resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard})); "
                  "runpy.run_module('slipstream.entrypoints.openai.api_server', run_name='__main__')")


@pytest.fixture(scope="module")
def server():
    with running_server("--max-num-seqs", "8", "--max-concurrency", "3", "--send-timeout", str(SEND_TIMEOUT_S),
                        "--enable-logprob", "--max-model-len", "2048", launcher=with_open_files_limit(1024, 8192)) as s:
        yield s


def requests_state(server) -> dict:
    return httpx.get(f"{server.url}/v1/engine/stats", timeout=60).json()["requests"]


def wait_for(condition, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"{what}: not after {timeout} s"
        time.sleep(0.2)
    return time.monotonic() - start


def raw_post(server, path: str, body: dict, receive_buffer: int | None = None) -> socket.socket:
    """A request sent on a socket of our own, whose answer nobody reads unless the caller does."""
    sock = socket.socket()
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect(("127.0.0.1", int(server.url.rsplit(":", 1)[1])))
    data = json.dumps(body).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(0.5)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_the_open_files_limit_is_raised(server):
    """Started with a soft limit of 1024 (a common default) under a hard one of 8192: raised to 8192."""
    limits = open(f"/proc/{server.process.pid}/limits").read()
    soft, hard = next(line for line in limits.splitlines() if line.startswith("Max open files")).split()[3:5]
    assert (int(soft), int(hard)) == (min(OPEN_FILES_TARGET, 8192), 8192), limits


def test_a_stream_nobody_reads_ends_after_the_send_timeout(server):
    """A client that asked for a stream and never reads it (a tiny receive buffer, no recv): once the buffers between
    are full, its response waits on it; after --send-timeout the response ends, its engine requests with it, and
    its slot is free again (it was held for as long as the socket stayed open)."""
    sock = raw_post(server, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 400, "n": 8,
                                                "logprobs": 20, "ignore_eos": True, "stream": True}, 4096)
    try:
        wait_for(lambda: requests_state(server)["in_flight_http"] == 1, 60, "the request arrives")
        wait_for(lambda: requests_state(server)["in_flight_http"] == 0, 300, "the stalled stream's slot is freed")
        # (the slot is freed as the response ends; the engine thread ends its requests between two steps)
        wait_for(lambda: requests_state(server)["running"] == 0, 30, "its engine requests end")
        assert "the client took none of its response for 3 s (--send-timeout): ended" in server.log()
        r = httpx.post(f"{server.base_url}/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=600)
        assert r.status_code == 200
    finally:
        sock.close()


def test_a_stream_abandoned_while_its_prompt_waits_frees_its_slot_at_once(server):
    """A streamed request whose client leaves while its prompt waits for the prompt worker (here behind a chat of
    400,000 messages, seconds of template rendering): its slot was held until its prompt was tokenized and the
    engine had taken it; now it is free at once, as a request that is not streamed is."""
    slow_done = threading.Event()

    def slow_chat() -> None:
        messages = [{"role": "user", "content": "a"}] * 400_000
        httpx.post(f"{server.base_url}/chat/completions", json={"messages": messages, "max_tokens": 1}, timeout=600)
        slow_done.set()

    slow = threading.Thread(target=slow_chat)
    slow.start()
    wait_for(lambda: requests_state(server)["in_flight_http"] == 1, 60, "the slow chat is in")
    abandoned = raw_post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                          "max_tokens": 4, "stream": True})
    wait_for(lambda: requests_state(server)["in_flight_http"] == 2, 60, "the stream is in")
    abandoned.close()
    wait_for(lambda: requests_state(server)["in_flight_http"] == 1, 60, "the abandoned stream's slot is freed")
    assert not slow_done.is_set(), "the slow chat ended first: nothing was checked"
    slow.join(timeout=600)
    assert requests_state(server) == {"running": 0, "waiting": 0, "in_flight_http": 0}


def test_a_stream_abandoned_in_the_engine_queue_leaves_it(server):
    """The same while the engine queue holds it (all 8 sequences busy): its slot and its place in the queue go."""
    busy = raw_post(server, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 1500, "n": 8,
                                                "ignore_eos": True})
    try:
        wait_for(lambda: requests_state(server)["running"] == 8, 60, "the busy request runs")
        waiting = raw_post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                            "max_tokens": 4, "stream": True})
        wait_for(lambda: requests_state(server)["waiting"] == 1, 60, "the stream waits")
        assert requests_state(server)["in_flight_http"] == 2
        waiting.close()
        wait_for(lambda: requests_state(server)["in_flight_http"] == 1, 10, "the abandoned stream's slot is freed")
        wait_for(lambda: requests_state(server)["waiting"] == 0, 10, "the abandoned stream leaves the queue")
        assert requests_state(server)["running"] == 8  # (the busy request still runs)
    finally:
        busy.close()
    wait_for(lambda: requests_state(server)["in_flight_http"] == 0, 60, "the busy request ends with its client")


def test_a_request_of_many_sequences_does_not_hold_back_a_later_one(server):
    """24 prompts (24 sequences, 8 run at a time) then a chat of as many tokens: the chat was admitted after all 24,
    and ended with them at best; admitted in turns, it ends while the big request's later sequences still run."""
    done: dict[str, float] = {}

    def post(name: str, path: str, body: dict) -> None:
        r = httpx.post(f"{server.base_url}/{path}", json={**body, "max_tokens": 24, "ignore_eos": True}, timeout=600)
        assert r.status_code == 200, r.text
        done[name] = time.monotonic()

    big = threading.Thread(target=post, args=("big", "completions", {"prompt": [f"Story {i}:" for i in range(24)]}))
    big.start()
    wait_for(lambda: requests_state(server)["waiting"] > 0, 60, "the big request queues")
    post("chat", "chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})
    big.join(600)
    assert done["chat"] < done["big"], done


def test_a_connection_that_sends_no_whole_request_head_is_closed(server):
    """A socket that sends nothing and one that sends its head a byte a second are closed REQUEST_HEAD_TIMEOUT_S
    after they opened (both were kept for ever: enough of them took every file descriptor); a client that sends its
    request is served meanwhile."""
    port = int(server.url.rsplit(":", 1)[1])
    idle, slow = socket.create_connection(("127.0.0.1", port)), socket.create_connection(("127.0.0.1", port))
    start, head, closed_after = time.monotonic(), b"GET /health HTTP/1.1\r\nHost: slowly-slowly-slowly\r\n", {}
    try:
        for i in range(int(REQUEST_HEAD_TIMEOUT_S) + 10):
            if "slow" not in closed_after:
                try:
                    slow.send(head[i:i + 1])
                except OSError:
                    closed_after["slow"] = time.monotonic() - start
            for name, sock in (("idle", idle), ("slow", slow)):
                if name not in closed_after and closed_by_server(sock):
                    closed_after[name] = time.monotonic() - start
            if i == 5:
                assert httpx.get(f"{server.url}/health", timeout=60).status_code == 200
            if len(closed_after) == 2:
                break
            time.sleep(max(0.0, i + 1 - (time.monotonic() - start)))
    finally:
        idle.close()
        slow.close()
    assert set(closed_after) == {"idle", "slow"}, closed_after
    assert all(REQUEST_HEAD_TIMEOUT_S - 1 < t < REQUEST_HEAD_TIMEOUT_S + 8 for t in closed_after.values()), closed_after


def test_sockets_past_the_open_files_limit_wait_quietly_and_are_served_once_others_close():
    """Past the open-files limit the server accepts nobody: asyncio logged a traceback for every refused accept
    (250,000 in 40 s, 112 MB of log); now a warning at most every 10 s, and the waiting connections are served as
    soon as descriptors free up."""
    with running_server(launcher=with_open_files_limit(400, 400)) as limited:
        port = int(limited.url.rsplit(":", 1)[1])
        flood = [socket.create_connection(("127.0.0.1", port)) for _ in range(600)]
        try:
            time.sleep(5)
            log = limited.log()
            assert "new connections wait: out of file descriptors" in log
            assert log.count("out of file descriptors") <= 2 and "Traceback" not in log, log[-3000:]
            waiting = threading.Thread(target=lambda: results.append(
                httpx.get(f"{limited.url}/health", timeout=120).status_code))
            results: list[int] = []
            waiting.start()
            time.sleep(2)
            assert not results  # (not accepted yet: its connection waits in the listen backlog)
        finally:
            for sock in flood:
                sock.close()
        waiting.join(timeout=120)
        assert results == [200]
