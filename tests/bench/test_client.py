"""The suite's two HTTP clients (lean httptools, aiohttp) read the same things from the same
answers of a real mock backend served in-process: status, error codes, usage, SSE timing,
and a dropped connection as a transport error."""

from __future__ import annotations

import aiohttp
import pytest
import uvloop

from bench.client import HttpTarget
from bench.loadgen import TRANSPORT_ERROR, Sample
from bench.procs import HOST, free_port
from bench.suite import request_body
from tools.mock_backend import Behaviour, start_mock


@pytest.mark.parametrize("lean", [True, False])
async def test_both_clients_read_the_same(lean: bool) -> None:
    await exercise(lean)


@pytest.mark.parametrize("lean", [True, False])
def test_both_clients_on_uvloop(lean: bool) -> None:
    """The suite runs on uvloop, whose transports are not asyncio's classes."""
    uvloop.run(exercise(lean))


async def exercise(lean: bool) -> None:
    port = free_port()
    server, state = await start_mock(HOST, port, models=["m"])
    url = f"http://{HOST}:{port}/v1/chat/completions"
    try:
        async with HttpTarget(url, request_body("m", False, "/v1/chat/completions"),
                              key="k", want_usage=True, lean=lean, max_connections=2) as t:
            assert t.client == ("httptools" if lean else "aiohttp")
            samples = [Sample(i, 0.0) for i in range(5)]
            for s in samples:
                await t.send(s)
            assert [s.status for s in samples] == [200] * 5
            assert all(s.usage and s.usage[0] > 0 and s.usage[1] > 0 for s in samples)
            assert state.connections <= 2  # kept alive and reused
        async with HttpTarget(url, request_body("m", True, "/v1/chat/completions"),
                              stream=True, want_usage=True, lean=lean) as t:
            state.behaviour = Behaviour(reply_tokens=6, event_interval_ms=2.0)
            s = Sample(0, 0.0)
            await t.send(s)
            assert s.status == 200 and s.ttft is not None and s.ttft > 0
            # role chunk, 6 words, finish, usage, [DONE]: 10 events, 9 gaps
            assert len(s.event_gaps) == 9
            assert s.usage is not None and s.usage[0] > 0 and s.usage[1] == 6
            state.behaviour = Behaviour(error_rate=1.0, error_status=503)
            s = Sample(1, 0.0)
            await t.send(s)
            assert s.status == 503 and s.error == "mock_503"
            state.behaviour = Behaviour(error_rate=1.0, fail_mode="close")
            s = Sample(2, 0.0)
            with pytest.raises((ConnectionError, aiohttp.ClientError)):
                await t.send(s)  # open_loop records it as a transport error
            assert s.status == TRANSPORT_ERROR
    finally:
        server.close()
        await server.wait_closed()
