"""Bounded load test on loopback: `make loadtest` (or `python -m benchmarks.loadtest`).

Starts the real app (`ptd serve`, uvicorn, the bundled set or --artifacts) on 127.0.0.1 and a
free port, then runs concurrent keep-alive clients for a fixed time in two scenarios, one after
the other:

    single   POST /api/predict, one customer per request (features body)
    batch    POST /api/predict_batch, --batch-size customers per request

and reports, per scenario: requests and predictions per second, latency p50/p95/p99/max, and
errors (any answer other than 200, or a broken connection). Exits 1 when there was any error.
Bounded: --seconds in total (split between the scenarios), --clients connections, loopback only.
The client is a minimal asyncio HTTP/1.1 client (pre-built request bytes, Content-Length
framing) so that the load generator, which shares the machine's cores with the server, costs
little. Rate limiting is off on the served app (PTD_RATE_LIMIT_PER_MINUTE=0).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.azurite import free_port

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Result:
    scenario: str
    clients: int
    seconds: float
    customers_per_request: int
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_ms)
        n = len(lat)

        def pct(p: float) -> float:
            return round(lat[min(n - 1, int(p / 100 * n))], 2) if n else float("nan")

        return {
            "scenario": self.scenario,
            "clients": self.clients,
            "seconds": round(self.seconds, 2),
            "customers_per_request": self.customers_per_request,
            "requests": n,
            "requests_per_second": round(n / self.seconds, 1),
            "predictions_per_second": round(n * self.customers_per_request / self.seconds, 1),
            "predictions_per_minute": round(n * self.customers_per_request / self.seconds * 60),
            "p50_ms": pct(50),
            "p95_ms": pct(95),
            "p99_ms": pct(99),
            "max_ms": round(lat[-1], 2) if n else float("nan"),
            "mean_ms": round(statistics.fmean(lat), 2) if n else float("nan"),
            "errors": self.errors,
            "statuses": self.statuses,
        }


def feature_body(artifacts: Path) -> dict[str, float | int]:
    """A plausible customer: the set's typical feature values (the median, or the most common
    code of a categorical feature, sent as a JSON integer: the API refuses 101.0 for a code)."""
    from detector.features import FEATURES
    from detector.model import ArtifactSet

    typical = ArtifactSet(artifacts).typical.tolist()
    return {
        spec.name: int(value) if spec.kind == "categorical" else float(value)
        for spec, value in zip(FEATURES, typical, strict=True)
    }


def request_bytes(host: str, port: int, path: str, body: dict[str, Any]) -> bytes:
    payload = json.dumps(body, separators=(",", ":")).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: keep-alive\r\n\r\n"
    )
    return head.encode() + payload


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    if length:
        await reader.readexactly(length)
    return status


async def _client(host: str, port: int, raw: bytes, deadline: float, result: Result) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                writer.write(raw)
                await writer.drain()
                status = await _read_response(reader)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                result.errors += 1
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
                continue
            result.latencies_ms.append((time.perf_counter() - started) * 1000)
            result.statuses[status] = result.statuses.get(status, 0) + 1
            if status != 200:
                result.errors += 1
    finally:
        writer.close()


async def run_scenario(
    host: str, port: int, scenario: str, raw: bytes, per_request: int, clients: int, seconds: float
) -> Result:
    result = Result(scenario, clients, seconds, per_request)
    # Warm-up (connections, first-call costs), not counted.
    warm = Result(scenario, 1, 1.0, per_request)
    await _client(host, port, raw, time.perf_counter() + 1.0, warm)
    started = time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(*(_client(host, port, raw, deadline, result) for _ in range(clients)))
    result.seconds = time.perf_counter() - started
    return result


def start_server(host: str, port: int, artifacts: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PTD_RATE_LIMIT_PER_MINUTE": "0",
        "PTD_LOG_LEVEL": "WARNING",  # one request line per call would measure the logger
        "PTD_MODEL_SOURCE": "local",
        "PTD_MODEL_DIR": str(artifacts.resolve()),
    }
    env.pop("PTD_API_KEYS", None)
    env.pop("APPLICATIONINSIGHTS_CONNECTION_STRING", None)
    command = [sys.executable, "-m", "detector", "serve", "--host", host, "--port", str(port)]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            url = f"http://{host}:{port}/api/health"
            with urllib.request.urlopen(url, timeout=1) as response:  # nosec B310
                if response.status == 200:
                    return process
        except OSError:
            time.sleep(0.2)
    process.terminate()
    raise RuntimeError("server did not become healthy in 60 s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="total, split by scenario")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--scenarios", default="single,batch")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--artifacts", type=Path, default=REPO / "models_artifacts", help="artifact set to serve"
    )
    args = parser.parse_args(argv)
    if not ipaddress.ip_address(args.host).is_loopback:
        parser.error("the load test runs on loopback only (--host 127.0.0.1)")
    if not 1 <= args.clients <= 256 or not 1 <= args.seconds <= 600:
        parser.error("bounded: 1..256 clients, 1..600 seconds")
    scenarios = [s for s in args.scenarios.split(",") if s]
    features = feature_body(args.artifacts)
    port = free_port(args.host)
    server = start_server(args.host, port, args.artifacts)
    results = []
    try:
        for scenario in scenarios:
            if scenario == "single":
                raw = request_bytes(
                    args.host, port, "/api/predict", {"customer_id": "load-1", "features": features}
                )
                per_request = 1
            elif scenario == "batch":
                records = [
                    {"customer_id": f"load-{i}", "features": features}
                    for i in range(args.batch_size)
                ]
                raw = request_bytes(args.host, port, "/api/predict_batch", {"records": records})
                per_request = args.batch_size
            else:
                parser.error(f"unknown scenario {scenario!r}")
            seconds = args.seconds / len(scenarios)
            result = asyncio.run(
                run_scenario(args.host, port, scenario, raw, per_request, args.clients, seconds)
            )
            results.append(result.summary())
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
    report = {
        "host": args.host,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "results": results,
    }
    for r in results:
        print(
            f"{r['scenario']:>6}: {r['clients']} clients, {r['seconds']} s, "
            f"{r['requests']} requests ({r['requests_per_second']}/s), "
            f"{r['predictions_per_minute']:,} predictions/min, "
            f"p50 {r['p50_ms']} ms, p95 {r['p95_ms']} ms, p99 {r['p99_ms']} ms, "
            f"max {r['max_ms']} ms, errors {r['errors']} {r['statuses']}"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    errors = sum(r["errors"] for r in results)
    if errors:
        print(f"FAILED: {errors} errors", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
