"""What build is running: version, git commit and build time, stamped when the package is built.

``setup.py`` writes ``apirouter/_build_info.json`` while building (a wheel, an image, an
editable install): the commit from ``APIROUTER_GIT_COMMIT`` or ``git rev-parse HEAD`` in the
source tree, the time from ``SOURCE_DATE_EPOCH`` or the clock. Nothing asks git at run time; a
tree that was never built says ``unknown``.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources

from apirouter import __version__

STAMP_FILE = "_build_info.json"
UNKNOWN = "unknown"


@cache
def build_info() -> dict[str, str]:
    info = {"version": __version__, "git_commit": UNKNOWN, "build_time": UNKNOWN}
    try:
        stamped = json.loads(resources.files("apirouter").joinpath(STAMP_FILE).read_text())
    except (OSError, ValueError):
        return info
    if isinstance(stamped, dict):
        for k in ("git_commit", "build_time"):
            if isinstance(stamped.get(k), str) and stamped[k]:
                info[k] = stamped[k]
    return info
