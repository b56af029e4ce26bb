"""bench.instructions: a real count, the worker under valgrind against the mock backend."""

from __future__ import annotations

from bench.instructions import measure


def test_instructions_per_request_are_counted_and_differenced() -> None:
    result = measure(seconds=1, connections=8)
    short, long = result["runs"]
    assert 0 < short["requests"] < long["requests"]
    assert short["instructions"] < long["instructions"]
    # Start-up (imports, the table, valgrind's own) cancels in the difference: what is left
    # is the request path, tens to hundreds of thousands of instructions, not millions.
    per_request = result["instructions_per_request"]
    assert 20_000 < per_request < 2_000_000, per_request
    assert per_request < short["instructions"] / short["requests"]
