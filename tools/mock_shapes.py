"""What the mock backend answers, in OpenAI's shapes: chat and text completions (whole, or as
the payloads of a stream's events), embeddings and model objects.

The reply text depends only on the request and the mock's name (and ``reply_tokens``), so a
stream carries exactly the text and usage of the non-streaming answer to the same request.
Tokens are words: ``completion_tokens`` is the number of words, one content event each.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import struct
import time
from collections.abc import Iterator
from typing import Any

import orjson

_SENTENCE = "This is a mock completion for testing.".split()


def reply_text(name: str, doc: dict[str, Any], reply_tokens: int = 0) -> str:
    """The answer: a fixed sentence, or ``reply_tokens`` words of it repeated, cut to the
    request's ``max_completion_tokens`` (or ``max_tokens``)."""
    words = ["Hello", "from", name + "."] + _SENTENCE
    if reply_tokens:
        words = list(itertools.islice(itertools.cycle(words), reply_tokens))
    max_tokens = doc.get("max_completion_tokens", doc.get("max_tokens"))
    if isinstance(max_tokens, int) and max_tokens > 0:
        words = words[:max_tokens]
    return " ".join(words)


def _prompt_words(doc: dict[str, Any]) -> int:
    messages = doc.get("messages")
    if messages is None:
        return len(str(doc.get("prompt", "")).split()) or 1
    n = 0
    if isinstance(messages, list):
        for m in messages:
            c = m.get("content") if isinstance(m, dict) else None
            if isinstance(c, str):
                n += len(c.split())
    return max(n, 1)


def usage(doc: dict[str, Any], text: str) -> dict[str, int]:
    prompt, completion = _prompt_words(doc), len(text.split())
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def chat_body(name: str, rid: int, doc: dict[str, Any], text: str, with_usage: bool) -> bytes:
    out: dict[str, Any] = {
        "id": f"chatcmpl-{name}-{rid}", "object": "chat.completion",
        "created": int(time.time()), "model": doc.get("model", "mock"),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": "stop", "logprobs": None}],
        "system_fingerprint": f"mock-{name}"}
    if with_usage:
        out["usage"] = usage(doc, text)
    return orjson.dumps(out)


def completion_body(name: str, rid: int, doc: dict[str, Any], text: str,
                    with_usage: bool) -> bytes:
    out: dict[str, Any] = {
        "id": f"cmpl-{name}-{rid}", "object": "text_completion",
        "created": int(time.time()), "model": doc.get("model", "mock"),
        "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}]}
    if with_usage:
        out["usage"] = usage(doc, text)
    return orjson.dumps(out)


def stream_payloads(name: str, rid: int, doc: dict[str, Any], text: str, chat: bool,
                    with_usage: bool) -> Iterator[bytes]:
    """The ``data:`` payloads of a stream in OpenAI's chunk shape, ``[DONE]`` last: for chat a
    role chunk, one chunk per word, a finish chunk and (``with_usage``) a usage chunk with no
    choices; with usage asked for, every other chunk says ``"usage": null`` as OpenAI does."""
    base: dict[str, Any] = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{name}-{rid}",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()), "model": doc.get("model", "mock")}
    if chat:
        base["system_fingerprint"] = f"mock-{name}"
    if with_usage:
        base["usage"] = None

    def choice(piece: str | None, finish: str | None) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {} if piece is None else {"content": piece}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}

    if chat:
        yield orjson.dumps({**base, "choices": [{"index": 0, "delta": {
            "role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]})
    for i, word in enumerate(text.split()):
        yield orjson.dumps({**base, "choices": [choice(word if i == 0 else " " + word, None)]})
    yield orjson.dumps({**base, "choices": [choice(None, "stop")]})
    if with_usage:
        yield orjson.dumps({**base, "choices": [], "usage": usage(doc, text)})
    yield b"[DONE]"


def embeddings_body(doc: dict[str, Any], with_usage: bool) -> bytes:
    """Eight numbers per input from its hash; base64 little-endian float32 when asked for
    (the openai SDK asks for it by default and decodes it)."""
    inputs = doc.get("input", "")
    items = inputs if isinstance(inputs, list) else [inputs]
    as_base64 = doc.get("encoding_format") == "base64"
    data = []
    for i, item in enumerate(items):
        vector = [round(b / 255.0, 6) for b in hashlib.sha256(str(item).encode()).digest()[:8]]
        data.append({"object": "embedding", "index": i, "embedding": base64.b64encode(
            struct.pack(f"<{len(vector)}f", *vector)).decode() if as_base64 else vector})
    out: dict[str, Any] = {"object": "list", "data": data, "model": doc.get("model", "mock")}
    if with_usage:
        tokens = sum(len(str(x).split()) for x in items) or 1
        out["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
    return orjson.dumps(out)


def model_object(model: str, owner: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": 0, "owned_by": owner}
