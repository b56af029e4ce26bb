"""readyz asks Redis itself: nothing listening is 'degraded' at once, not 'ok' until a request
happens to fail."""

from __future__ import annotations

from collections.abc import Callable

from tests.harness import MockBackend, RedisServer, Router, free_port, router_config, wait_for


def test_readyz_probes_redis_actively(mock_backend: Callable[..., MockBackend],
                                      router: Callable[..., Router]) -> None:
    port = free_port()  # nothing listens here yet
    a = mock_backend("a")
    r = router(router_config({"a": a.url}, {"m": {"a": 1}},
                             redis_url=f"redis://127.0.0.1:{port}/0"), workers=1)

    def admission() -> dict[str, object]:
        check: dict[str, object] = r.readyz()["checks"]["admission"]
        return check

    wait_for(lambda: admission()["status"] == "degraded", 10, "Redis down reported")
    probe = admission()["probe"]
    assert isinstance(probe, dict) and probe["ok"] is False and probe["error"]
    redis = RedisServer(port=port)
    try:
        wait_for(lambda: admission()["status"] == "ok", 10, "Redis back reported")
        assert admission()["probe"]["ok"] is True  # type: ignore[index]
    finally:
        redis.stop()
        redis.cleanup()
