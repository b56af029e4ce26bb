"""Watching an adopted gunicorn master, which is not the supervisor's child."""

from __future__ import annotations

import asyncio
import subprocess
import time

from supervisor.worker_pool import _exited


async def test_the_wait_ends_when_the_process_exits_not_before() -> None:
    proc = subprocess.Popen(["sleep", "0.3"])
    try:
        started = time.monotonic()
        # Exited is enough (a zombie nobody reaped yet counts as gone, as pid_alive has it).
        await asyncio.wait_for(_exited(proc.pid), 5)
        assert time.monotonic() - started >= 0.25
        assert proc.poll() is not None
    finally:
        proc.kill()
        proc.wait()


async def test_a_process_already_gone_ends_the_wait_at_once() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()  # reaped: the pid names nothing now
    await asyncio.wait_for(_exited(proc.pid), 1)
