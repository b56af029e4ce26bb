"""Control-plane metrics, written to the same multiprocess directory the workers export from.

PROMETHEUS_MULTIPROC_DIR must be set before this module is imported (``apirouter serve``
does that first thing), so these land beside the workers' files and appear on /metrics.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client import Counter, Gauge

from apirouter.buildinfo import build_info

TABLE_GENERATION = Gauge("router_table_published_generation",
                         "Latest routing-table generation the supervisor published",
                         multiprocess_mode="livemax")
CONFIG_REVISION = Gauge("router_config_revision", "etcd revision of the config in force",
                        multiprocess_mode="livemax")
CONFIG_STORE_UP = Gauge("router_config_store_up", "1 while the config store (etcd) answers",
                        multiprocess_mode="livemax")
CONFIG_REJECTIONS = Counter("router_config_rejections_total",
                            "Config changes rejected as invalid (the last good one stays)")
BACKEND_HEALTH = Gauge("router_backend_health_status",
                       "1 while the backend takes traffic first-hand, 0 when unhealthy or ejected",
                       ["backend_id"], multiprocess_mode="livemax")
EJECTIONS = Counter("router_backend_ejections_total", "Outlier ejections", ["backend_id"])
USAGE_DRAINED = Counter("router_usage_records_drained_total",
                        "Usage records taken from worker rings and overflow files")
USAGE_PUBLISHED = Counter("router_usage_records_published_total",
                          "Usage records acknowledged by the sink (Kafka, or JSONL files)")
USAGE_SPOOLED = Counter("router_usage_records_spooled_total",
                        "Usage records written to the disk spool because Kafka did not take them")
USAGE_REPLAYED = Counter("router_usage_records_replayed_total",
                         "Spooled usage records published to Kafka later")
USAGE_SPOOL_BYTES = Gauge("router_usage_spool_bytes", "Bytes in the disk spool not yet replayed",
                          multiprocess_mode="livemax")
USAGE_SPOOL_AGE = Gauge("router_usage_spool_oldest_age_seconds",
                        "Age of the oldest record waiting in the disk spool (0: empty)",
                        multiprocess_mode="livemax")
USAGE_SPOOL_CORRUPT = Counter("router_usage_spool_corrupt_entries_total",
                              "Torn or corrupt spool entries skipped (a crash mid-write)")
USAGE_RING_FILL = Gauge("router_usage_ring_fill_ratio",
                        "Fullest worker usage ring, as a share of its capacity (1: overflowing)",
                        multiprocess_mode="livemax")
USAGE_SINK_UP = Gauge("router_usage_sink_up", "1 while the usage sink (Kafka) takes records",
                      multiprocess_mode="livemax")
USAGE_SINK_ERRORS = Counter("router_usage_sink_errors_total",
                            "Failed attempts to hand usage records to the sink or spool",
                            ["sink"])
USAGE_MALFORMED = Counter("router_usage_records_malformed_total",
                          "Ring entries that were not usage records (quarantined, logged)")
USAGE_DEAD_LETTER = Counter("router_usage_dead_letter_total",
                            "Usage records Kafka can never take (too large), written to the "
                            "dead-letter file beside the spool instead")
USAGE_QUARANTINED = Counter("router_usage_quarantined_total",
                            "Ring regions or entries that failed their checks, kept in the run "
                            "directory's usage-quarantine/")
AUDIT_WRITES = Counter("router_audit_records_stored_total", "Records written to the audit store")
AUDIT_ERRORS = Counter("router_audit_store_errors_total",
                       "Batches the audit store did not take (the records are still exported)")
USAGE_SPOOL_RECORDS = Gauge("router_usage_spool_records",
                            "Usage records in the disk spool not yet replayed",
                            multiprocess_mode="livemax")
HEARTBEAT = Gauge("router_supervisor_heartbeat_timestamp_seconds",
                  "Unix time of the supervisor's last usage-drain pass (stale: supervisor gone)",
                  multiprocess_mode="max")
BUILD_INFO = Gauge("router_build_info", "1, labelled with the build that is running",
                   ["version", "git_commit", "build_time"], multiprocess_mode="max")

SINKS = ("kafka", "spool", "jsonl")
for _sink in SINKS:
    USAGE_SINK_ERRORS.labels(_sink)


def stamp_build() -> None:
    info = build_info()
    BUILD_INFO.labels(info["version"], info["git_commit"], info["build_time"]).set(1)
    HEARTBEAT.set(time.time())


def preregister(backend_ids: Iterable[str]) -> None:
    """Create (at zero) the per-backend series of a published table. Idempotent."""
    for bid in backend_ids:
        EJECTIONS.labels(bid)
