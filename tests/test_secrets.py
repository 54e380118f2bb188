"""No secret in the repository: every tracked file (git ls-files) is scanned for credentials.

Patterns: storage account keys and SAS tokens in connection strings or URLs, Application
Insights instrumentation keys, private keys, GitHub/Azure tokens and long base64 strings that look
like keys. The one allowlisted value is Azurite's public development key (documented by Microsoft
for every emulator install); tests/azurite.py builds it from two halves so that it never appears
whole, and the scan would flag it anywhere else. The fake secrets planted below to prove that
the scan finds them are written in pieces for the same reason (this file is scanned too).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.azurite import DEV_ACCOUNT_KEY

REPO = Path(__file__).resolve().parent.parent
ALLOWED_VALUES = {DEV_ACCOUNT_KEY}  # public Azurite key, not a secret
# Placeholders and references that are not values: "<...>", "${...}", "$(...)", "{...}".
PLACEHOLDER = re.compile(r"^(<|\$\{|\$\(|\{|%|\.\.\.|x+$)", re.I)

PATTERNS: dict[str, re.Pattern[str]] = {
    "account key": re.compile(r"Account[K]ey=([^;\"'\s]+)", re.I),
    "shared access signature": re.compile(r"SharedAccess[S]ignature=([^;\"'\s]+)", re.I),
    "SAS token in a URL": re.compile(r"[?&]sig=([A-Za-z0-9%+/=]{20,})"),
    "instrumentation key": re.compile(
        r"Instrumentation[K]ey=([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})", re.I
    ),
    "private key": re.compile(
        r"(-----BEGIN (?:RSA |EC |OPENSSH |DSA |ENCRYPTED )?PRIVATE KEY-----)"
    ),
    "GitHub token": re.compile(r"\b(gh[pousr]_[A-Za-z0-9]{36,})\b"),
    "client secret": re.compile(
        r"(?:client_?secret|AZURE_CLIENT_SECRET)\s*[=:]\s*[\"']?([^\s\"']{16,})", re.I
    ),
    "long base64 key": re.compile(
        r"(?<![A-Za-z0-9+/])([A-Za-z0-9+/]{60,}={1,2})(?![A-Za-z0-9+/=])"
    ),
}
SRI_PREFIX = re.compile(r"sha(1|256|384|512)-$")
# The all-zero instrumentation key is the documented placeholder.
ZERO_IKEY = "00000000-0000-0000-0000-000000000000"


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True, timeout=30
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"not a git checkout: {exc}")
    return [REPO / name for name in out.decode().split("\0") if name]


def findings(text: str) -> list[tuple[str, str]]:
    found = []
    for kind, pattern in PATTERNS.items():
        for match in pattern.finditer(text):
            value = match.group(1)
            if value in ALLOWED_VALUES or PLACEHOLDER.match(value) or value == ZERO_IKEY:
                continue
            if SRI_PREFIX.search(text[max(0, match.start(1) - 8) : match.start(1)]):
                continue  # a Subresource Integrity hash (package-lock.json), public
            found.append((kind, value[:12] + "..."))
    return found


def test_no_secret_in_tracked_files() -> None:
    files = tracked_files()
    assert files, "git ls-files listed nothing"
    problems = []
    for path in files:
        if not path.is_file():
            continue  # deleted in the working tree
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary (model arrays); keys are text
        for kind, excerpt in findings(data.decode("utf-8", "replace")):
            problems.append(f"{path.relative_to(REPO)}: {kind} {excerpt}")
    assert not problems, "possible secrets:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    "text",
    [
        "DefaultEndpointsProtocol=https;AccountName=prod;Account"
        + "Key="
        + "Zm9vYmFyYmF6cXV4" * 5
        + "==;EndpointSuffix=core.windows.net",
        "Endpoint=sb://x.servicebus.windows.net/;SharedAccess" + "Signature=sv=2022&s" + "ig=abc",
        "https://acct.blob.core.windows.net/c/b?sv=2022-11-02&s"
        + "ig=AbCdEf0123456789AbCdEf0123%3D",
        "Instrumentation" + "Key=12345678-1234-1234-1234-123456789abc;IngestionEndpoint=https://x",
        "-----BEGIN RSA " + "PRIVATE KEY-----\nMIIE...",
        "token: ghp_" + "a1B2" * 10,
        "AZURE_CLIENT_" + "SECRET=abcdefghijklmnopqrstuv",
        "key = '" + "QUJD" * 20 + "=='",
    ],
)
def test_the_scan_finds_planted_secrets(text: str) -> None:
    assert findings(text), text


@pytest.mark.parametrize(
    "text",
    [
        f"AccountKey={DEV_ACCOUNT_KEY};",
        "AccountKey=<your key>;",
        "AccountKey=${{ secrets.KEY }};",
        f"InstrumentationKey={ZERO_IKEY}",
        "APPLICATIONINSIGHTS_AUTHENTICATION_STRING=ClientId=abc;Authorization=AAD",
        "sha256: " + "ab" * 32,
        '"integrity": "sha512-' + "QUJD" * 20 + '=="',
    ],
)
def test_the_scan_allows_public_values_and_placeholders(text: str) -> None:
    assert not findings(text), text
