"""Review of 4b410a6 (bucket segment layout 2 -> 3): a router started on a run directory whose
previous router — the version before — died and left its bucket segment (layout 2: no stripe
mutexes, lockf) behind, with none of its workers alive, must start (take the segment over or
replace it), not refuse for ever."""

from __future__ import annotations

import struct
import tempfile
from collections.abc import Callable, Iterator

import pytest

from apirouter.shm import open_segment, segment_name, unlink
from tests.harness import MockBackend, Router, router_config

STRIPES, WAYS = 1024, 16  # shared_buckets.STRIPES / WAYS, unchanged by 4b410a6
INSTANCE = "r3layout2ab"


def _previous_versions_segment(name: str) -> None:
    """As a9c055e's create_buckets_segment made it: a 32-byte header (magic, layout 2,
    stripes, ways), then the slots, zeroed; nothing after them."""
    shm, created = open_segment(name, 32 + STRIPES * WAYS * 40)
    assert created and shm.buf is not None
    shm.buf[:32] = struct.pack("<8sIII", b"APIRBKT\x01", 2, STRIPES, WAYS).ljust(32, b"\0")
    shm.close()


@pytest.fixture
def run_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="apirouter-layout-")
    with open(f"{path}/instance", "w") as f:
        f.write(INSTANCE + "\n")
    yield path
    for kind in ("buckets", "stats", "table", "usage"):
        unlink(segment_name(INSTANCE, kind))


def test_a_router_starts_over_the_previous_versions_bucket_segment(
        mock_backend: Callable[..., MockBackend], router: Callable[..., Router],
        run_dir: str) -> None:
    backend = mock_backend("a")
    _previous_versions_segment(segment_name(INSTANCE, "buckets"))
    r = router(router_config({"a": backend.url}, {"m": {"a": 1}}), workers=1,
               run_dir=run_dir)  # waits until readyz answers 200
    assert r.readyz()["status"] == "ready"


def test_the_previous_versions_records_are_kept_when_nobody_uses_its_segment() -> None:
    """(The fix's unit half.) A layout-2 segment's slots are layout 3's: its buckets and
    ledgers carry over, so a restart across the upgrade does not refill every limit."""
    import time

    from apirouter.limits import BucketSpec
    from apirouter.shared_buckets import BucketTable, create_buckets_segment

    name = segment_name(INSTANCE + "u", "buckets")
    _previous_versions_segment(name)
    try:
        # a bucket the previous version charged (its slot as it wrote it, lockf and all)
        table = BucketTable.private(stripes=STRIPES, ways=WAYS)
        now = time.monotonic() * 1000
        assert table.admit([BucketSpec("key:k:rpm", 10, 1, 4)], [], None, now)[0].allowed
        old, created = open_segment(name, 32 + STRIPES * WAYS * 40)
        assert not created and old.buf is not None
        old.buf[32:32 + STRIPES * WAYS * 40] = table._buf[32:32 + STRIPES * WAYS * 40]
        old.close()
        shm = create_buckets_segment(name, replace_foreign=True)
        shared = BucketTable.attach(name)
        state = shared.bucket("key:k:rpm", now)
        assert state is not None and state.tokens == 6
        shared.close()
        shm.close()
    finally:
        unlink(name)
