"""Loopback HTTP rows: uvicorn serving the real app (and a bare ASGI app), started and stopped here.

Latency rows use `RawClient`: one keep-alive connection, one request at a time, pre-built
request bytes and Content-Length framing, so the figure is the server's round trip and not the
client's own parsing (an httpx client is measured beside it, for what a typical Python caller
adds). The concurrent load uses the same framing on asyncio streams. Every non-200 answer or
broken connection counts as an error. The server process is sampled with py-spy during the
single-prediction load and the 10k-record batches (see "Where the time goes").
"""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import psutil

from benchmarks.common import (
    REPO,
    Row,
    Stats,
    features_body,
    history_records,
    lat,
    measure,
    ms,
    server,
    yes_no,
)

JSON = {"content-type": "application/json"}


def _bodies(rows: np.ndarray, n: int, prefix: str = "c") -> list[dict[str, Any]]:
    return [features_body(rows[i % len(rows)], f"{prefix}{i}") for i in range(n)]


# --- a minimal load generator ------------------------------------------------------------------


def _request(url: str, body: bytes | None) -> bytes:
    parts = urlsplit(url)
    head = (
        f"{'POST' if body is not None else 'GET'} {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
    )
    if body is None:
        return (head + "\r\n").encode()
    return (
        head + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


class RawClient:
    """A blocking HTTP/1.1 client for latency: keep-alive, TCP_NODELAY, no parsing beyond the
    status and Content-Length. Raises on a broken connection; counts non-200 answers."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.url = url
        self.sock = socket.create_connection((parts.hostname or "", parts.port or 80), timeout=120)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.stream = self.sock.makefile("rb")
        self.not_ok = 0

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stream.close()
        self.sock.close()

    def send(self, request: bytes) -> bytes:
        self.sock.sendall(request)
        head = [self.stream.readline()]
        while head[-1] not in (b"\r\n", b""):
            head.append(self.stream.readline())
        status, length = _status_and_length(b"".join(head))
        if status != 200:
            self.not_ok += 1
        return self.stream.read(length)


def _status_and_length(head: bytes) -> tuple[int, int]:
    """The status code and Content-Length (0 if absent) of a response head."""
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    return int(head[9:12]), length


async def _client(
    host: str,
    port: int,
    requests: list[bytes],
    deadline: float,
    latencies: list[float],
    errors: Counter[str],
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    i = 0
    clock = time.perf_counter
    try:
        while clock() < deadline:
            start = clock()
            writer.write(requests[i % len(requests)])
            i += 1
            status, length = _status_and_length(await reader.readuntil(b"\r\n\r\n"))
            await reader.readexactly(length)
            latencies.append(clock() - start)
            if status != 200:
                errors[f"HTTP {status}"] += 1
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        errors[type(exc).__name__] += 1
    finally:
        writer.close()


def load(url: str, requests: list[bytes], clients: int, seconds: float) -> dict[str, Any]:
    parts = urlsplit(url)
    latencies: list[float] = []
    errors: Counter[str] = Counter()

    async def run() -> float:
        start = time.perf_counter()
        deadline = start + seconds
        await asyncio.gather(
            *(
                _client(
                    parts.hostname or "", parts.port or 80, requests, deadline, latencies, errors
                )
                for _ in range(clients)
            )
        )
        return time.perf_counter() - start

    elapsed = asyncio.run(run())
    stats = Stats(latencies)
    return {
        "requests": len(latencies),
        "elapsed": elapsed,
        "per_minute": len(latencies) / elapsed * 60,
        "errors": dict(errors),
        "n_errors": sum(errors.values()),
        "stats": stats,
    }


# --- profiling -----------------------------------------------------------------------------------


def _py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def start_profile(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    exe = _py_spy()
    if exe is None:
        return None
    return subprocess.Popen(
        [
            *(exe, "record", "-p", str(pid), "-d", str(int(np.ceil(seconds))), "-r", "250"),
            *("--nonblocking", "-f", "raw", "-o", str(out)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _stacks(path: Path) -> Iterator[tuple[list[str], int]]:
    """py-spy's collapsed format: one `frame;frame;... count` line per distinct stack."""
    if not path.is_file():
        return
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if stack:
            yield stack.split(";"), int(count_text)


def summarise_profile(path: Path, top: int = 14) -> dict[str, Any] | None:
    """Collapsed stacks -> the functions with the most samples, inclusive and self."""
    inclusive: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    total = 0
    for stack, count in _stacks(path):
        total += count
        frames = [_frame(f) for f in stack]
        for name in set(frames):
            inclusive[name] += count
        self_time[frames[-1]] += count
    if not total:
        return None
    # Inclusive shares of our own code (the framework's frames wrap everything and say little).
    incl = [(name, n / total) for name, n in inclusive.most_common() if "(detector/" in name][:top]
    return {
        "samples": total,
        "inclusive": incl,
        "self": [(name, n / total) for name, n in self_time.most_common(top)],
    }


BUCKETS: tuple[tuple[str, Any], ...] = (
    ("model: ArtifactSet.score (numpy tree walk)", lambda f, p: "detector/model/" in p),
    (
        "reasons (explain_dicts, texts)",
        lambda f, p: "reasons.py" in p,
    ),
    ("logging + metrics (request log line)", lambda f, p: "logging/" in p or "telemetry.py" in p),
    ("validation (pydantic TypeAdapter)", lambda f, p: f == "_validate" or "pydantic" in p),
    (
        "features from raw history",
        lambda f, p: "detector/features/" in p or "detector/schema.py" in p,
    ),
    (
        "request body: headers, read, decode, JSON parse (body_plan, read_body, parse_json)",
        lambda f, p: f in ("read_body", "parse_json", "body_plan"),
    ),
    ("JSON response (json_response)", lambda f, p: f == "json_response"),
    (
        "predict_batch run(): result dicts + to_json",
        lambda f, p: f.endswith(("predict_batch.<locals>.run", "score_batch.<locals>.run")),
    ),
    (
        "score_records: row matrix + result dicts",
        lambda f, p: f.startswith("score_records") and "records.py" in p,
    ),
    (
        "detector/records.py: record checks, history rows, error locations",
        lambda f, p: "detector/records.py" in p,
    ),
    ("detector/api.py: middleware, route, auth", lambda f, p: "detector/api.py" in p),
    (
        "FastAPI/Starlette: routing, request, response",
        lambda f, p: "starlette/" in p or "fastapi/" in p,
    ),
    (
        "uvicorn (httptools): HTTP parsing, transport",
        lambda f, p: "uvicorn/" in p or "h11/" in p or "httptools/" in p,
    ),
    (
        "socket send (asyncio transport.write: kernel loopback TCP)",
        lambda f, p: f.endswith("Transport.write") and "selector_events" in p,
    ),
    ("event loop wait (epoll select)", lambda f, p: f.endswith(".select") and "selectors" in p),
    (
        "asyncio / uvloop / anyio: event loop, threads",
        lambda f, p: "asyncio/" in p or "anyio/" in p or "uvloop/" in p,
    ),
)


def buckets(path: Path) -> list[tuple[str, float]]:
    """Each sample to the innermost frame that names an owner; numpy/pandas go to their caller."""
    counts: Counter[str] = Counter()
    total = 0
    for stack, count in _stacks(path):
        total += count
        owner = "other (interpreter, selectors, GC)"
        for frame in reversed(stack):
            function, _, where = frame.partition(" (")
            hit = next((name for name, rule in BUCKETS if rule(function, where)), None)
            if hit:
                owner = hit
                break
        counts[owner] += count
    return [(name, n / total) for name, n in counts.most_common()] if total else []


def _frame(text: str) -> str:
    # "function (path/to/file.py:123)" -> "function (file.py)" with the package kept for clarity
    name, _, where = text.partition(" (")
    where = where.rstrip(")")
    file = where.rsplit(":", 1)[0]
    for marker in ("site-packages/", f"{REPO}/", "lib/python3.11/"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return f"{name} ({file})"


# --- the rows ----------------------------------------------------------------------------------


def route_work(
    bodies: dict[int, bytes], runs: int, seconds: float, artifacts_dir: Path
) -> dict[int, Stats]:
    """What /api/predict_batch does with each body, minus HTTP: parse, validate, features,
    score, reasons, the JSON answer. The limit the loopback rows are compared with."""
    import gc
    import os

    import pydantic_core

    from detector.config import Settings
    from detector.model import ArtifactSet
    from detector.records import score_records

    settings = Settings.from_env({**os.environ, **_model_env(artifacts_dir)})
    artifacts = ArtifactSet(settings.model_dir)

    def once(body: bytes) -> None:
        records = pydantic_core.from_json(body)["records"]
        outcome = score_records(records, artifacts, artifacts.default_model, settings, str)
        pydantic_core.to_json([{"index": i, **item} for i, item in enumerate(outcome.items)])

    gc.freeze()  # as the server does after startup
    try:
        return {
            size: measure(lambda body=body: once(body), runs=runs, warmup=1, max_seconds=seconds)
            for size, body in bodies.items()
        }
    finally:
        gc.unfreeze()


def _model_env(artifacts_dir: Path) -> dict[str, str]:
    """The app serves the set being benchmarked, from local files."""
    return {"PTD_MODEL_SOURCE": "local", "PTD_MODEL_DIR": str(Path(artifacts_dir).resolve())}


def run(
    rows: np.ndarray,
    cfg: dict[str, Any],
    tmp: Path,
    data_dir: Path | None,
    artifacts_dir: Path,
) -> tuple[list[Row], dict[str, Any]]:
    """Every HTTP and sustained-load row, with the app serving `artifacts_dir`; feature bodies
    from `rows`, raw histories from `data_dir` (synthetic when absent)."""
    import httpx

    out: list[Row] = []
    extra: dict[str, Any] = {}
    singles = [json.dumps(b).encode() for b in _bodies(rows, 512)]
    batch_bodies = {
        size: json.dumps({"records": _bodies(rows, size)}).encode() for size in cfg["batch_sizes"]
    }
    runs, secs = cfg["http_runs"], cfg["http_seconds"]
    histories, n_invoices = history_records(cfg["history_records"], data_dir)
    history_body = json.dumps({"records": histories}).encode()

    with server("benchmarks.bare:create_app") as (bare_url, bare_process):
        bare_posts = itertools.cycle([_request(bare_url + "/", b) for b in singles])
        with RawClient(bare_url) as client:
            get_request = _request(bare_url + "/", None)
            bare_get = measure(
                lambda: client.send(get_request), runs=runs, warmup=100, max_seconds=secs
            )
            bare_post_stats = measure(
                lambda: client.send(next(bare_posts)), runs=runs, warmup=100, max_seconds=secs
            )
        bare_proc = psutil.Process(bare_process.pid)
        cpu0 = sum(bare_proc.cpu_times()[:2])
        bare_load = load(bare_url, [_request(bare_url + "/", singles[0])], 8, cfg["load_seconds"])
        bare_cpu = (sum(bare_proc.cpu_times()[:2]) - cpu0) / max(1, bare_load["requests"])
        extra["cpu_per_bare"] = bare_cpu

    in_process = route_work(batch_bodies, cfg["batch_runs"], cfg["batch_seconds"], artifacts_dir)
    env = {**_model_env(artifacts_dir), "PTD_LOG_LEVEL": "INFO"}
    with server("detector.api:create_app", env, tmp / "api-server.log") as (url, process):
        predict_requests = [_request(url + "/api/predict", b) for b in singles]
        predict_cycle = itertools.cycle(predict_requests)
        batch_requests = {
            size: _request(url + "/api/predict_batch", body) for size, body in batch_bodies.items()
        }
        with RawClient(url) as client:
            health_request = _request(url + "/api/health", None)
            json.loads(client.send(health_request))
            health = measure(
                lambda: client.send(health_request), runs=runs, warmup=100, max_seconds=secs
            )
            single = measure(
                lambda: client.send(next(predict_cycle)), runs=runs, warmup=100, max_seconds=secs
            )
            batch: dict[int, Stats] = {}
            for size, request in batch_requests.items():
                batch[size] = measure(
                    lambda request=request: client.send(request),
                    runs=cfg["batch_runs"],
                    warmup=1,
                    max_seconds=cfg["batch_seconds"],
                )
            history_request = _request(url + "/api/predict_batch", history_body)
            history = measure(
                lambda: client.send(history_request),
                runs=cfg["batch_runs"],
                warmup=1,
                max_seconds=cfg["batch_seconds"],
            )
            bad = client.not_ok
        # What a typical Python caller adds: the same requests through httpx.
        with httpx.Client(base_url=url, timeout=120) as http_client:
            bodies = itertools.cycle(singles)
            statuses: Counter[int] = Counter()

            def predict_httpx() -> None:
                response = http_client.post("/api/predict", content=next(bodies), headers=JSON)
                statuses[response.status_code] += 1

            single_httpx = measure(predict_httpx, runs=runs, warmup=100, max_seconds=secs)
        bad += statuses.total() - statuses[200]

        # Sustained load, single predictions from N clients; py-spy samples the server meanwhile.
        profile_single = tmp / "profile-predict.txt"
        proc = psutil.Process(process.pid)
        loads = {}
        for j, n in enumerate(cfg["clients"]):
            spy = (
                start_profile(process.pid, cfg["load_seconds"] - 0.5, profile_single)
                if not j
                else None
            )
            cpu0 = sum(proc.cpu_times()[:2])
            loads[n] = load(url, predict_requests, n, cfg["load_seconds"])
            loads[n]["server_cpu_per_request"] = (sum(proc.cpu_times()[:2]) - cpu0) / max(
                1, loads[n]["requests"]
            )
            if spy is not None:
                spy.wait(timeout=60)
        extra["cpu_per_predict"] = loads[cfg["clients"][0]]["server_cpu_per_request"]
        # Batch throughput: records per minute through predict_batch, 2 clients.
        batch_loads = {}
        for size in cfg["load_batch_sizes"]:
            res = load(url, [batch_requests[size]], 2, cfg["load_seconds"])
            res["predictions_per_minute"] = res["requests"] * size / res["elapsed"] * 60
            batch_loads[size] = res
        # Profile 10k batches on their own.
        big = max(batch_bodies)
        profile_batch = tmp / "profile-batch.txt"
        spy = start_profile(process.pid, cfg["profile_batch_seconds"], profile_batch)
        cpu0, sent = sum(proc.cpu_times()[:2]), 0
        with RawClient(url) as client:
            deadline = time.perf_counter() + cfg["profile_batch_seconds"]
            while time.perf_counter() < deadline or not sent:
                client.send(batch_requests[big])
                sent += 1
            bad += client.not_ok
        extra["cpu_per_batch"] = (sum(proc.cpu_times()[:2]) - cpu0) / sent
        if spy is not None:
            spy.wait(timeout=60)

    extra["buckets_predict"] = buckets(profile_single)
    extra["buckets_batch"] = buckets(profile_batch)
    extra["profile_predict"] = summarise_profile(profile_single)
    extra["profile_batch"] = summarise_profile(profile_batch)
    extra["profile_batch_size"] = big
    extra["bad_responses"] = bad

    out.append(
        Row(
            "HTTP loopback",
            "GET /api/health (app's cheapest route)",
            lat(health),
            limit=f"bare ASGI GET {lat(bare_get)}",
            ratio=f"{health.p50 / bare_get.p50:.2f}x bare",
        )
    )
    out.append(
        Row(
            "HTTP loopback",
            "POST /api/predict, features, 1 client keep-alive",
            lat(single),
            limit=f"bare ASGI POST {lat(bare_post_stats)}",
            ratio=f"{single.p50 / bare_post_stats.p50:.2f}x bare; "
            f"+{ms(single.p50 - bare_post_stats.p50)}",
            goal="p50 ≤ 1.5 ms",
            met=yes_no(single.p50 <= 0.0015),
            note=f"{single.n} requests; non-200 in all latency rows: {bad}",
        )
    )
    out.append(
        Row(
            "HTTP loopback",
            "POST /api/predict through httpx (what a Python caller adds)",
            lat(single_httpx),
            ratio=f"+{ms(single_httpx.p50 - single.p50)} over the raw client",
            note="the client's own request building and response parsing, same server",
        )
    )
    for size, stats in batch.items():
        alone = in_process[size]
        out.append(
            Row(
                "HTTP loopback",
                f"POST /api/predict_batch, {size:,} customers",
                f"{lat(stats)} ({size / stats.p50 * 60 / 1e6:.2f} M pred/min)",
                limit=f"the route's work in process: p50 {ms(alone.p50)} "
                f"({size / alone.p50 * 60 / 1e6:.2f} M pred/min); body "
                f"{len(batch_bodies[size]) / 1e6:.1f} MB",
                ratio=f"{stats.p50 / alone.p50:.2f}x in process",
                goal="10k ≤ 1 s" if size >= 10_000 else "",
                met=yes_no(stats.p50 <= 1) if size >= 10_000 else "",
            )
        )
    out.append(
        Row(
            "HTTP loopback",
            f"POST /api/predict_batch, {len(histories):,} raw histories",
            f"{lat(history)} ({len(histories) / history.p50 * 60:,.0f} pred/min)",
            limit=f"body {len(history_body) / 1e6:.1f} MB, {n_invoices:,} invoices",
            note="validation + prepare_invoices + compute_features + score, in one request",
        )
    )
    for n, res in loads.items():
        s = res["stats"]
        out.append(
            Row(
                "sustained load",
                f"POST /api/predict, {n} concurrent clients, {cfg['load_seconds']:.0f} s",
                f"{res['per_minute']:,.0f} pred/min; p50 {ms(s.p50)} · p95 {ms(s.p95)} · "
                f"p99 {ms(s.p99)}",
                limit=f"bare ASGI, 8 clients: {bare_load['per_minute']:,.0f} req/min",
                ratio=f"{res['per_minute'] / bare_load['per_minute']:.2f}x bare",
                goal="0 errors",
                met=yes_no(res["n_errors"] == 0),
                note=f"{res['requests']:,} requests, errors: {res['errors'] or 0}; server CPU "
                f"{ms(res['server_cpu_per_request'])}/request (bare ASGI {ms(bare_cpu)})",
            )
        )

    def per_minute(size: int) -> float:
        return size / in_process[size].p50 * 60

    for size, res in batch_loads.items():
        s = res["stats"]
        out.append(
            Row(
                "sustained load",
                f"POST /api/predict_batch of {size:,}, 2 clients, {cfg['load_seconds']:.0f} s",
                f"{res['predictions_per_minute']:,.0f} pred/min; p50 {ms(s.p50)} · p99 {ms(s.p99)}",
                limit=f"the route's work in process, one thread: {per_minute(size):,.0f} pred/min",
                ratio=f"{res['predictions_per_minute'] / per_minute(size):.2f}x in process",
                goal="> 1,000,000 pred/min",
                met=yes_no(res["predictions_per_minute"] > 1e6 and res["n_errors"] == 0),
                note=f"{res['requests']} requests, errors: {res['errors'] or 0}",
            )
        )
    extra["stats"] = {
        "health": health.to_dict(),
        "bare_get": bare_get.to_dict(),
        "bare_post": bare_post_stats.to_dict(),
        "predict": single.to_dict(),
        "predict_httpx": single_httpx.to_dict(),
        "batch": {s: v.to_dict() for s, v in batch.items()},
        "histories": history.to_dict(),
    }
    return out, extra
