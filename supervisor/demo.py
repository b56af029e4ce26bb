"""`apirouter serve --demo`: two mock backends on free loopback ports and a config routing to them.

This is the embedded default a newcomer gets with no config file and no services.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import sys
from typing import Any

log = logging.getLogger("apirouter.supervisor")

DEMO_MODELS = ("gpt-4o-mini", "demo-model")
DEMO_TOKEN = "demo"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def demo_config(ports: dict[str, int]) -> dict[str, Any]:
    """Every demo model is served by both mocks, weighted 3:1 so routing is visible."""
    weights = {"mock-a": 3, "mock-b": 1}
    return {
        # Demo only: the API key "demo" is accepted, with every scope.
        "keys": {"demo": {"sha256": hashlib.sha256(DEMO_TOKEN.encode()).hexdigest(),
                          "org": "demo", "scopes": ["inference", "audit", "admin"],
                          "tier": "admin"}},
        "backends": {name: {"url": f"http://127.0.0.1:{port}"} for name, port in ports.items()},
        "models": {m: {"backends": [{"backend": b, "weight": weights[b]} for b in ports]}
                   for m in DEMO_MODELS},
    }


class DemoBackends:
    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []
        self.ports = {"mock-a": free_port(), "mock-b": free_port()}

    async def start(self) -> None:
        for name, port in self.ports.items():
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tools.mock_backend", "--bind", f"127.0.0.1:{port}",
                "--name", name, "--models", ",".join(DEMO_MODELS), "--latency-ms", "5",
                stdout=asyncio.subprocess.DEVNULL)
            self.procs.append(proc)
        for port in self.ports.values():
            await _wait_port(port)
        log.info("demo mock backends up on ports %s", sorted(self.ports.values()))

    async def stop(self) -> None:
        for p in self.procs:
            if p.returncode is None:
                p.terminate()
        for p in self.procs:
            await p.wait()


async def _wait_port(port: int, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            if loop.time() > deadline:
                raise RuntimeError(f"mock backend on port {port} did not start") from None
            await asyncio.sleep(0.02)
