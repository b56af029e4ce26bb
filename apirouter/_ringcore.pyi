"""Types of the usage ring's C core (apirouter/_ringcore.c)."""

from collections.abc import Callable
from typing import TypeVar

_Encoder = TypeVar("_Encoder", bound=Callable[..., bytes])

class Producer:
    def __init__(self, slot: memoryview, capacity: int, crc32: Callable[[bytes], int]) -> None: ...
    def put(self, record: bytes) -> bool: ...
    def release(self) -> None: ...

def scan(span: bytes, at: int, stop: int, limit: int, crc32: Callable[[bytes], int],
         out: list[bytes], /) -> tuple[int, int]: ...

def record_encoder(reference: _Encoder, write_floats: Callable[[tuple[float, float]], bytes],
                   /) -> _Encoder: ...
