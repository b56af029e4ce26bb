"""The gunicorn worker class: uvloop, the lean server for hot endpoints, aiohttp for the rest.

Stop signals: a stop signal can reach a worker at any point of its boot, before its event loop
exists or while the app module is imported. With loop-based handlers alone such a TERM was
dropped and the worker served on until the master killed it at the graceful timeout (seen as
30 s drains). Plain handlers that only flip ``alive`` and wake the serve loop work in every
phase; gunicorn_conf blocks the signals across fork() so the window before they exist is
covered too.
"""

from __future__ import annotations

import os
import signal
from types import FrameType

from aiohttp import web
from aiohttp.worker import GunicornUVLoopWebWorker

from workers.app import ENDPOINTS_KEY
from workers.fast_server import FastServer

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


class RouterWorker(GunicornUVLoopWebWorker):
    def init_signals(self) -> None:
        super().init_signals()
        for sig in STOP_SIGNALS:
            signal.signal(sig, self.request_stop)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        self.alive = False
        loop = getattr(self, "loop", None)
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._notify_waiter_done)

    async def _run(self) -> None:
        app = await self.wsgi()
        shutdown_timeout = self.cfg.graceful_timeout * 0.95
        runner = web.AppRunner(app, keepalive_timeout=self.cfg.keepalive, access_log=None,
                               shutdown_timeout=shutdown_timeout)
        await runner.setup()
        assert runner.server is not None
        fast = FastServer(app[ENDPOINTS_KEY], runner.server, keepalive_s=self.cfg.keepalive)
        servers = [await self.loop.create_server(fast.protocol, sock=sock,
                                                 backlog=self.cfg.backlog)
                   for sock in self.sockets]
        # Sockets are serving: tell the arbiter the boot succeeded.
        self.booted = True
        stats = app[ENDPOINTS_KEY].stats
        usage = app[ENDPOINTS_KEY].usage
        try:
            while self.alive:
                self.notify()
                if stats is not None:
                    stats.heartbeat()
                if usage is not None:
                    usage.rotate()
                if self.ppid != os.getppid():
                    self.log.info("parent changed, shutting down: %s", self)
                    break
                await self._wait_next_notify()
        finally:
            for server in servers:
                server.close()
            await fast.shutdown(shutdown_timeout)
            await runner.cleanup()
