"""apirouter/_usagecore.c's usage_pair held to its Python reference (validation._usage_pair_py)
on generated bodies: the usual usage block, and every near miss of it the pattern refuses."""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from apirouter._usagecore import usage_pair
from apirouter.validation import _usage_pair_py, usage_counts

# Pieces a body is made of: the two keys, their near misses, spaces, digit runs about the
# ten-digit bound and MAX_REPORTED_TOKENS, the terminators the pattern takes and others.
_pieces = st.sampled_from([
    b'"prompt_tokens":', b'"completion_tokens":', b'"prompt_tokens"', b'"completion_tokens" :',
    b'"total_tokens":', b"prompt_tokens:", b'"', b":", b" ", b"  ", b",", b", ", b"}", b"\n",
    b"\r", b"\t", b"{", b"]", b"x", b"-", b"+", b".", b"0", b"7", b"00", b"1000000000",
    b"1000000001", b"999999999", b"9999999999", b"12345678901", b"0000000001", b"\xff", b"\x00",
]) | st.integers(0, 10**11).map(lambda n: str(n).encode()) | st.binary(max_size=4)


def _block(prompt: int, completion: int, a: str, b: str, c: str, d: str, end: str) -> bytes:
    return (f'"prompt_tokens":{a}{prompt}{b},{c}"completion_tokens":{d}{completion}{end}'
            .encode())


_spaces = st.sampled_from(["", " ", "  ", "\t", "\n"])
_blocks = st.builds(_block, st.integers(0, 2 * 10**10), st.integers(0, 2 * 10**10), _spaces,
                    _spaces, _spaces, _spaces, st.sampled_from([",", "}", " ", "\n", "\r", "",
                                                                "x", "]", "\t", "0"]))
_bodies = st.lists(_pieces | _blocks, max_size=24).map(b"".join)


@settings(max_examples=3000, deadline=None)
@given(body=_bodies)
def test_usage_pair_is_its_python_reference(body: bytes) -> None:
    assert usage_pair(body) == _usage_pair_py(body)
    assert usage_pair(bytearray(body)) == _usage_pair_py(bytearray(body))


@settings(max_examples=300, deadline=None)
@given(prompt=st.integers(0, 10**9), completion=st.integers(0, 10**9),
       content=st.text(max_size=100), indent=st.booleans())
def test_usage_pair_reads_an_openai_response(prompt: int, completion: int, content: str,
                                              indent: bool) -> None:
    body = orjson.dumps({"choices": [{"message": {"content": content}}],
                         "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                   "total_tokens": prompt + completion}},
                        option=orjson.OPT_INDENT_2 if indent else 0)
    # (indented, the block spans lines: the pattern's spaces are spaces only, so usage_counts
    # reads it the slower way)
    assert usage_pair(body) == _usage_pair_py(body) == (None if indent else (prompt, completion))
    assert usage_counts(body) == (prompt, completion)


def test_usage_pair_edges() -> None:
    assert usage_pair(b"") is None
    assert usage_pair(b'"prompt_tokens":') is None
    assert usage_pair(b'"prompt_tokens":1,"completion_tokens":2') is None  # no terminator
    assert usage_pair(b'"prompt_tokens":1,"completion_tokens":2}') == (1, 2)
    assert usage_pair(b'"prompt_tokens":1,"completion_tokens":2,"completion_tokens":3}') is None
    assert usage_pair(b'"prompt_tokens":1000000001,"completion_tokens":2}') is None
    assert usage_pair(b'"prompt_tokens":12345678901,"completion_tokens":2}') is None
    assert usage_pair(b'"prompt_tokens":0000000001,"completion_tokens":2}') == (1, 2)
