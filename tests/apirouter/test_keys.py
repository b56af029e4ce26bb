from __future__ import annotations

from typing import Any

import pytest

from apirouter.config import ConfigError, parse_config
from apirouter.errors import RouterError
from apirouter.keys import (
    DEFAULT_TIERS,
    authenticate,
    credential,
    hash_key,
    new_key,
    parse_keys,
    parse_tiers,
)

KEY = "ar-test-key"


def keys_of(raw: dict[str, Any]) -> dict[str, Any]:
    return {k.sha256: k for k in parse_keys(raw, parse_tiers(None))}


def test_seed_tiers_and_key_overrides() -> None:
    assert (DEFAULT_TIERS["admin"].rpm, DEFAULT_TIERS["admin"].rpm_burst) == (100_000, 120_000)
    assert (DEFAULT_TIERS["developer"].rpm, DEFAULT_TIERS["viewer"].rpm_burst) == (10_000, 1_200)
    keys = keys_of({"k1": {"sha256": hash_key(KEY), "org": "acme", "tier": "viewer",
                           "rpm": 50}})
    record = keys[hash_key(KEY)]
    assert (record.limits.rpm, record.limits.rpm_burst) == (50, 50)  # own rate, no burst
    assert record.limits.tpm == DEFAULT_TIERS["viewer"].tpm
    assert record.scopes == {"inference"}


@pytest.mark.parametrize(("raw", "message"), [
    ({"k": {"org": "a"}}, "sha256"),
    ({"k": {"sha256": "x" * 64, "org": "a"}}, "sha256"),
    ({"k": {"sha256": "a" * 64}}, "org"),
    ({"k": {"sha256": "a" * 64, "org": "a", "scopes": ["root"]}}, "scopes"),
    ({"k": {"sha256": "a" * 64, "org": "a", "tier": "gold"}}, "unknown tier"),
    ({"k": {"sha256": "a" * 64, "org": "a", "rpm": 10, "rpm_burst": 5}}, "burst"),
    ({"k": {"sha256": "a" * 64, "org": "a", "key": "plaintext"}}, "unknown field"),
    ({"k": {"sha256": "a" * 64, "org": "a"}, "j": {"sha256": "a" * 64, "org": "b"}}, "same key"),
])
def test_invalid_keys_are_config_errors(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_keys(raw, parse_tiers(None))


def test_custom_tiers_and_keys_in_a_config() -> None:
    cfg = parse_config({"tiers": {"batch": {"rpm": 10}},
                        "keys": {"k": {"sha256": hash_key(KEY), "org": "o", "tier": "batch"}}})
    assert cfg.tiers["batch"].rpm == 10 and cfg.keys[0].tier == "batch"


def test_authentication_decisions() -> None:
    keys = keys_of({"k": {"sha256": hash_key(KEY), "org": "acme",
                          "scopes": ["inference", "audit"]}})
    assert authenticate(keys, KEY, "inference").key_id == "k"
    for key, scope, code in ((None, "inference", "UNAUTHORIZED"),
                             ("ar-wrong", "inference", "INVALID_API_KEY"),
                             (KEY, "admin", "FORBIDDEN")):
        with pytest.raises(RouterError) as e:
            authenticate(keys, key, scope)
        assert e.value.code == code


def test_credential_sources_and_new_keys() -> None:
    assert credential("Bearer abc", None) == "abc"
    assert credential("bearer  abc ", "zzz") == "abc"
    assert credential(None, "xyz") == "xyz"
    assert credential("Basic abc", None) is None
    key_id, key = new_key()
    assert key.startswith("ar-") and len(key) > 40 and key_id.startswith("key_")


def test_signing_round_trip_and_failures() -> None:
    import time

    from apirouter.keys import KeyRecord, Tier
    from apirouter.signing import NONCE, SIGNATURE, TIMESTAMP, sign, verify

    record = KeyRecord("k", hash_key(KEY), "o", "", frozenset({"inference"}), "t",
                       Tier(1, 1, 0, 0), True)
    h = sign(KEY, "post", "/v1/inference?x=1", b"{}")
    now = time.time()
    assert verify(record, "POST", "/v1/inference?x=1", b"{}", h[TIMESTAMP], h[NONCE],
                  h[SIGNATURE], now, 300) == h[NONCE]
    for args in ((b"{ }", h[NONCE]), (b"{}", "short")):
        with pytest.raises(RouterError):
            verify(record, "POST", "/v1/inference?x=1", args[0], h[TIMESTAMP], args[1],
                   h[SIGNATURE], now, 300)
    with pytest.raises(RouterError, match="window"):
        verify(record, "POST", "/v1/inference?x=1", b"{}", h[TIMESTAMP], h[NONCE],
               h[SIGNATURE], now + 301, 300)
