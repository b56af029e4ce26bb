from __future__ import annotations

from typing import Any

import pytest

from apirouter.config import SETTINGS, ConfigError, load_config_file, parse_config

VALID: dict[str, Any] = {
    "server": {"workers": 3},
    "backends": {"a": {"url": "http://127.0.0.1:9001"}, "b": "https://llm.internal/base/"},
    "models": {"m1": {"backends": [{"backend": "a", "weight": 3}, "b"]}},
}


def test_valid_config_parses_with_defaults() -> None:
    cfg = parse_config(VALID)
    assert cfg.server.workers == 3
    assert cfg.server.max_body_bytes == next(s.default for s in SETTINGS
                                             if s.name == "max_body_bytes")
    assert [b.url for b in cfg.backends] == ["http://127.0.0.1:9001", "https://llm.internal/base"]
    assert [(t.backend, t.weight) for t in cfg.models[0].targets] == [("a", 3), ("b", 1)]


def test_env_overrides_file_and_flags_override_env() -> None:
    cfg = parse_config(VALID, env={"APIROUTER_WORKERS": "5"})
    assert cfg.server.workers == 5
    cfg = parse_config(VALID, env={"APIROUTER_WORKERS": "5"}, overrides={"workers": 7})
    assert cfg.server.workers == 7


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda c: c["models"]["m1"]["backends"].append({"backend": "zz"}),
     "models.m1.backends[2].backend: unknown backend 'zz'"),
    (lambda c: c["models"]["m1"]["backends"][0].update(weight=-1),
     "models.m1.backends[0].weight"),
    (lambda c: c["backends"]["a"].update(url="ftp://x"), "backends.a.url"),
    (lambda c: c["server"].update(workers=0), "server.workers: must be > 0"),
    (lambda c: c["server"].update(wrokers=2), "server.wrokers: unknown setting"),
    (lambda c: c.update(extra=1), "extra: unknown section"),
    (lambda c: c["models"].update(m2={"backends": []}), "models.m2.backends"),
    (lambda c: c["models"]["m1"]["backends"].append("a"), "listed twice"),
])
def test_invalid_configs_name_the_problem(mutate: Any, message: str) -> None:
    import copy

    cfg = copy.deepcopy(VALID)
    mutate(cfg)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config(cfg)


def test_all_zero_weights_rejected() -> None:
    with pytest.raises(ConfigError, match="at least one weight"):
        parse_config({"backends": {"a": "http://h:1"},
                      "models": {"m": {"backends": [{"backend": "a", "weight": 0}]}}})


def test_file_errors_are_config_errors(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config_file(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config_file(str(bad))


def test_fallbacks_must_exist_and_be_cycle_free() -> None:
    base = {"backends": {"a": "http://h:1"}}
    ok = parse_config({**base, "models": {
        "m1": {"backends": ["a"], "fallbacks": ["m2"], "strategy": "least_inflight"},
        "m2": {"backends": ["a"], "fallbacks": ["m3"]},
        "m3": {"backends": ["a"]}}})
    assert ok.models[0].fallbacks == ("m2",) and ok.models[0].strategy == "least_inflight"
    with pytest.raises(ConfigError, match="unknown model 'zz'"):
        parse_config({**base, "models": {"m1": {"backends": ["a"], "fallbacks": ["zz"]}}})
    with pytest.raises(ConfigError, match="cycle m1 -> m2 -> m1"):
        parse_config({**base, "models": {"m1": {"backends": ["a"], "fallbacks": ["m2"]},
                                         "m2": {"backends": ["a"], "fallbacks": ["m1"]}}})
    with pytest.raises(ConfigError, match="strategy"):
        parse_config({**base, "models": {"m1": {"backends": ["a"], "strategy": "random"}}})
