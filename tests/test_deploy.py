"""Files under deploy/ stay usable: the example config is valid and means what it says."""

from __future__ import annotations

from pathlib import Path

from apirouter.config import SETTINGS, load_config_file

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def test_example_config_is_valid_and_documents_every_setting() -> None:
    path = DEPLOY / "config" / "router.example.yaml"
    cfg = load_config_file(str(path))
    assert {m.name for m in cfg.models} == {"llama-3.1-8b-instruct", "gpt-4o-mini"}
    text = path.read_text()
    for s in SETTINGS:
        assert f"  {s.name}:" in text, f"{s.name} is not documented in the example"


def test_systemd_unit_reloads_with_hup_and_stops_with_term() -> None:
    unit = (DEPLOY / "systemd" / "apirouter.service").read_text()
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit
    assert "KillSignal=SIGTERM" in unit
    assert "apirouter serve --config" in unit
