"""The real server with the test-only scripted architecture registered: `python tests/scripted_server.py
--model DIR [server flags]`, DIR written by `scripted_model.save_scripted_model`. Tests start it with
`running_scripted_server`, which waits for /health and stops it afterwards, as `running_server` does."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import scripted_model
from server_utils import DEFAULT_ARGS, RunningServer, _wait_healthy, free_port


@contextmanager
def running_scripted_server(*args: str) -> Iterator[RunningServer]:
    port = free_port()
    cmd = [sys.executable, __file__, "--host", "127.0.0.1", "--port", str(port), *DEFAULT_ARGS, *args]
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "server.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
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


if __name__ == "__main__":
    from slipstream.entrypoints.openai import api_server

    scripted_model.register()
    api_server.main(prog="scripted_server")
