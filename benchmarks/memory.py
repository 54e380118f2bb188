"""Peak memory of the served app under the worst requests its limits allow.

    .venv/bin/python -m benchmarks.memory [--max-body-bytes N] [--inflight-bytes N]
        [--concurrency 8] [--only NAMES] [--out FILE]

Starts `ptd serve` (uvicorn, one process, the bundled model) on 127.0.0.1 with the given limits
(default: the app's defaults), warms it up (a history predict, so pandas is loaded as in
production), and for each scenario resets the process's peak RSS (`/proc/<pid>/clear_refs`,
value 5: VmHWM becomes the current RSS) and reads `VmHWM` from `/proc/<pid>/status` after the
requests. Scenarios, each body as large as `PTD_MAX_BODY_BYTES` allows:

    valid_histories    raw invoice histories of real STEG clients (synthetic without the data)
    valid_features     10,000 feature records (the records limit), as large as it gets
    empty_invoices     records of 2,000 empty invoice objects `{}` (the case of issue 13):
                       more objects than bytes allow, refused before parsing (400)
    one_key_invoices   records of 2,000 `{"a":0}`: 22 bytes of memory per body byte when parsed;
                       refused before parsing (400)
    short_strings      `{"records": ["a", "b", ..., "aaa", ...]}`: distinct strings of 1 to 5
                       characters, the most memory per body byte found among bodies with few
                       enough objects to be parsed (then 413: too many records)
    small_dicts        records of `{"a":"x1","b":"x2","c":"x3"}` with distinct values, one
                       object per 32 bytes: the densest objects parsed
    floats_and_dicts   `{"records": [{"a":1e1},1e1,1e1,...]}`, an object every 7th item: the
                       most memory per body byte found (a reviewer's shape; 413 after parsing)
    unknown_keys       one record whose `features` has hundreds of thousands of unknown keys
    gzip_bomb          a gzip body of a few kB that inflates past the limit (refused, 413)
    concurrent_hostile `--concurrency` floats_and_dicts bodies at once
    budget_filled_hostile  `--concurrency` floats_and_dicts bodies that together fill
                       `PTD_MAX_INFLIGHT_BODY_BYTES`: all in work at once, the budget's worst
    concurrent_valid   `--concurrency` valid_histories bodies at once

Reports per scenario: statuses, wall time, RSS before, peak RSS, growth, and growth per byte of
the bodies in work at once (the budget lets `PTD_MAX_INFLIGHT_BODY_BYTES` in). Linux only (reads
/proc). Bounded: one server, a handful of requests, a minute or two.
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.azurite import free_port, stop, wait_listening

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
MIB = 1024 * 1024


# --- the process --------------------------------------------------------------------------------


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def rss(pid: int) -> int:
    """Resident set size now, bytes."""
    return _status_kib(pid, "VmRSS") * 1024


def peak_rss(pid: int) -> int:
    """Peak resident set size (VmHWM) since start or since `reset_peak`, bytes."""
    return _status_kib(pid, "VmHWM") * 1024


def reset_peak(pid: int) -> bool:
    """Make VmHWM the current RSS (Linux >= 4.0); False when the kernel refuses."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@contextmanager
def ptd_serve(
    env: dict[str, str] | None = None, args: tuple[str, ...] = ()
) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """`ptd serve` on 127.0.0.1 and a free port; yields (port, process); stops that process."""
    port = free_port()
    process = subprocess.Popen(
        [PY, "-m", "detector", "serve", "--host", "127.0.0.1", "--port", str(port), *args],
        cwd=REPO,
        env={
            **os.environ,
            "PYTHONPATH": str(REPO),
            "PTD_MODEL_SOURCE": "local",
            "PTD_LOG_LEVEL": "WARNING",
            **(env or {}),
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_listening(process, port, "ptd serve")
        yield port, process
    finally:
        stop(process)


def post(
    port: int,
    path: str,
    body: bytes,
    headers: dict[str, str] | None = None,
    timeout: float = 300.0,
) -> tuple[int, dict[str, str], bytes, float]:
    """One POST on a new connection: status, headers (lower-case), body, seconds."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    started = time.perf_counter()
    try:
        connection.request(
            "POST", path, body=body, headers={"content-type": "application/json", **(headers or {})}
        )
        response = connection.getresponse()
        content = response.read()
        return (
            response.status,
            {k.lower(): v for k, v in response.getheaders()},
            content,
            time.perf_counter() - started,
        )
    finally:
        connection.close()


def post_all(
    port: int, path: str, bodies: list[bytes], headers: dict[str, str] | None = None
) -> list[tuple[int, dict[str, str], bytes, float]]:
    """Send every body at once (one thread and connection each); answers in order."""
    answers: list[Any] = [None] * len(bodies)
    barrier = threading.Barrier(len(bodies))

    def one(k: int) -> None:
        barrier.wait()
        answers[k] = post(port, path, bodies[k], headers)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


# --- bodies -------------------------------------------------------------------------------------


def hostile_body(item: str, limit: int, per_record: int = 2_000, records: int = 10_000) -> bytes:
    """`{"records": [...]}` of records whose invoices are `per_record` copies of `item`, as
    many records as fit in `limit` bytes (at most `records`)."""
    record = '{"customer_id":"e","invoices":[' + ",".join([item] * per_record) + "]}"
    n = max(1, min(records, (limit - len('{"records":[]}')) // (len(record) + 1)))
    return ('{"records":[' + ",".join([record] * n) + "]}").encode()


def short_text(k: int) -> str:
    """The k-th of all strings of ASCII letters, shortest first ("a", ..., "Z", "aa", ...)."""
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    text = letters[k % 52]
    k //= 52
    while k:
        k -= 1
        text += letters[k % 52]
        k //= 52
    return text


def filled(item: Any, limit: int, head: str = '{"records":[', tail: str = "]}") -> bytes:
    """`head` + items `item(0)`, `item(1)`, ... joined by commas + `tail`, within `limit` bytes."""
    parts: list[str] = []
    size = len(head) + len(tail)
    k = 0
    while True:
        part = item(k)
        if size + len(part) + 1 > limit:
            break
        parts.append(part)
        size += len(part) + 1
        k += 1
    return (head + ",".join(parts) + tail).encode()


def short_strings_body(limit: int) -> bytes:
    """`{"records": [...]}` of distinct short strings: no objects, the most memory per byte."""
    return filled(lambda k: f'"{short_text(k)}"', limit)


def small_dicts_body(limit: int) -> bytes:
    """Records of three distinct short strings each, one object per 32 bytes or so."""

    def record(k: int) -> str:
        a, b, c = (short_text(3 * k + j) for j in range(3))
        return f'{{"a":"{a}","b":"{b}","c":"{c}"}}'

    return filled(record, limit)


def floats_and_dicts_body(limit: int) -> bytes:
    """Records that are floats (`1e1`, 24 bytes of float object for 4 of JSON) with an object
    every 7th item, under the objects-per-byte limit."""
    return filled(lambda k: '{"a":1e1}' if k % 7 == 0 else "1e1", limit)


def unknown_keys_body(limit: int) -> bytes:
    """One predict body whose `features` holds distinct unknown keys up to `limit` bytes."""
    return filled(lambda k: f'"k{k}":0', limit, '{"customer_id":"x","features":{', "}}")


def histories_body(limit: int, records: int = 10_000) -> tuple[bytes, int]:
    """Raw histories of real STEG clients (synthetic ones without the shared data), as many as
    fit in `limit` bytes; the body and its number of records."""
    from benchmarks.common import DATA_DIR, history_records

    pool, _ = history_records(3_000, DATA_DIR)
    parts: list[str] = []
    size = len('{"records":[]}')
    while len(parts) < records:
        text = json.dumps(pool[len(parts) % len(pool)], separators=(",", ":"))
        if size + len(text) + 1 > limit:
            break
        parts.append(text)
        size += len(text) + 1
    return ('{"records":[' + ",".join(parts) + "]}").encode(), len(parts)


def features_body(records: int = 10_000) -> bytes:
    from benchmarks.common import DATA_DIR, feature_rows
    from benchmarks.common import features_body as one

    rows, _ = feature_rows(min(records, 2_000), DATA_DIR)
    body = {"records": [one(rows[k % len(rows)], f"customer-{k:06d}") for k in range(records)]}
    return json.dumps(body, separators=(",", ":")).encode()


def gzip_bomb(limit: int) -> bytes:
    """A gzip stream that inflates to four times `limit` (one of `{"a":0}` invoices)."""
    return gzip.compress(hostile_body('{"a":0}', 4 * limit, records=10**9), 9)


# --- the run ------------------------------------------------------------------------------------


def measure(
    port: int,
    pid: int,
    name: str,
    bodies: list[bytes],
    inflight: int,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Send `bodies` at once; the answers, the time and the peak RSS growth. Growth per byte in
    work divides by the bodies the budget lets in at once (`inflight`), not by all of them."""
    exact = reset_peak(pid)
    before = rss(pid)
    started = time.perf_counter()
    answers = post_all(
        port, "/api/predict_batch" if name != "unknown_keys" else "/api/predict", bodies, headers
    )
    wall = time.perf_counter() - started
    peak = peak_rss(pid)
    size = len(bodies[0])
    in_work = min(len(bodies), max(1, inflight // size)) * size
    statuses: dict[int, int] = {}
    for status, *_ in answers:
        statuses[status] = statuses.get(status, 0) + 1
    return {
        "scenario": name,
        "requests": len(bodies),
        "body_bytes": size,
        "statuses": statuses,
        "seconds": round(wall, 2),
        "max_request_seconds": round(max(a[3] for a in answers), 2),
        "rss_before_mb": round(before / MIB),
        "peak_rss_mb": round(peak / MIB),
        "growth_mb": round((peak - before) / MIB),
        "bytes_in_work": in_work,
        "growth_per_byte_in_work": round((peak - before) / in_work, 1),
        "peak_exact": exact,
    }


def run(
    max_body: int, inflight: int, concurrency: int, only: set[str] | None = None
) -> dict[str, Any]:
    env = {"PTD_MAX_BODY_BYTES": str(max_body), "PTD_MAX_INFLIGHT_BODY_BYTES": str(inflight)}
    scenarios: dict[str, Any] = {
        "valid_histories": lambda: [histories_body(max_body)[0]],
        "valid_features": lambda: [features_body()],
        "empty_invoices": lambda: [hostile_body("{}", max_body)],
        "one_key_invoices": lambda: [hostile_body('{"a":0}', max_body)],
        "unknown_keys": lambda: [unknown_keys_body(max_body)],
        "gzip_bomb": lambda: [gzip_bomb(max_body)],
        "short_strings": lambda: [short_strings_body(max_body)],
        "small_dicts": lambda: [small_dicts_body(max_body)],
        "floats_and_dicts": lambda: [floats_and_dicts_body(max_body)],
        "concurrent_hostile": lambda: [floats_and_dicts_body(max_body)] * concurrency,
        "budget_filled_hostile": lambda: (
            [floats_and_dicts_body(inflight // concurrency)] * concurrency
        ),
        "concurrent_valid": lambda: [histories_body(max_body)[0]] * concurrency,
    }
    rows = []
    with ptd_serve(env) as (port, process):
        warm, _ = histories_body(200_000)
        post(port, "/api/predict_batch", warm)
        idle = rss(process.pid)
        for name, make in scenarios.items():
            if only and name not in only:
                continue
            bodies = make()
            headers = {"content-encoding": "gzip"} if name == "gzip_bomb" else None
            row = measure(port, process.pid, name, bodies, inflight, headers)
            row["body_bytes_sent"] = len(bodies[0])
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            del bodies
    return {
        "max_body_bytes": max_body,
        "max_inflight_body_bytes": inflight,
        "concurrency": concurrency,
        "idle_rss_mb": round(idle / MIB),
        "rows": rows,
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"`PTD_MAX_BODY_BYTES` {report['max_body_bytes']:,}, `PTD_MAX_INFLIGHT_BODY_BYTES` "
        f"{report['max_inflight_body_bytes']:,}; idle RSS after warm-up "
        f"{report['idle_rss_mb']} MB.",
        "",
        "| Scenario | Requests | Body each | Answers | Wall | RSS before | Peak RSS | Growth "
        "| Growth per byte in work |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        answers = ", ".join(f"{n} x {s}" for s, n in sorted(row["statuses"].items()))
        lines.append(
            f"| {row['scenario']} | {row['requests']} | {row['body_bytes_sent'] / MIB:.1f} MiB "
            f"| {answers} | {row['seconds']} s | {row['rss_before_mb']} MB "
            f"| {row['peak_rss_mb']} MB | {row['growth_mb']} MB "
            f"| {row['growth_per_byte_in_work']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from detector.config import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_INFLIGHT_BODY_BYTES

    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__)
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    parser.add_argument("--inflight-bytes", type=int, default=DEFAULT_MAX_INFLIGHT_BODY_BYTES)
    parser.add_argument("--concurrency", type=int, default=8, choices=range(1, 33))
    parser.add_argument("--only", help="comma-separated scenario names")
    parser.add_argument("--out", help="write the Markdown table here")
    args = parser.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    report = run(args.max_body_bytes, args.inflight_bytes, args.concurrency, only)
    text = markdown(report)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
