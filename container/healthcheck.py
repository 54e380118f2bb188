"""Docker HEALTHCHECK of the container image: GET /api/health must answer 200 with status ok.

The Functions host asks for a function key on /api/health like on every route (auth level
FUNCTION). With file-based keys (AzureWebJobsSecretStorageType=files, FUNCTIONS_SECRETS_PATH,
the host's own host.json there), the first function key (else the master key) of that file is
sent; PTD_HEALTHCHECK_KEY overrides it. Exit status 0 healthy, 1 unhealthy (Docker's contract).
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path


def host_key(environ: dict[str, str]) -> str:
    if environ.get("PTD_HEALTHCHECK_KEY"):
        return environ["PTD_HEALTHCHECK_KEY"]
    secrets = Path(environ.get("FUNCTIONS_SECRETS_PATH", "/home/ptd/secrets")) / "host.json"
    try:
        doc = json.loads(secrets.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    keys = [k for k in doc.get("functionKeys", []) if not k.get("encrypted")]
    if keys:
        return str(keys[0].get("value", ""))
    master = doc.get("masterKey") or {}
    return "" if master.get("encrypted") else str(master.get("value", ""))


def main() -> int:
    environ = dict(os.environ)
    port = environ.get("PTD_HEALTHCHECK_PORT", "8080")
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/health")
    key = host_key(environ)
    if key:
        request.add_header("x-functions-key", key)
    try:
        with urllib.request.urlopen(request, timeout=8) as response:  # noqa: S310
            body = json.loads(response.read() or b"{}")
            return 0 if response.status == 200 and body.get("status") == "ok" else 1
    except (urllib.error.URLError, TimeoutError, ConnectionError, ValueError):
        return 1


if __name__ == "__main__":
    sys.exit(main())
