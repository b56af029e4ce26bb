"""The README's quickstart as written (seed T046): the demo's hint works when pasted, every
flag the README passes to `apirouter serve` exists, and the help says what the README says."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys

from tests.harness import ROOT, Router, wait_for

README = (ROOT / "README.md").read_text()


def serve_help() -> str:
    return subprocess.run([sys.executable, "-m", "tools.cli", "serve", "--help"],
                          capture_output=True, text=True, timeout=30, cwd=ROOT).stdout


def test_every_flag_the_readme_passes_to_serve_exists() -> None:
    helped = serve_help()
    commands = re.findall(r"^apirouter serve (.+)$", README, re.M)
    assert len(commands) >= 2
    flags = {f for cmd in commands for f in re.findall(r"(--[a-z][a-z0-9-_]*)", cmd)}
    flags |= set(re.findall(r"\(`(--[a-z-]+) [0-9]+`\)", README))
    assert "--max-body-bytes" in flags
    for flag in flags:
        assert re.search(rf"{re.escape(flag)}\b", helped), f"README uses {flag}; serve lacks it"
    assert "admin-scoped API keys still reach the admin API" in " ".join(helped.split())


def test_the_demo_hint_works_when_pasted() -> None:
    demo = Router(None, demo=True, workers=1)
    try:
        wait_for(lambda: "try: curl" in demo.output(), 10, "the demo's hint")
        hint = demo.output().split("try: ", 1)[1].splitlines()[0]
        curl = shutil.which("curl")
        assert curl, "curl is not installed"
        args = shlex.split(hint)
        assert args[0] == "curl"
        done = subprocess.run([curl, "-s", "-o", "/dev/null", "-w", "%{http_code}", *args[1:]],
                              capture_output=True, text=True, timeout=30)
        assert done.stdout == "200", (hint, done.stdout)
    finally:
        demo.stop()
        demo.cleanup()
