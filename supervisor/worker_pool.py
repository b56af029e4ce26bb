"""The gunicorn master that runs the workers: started as a fresh process (exec), never forked.

gunicorn owns worker lifecycle (spawn, respawn, graceful reload, TTIN/TTOU); this module owns
gunicorn: start it with the right environment, pass signals on, and stop it gracefully.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import sys

from apirouter.config import ServerConfig

log = logging.getLogger("apirouter.supervisor")

# gunicorn's own exit codes for a pool that cannot boot: respawning would only loop.
BOOT_FAILURE_CODES = {2: "gunicorn rejected its arguments", 3: "a worker failed to boot",
                      4: "the application failed to load"}


class WorkerPool:
    def __init__(self, server: ServerConfig, env: dict[str, str]) -> None:
        self.server = server
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def command(self) -> list[str]:
        s = self.server
        return [sys.executable, "-m", "gunicorn", "workers.app:make_app",
                "--config", "python:workers.gunicorn_conf",
                "--bind", s.bind, "--workers", str(s.workers),
                "--graceful-timeout", str(math.ceil(s.graceful_timeout_s)),
                "--keep-alive", str(math.ceil(s.keepalive_s)),
                "--timeout", str(max(30, int(s.request_timeout_s) + 10)),
                "--name", "apirouter"]

    async def start(self) -> None:
        env = {**os.environ, **self.env}
        self.proc = await asyncio.create_subprocess_exec(*self.command(), env=env)
        log.info("started gunicorn master pid %d with %d workers on %s",
                 self.proc.pid, self.server.workers, self.server.bind)

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(sig)

    async def wait(self) -> int:
        assert self.proc is not None
        return await self.proc.wait()

    async def stop(self, timeout: float) -> int | None:
        """Graceful stop: TERM lets in-flight requests finish; KILL after the timeout."""
        if self.proc is None or self.proc.returncode is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            log.error("gunicorn did not stop within %.1fs; killing it", timeout)
            self.proc.kill()
            return await self.proc.wait()
