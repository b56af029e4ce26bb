"""ADMIT's reservation record is made first (SET NX): a script that then fails (Redis does not
roll a script back) must not leave a record that a release would refund."""

from __future__ import annotations

from apirouter.redis_client import RedisClient, RedisError
from tests.harness import RedisServer
from workers.admission_scripts import ADMIT_LUA, RELEASE_LUA, bucket_place


async def test_an_admit_that_fails_midway_leaves_nothing_for_a_release_to_refund(
        redis_server: RedisServer) -> None:
    c = RedisClient(redis_server.url, stall_timeout=5)
    hkey, o = bucket_place("pf", "key:pf:rpm")
    budget = "apirouter:budget:{pf}:bad"
    await c.execute("SET", budget, "not a hash", timeout=5)  # foreign or corrupted data
    res1, res2 = "apirouter:res:{pf}:1", "apirouter:res:{pf}:2"
    bucket_args = [1, o, 10, 0, 1]  # hash 1, rpm, capacity 10, no refill, cost 1
    ok = await c.execute("EVAL", ADMIT_LUA, 2, hkey, res1, 1, 1, 0, 0, *bucket_args,
                         timeout=5)
    assert ok[0] == 1  # charged: level 9
    failed = await c.execute("EVAL", ADMIT_LUA, 3, hkey, budget, res2, 1, 1, 1, 0,
                             *bucket_args, -1, -1, -1, 0, 0, 0, 60000, timeout=5)
    assert isinstance(failed, RedisError)  # WRONGTYPE: nothing charged
    # the failure policy releases an admission Redis did not answer
    await c.execute("EVAL", RELEASE_LUA, 2, hkey, res2, 1, 1, 0, 0, *bucket_args, timeout=5)
    level = await c.execute("HGET", hkey, "rpm", timeout=5)
    record = await c.execute("GET", res2, timeout=5)
    c.close()
    assert float(level) == 9, (level, record)  # not refunded for a charge never made
