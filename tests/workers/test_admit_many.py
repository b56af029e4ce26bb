"""ADMIT_MANY (a turn's admissions of one org in one script call) against ADMIT called once per
admission, in order, on a real redis-server."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from apirouter.redis_client import RedisClient, RedisError, encode_command
from tests.harness import RedisServer
from workers.admission_scripts import (
    ADMIT_LUA,
    ADMIT_MANY_LUA,
    BUCKET_TTL_MS,
    BUCKET_TTL_REFRESH_MS,
    RESERVATION_TTL_MS,
)

# Both scripts at one fixed ``now`` (TIME is the clock's; ADMIT_MANY reads it once a call,
# sequential ADMIT calls once each): their prelude's clock read replaced, nothing else.
NOW = 1_764_000_000_500
_TIME = "local t = redis.call('TIME')"
_FIXED = f"local t = {{'{NOW // 1000}', '{NOW % 1000 * 1000}'}}"
assert ADMIT_LUA.count(_TIME) == 1 and ADMIT_MANY_LUA.count(_TIME) == 1
ADMIT_AT = ADMIT_LUA.replace(_TIME, _FIXED)
MANY_AT = ADMIT_MANY_LUA.replace(_TIME, _FIXED)

ORG = "pm"
HASHES = [f"apirouter:rlh:{{{ORG}}}:{scope}" for scope in ("key:a", "key:b", "org:pm",
                                                           "key:a:model:m")]
FIELDS = ("rpm", "rpm_ts", "tpm", "tpm_ts", "ttl_set")


@dataclass(frozen=True)
class Admit:
    hashes: tuple[int, ...]  # indices into HASHES, distinct (ADMIT's layout)
    buckets: tuple[tuple[int, int, int, int, int], ...]  # index (1..h), place, cap, rpm, cost
    rid: str

    def keys(self) -> list[str]:
        return [HASHES[i] for i in self.hashes] + [f"apirouter:res:{{{ORG}}}:{self.rid}"]

    def args(self) -> list[int]:
        out = [len(self.hashes), len(self.buckets)]
        for b in self.buckets:
            out += b
        return out


@st.composite
def admissions(draw: st.DrawFn) -> Admit:
    hashes = tuple(draw(st.lists(st.integers(0, len(HASHES) - 1), min_size=1, max_size=3,
                                 unique=True)))
    buckets = tuple(draw(st.lists(st.tuples(
        st.integers(1, len(hashes)), st.sampled_from([1, 3]), st.integers(0, 60),
        st.sampled_from([0, 1, 7, 600, 6000, 60_000]), st.integers(0, 25)), max_size=3)))
    return Admit(hashes, buckets, draw(st.sampled_from([f"r{i}" for i in range(8)])))


def _number(draw: st.DrawFn) -> str:
    return draw(st.one_of(st.integers(-20, 80).map(str),
                          st.floats(-20, 80, allow_nan=False).map(lambda f: f"{f:.6f}")))


@st.composite
def hash_state(draw: st.DrawFn) -> dict[str, str] | str | None:
    """A bucket hash before the call: absent, of another type, or some of its fields (a few
    of them not numbers, a few times ahead of the clock)."""
    kind = draw(st.sampled_from(["absent", "hash", "hash", "hash", "string"]))
    if kind == "absent":
        return None
    if kind == "string":
        return "not a hash"
    out: dict[str, str] = {}
    for f in FIELDS:
        if not draw(st.booleans()):
            continue
        if f in ("rpm", "tpm"):
            out[f] = draw(st.one_of(st.just("junk"), st.builds(str)).filter(bool)
                          ) if draw(st.integers(0, 15)) == 0 else _number(draw)
        else:
            out[f] = str(NOW + draw(st.sampled_from([-10 * BUCKET_TTL_REFRESH_MS,
                                                     -BUCKET_TTL_REFRESH_MS - 1,
                                                     -BUCKET_TTL_REFRESH_MS, -30_000, -1,
                                                     0, 1, 5_000])))
    return out


async def _state(c: RedisClient) -> dict[bytes, tuple[object, ...]]:
    """Every key: its type, value (a hash's fields in order) and time to live."""
    out: dict[bytes, tuple[object, ...]] = {}
    for key in await c.execute("KEYS", "*", timeout=5):
        kind = await c.execute("TYPE", key, timeout=5)
        value = await c.execute("HGETALL" if kind == "hash" else "GET", key, timeout=5)
        out[key] = (kind, value, await c.execute("PTTL", key, timeout=5))
    return out


def _same_ttl(a: object, b: object) -> bool:
    assert isinstance(a, int) and isinstance(b, int)
    return a == b if a < 0 or b < 0 else abs(a - b) < 2_000


@settings(max_examples=300, deadline=None)
@given(st.lists(hash_state(), min_size=len(HASHES), max_size=len(HASHES)),
       st.lists(st.sampled_from([None, "a", "r"]), min_size=8, max_size=8),
       st.lists(admissions(), min_size=1, max_size=24))
def test_admit_many_replies_and_leaves_redis_as_admit_one_by_one(
        redis_server: RedisServer, before: list[dict[str, str] | str | None],
        records: list[str | None], batch: list[Admit]) -> None:
    """Any admissions of one org — keys shared or not, refusals, reservation ids repeated or
    found already there (charged, or a release's tombstone), a key of another type, a level
    that is not a number, ``ttl_set`` due or not — get ADMIT's replies through one ADMIT_MANY,
    and leave every key (bucket hashes field by field in order, reservation records) as the
    same admissions one ADMIT call each, in order, leave it, their times to live within the
    bounds of the two runs' clocks."""
    base = redis_server.url.rsplit("/", 1)[0]

    async def run() -> None:
        seq = RedisClient(f"{base}/1", stall_timeout=5)
        many = RedisClient(f"{base}/2", stall_timeout=5)
        for c in (seq, many):
            await c.execute("FLUSHDB", timeout=5)
            for key, s in zip(HASHES, before, strict=True):
                if isinstance(s, str):
                    await c.execute("SET", key, s, timeout=5)
                elif s:
                    await c.execute("HSET", key, *[x for kv in s.items() for x in kv],
                                    timeout=5)
                    await c.execute("PEXPIRE", key, BUCKET_TTL_MS, timeout=5)
            for i, value in enumerate(records):
                if value is not None:
                    await c.execute("SET", f"apirouter:res:{{{ORG}}}:r{i}", value, "PX",
                                    RESERVATION_TTL_MS // 2, timeout=5)
        one = await seq.execute("SCRIPT", "LOAD", ADMIT_AT, timeout=5)
        want = [await seq.execute("EVALSHA", one, len(a.keys()), *a.keys(), a.args()[0],
                                  a.args()[1], 0, 0, *a.args()[2:], timeout=5)
                for a in batch]
        keys = [k for a in batch for k in a.keys()]
        got = await many.execute("EVAL", MANY_AT, len(keys), *keys, len(batch),
                                 *[x for a in batch for x in a.args()], timeout=5)
        assert isinstance(got, list) and len(got) == len(want)
        for w, g in zip(want, got, strict=True):
            if isinstance(w, RedisError):
                assert isinstance(g, RedisError) and str(g) == str(w)
            else:
                assert g == w
        a, b = await _state(seq), await _state(many)
        assert a.keys() == b.keys()
        for key, (kind, value, ttl) in a.items():
            assert (kind, value) == b[key][:2], key
            assert _same_ttl(ttl, b[key][2]), (key, ttl, b[key][2])
        seq.close()
        many.close()

    asyncio.run(run())


def test_admit_many_reads_and_writes_each_hash_once(redis_server: RedisServer) -> None:
    """Sixteen admissions of one key's rpm and tpm buckets (one hash) in one call: one HMGET,
    one HSET, one PEXPIRE (the hash new), a SET NX each — and the levels carried over."""
    base = redis_server.url.rsplit("/", 1)[0]

    async def run() -> None:
        c = RedisClient(f"{base}/3", stall_timeout=5)
        await c.execute("FLUSHDB", timeout=5)
        batch = [Admit((0,), ((1, 1, 100, 6000, 1), (1, 3, 1000, 60_000, 10)), f"x{i}")
                 for i in range(16)]
        keys = [k for a in batch for k in a.keys()]
        sha = await c.execute("SCRIPT", "LOAD", ADMIT_MANY_LUA, timeout=5)
        await c.execute("CONFIG", "RESETSTAT", timeout=5)
        got = await c.execute("EVALSHA", sha, len(keys), *keys, len(batch),
                              *[x for a in batch for x in a.args()], timeout=5)
        stats = (await c.execute("INFO", "commandstats", timeout=5)).decode()
        calls = {line.split(":")[0][len("cmdstat_"):]: int(line.split("calls=")[1].split(",")[0])
                 for line in stats.splitlines() if line.startswith("cmdstat_")}
        assert calls == {"evalsha": 1, "time": 1, "hmget": 1, "hset": 1, "pexpire": 1,
                         "set": 16, "config|resetstat": 1}
        assert [r[:3] for r in got] == [[1, 0, 99 - i] for i in range(16)]
        assert float(await c.execute("HGET", HASHES[0], "tpm", timeout=5)) == 1000 - 160
        c.close()

    asyncio.run(run())


def test_encoded_admit_many_is_the_admissions_admit_commands_spliced() -> None:
    """admit_many_command's bytes: EVALSHA, then each admission's KEYS of its ADMIT command
    (PlannedAdmit.command: its plan's hashes, its reservation record), the count, and each
    admission's ADMIT arguments without the budget count and nonce ttl (h, n, its buckets with
    their costs), as encode_command makes them."""
    from apirouter.keys import KeyRecord, Tier
    from apirouter.limits import plan_for
    from apirouter.redis_client import parse_reply
    from workers.admission_scripts import admit_many_command, planned_admit

    key = KeyRecord("k1", "a" * 64, "o1", "", frozenset({"inference"}), "t",
                    Tier(10, 20, 600, 6000), False)
    other = KeyRecord("k2", "b" * 64, "o1", "", frozenset({"inference"}), "t",
                      Tier(0, 0, 600, 6000), False)
    plans = [planned_admit(plan_for(key, "m", Tier(1, 2, 3, 4), None), "o1", "s" * 40),
             planned_admit(plan_for(key, "n", None, Tier(5, 6, 7, 8)), "o1", "s" * 40),
             planned_admit(plan_for(other, "m", None, None), "o1", "s" * 40)]
    items = [(plans[0], "r.1", 5), (plans[1], "r.2", 1500), (plans[0], "r.3", 1),
             (plans[2], "r%d.4", 1023), (plans[1], "r.5", 1024)]
    keys: list[bytes] = []
    args: list[bytes] = [b"%d" % len(items)]
    for p, rid, tokens in items:
        one, end = parse_reply(p.command(rid, tokens), 0)
        assert end == len(p.command(rid, tokens)) and one[:2] == [b"EVALSHA", b"s" * 40]
        nkeys = int(one[2])
        keys += one[3:3 + nkeys]
        h, n, m, nonce_ttl, *buckets = one[3 + nkeys:]
        assert (m, nonce_ttl) == (b"0", b"0") and len(buckets) == 5 * int(n)
        args += [h, n, *buckets]
    want = encode_command("EVALSHA", "m" * 40, len(keys), *keys, *args)
    assert admit_many_command("m" * 40, [p for p, _, _ in items], [r for _, r, _ in items],
                              [t for _, _, t in items]) == want
