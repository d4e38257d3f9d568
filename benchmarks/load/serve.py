"""Serve examples/fastapi_app with uvicorn on 127.0.0.1 and an ephemeral port.

Prints the port on the first line of standard output, then serves until SIGTERM/SIGINT.
Settings come from the environment (``RAG_EXAMPLE_*``, ``RAG_INSTRUMENT_*``); see run.py.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import uvicorn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    print(sock.getsockname()[1], flush=True)
    config = uvicorn.Config(
        "examples.fastapi_app.app:create_app",
        factory=True,
        log_level="warning",
        access_log=False,
        lifespan="on",
    )
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
