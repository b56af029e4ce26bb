"""The gunicorn master that runs the workers: started as a fresh process (exec), never forked.

gunicorn owns worker lifecycle (spawn, respawn, graceful reload, TTIN/TTOU); this module owns
gunicorn: start it with the right environment, pass signals on, and stop it gracefully.

A supervisor that died leaves its gunicorn master serving (orphaned, reparented to init). A
successor on the same run directory *adopts* that master instead of starting a second pool on
the same port: no gap in listening, no worker killed mid-request. The adopted master is not our
child, so it is watched through a pidfd (polled where there is none) and stopped by signal;
once it is gone the supervisor starts a pool of its own as usual.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import sys

from apirouter.config import LOG_LEVEL_ENV, ServerConfig
from apirouter.runstate import pid_alive
from apirouter.shm import TABLE_SEGMENT_ENV

log = logging.getLogger("apirouter.supervisor")

# gunicorn's own exit codes for a pool that cannot boot: respawning would only loop.
ADOPTED_POLL_S = 0.2
BOOT_FAILURE_CODES = {2: "gunicorn rejected its arguments", 3: "a worker failed to boot",
                      4: "the application failed to load"}


class WorkerPool:
    def __init__(self, server: ServerConfig, env: dict[str, str]) -> None:
        self.server = server
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.adopted: int | None = None  # pid of an orphaned master taken over

    @property
    def pid(self) -> int | None:
        if self.adopted is not None:
            return self.adopted
        return self.proc.pid if self.proc is not None else None

    def adopt(self, pid: int) -> None:
        self.adopted = pid
        log.warning("adopted the orphaned gunicorn master pid %d (its workers go on serving)",
                    pid)

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
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
        env = {**os.environ, LOG_LEVEL_ENV: level, **self.env}
        self.proc = await asyncio.create_subprocess_exec(*self.command(), env=env)
        log.info("started gunicorn master pid %d with %d workers on %s",
                 self.proc.pid, self.server.workers, self.server.bind)

    def signal(self, sig: int) -> None:
        if self.adopted is not None:
            try:
                os.kill(self.adopted, sig)
            except ProcessLookupError:
                pass
        elif self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(sig)

    async def wait(self) -> int:
        if self.adopted is not None:
            await _exited(self.adopted)
            log.error("the adopted gunicorn master pid %d has exited", self.adopted)
            self.adopted = None
            return -1  # not our child: its exit status is not ours to read
        assert self.proc is not None
        return await self.proc.wait()

    async def stop(self, timeout: float) -> int | None:
        """Graceful stop: TERM lets in-flight requests finish; KILL after the timeout."""
        if self.adopted is not None:
            self.signal(signal.SIGTERM)
            try:
                return await asyncio.wait_for(self.wait(), timeout)
            except TimeoutError:
                log.error("gunicorn did not stop within %.1fs; killing it", timeout)
                self.signal(signal.SIGKILL)
                return await self.wait()
        if self.proc is None or self.proc.returncode is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            log.error("gunicorn did not stop within %.1fs; killing it", timeout)
            self.proc.kill()
            return await self.proc.wait()


async def _exited(pid: int) -> None:
    """Until ``pid`` (not our child: no SIGCHLD, no waitpid) has exited. A pidfd turns
    readable when its process exits (Linux 5.3): no wake-up until then, where polling woke
    the supervisor 5 times a second for as long as it ran an adopted pool. Without pidfds
    (an older kernel, a seccomp profile that refuses the call): polled."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):
        while pid_alive(pid):
            await asyncio.sleep(ADOPTED_POLL_S)
        return
    loop = asyncio.get_running_loop()
    gone: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not gone.done():
            gone.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await gone
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def orphaned_master(pid: object, table_segment: str) -> int | None:
    """The gunicorn master a dead predecessor started, if ``pid`` (from its state file) is
    still that process: a live gunicorn whose environment names this instance's table
    segment (so a reused pid, or another router's master, is never adopted)."""
    if not isinstance(pid, int) or pid <= 1 or not pid_alive(pid):
        return None
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except OSError:
        return None
    wanted = f"{TABLE_SEGMENT_ENV}={table_segment}".encode()
    return pid if wanted in env and b"gunicorn" in cmd else None
