"""schemathesis, every check, against apirouter/openapi.yaml and a real router: the document and
the server agree (no 5xx, nothing schema-valid refused, nothing schema-invalid accepted)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import pytest
import yaml

from apirouter.usage import field_names
from tests.harness import MockBackend, Router, router_config

SPEC = str(resources.files("apirouter") / "openapi.yaml")
# Bounded: about 10 s on an idle machine; a fixed seed makes a failure reproducible (the output
# prints the curl command of each failing case). One schemathesis worker: with two, hypothesis'
# shared caches race and schemathesis reports "Inconsistent results" of its own.
MAX_EXAMPLES = 100
SEED = 20261129


@pytest.fixture(scope="module")
def router() -> Iterator[Router]:
    mock = MockBackend("a")
    # The document's examples name gpt-4o-mini: route it, so the examples reach a backend.
    r = Router(router_config({"a": mock.url}, {"gpt-4o-mini": {"a": 1}}), workers=1)
    yield r
    for p in (r, mock):
        p.stop()
        p.cleanup()


def schemathesis() -> str:
    path = Path(sys.executable).parent / "schemathesis"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: tools/setup.sh test installs schemathesis")
    return str(path)


def test_the_server_keeps_the_openapi_contract(router: Router, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCHEMATHESIS_")}
    run = subprocess.run(
        [schemathesis(), "run", SPEC, "--url", router.url, "--checks", "all",
         "--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED), "--workers", "1",
         "--output-sanitize", "false", "--no-color", "--generation-database", "none",
         "--report-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env)
    summary = run.stdout[-6000:]
    assert run.returncode == 0, f"schemathesis found problems:\n{summary}\n{run.stderr[-2000:]}"
    assert "Server error" not in summary and "rejected" not in summary
    # Client errors are answered, not logged with a traceback each.
    assert "Traceback" not in router.output(), router.output()[-4000:]


def test_the_documented_fields_are_the_usage_record_fields() -> None:
    """?fields= is documented as an enum so schemathesis sends only names the server knows."""
    with open(SPEC, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    params = doc["paths"]["/v1/audit/requests/{requestId}"]["get"]["parameters"]
    fields = next(p for p in params if p["name"] == "fields")
    assert set(fields["schema"]["items"]["enum"]) == field_names()
