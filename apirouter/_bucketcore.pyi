"""Types of the C core of apirouter/shared_buckets.py (apirouter/_bucketcore.c)."""

from types import NotImplementedType

from apirouter.limits import BucketSpec

class Core:
    def __init__(self, buf: object, fd: int, stripes: int, ways: int) -> None: ...
    def take(self, specs: list[BucketSpec], keys: dict[str, tuple[int, int]], now_ms: float,
             /) -> tuple[int, float, int] | None | NotImplementedType: ...
    def settle(self, items: list[tuple[list[BucketSpec], int]],
               keys: dict[str, tuple[int, int]], now_ms: float, /) -> int | None: ...
