"""HMAC request signing: the canonical string, the client-side signer, and verification. Pure.

For keys created with ``hmac: true`` every request carries three headers:

    X-Signature-Timestamp   unix seconds when the client signed
    X-Signature-Nonce       8-64 characters of [A-Za-z0-9_-], never reused
    X-Signature             hex HMAC-SHA256(secret, canonical string)

    canonical string = METHOD "\\n" PATH "\\n" TIMESTAMP "\\n" NONCE "\\n" hex(SHA-256(body))

PATH includes the query string. The secret is derived from the key's SHA-256 (see
keys.signing_secret), so the router can verify without ever storing the key. A request outside
the timestamp window (default ±300 s) is refused; a nonce already seen inside twice the window
is refused as a replay (checked in the same Redis round trip as admission).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time

from apirouter.errors import RouterError
from apirouter.keys import KeyRecord, hash_key, signing_secret

TIMESTAMP = "X-Signature-Timestamp"
NONCE = "X-Signature-Nonce"
SIGNATURE = "X-Signature"
_NONCE = re.compile(r"[A-Za-z0-9_-]{8,64}")


def canonical(method: str, path: str, timestamp: str, nonce: str, body: bytes) -> bytes:
    return "\n".join((method.upper(), path, timestamp, nonce,
                      hashlib.sha256(body).hexdigest())).encode()


def sign(key: str, method: str, path: str, body: bytes, timestamp: int | None = None,
         nonce: str | None = None) -> dict[str, str]:
    """The headers a client adds to a request made with ``key`` (see tools/sign_request.py)."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    nonce = nonce or secrets.token_urlsafe(16)
    mac = hmac.new(signing_secret(hash_key(key)), canonical(method, path, ts, nonce, body),
                   hashlib.sha256).hexdigest()
    return {TIMESTAMP: ts, NONCE: nonce, SIGNATURE: mac}


def verify(record: KeyRecord, method: str, path: str, body: bytes, timestamp: str | None,
           nonce: str | None, signature: str | None, now: float, window_s: float) -> str:
    """Check a signed request; return its nonce (for the replay check) or raise."""
    if not (timestamp and nonce and signature):
        raise RouterError("UNAUTHORIZED", f"this key requires signed requests: send {TIMESTAMP}, "
                                          f"{NONCE} and {SIGNATURE}")
    if not _NONCE.fullmatch(nonce):
        raise RouterError("INVALID_REQUEST", "the nonce must be 8-64 characters of "
                                             "[A-Za-z0-9_-]", field=NONCE)
    try:
        ts = int(timestamp)
    except ValueError:
        raise RouterError("INVALID_REQUEST", "the signature timestamp must be unix seconds",
                          field=TIMESTAMP) from None
    if abs(now - ts) > window_s:
        raise RouterError("UNAUTHORIZED", f"the signature timestamp is outside the allowed "
                                          f"window of {window_s:g} s (check the client clock)")
    expected = hmac.new(signing_secret(record.sha256),
                        canonical(method, path, timestamp, nonce, body),
                        hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signature.lower()):
        raise RouterError("UNAUTHORIZED", "the request signature does not match")
    return nonce
