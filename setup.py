"""Metadata lives in setup.cfg; this only stamps the build (apirouter/buildinfo.py)."""

from __future__ import annotations

import datetime
import json
import os
import subprocess

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
STAMP = os.path.join("apirouter", "_build_info.json")


def _commit() -> str:
    if os.environ.get("APIROUTER_GIT_COMMIT"):
        return os.environ["APIROUTER_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def _build_time() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = (datetime.datetime.fromtimestamp(int(epoch), datetime.UTC) if epoch
            else datetime.datetime.now(datetime.UTC))
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


class StampedBuildPy(build_py):
    def run(self) -> None:
        super().run()
        stamp = json.dumps({"git_commit": _commit(), "build_time": _build_time()}) + "\n"
        targets = [os.path.join(self.build_lib, STAMP)]
        if getattr(self, "editable_mode", False):  # the package is imported from the source
            targets.append(os.path.join(HERE, STAMP))
        for path in targets:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(stamp)


# The in-process limiter's bucket arithmetic in C (apirouter/_bucketcore.c); not optional: a
# build that cannot compile it fails, rather than quietly serving at four times the cost.
BUCKET_CORE = Extension("apirouter._bucketcore", ["apirouter/_bucketcore.c"],
                        extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra"])

# The usage ring's producer (and the drain's frame loop) in C (apirouter/_ringcore.c): a
# worker's per-request hand-off of its usage record in one call; required like the bucket core.
RING_CORE = Extension("apirouter._ringcore", ["apirouter/_ringcore.c"],
                      extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra"])
# A streamed read's whole events found, checked and counted in C (apirouter/_ssecore.c).
SSE_CORE = Extension("apirouter._ssecore", ["apirouter/_ssecore.c"],
                     extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra"])

# The lean server's request parse and response head in C (apirouter/_httpcore.c).
HTTP_CORE = Extension("apirouter._httpcore", ["apirouter/_httpcore.c"],
                      extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra"])

setup(cmdclass={"build_py": StampedBuildPy},
      ext_modules=[BUCKET_CORE, RING_CORE, SSE_CORE, HTTP_CORE])
