"""Fixtures: real services (session scope) and the project's own processes (per test)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.harness import EtcdServer, KafkaBroker, ManagedProcess, MockBackend, RedisServer, Router


def _stopped(proc: ManagedProcess) -> None:
    proc.stop()
    proc.cleanup()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    _stopped(server)


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    server = EtcdServer()
    yield server
    _stopped(server)


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[KafkaBroker]:
    broker = KafkaBroker()
    yield broker
    _stopped(broker)


@pytest.fixture
def mock_backend() -> Iterator[Callable[..., MockBackend]]:
    """Factory: mock_backend("name", "--latency-ms", "5") starts a mock backend process."""
    started: list[MockBackend] = []

    def start(name: str = "mock", *args: str) -> MockBackend:
        m = MockBackend(name, *args)
        started.append(m)
        return m

    yield start
    for m in started:
        _stopped(m)


@pytest.fixture
def router() -> Iterator[Callable[..., Router]]:
    """Factory: router(config_dict, workers=2) runs `apirouter serve` until the test ends."""
    started: list[Router] = []

    def start(config: dict[str, Any] | None, **kwargs: Any) -> Router:
        r = Router(config, **kwargs)
        started.append(r)
        return r

    yield start
    for r in started:
        _stopped(r)
