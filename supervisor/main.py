"""The supervisor process: load config, publish the table, run the worker pool, react to signals.

Signal handlers only queue the signal; the main loop dispatches it (gunicorn's arbiter does the
same): HUP re-reads the config and publishes a new generation, TERM/INT drain and exit,
TTIN/TTOU pass through to gunicorn to scale the pool.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import apirouter
from apirouter.config import ConfigError, RouterConfig, load_config_file, parse_config
from apirouter.runstate import remove_state, write_state
from apirouter.shm import TABLE_SEGMENT_ENV, SegmentError, remove_stale_segments
from supervisor.demo import DemoBackends, demo_config
from supervisor.publisher import TablePublisher
from supervisor.worker_pool import BOOT_FAILURE_CODES, WorkerPool

log = logging.getLogger("apirouter.supervisor")

_RESTART_WINDOW_S = 60.0
_MAX_RESTARTS = 5


@dataclass
class ServeOptions:
    config_path: str | None
    demo: bool
    run_dir: str
    overrides: dict[str, Any]


class Supervisor:
    def __init__(self, opts: ServeOptions) -> None:
        self.opts = opts
        self.signals: asyncio.Queue[int] = asyncio.Queue()
        self.publisher: TablePublisher | None = None
        self.pool: WorkerPool | None = None
        self.demo: DemoBackends | None = None
        self.cfg: RouterConfig | None = None
        self.metrics_dir: str | None = None
        self.reload_failures = 0
        self.started_at = time.time()

    # -- config ------------------------------------------------------------------------------

    def load(self) -> RouterConfig:
        if self.demo is not None:
            return parse_config(demo_config(self.demo.ports), env=os.environ,
                                overrides=self.opts.overrides)
        assert self.opts.config_path is not None
        return load_config_file(self.opts.config_path, overrides=self.opts.overrides)

    @property
    def source(self) -> str:
        return "demo" if self.opts.demo else f"file:{self.opts.config_path}"

    def reload(self) -> None:
        assert self.publisher is not None and self.cfg is not None
        try:
            cfg = self.load()
            self.publisher.publish(cfg, self.source)
        except (ConfigError, SegmentError) as e:
            self.reload_failures += 1
            log.error("reload rejected, generation %d stays in force: %s",
                      self.publisher.generation, e)
            self._write_state()
            return
        old = self.cfg.server
        if cfg.server.bind != old.bind:
            log.warning("bind changed to %s: it takes effect on restart", cfg.server.bind)
        delta = cfg.server.workers - old.workers
        for _ in range(abs(delta)):
            self._signal_pool(signal.SIGTTIN if delta > 0 else signal.SIGTTOU)
        self.cfg = cfg
        self._write_state()

    # -- lifecycle ---------------------------------------------------------------------------

    def _write_state(self) -> None:
        assert self.cfg is not None and self.publisher is not None
        write_state(self.opts.run_dir, {
            "pid": os.getpid(),
            "gunicorn_pid": self.pool.pid if self.pool else None,
            "bind": self.cfg.server.bind,
            "workers": self.cfg.server.workers,
            "table_segment": self.publisher.segment,
            "metrics_dir": self.metrics_dir,
            "generation": self.publisher.generation,
            "source": self.source,
            "started_at": self.started_at,
            "reload_failures": self.reload_failures,
            "version": apirouter.__version__,
        })

    def _signal_pool(self, sig: int) -> None:
        if self.pool is not None:
            self.pool.signal(sig)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGTTIN, signal.SIGTTOU):
            loop.add_signal_handler(sig, self.signals.put_nowait, sig)
        stale = remove_stale_segments()
        if stale:
            log.info("removed %d segments left by dead routers: %s", len(stale), stale)
        try:
            return await self._serve()
        finally:
            await self._shutdown()

    async def _serve(self) -> int:
        if self.opts.demo:
            self.demo = DemoBackends()
            await self.demo.start()
        try:
            self.cfg = self.load()
        except ConfigError as e:
            log.error("invalid config: %s", e)
            return 2
        self.publisher = TablePublisher(self.cfg.server.table_slot_bytes)
        self.publisher.publish(self.cfg, self.source)
        self.metrics_dir = tempfile.mkdtemp(prefix="apirouter-metrics-")
        project_root = os.path.dirname(os.path.dirname(os.path.abspath(apirouter.__file__)))
        pythonpath = os.pathsep.join(p for p in (project_root, os.environ.get("PYTHONPATH")) if p)
        self.pool = WorkerPool(self.cfg.server, {
            TABLE_SEGMENT_ENV: self.publisher.segment,
            "PROMETHEUS_MULTIPROC_DIR": self.metrics_dir,
            "PYTHONPATH": pythonpath,
        })
        restarts: list[float] = []
        await self.pool.start()
        self._write_state()
        announce = asyncio.create_task(self._announce_ready())
        try:
            while True:
                exited = asyncio.ensure_future(self.pool.wait())
                sig_task = asyncio.ensure_future(self.signals.get())
                done, _ = await asyncio.wait({exited, sig_task},
                                             return_when=asyncio.FIRST_COMPLETED)
                if sig_task in done:
                    exited.cancel()
                    sig = sig_task.result()
                    if sig in (signal.SIGTERM, signal.SIGINT):
                        log.info("received %s: draining", signal.Signals(sig).name)
                        return 0
                    if sig == signal.SIGHUP:
                        self.reload()
                    else:
                        self._signal_pool(sig)
                    continue
                sig_task.cancel()
                code = exited.result()
                if code in BOOT_FAILURE_CODES:
                    log.error("worker pool cannot start: %s (gunicorn exit %d)",
                              BOOT_FAILURE_CODES[code], code)
                    return 1
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < _RESTART_WINDOW_S] + [now]
                if len(restarts) > _MAX_RESTARTS:
                    log.error("gunicorn exited %d times within %.0fs; giving up",
                              len(restarts), _RESTART_WINDOW_S)
                    return 1
                log.error("gunicorn exited with %s; restarting it", code)
                await asyncio.sleep(0.5 * len(restarts))
                await self.pool.start()
                self._write_state()
        finally:
            announce.cancel()

    async def _announce_ready(self) -> None:
        assert self.cfg is not None
        host, _, port = self.cfg.server.bind.rpartition(":")
        host = host.strip("[]")
        for _ in range(600):
            try:
                r, w = await asyncio.open_connection(host, int(port))
                w.write(b"GET /v1/status/readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                status_line = await r.readline()
                w.close()
                if b" 200 " in status_line:
                    url = f"http://{self.cfg.server.bind}"
                    log.info("apirouter ready on %s (table generation %d)", url,
                             self.publisher.generation if self.publisher else 0)
                    if self.opts.demo:
                        log.info("try: curl %s/v1/chat/completions -H 'Content-Type: "
                                 "application/json' -d '{\"model\":\"gpt-4o-mini\",\"messages\":"
                                 "[{\"role\":\"user\",\"content\":\"hi\"}]}'", url)
                    return
            except OSError:
                pass
            await asyncio.sleep(0.05)

    async def _shutdown(self) -> None:
        if self.pool is not None:
            timeout = (self.cfg.server.graceful_timeout_s if self.cfg else 30.0) + 5.0
            code = await self.pool.stop(timeout)
            log.info("worker pool stopped (exit %s)", code)
        if self.publisher is not None:
            self.publisher.close()
        if self.metrics_dir is not None:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
        if self.demo is not None:
            await self.demo.stop()
        remove_state(self.opts.run_dir)
        log.info("supervisor stopped; segments unlinked")


def serve(opts: ServeOptions) -> int:
    import uvloop

    async def main() -> int:
        return await Supervisor(opts).run()

    return uvloop.run(main())
