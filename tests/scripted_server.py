"""The real server with the test-only scripted architecture registered: `python tests/scripted_server.py
--model DIR [server flags]`, DIR written by `scripted_model.save_scripted_model`. Tests start it with
`running_scripted_server`, which waits for /health and stops it afterwards, as `running_server` does."""

from __future__ import annotations

from contextlib import AbstractContextManager

import scripted_model
from server_utils import RunningServer, running_server


def running_scripted_server(*args: str) -> AbstractContextManager[RunningServer]:
    return running_server(*args, launcher=(__file__,))


if __name__ == "__main__":
    from slipstream.entrypoints.openai import api_server

    scripted_model.register()
    api_server.main(prog="scripted_server")
