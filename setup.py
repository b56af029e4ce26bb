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


# The C cores, each held equal to a Python reference by property tests (tests/*/test_*core*).
# Not optional: a build that cannot compile them fails, rather than quietly serving at several
# times the cost (the limiter's arithmetic alone was four times dearer in Python).
C_CORES = {
    # the in-process limiter's bucket arithmetic
    "_bucketcore": "apirouter/_bucketcore.c",
    # the usage ring's producer (a request's record in one call) and the drain's frame loop
    "_ringcore": "apirouter/_ringcore.c",
    # a streamed read's whole events found, checked and counted; chunked framing taken off
    "_ssecore": "apirouter/_ssecore.c",
    # the lean server's whole request parsed and its response head built, one call each
    "_httpcore": "apirouter/_httpcore.c",
    # a backend's whole buffered response taken in one call
    "_wholecore": "apirouter/_wholecore.c",
    # a buffered response's token counts read from its usage block
    "_usagecore": "apirouter/_usagecore.c",
}

setup(cmdclass={"build_py": StampedBuildPy},
      ext_modules=[Extension(f"apirouter.{name}", [source],
                             extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra"])
                   for name, source in C_CORES.items()])
