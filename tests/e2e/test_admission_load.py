"""Exact admission under real load, at default settings: 2 router instances x 2 workers on one
redis-server that pauses 8 ms every 25 ms (``CLIENT PAUSE 8 ALL``, as a busy or failing-over
Redis answers late) while busy processes take the cores beside the router. Every admission
must be Redis's decision: request buckets and quotas admit exactly, token buckets and spend
budgets hold exactly what the admitted requests used. Then Redis stopped (SIGSTOP) and killed
(SIGKILL) under the fail-closed policy: nothing that was refused stays charged."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from apirouter.keys import hash_key
from tests.harness import HOST, MockBackend, RedisServer, Router, wait_for
from workers.admission import BREAKER_OPEN_S
from workers.admission_scripts import bucket_fields, bucket_place

USER = [{"role": "user", "content": "hello there"}]
PRICE = {"prompt_per_1k": 1.0, "completion_per_1k": 2.0}
CLIENTS = 32


class Pauser(threading.Thread):
    """``CLIENT PAUSE 8 ALL`` every 25 ms until stopped."""

    def __init__(self, port: int, pause_ms: int = 8, every_ms: int = 25) -> None:
        super().__init__(daemon=True)
        self.port, self.pause_ms, self.every_s = port, pause_ms, every_ms / 1000
        self.done = threading.Event()
        self.pauses = 0

    def run(self) -> None:
        with socket.create_connection((HOST, self.port)) as s:
            cmd = (b"*4\r\n$6\r\nCLIENT\r\n$5\r\nPAUSE\r\n$%d\r\n%d\r\n$3\r\nALL\r\n"
                   % (len(str(self.pause_ms)), self.pause_ms))
            while not self.done.wait(self.every_s):
                s.sendall(cmd)
                if s.recv(64).startswith(b"+OK"):
                    self.pauses += 1

    def stop(self) -> None:
        self.done.set()
        self.join(5)


@pytest.fixture
def own_redis() -> Iterator[list[RedisServer]]:
    servers = [RedisServer()]
    yield servers
    for s in servers:
        if s.proc.poll() is None:
            os.kill(s.pid, signal.SIGCONT)
        s.stop()
        s.cleanup()


def redis_hash(redis: RedisServer, key: str) -> dict[str, str]:
    out = subprocess.run(["redis-cli", "-h", HOST, "-p", str(redis.port), "--no-raw",
                          "HGETALL", key], capture_output=True, text=True, check=True).stdout
    items = [line.split(") ", 1)[1].strip('"') for line in out.splitlines() if ") " in line]
    return dict(zip(items[::2], items[1::2], strict=True))


def cost_micro(usage: dict[str, int]) -> int:
    return int(round((usage["prompt_tokens"] * PRICE["prompt_per_1k"]
                      + usage["completion_tokens"] * PRICE["completion_per_1k"]) * 1000))


class Load:
    """CLIENTS threads sending ``each`` requests per key, a new connection each (so the kernel
    spreads them over the workers), round-robin over the routers; counts per key."""

    def __init__(self) -> None:
        self.statuses: dict[str, Counter[int]] = {}
        self.used_tokens: Counter[str] = Counter()
        self.spent: Counter[str] = Counter()
        self.lock = threading.Lock()

    def one(self, router: Router, key: str) -> int:
        conn = http.client.HTTPConnection(HOST, router.port, timeout=30)
        try:
            conn.request("POST", "/v1/chat/completions",
                         json.dumps({"model": "m", "messages": USER, "max_tokens": 20}),
                         {"Content-Type": "application/json",
                          "Authorization": f"Bearer ar-{key}"})
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        with self.lock:
            self.statuses.setdefault(key, Counter())[resp.status] += 1
            if resp.status == 200:
                usage = json.loads(body)["usage"]
                self.used_tokens[key] += usage["prompt_tokens"] + usage["completion_tokens"]
                self.spent[key] += cost_micro(usage)
        return resp.status

    def run(self, routers: list[Router], keys: list[str], each: int) -> None:
        def client(i: int) -> None:
            for n in range(each):
                for k in keys:
                    self.one(routers[(i + n) % len(routers)], k)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)


def load_config(mock: str, redis_url: str, rounds: int, **server: Any) -> dict[str, Any]:
    keys: dict[str, Any] = {}
    budgets: dict[str, Any] = {}
    for r in range(rounds):
        keys[f"rl{r}"] = {"sha256": hash_key(f"ar-rl{r}"), "org": f"rl{r}",
                          "rpm": 1, "rpm_burst": 50}
        keys[f"q{r}"] = {"sha256": hash_key(f"ar-q{r}"), "org": f"q{r}", "tier": "admin"}
        budgets[f"org:q{r}"] = {"period": "day", "requests": 40}
        keys[f"t{r}"] = {"sha256": hash_key(f"ar-t{r}"), "org": f"t{r}", "rpm": 100_000,
                         "tpm": 1, "tpm_burst": 1000}
        keys[f"s{r}"] = {"sha256": hash_key(f"ar-s{r}"), "org": f"s{r}", "tier": "admin"}
        budgets[f"org:s{r}"] = {"period": "month", "spend": 1.0}
    return {"server": {"auth_required": True, "redis_url": redis_url, **server},
            "backends": {"a": {"url": mock}},
            "models": {"m": {"backends": ["a"], "price": PRICE}},
            "keys": keys, "budgets": budgets}


def bucket_level(redis: RedisServer, org: str, bucket: str, capacity: float,
                 per_minute: float) -> float:
    """The level now of bucket ``bucket`` (its name, as admission charges it) of ``org``."""
    h = redis_hash(redis, bucket_place(org, bucket)[0])
    level, ts = bucket_fields(bucket)
    now_ms = float(redis_time_ms(redis))
    return min(capacity, float(h[level]) + max(0.0, now_ms - float(h[ts])) * per_minute / 60000)


def eventually(get: Callable[[], Any], expect: Any, timeout: float = 10) -> Any:
    """What ``get`` returns once it equals ``expect`` (settlement runs after the response), or
    its last value when that never happens."""
    deadline = time.monotonic() + timeout
    value = get()
    while value != expect and time.monotonic() < deadline:
        time.sleep(0.05)
        value = get()
    return value


def redis_time_ms(redis: RedisServer) -> int:
    out = subprocess.run(["redis-cli", "-h", HOST, "-p", str(redis.port), "TIME"],
                         capture_output=True, text=True, check=True).stdout.split()
    return int(out[0]) * 1000 + int(out[1]) // 1000


def budget_hash(redis: RedisServer, org: str, period: str) -> dict[str, str]:
    fmt = "%Y-%m-%d" if period == "day" else "%Y-%m"
    return redis_hash(redis, f"apirouter:budget:{{{org}}}:org:{org}:"
                             f"{time.strftime(fmt, time.gmtime())}")


def test_exact_under_late_redis_and_busy_cores_at_default_settings(
        own_redis: list[RedisServer], mock_backend: Callable[..., MockBackend],
        router: Callable[..., Router], load_beside: None) -> None:
    redis = own_redis[0]
    rounds = 2
    cfg = load_config(mock_backend("a").url, redis.url, rounds)
    routers = [router(cfg, workers=2), router(cfg, workers=2)]
    pauser = Pauser(redis.port)
    pauser.start()
    try:
        for r in range(rounds):
            load = Load()
            load.run(routers, [f"rl{r}", f"q{r}", f"t{r}", f"s{r}"], each=100 // CLIENTS + 1)
            total = (100 // CLIENTS + 1) * CLIENTS
            assert load.statuses[f"rl{r}"] == {200: 50, 429: total - 50}, (r, load.statuses)
            assert load.statuses[f"q{r}"] == {200: 40, 402: total - 40}, (r, load.statuses)
            assert set(load.statuses[f"t{r}"]) <= {200, 429}, load.statuses
            assert set(load.statuses[f"s{r}"]) <= {200, 402}, load.statuses
            # Token bucket and spend budget: after settlement, Redis holds exactly what the
            # admitted requests used (nothing for a refusal, nothing uncharged).
            used = load.used_tokens[f"t{r}"]
            spent = load.spent[f"s{r}"]
            assert used <= 1000 and spent <= 1_000_000, (used, spent)

            def held(r: int = r) -> tuple[int, int]:
                level = bucket_level(redis, f"t{r}", f"key:t{r}:tpm", 1000, 1)
                return (round(1000 - level),
                        int(budget_hash(redis, f"s{r}", "month").get("spend", 0)))

            assert eventually(held, (used, spent)) == (used, spent), (r, load.statuses)
    finally:
        pauser.stop()
    assert pauser.pauses > 10


def test_fail_closed_charges_nothing_refused_under_sigstop_and_sigkill(
        own_redis: list[RedisServer], mock_backend: Callable[..., MockBackend],
        router: Callable[..., Router], load_beside: None) -> None:
    redis = own_redis[0]
    a = mock_backend("a")
    cfg = load_config(a.url, redis.url, 0, redis_failure_policy="closed")
    cfg["keys"]["fc"] = {"sha256": hash_key("ar-fc"), "org": "fc", "rpm": 1,
                         "rpm_burst": 100_000}
    cfg["budgets"]["org:fc"] = {"period": "day", "requests": 100_000}
    cfg["keys"]["fq"] = {"sha256": hash_key("ar-fq"), "org": "fq", "tier": "admin"}
    cfg["budgets"]["org:fq"] = {"period": "day", "requests": 40}
    routers = [router(cfg, workers=2)]
    load = Load()
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            load.one(routers[0], "fc")

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: load.statuses.get("fc", Counter())[200] > 50, 20, "traffic")
        os.kill(redis.pid, signal.SIGSTOP)
        wait_for(lambda: load.statuses["fc"][503] > 20, 20, "refusals while Redis is stopped")
        os.kill(redis.pid, signal.SIGCONT)
        admitted = load.statuses["fc"][200]
        wait_for(lambda: load.statuses["fc"][200] > admitted + 50, 20, "Redis answering again")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    done = load.statuses["fc"]
    assert set(done) == {200, 503}, done

    def charged() -> tuple[int, int]:
        level = bucket_level(redis, "fc", "key:fc:rpm", 100_000, 1)
        return (int(budget_hash(redis, "fc", "day").get("requests", 0)),
                round(100_000 - level))

    # Only the admitted requests are charged, to the quota and to the request bucket.
    assert eventually(charged, (done[200], done[200])) == (done[200], done[200]), done

    # SIGKILL: refused (503) while it is gone; a new empty Redis on the port is exact again.
    os.kill(redis.pid, signal.SIGKILL)
    redis.proc.wait()
    statuses = Counter(load.one(routers[0], "fq") for _ in range(10))
    assert statuses == {503: 10}, statuses
    own_redis.append(RedisServer(redis.port))
    # Until both workers' breakers have let Redis be asked again; the 503s before that are
    # refusals and charge nothing. A worker's last failure was a 503 some client saw, so once
    # admissions have succeeded for longer than the breaker stays open, no breaker is open (8
    # in a row alone was not enough: a faster router did them all on one worker within the
    # second the other worker's breaker stayed open).
    streak: list[float] = []

    def back() -> bool:
        if load.one(routers[0], "fq") == 200:
            streak.append(time.monotonic())
            time.sleep(0.2)  # 8 successes span the breaker's window on a few of the 40
        else:
            streak.clear()
        return len(streak) >= 8 and streak[-1] - streak[0] > BREAKER_OPEN_S + 0.2

    wait_for(back, 20, "Redis back")
    used = load.statuses["fq"][200]
    load.statuses["fq"].clear()
    load.run(routers, ["fq"], each=2)
    assert load.statuses["fq"] == {200: 40 - used, 402: 2 * CLIENTS - 40 + used}, (
        used, load.statuses["fq"])
