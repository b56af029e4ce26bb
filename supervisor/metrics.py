"""Control-plane metrics, written to the same multiprocess directory the workers export from.

PROMETHEUS_MULTIPROC_DIR must be set before this module is imported (``apirouter serve``
does that first thing), so these land beside the workers' files and appear on /metrics.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

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
