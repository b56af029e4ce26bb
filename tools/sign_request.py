"""Send one HMAC-signed request to apirouter (an example of the client side of signing).

    python -m tools.sign_request --key ar-... --url http://127.0.0.1:8080/v1/inference \\
        --data '{"model": "gpt-4o-mini", "prompt": "hello"}'

Clients in other languages follow apirouter/signing.py: the canonical string, the secret
derived from the key's SHA-256, and the three X-Signature headers.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from apirouter.signing import sign


def send(key: str, url: str, data: bytes, method: str = "POST") -> tuple[int, bytes]:
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json",
               **sign(key, method, path, data)}
    req = urllib.request.Request(url, data=data if method != "GET" else None, method=method,
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m tools.sign_request", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--key", required=True)
    p.add_argument("--url", required=True)
    p.add_argument("--data", default="")
    p.add_argument("--method", default="POST")
    args = p.parse_args()
    status, body = send(args.key, args.url, args.data.encode(), args.method)
    print(status)
    sys.stdout.write(body.decode("utf-8", "replace") + "\n")
    return 0 if status < 400 else 1


if __name__ == "__main__":
    raise SystemExit(main())
