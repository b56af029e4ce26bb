"""The gunicorn worker class: uvloop, the lean server for hot endpoints, aiohttp for the rest.

Built on gunicorn's public Worker API alone (``init_process``, ``init_signals``, ``run``,
``notify``) and aiohttp's public server API (AppRunner): no private method of aiohttp's own
gunicorn worker is used, so an aiohttp upgrade cannot silently change how a worker waits or
stops.

Stop signals: a stop signal can reach a worker at any point of its boot, before its event loop
exists or while the app module is imported. With loop-based handlers alone such a TERM was
dropped and the worker served on until the master killed it at the graceful timeout (seen as
30 s drains). Plain handlers that only flip ``alive`` and wake the serve loop work in every
phase; gunicorn_conf blocks the signals across fork() so the window before they exist is
covered too.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from types import FrameType

import uvloop
from aiohttp import web
from gunicorn.workers.base import Worker

from apirouter.stats import RUN_DIR_ENV
from workers import log_setup, readiness
from workers.admission import finish_pending
from workers.app import PIPELINE_KEY
from workers.fast_server import FastServer

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
TICK_S = 1.0  # heartbeat to the arbiter, the stats segment and the usage ring
SETTLE_DRAIN_S = 1.0  # at exit: how long settlements still on their way to Redis may take


class RouterWorker(Worker):
    loop: asyncio.AbstractEventLoop | None = None
    _wakeup: asyncio.Future[None] | None = None

    def init_process(self) -> None:
        log_setup.configure()  # before the app loads: its boot lines are JSON too
        self.loop = uvloop.new_event_loop()
        asyncio.set_event_loop(self.loop)
        super().init_process()

    def init_signals(self) -> None:
        super().init_signals()
        for sig in STOP_SIGNALS:
            signal.signal(sig, self.request_stop)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        self.alive = False
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        w = self._wakeup
        if w is not None and not w.done():
            w.set_result(None)

    async def _tick(self) -> None:
        """Sleep until the next tick, or until a stop signal wakes us."""
        assert self.loop is not None
        self._wakeup = w = self.loop.create_future()
        timer = self.loop.call_later(TICK_S, self._wake)
        try:
            await w
        finally:
            timer.cancel()
            self._wakeup = None

    def _watch_supervisor(self, run_dir: str) -> None:
        was = readiness.WATCH.alive
        if readiness.WATCH.check(run_dir) != was:
            if was:
                self.log.error("no supervisor holds %s: serving on, usage records wait in the "
                               "rings for the next supervisor (readyz: degraded)", run_dir)
            else:
                self.log.warning("a supervisor holds %s again", run_dir)

    def run(self) -> None:
        # The real boot (app factory, runner, sockets) happens in _serve: until it reaches the
        # serve loop, an exit is a boot failure the arbiter must not answer with respawns.
        self.booted = False
        assert self.loop is not None
        try:
            self.loop.run_until_complete(self._serve())
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()
        sys.exit(0)

    async def _serve(self) -> None:
        assert self.loop is not None
        app = await self.wsgi()
        shutdown_timeout = self.cfg.graceful_timeout * 0.95
        runner = web.AppRunner(app, keepalive_timeout=self.cfg.keepalive, access_log=None,
                               shutdown_timeout=shutdown_timeout, handler_cancellation=True)
        await runner.setup()
        assert runner.server is not None
        pipeline = app[PIPELINE_KEY]
        fast = FastServer(pipeline, runner.server, keepalive_s=self.cfg.keepalive)
        servers = [await self.loop.create_server(fast.protocol, sock=sock,
                                                 backlog=self.cfg.backlog)
                   for sock in self.sockets]
        # Sockets are serving: tell the arbiter the boot succeeded.
        self.booted = True
        run_dir = os.environ.get(RUN_DIR_ENV)
        try:
            while self.alive:
                self.notify()
                if pipeline.stats is not None:
                    pipeline.stats.heartbeat()
                if pipeline.usage is not None:
                    pipeline.usage.rotate()
                if run_dir:
                    self._watch_supervisor(run_dir)
                readiness.REDIS.kick(pipeline.tables.current().table.limits.redis_url)
                if self.ppid != os.getppid():
                    self.log.info("parent changed, shutting down: %s", self)
                    break
                await self._tick()
        finally:
            for server in servers:
                server.close()
            await fast.shutdown(shutdown_timeout)
            await runner.cleanup()
            await finish_pending(pipeline.admission, SETTLE_DRAIN_S)
