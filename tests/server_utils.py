"""Start the real server (`python -m slipstream.entrypoints.openai.api_server`) as a subprocess on a
free port, wait for /health, stop it afterwards. Test modules start one per module."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

# The default dtype is exact (float32); a small KV cache and context keep the server light on a 2-core machine.
DEFAULT_ARGS = ["--kv-cache-memory", "256MiB", "--log-level", "info"]
START_TIMEOUT_S = 600  # the model loads in seconds, but CI machines can be slow and busy

# The seed's Python example (FastDeploy's docs) sends exactly this conversation.
SEED_MESSAGES = [
    {"role": "system", "content": "I'm a helpful AI assistant."},
    {"role": "user", "content": "把李白的静夜思改写为现代诗"},
]


@dataclass
class RunningServer:
    url: str  # http://127.0.0.1:PORT
    process: subprocess.Popen
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(*args: str, env: dict[str, str] | None = None,
                   launcher: tuple[str, ...] = ("-m", "slipstream.entrypoints.openai.api_server"),
                   ) -> Iterator[RunningServer]:
    port = free_port()
    cmd = [sys.executable, *launcher, "--host", "127.0.0.1", "--port", str(port), *DEFAULT_ARGS, *args]
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "server.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        server = RunningServer(f"http://127.0.0.1:{port}", proc, log_path)
        try:
            _wait_healthy(server)
            yield server
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_healthy(server: RunningServer) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"the server exited with {server.process.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(0.2)
    raise RuntimeError(f"the server was not healthy after {START_TIMEOUT_S} s:\n{server.log()}")
