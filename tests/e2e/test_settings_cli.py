"""Boolean settings read the same from the command line, the environment and the file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable

import pytest

from apirouter.config import ConfigError, parse_config
from tests.harness import HOST, ROOT, MockBackend, Router, free_port, router_config


def _chat(r: Router) -> int:
    import http.client

    c = http.client.HTTPConnection(HOST, r.port, timeout=10)
    c.request("POST", "/v1/chat/completions",
              json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}]}),
              {"Content-Type": "application/json"})
    status = c.getresponse().status
    c.close()
    return status


def test_auth_required_false_on_the_command_line_turns_auth_off(
        mock_backend: Callable[..., MockBackend], router: Callable[..., Router]) -> None:
    a = mock_backend("a")
    cfg = router_config({"a": a.url}, {"m": {"a": 1}}, auth_required=True)
    r = router(cfg, workers=1, extra=["--auth-required", "false"])
    assert _chat(r) == 200  # argparse's type=bool read "false" as True: 401


def test_a_word_that_is_not_a_boolean_is_refused_on_the_command_line(tmp_path: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "tools.cli", "serve", "--demo",
                           "--bind", f"{HOST}:{free_port()}", "--run-dir", str(tmp_path),
                           "--auth-required", "maybe"], cwd=ROOT, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2
    assert "--auth-required: invalid boolean value: 'maybe'" in proc.stderr


@pytest.mark.parametrize("word,value", [("true", True), ("1", True), ("yes", True),
                                        ("On", True), ("false", False), ("0", False),
                                        ("no", False), ("OFF", False)])
def test_environment_booleans(word: str, value: bool) -> None:
    cfg = parse_config({}, env={"APIROUTER_AUTH_REQUIRED": word})
    assert cfg.server.auth_required is value


def test_an_environment_word_that_is_not_a_boolean_is_refused() -> None:
    with pytest.raises(ConfigError, match="APIROUTER_AUTH_REQUIRED: expected bool, got 'nah'"):
        parse_config({}, env={"APIROUTER_AUTH_REQUIRED": "nah"})
    assert os.environ.get("APIROUTER_AUTH_REQUIRED") is None
