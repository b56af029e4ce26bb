"""The supervisor process: load config, publish the table, run the worker pool, react to signals.

Signal handlers only queue the signal; the main loop dispatches it (gunicorn's arbiter does the
same): HUP re-reads the config (file) or resyncs with etcd and publishes a new generation,
TERM/INT drain and exit, TTIN/TTOU pass through to gunicorn to scale the pool.

Config sources: a YAML file (re-read on HUP), the embedded demo, or etcd (watched; every
accepted revision is also written to the local cache, which is what the supervisor boots from
when etcd is unreachable). An invalid config never replaces the last good one: the rejection
is logged, counted, and shown in readyz and `apirouterctl status`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass
from typing import Any

import apirouter
from apirouter.config import ConfigError, RouterConfig, parse_config, read_config_file
from apirouter.health import HealthPolicy
from apirouter.overrides import active, next_expiry, to_override
from apirouter.runstate import RunDir, RunDirError, read_state, remove_state, write_state
from apirouter.shared_buckets import BUCKETS_SEGMENT_ENV, create_buckets_segment
from apirouter.shm import TABLE_SEGMENT_ENV, SegmentError, segment_name, unlink
from apirouter.stats import (
    RUN_DIR_ENV,
    STATS_SEGMENT_ENV,
    StatsReader,
    create_stats_segment,
)
from apirouter.table import Override, compile_table
from supervisor import metrics
from supervisor.config_cache import ConfigCache
from supervisor.control_server import ControlServer
from supervisor.demo import DemoBackends, demo_config
from supervisor.etcd_source import EtcdSource, Snapshot
from supervisor.health_monitor import HealthMonitor
from supervisor.publisher import TablePublisher
from supervisor.record_store import RecordStore
from supervisor.usage_export import UsageExport
from supervisor.worker_pool import BOOT_FAILURE_CODES, WorkerPool, orphaned_master

log = logging.getLogger("apirouter.supervisor")

_RESTART_WINDOW_S = 60.0
POOL_SIGNAL_GAP_S = 0.1  # between TTIN/TTOU signals passed to gunicorn
_MAX_RESTARTS = 5
ETCD_BOOT_TIMEOUT_S = 3.0
STATS_SLOTS = 128  # worker slots: TTIN may grow the pool well past its configured size
STATS_BACKENDS = 256  # distinct backend ids a router can track
# Usage export is assembled once at boot (supervisor.usage_export).
RESTART_ONLY = ("kafka_bootstrap", "kafka_topic", "kafka_idempotence", "kafka_compression",
                "kafka_timeout_s", "spool_dir", "usage_ring_bytes", "audit_ttl_s")


@dataclass
class ServeOptions:
    config_path: str | None
    demo: bool
    run_dir: str
    overrides: dict[str, Any]
    metrics_dir: str
    etcd: str | None = None
    etcd_prefix: str = "/apirouter"
    cache_dir: str | None = None
    claimed: RunDir | None = None  # the run directory, already claimed (apirouter serve)


class Supervisor:
    def __init__(self, opts: ServeOptions) -> None:
        self.opts = opts
        self.signals: asyncio.Queue[int] = asyncio.Queue()
        self.publisher: TablePublisher | None = None
        self.pool: WorkerPool | None = None
        self.demo: DemoBackends | None = None
        self.cfg: RouterConfig | None = None
        self.etcd: EtcdSource | None = None
        self.cache = ConfigCache(opts.cache_dir or os.path.join(opts.run_dir, "cache"))
        self.from_cache = False
        self.applied_revision: int | None = None
        self.rejected: dict[str, Any] | None = None
        self.reload_failures = 0
        self.started_at = time.time()
        self._tasks: list[asyncio.Future[Any]] = []
        self._boot_kvs: dict[bytes, bytes] | None = None
        # Held until this process ends: a second router on this run directory is refused, and
        # the segments named by its instance id are ours alone.
        self.run_dir = opts.claimed or RunDir.claim(opts.run_dir)
        self.instance = self.run_dir.instance
        self.stats_shm = create_stats_segment(segment_name(self.instance, "stats"), STATS_SLOTS,
                                              STATS_BACKENDS)
        self.monitor = HealthMonitor(StatsReader(self.stats_shm), self.republish)
        # The in-process limiter's buckets, shared by the workers (apirouter/shared_buckets).
        self.buckets_shm = create_buckets_segment(segment_name(self.instance, "buckets"),
                                                  replace_foreign=not self.run_dir.orphans)
        self.indices: dict[str, int] = {}
        self.overrides = RecordStore("overrides", self.cache.directory, None)
        self.keys = RecordStore("keys", self.cache.directory, None)
        self.control = ControlServer(self)
        self._expiry: asyncio.TimerHandle | None = None
        self.usage: UsageExport | None = None

    # -- config ------------------------------------------------------------------------------

    @property
    def source(self) -> str:
        if self.opts.demo:
            return "demo"
        if self.opts.etcd:
            return f"etcd:{self.opts.etcd}{self.opts.etcd_prefix}"
        return f"file:{self.opts.config_path}"

    def parse(self, raw: dict[str, Any]) -> RouterConfig:
        if self.opts.etcd is None and self.keys.records:
            # Without etcd, keys created with apirouterctl live beside the file's own keys.
            raw = {**raw, "keys": {**(raw.get("keys") or {}), **self.keys.records}}
        return parse_config(raw, env=os.environ, overrides=self.opts.overrides)

    def keys_changed(self) -> None:
        """Without etcd, a key created or revoked here takes effect by re-reading the config
        with the managed keys merged in (with etcd, the watch delivers the change)."""
        if self.etcd is None:
            self.reload()

    def config_status(self) -> dict[str, Any]:
        """The config store's state, as readyz and apirouterctl status report it."""
        if self.etcd is None:
            return {"status": "ok", "kind": "demo" if self.opts.demo else "file",
                    "source": self.source, "rejected": self.rejected}
        healthy = self.etcd.connected and self.rejected is None
        return {
            "status": "ok" if healthy else "degraded",
            "kind": "etcd",
            "endpoint": self.etcd.endpoint,
            "prefix": self.opts.etcd_prefix,
            "connected": self.etcd.connected,
            "revision": self.applied_revision,
            "from_cache": self.from_cache,
            "last_error": self.etcd.last_error,
            "rejected": self.rejected,
        }

    def _allocate_indices(self, cfg: RouterConfig) -> dict[str, int]:
        """Stable stats-segment slots per backend id: a reload must not shuffle counters."""
        wanted = [b.id for b in cfg.backends]
        kept = {b: i for b, i in self.indices.items() if b in wanted}
        free = (i for i in range(STATS_BACKENDS) if i not in kept.values())
        for b in wanted:
            if b not in kept:
                kept[b] = next(free, -1)
                if kept[b] < 0:
                    raise ConfigError(f"more than {STATS_BACKENDS} backends")
        self.indices = kept
        return kept

    def publish(self, cfg: RouterConfig) -> None:
        """Publish ``cfg`` with live health and control-plane status; adjust the pool to it."""
        assert self.publisher is not None
        old = self.cfg
        table = compile_table(cfg, source=self.source,
                              status={"config_store": self.config_status(),
                                      **(self.usage.status() if self.usage else {})},
                              health=self.monitor.states(), indices=self._allocate_indices(cfg),
                              overrides=self.override_objects())
        self.publisher.publish(table)
        s = cfg.server
        self.monitor.configure(table.backends, HealthPolicy.from_server(s), s.health_interval_s,
                               s.health_timeout_s)
        if old is None or old != cfg:
            log.info("published routing table generation %d from %s (%d backends, %d models)",
                     self.publisher.generation, self.source, len(table.backends),
                     len(table.routes))
        self.cfg = cfg
        metrics.TABLE_GENERATION.set(self.publisher.generation)
        metrics.preregister(table.backends)
        if old is not None and self.pool is not None:
            if cfg.server.bind != old.server.bind:
                log.warning("bind changed to %s: it takes effect on restart", cfg.server.bind)
            for name in RESTART_ONLY:
                if getattr(cfg.server, name) != getattr(old.server, name):
                    log.warning("%s changed: it takes effect on restart", name)
            delta = cfg.server.workers - old.server.workers
            for _ in range(abs(delta)):  # one at a time, by the main loop (see _serve)
                self.signals.put_nowait(signal.SIGTTIN if delta > 0 else signal.SIGTTOU)
        self._write_state()

    # -- overrides ---------------------------------------------------------------------------

    def active_overrides(self) -> dict[str, dict[str, Any]]:
        return active(self.overrides.records, time.time())

    def override_objects(self) -> tuple[Override, ...]:
        return tuple(o for r in self.active_overrides().values()
                     if (o := to_override(r)) is not None)

    def overrides_changed(self) -> None:
        """Publish the new set and wake up again when the next one expires."""
        self.republish()
        self._arm_expiry()

    def _arm_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        now = time.time()
        due = next_expiry(self.overrides.records, now)
        if due is not None:
            loop = asyncio.get_running_loop()
            self._expiry = loop.call_at(loop.time() + (due - now) + 0.001, self._on_expiry)

    def _on_expiry(self) -> None:
        now = time.time()
        expired = [i for i, r in self.overrides.records.items()
                   if r.get("expires_at") is not None and r["expires_at"] <= now]
        for override_id in expired:
            self._tasks.append(asyncio.ensure_future(
                self.overrides.remove(override_id, "ttl", "override.expired")))
        self.overrides_changed()

    async def reload_now(self) -> None:
        if self.etcd is not None:
            await self._resync()
        else:
            self.reload()

    def republish(self) -> None:
        """Same config, new live state (health, config store): workers see it next request."""
        if self.cfg is not None and self.publisher is not None:
            try:
                self.publish(self.cfg)
            except SegmentError as e:
                log.error("cannot publish the routing table: %s", e)

    def reject(self, reason: str, revision: int | None = None) -> None:
        self.reload_failures += 1
        self.rejected = {"reason": reason, "revision": revision, "at": time.time()}
        metrics.CONFIG_REJECTIONS.inc()
        generation = self.publisher.generation if self.publisher else 0
        log.error("config rejected, generation %d stays in force: %s", generation, reason)
        self.republish()  # same routes, new status: readyz shows the rejection
        self._write_state()

    def load_file(self) -> RouterConfig:
        if self.demo is not None:
            return self.parse(demo_config(self.demo.ports))
        assert self.opts.config_path is not None
        raw = read_config_file(self.opts.config_path)
        if not isinstance(raw, dict):
            raise ConfigError(f"{self.opts.config_path}: expected a mapping at the top level")
        return self.parse(raw)

    def reload(self) -> None:
        if self.etcd is not None:
            self._tasks.append(asyncio.ensure_future(self._resync()))
            return
        try:
            cfg = self.load_file()
        except ConfigError as e:
            self.reject(str(e))
            return
        self.rejected = None
        try:
            self.publish(cfg)
        except SegmentError as e:
            self.reject(str(e))

    # -- etcd --------------------------------------------------------------------------------

    def on_snapshot(self, snap: Snapshot) -> None:
        self.overrides.update_from_kvs(snap.kvs, self.opts.etcd_prefix)
        self.keys.update_from_kvs(snap.kvs, self.opts.etcd_prefix)
        try:
            cfg = self.parse(snap.raw)
        except ConfigError as e:
            self.reject(str(e), snap.revision)
            return
        previous = (self.rejected, self.from_cache, self.applied_revision)
        self.rejected, self.from_cache, self.applied_revision = None, False, snap.revision
        try:
            self.publish(cfg)
        except SegmentError as e:
            self.rejected, self.from_cache, self.applied_revision = previous
            self.reject(str(e), snap.revision)
            return
        metrics.CONFIG_REVISION.set(snap.revision)
        self.cache.save(snap.raw, snap.revision, _override_kvs(snap.kvs, self.opts.etcd_prefix))
        self._arm_expiry()

    def on_source_state(self) -> None:
        assert self.etcd is not None
        metrics.CONFIG_STORE_UP.set(1 if self.etcd.connected else 0)
        self.republish()

    async def _resync(self) -> None:
        assert self.etcd is not None
        try:
            self.on_snapshot(await self.etcd.fetch_once(ETCD_BOOT_TIMEOUT_S))
        except Exception as e:  # etcd down: the watcher reconnects and resyncs by itself
            log.error("resync with etcd failed: %s", e)

    async def initial_config(self) -> RouterConfig | None:
        if self.opts.etcd is None:
            try:
                return self.load_file()
            except ConfigError as e:
                log.error("invalid config: %s", e)
                return None
        self.etcd = EtcdSource(self.opts.etcd, self.opts.etcd_prefix, self.on_snapshot,
                               self.on_source_state)
        try:
            snap = await self.etcd.fetch_once(ETCD_BOOT_TIMEOUT_S)
        except Exception as e:
            self.etcd.last_error = f"{type(e).__name__}: {e}"[:300]
            return self._from_cache(f"etcd {self.opts.etcd} unreachable at boot")
        try:
            cfg = self.parse(snap.raw)
        except ConfigError as e:
            self.rejected = {"reason": str(e), "revision": snap.revision, "at": time.time()}
            return self._from_cache(f"etcd revision {snap.revision} is invalid: {e}")
        self.etcd.connected, self.etcd.revision = True, snap.revision
        self.applied_revision = snap.revision
        self._boot_kvs = snap.kvs
        self.cache.save(snap.raw, snap.revision, _override_kvs(snap.kvs, self.opts.etcd_prefix))
        return cfg

    def _from_cache(self, why: str) -> RouterConfig | None:
        cached = self.cache.load()
        if cached is None:
            log.error("%s and no cached config in %s: cannot start", why, self.cache.path)
            return None
        raw, revision, override_kvs = cached
        self._boot_kvs = override_kvs
        log.warning("%s: serving the cached config of revision %d", why, revision)
        assert self.etcd is not None
        self.etcd.revision = revision  # the watcher publishes anything newer when etcd returns
        self.from_cache, self.applied_revision = True, revision
        return self.parse(raw)

    # -- lifecycle ---------------------------------------------------------------------------

    def _write_state(self) -> None:
        if self.cfg is None or self.publisher is None:
            return
        write_state(self.opts.run_dir, {
            "pid": os.getpid(),
            "instance": self.instance,
            "gunicorn_pid": self.pool.pid if self.pool else None,
            "bind": self.cfg.server.bind,
            "workers": self.cfg.server.workers,
            "table_segment": self.publisher.segment,
            "stats_segment": self.stats_shm.name,
            "usage": self.usage.state() if self.usage else None,
            "live_workers": self.monitor.live_workers,
            "backend_health": self.monitor.states(),
            "metrics_dir": self.opts.metrics_dir,
            "generation": self.publisher.generation,
            "source": self.source,
            "config_store": self.config_status(),
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
        metrics.stamp_build()
        try:
            return await self._serve()
        finally:
            await self._shutdown()

    async def _serve(self) -> int:
        if self.opts.demo:
            self.demo = DemoBackends()
            await self.demo.start()
        cfg = await self.initial_config()
        if cfg is None:
            return 2
        if self.etcd is not None:
            self.overrides = RecordStore("overrides", self.cache.directory, self.etcd)
            self.overrides.update_from_kvs(self._boot_kvs or {}, self.opts.etcd_prefix)
            self.keys = RecordStore("keys", self.cache.directory, self.etcd)
            self.keys.update_from_kvs(self._boot_kvs or {}, self.opts.etcd_prefix)
        previous = self._previous_state()
        self.publisher = TablePublisher(segment_name(self.instance, "table"),
                                        cfg.server.table_slot_bytes)
        self.usage = UsageExport(cfg.server, self.opts.run_dir, self.instance, STATS_SLOTS,
                                 self.republish)
        await self.usage.start()
        self.publish(cfg)
        project_root = os.path.dirname(os.path.dirname(os.path.abspath(apirouter.__file__)))
        pythonpath = os.pathsep.join(p for p in (project_root, os.environ.get("PYTHONPATH")) if p)
        self.pool = WorkerPool(cfg.server, {
            TABLE_SEGMENT_ENV: self.publisher.segment,
            STATS_SEGMENT_ENV: self.stats_shm.name,
            BUCKETS_SEGMENT_ENV: self.buckets_shm.name,
            RUN_DIR_ENV: self.opts.run_dir,
            **self.usage.worker_env(),
            "PROMETHEUS_MULTIPROC_DIR": self.opts.metrics_dir,
            "PYTHONPATH": pythonpath,
        })
        restarts: list[float] = []
        orphan = orphaned_master(previous.get("gunicorn_pid"), self.publisher.segment)
        if orphan is not None:
            if previous.get("bind") != cfg.server.bind:
                log.warning("the adopted pool serves %s; bind %s takes effect on restart",
                            previous.get("bind"), cfg.server.bind)
            self.pool.adopt(orphan)
        else:
            if self.run_dir.orphans:
                log.error("%d workers of a previous supervisor hold slots in %s but their "
                          "gunicorn master cannot be found; starting a new pool",
                          self.run_dir.orphans, self.opts.run_dir)
            await self.pool.start()
        self._write_state()
        self.monitor.start()
        await self.control.start()
        self._arm_expiry()  # for overrides loaded at boot
        self._tasks.append(asyncio.ensure_future(self._announce_ready()))
        if self.etcd is not None:
            metrics.CONFIG_STORE_UP.set(1 if self.etcd.connected else 0)
            self._tasks.append(asyncio.ensure_future(self.etcd.run()))
        # What is allocated by now lives as long as the supervisor: keep the collector off
        # it, and let young objects pile up longer before a collection (as workers.app does).
        # A drain's batch (a tuple and an index struct a record, ~770 records at c=32) set off
        # a young collection every drain (0.2-3 ms), its survivors a middle one every ~1.3 s,
        # and, every ~10 s of load, a full one over ~55,000 objects (~70 ms): measured with
        # gc.callbacks, ~0.55 µs a request in the first two and ~0.9 in the full ones; none
        # ran under load after this.
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        while True:
            exited = asyncio.ensure_future(self.pool.wait())
            sig_task = asyncio.ensure_future(self.signals.get())
            done, _ = await asyncio.wait({exited, sig_task}, return_when=asyncio.FIRST_COMPLETED)
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
                    # Two identical signals that reach gunicorn before its handler ran are one
                    # signal: scaling by N sends N, spaced.
                    await asyncio.sleep(POOL_SIGNAL_GAP_S)
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

    def _previous_state(self) -> dict[str, Any]:
        """What the previous supervisor of this run directory left (if it died, not stopped)."""
        try:
            state = read_state(self.opts.run_dir)
        except (OSError, ValueError):
            return {}
        if state.get("instance") != self.instance:
            return {}
        log.warning("the previous supervisor (pid %s) did not stop cleanly; taking over its "
                    "segments%s", state.get("pid"),
                    " and its orphaned pool" if self.run_dir.orphans else "")
        old = state.get("pid")
        if isinstance(old, int) and old != os.getpid():
            # Its live gauges (sink up, spool bytes ...) must not linger beside ours.
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(old, self.opts.metrics_dir)
        return state

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
                        log.info("try: curl %s/v1/chat/completions -H 'Authorization: "
                                 "Bearer demo' -H 'Content-Type: application/json' -d "
                                 "'{\"model\":\"gpt-4o-mini\",\"messages\":"
                                 "[{\"role\":\"user\",\"content\":\"hi\"}]}'", url)
                    return
            except OSError:
                pass
            await asyncio.sleep(0.05)

    async def _shutdown(self) -> None:
        await self.control.close()
        if self._expiry is not None:
            self._expiry.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.pool is not None:
            timeout = (self.cfg.server.graceful_timeout_s if self.cfg else 30.0) + 5.0
            code = await self.pool.stop(timeout)
            log.info("worker pool stopped (exit %s)", code)
        await self.monitor.stop()
        if self.usage is not None:
            await self.usage.stop()  # after the workers: their last records are in the rings
        if self.publisher is not None:
            self.publisher.close()
        self.stats_shm.close()
        unlink(self.stats_shm.name)
        self.buckets_shm.close()
        unlink(self.buckets_shm.name)
        shutil.rmtree(os.path.join(self.opts.run_dir, "slots"), ignore_errors=True)
        shutil.rmtree(self.opts.metrics_dir, ignore_errors=True)
        if self.demo is not None:
            await self.demo.stop()
        remove_state(self.opts.run_dir)
        log.info("supervisor stopped; segments unlinked")
        self.run_dir.release()


def _override_kvs(kvs: dict[bytes, bytes], prefix: str) -> dict[bytes, bytes]:
    """The keys to cache beside the config: the overrides (keys are part of the config)."""
    base = f"{prefix.rstrip('/')}/overrides/".encode()
    return {k: v for k, v in kvs.items() if k.startswith(base)}


def serve(opts: ServeOptions) -> int:
    import uvloop

    async def main() -> int:
        try:
            sup = Supervisor(opts)
        except (RunDirError, SegmentError) as e:
            log.error("%s", e)
            return 2
        return await sup.run()

    return uvloop.run(main())
