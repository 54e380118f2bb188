"""Shared pieces of the benchmark suite: timing statistics, the machine, data, servers."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tests.azurite import free_port, stop, wait_listening

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = REPO.parent / "shared" / "data" / "steg"
PY = sys.executable


@dataclass
class Stats:
    """Latencies of repeated runs (seconds); medians and tail percentiles, never one run."""

    samples: list[float]

    @property
    def n(self) -> int:
        return len(self.samples)

    def pct(self, q: float) -> float:
        return float(np.percentile(self.samples, q)) if self.samples else float("nan")

    @property
    def p50(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def p95(self) -> float:
        return self.pct(95)

    @property
    def p99(self) -> float:
        return self.pct(99)

    def to_dict(self) -> dict[str, float]:
        return {"n": self.n, "p50": self.p50, "p95": self.p95, "p99": self.p99}


def measure(
    fn: Callable[[], Any], *, runs: int, warmup: int = 0, max_seconds: float = 30.0
) -> Stats:
    """Call `fn` `warmup` times, then up to `runs` times (or `max_seconds`), timing each call."""
    return measure_interleaved(
        {"fn": lambda _: fn()}, runs=runs, warmup=warmup, max_seconds=max_seconds
    )["fn"]


def measure_interleaved(
    fns: dict[str, Callable[[int], Any]], *, runs: int, warmup: int = 0, max_seconds: float = 30.0
) -> dict[str, Stats]:
    """Time several functions in turns (round k calls each with k), so that a ratio between two
    of them compares samples taken under the same machine load, not minutes apart. The order
    rotates every round: each function follows each other equally often, so none always runs
    on caches another one just evicted."""
    for k in range(warmup):
        for fn in fns.values():
            fn(k)
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    clock = time.perf_counter
    deadline = clock() + max_seconds
    for k in range(runs):
        turn = k % len(names)
        for name in names[turn:] + names[:turn]:
            start = clock()
            fns[name](k)
            samples[name].append(clock() - start)
        if clock() > deadline and k >= 2:
            break
    return {name: Stats(values) for name, values in samples.items()}


@dataclass
class Row:
    """One line of the results table: ours beside the plain approach and the limit."""

    section: str
    name: str
    ours: str
    plain: str = ""
    limit: str = ""
    ratio: str = ""  # ours / limit (or plain / ours), spelled out
    goal: str = ""
    met: str = ""  # "yes", "no", "" (no goal) or "n/a"
    note: str = ""
    data: dict[str, Any] = field(default_factory=dict)


def ms(seconds: float) -> str:
    if seconds != seconds:  # NaN
        return "n/a"
    if seconds < 0.001:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def lat(stats: Stats) -> str:
    return f"p50 {ms(stats.p50)} · p99 {ms(stats.p99)}"


def yes_no(ok: bool) -> str:
    return "yes" if ok else "**no**"


def machine() -> dict[str, Any]:
    """Cores, RAM, CPU model, load, versions: what the numbers depend on."""
    import psutil

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions: dict[str, str] = {"python": platform.python_version()}
    from importlib import metadata

    for dist in (
        "numpy",
        "pandas",
        "pyarrow",
        "scikit-learn",
        "lightgbm",
        "fastapi",
        "pydantic",
        "uvicorn",
        "httptools",
        "uvloop",
        "httpx",
        "azure-storage-blob",
    ):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "absent"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        commit = ""
    commit = commit or os.environ.get("BENCH_COMMIT", "")  # a copy of the tree without .git
    return {
        "cores": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "cpu": cpu,
        "os": platform.platform(),
        "load": os.getloadavg(),
        "versions": versions,
        "commit": commit,
    }


@contextmanager
def server(
    target: str, env: dict[str, str] | None = None, log: Path | None = None
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """uvicorn serving `target` (a factory, "module:function") on a free loopback port."""
    port = free_port()
    handle = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 (closed below)
    process = subprocess.Popen(
        [
            PY,
            "-m",
            "uvicorn",
            target,
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        stdout=handle,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_listening(process, port, f"uvicorn {target}")
        yield f"http://127.0.0.1:{port}", process
    finally:
        stop(process)
        if log and not isinstance(handle, int):
            handle.close()


def timed_child(command: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `command` under a fresh launcher; wall time and the child's own peak RSS."""
    launcher = (
        "import json, resource, subprocess, sys, time\n"
        "t = time.perf_counter()\n"
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "wall = time.perf_counter() - t\n"
        "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024\n"
        "print(json.dumps({'wall': wall, 'peak_rss': peak, 'rc': p.returncode,"
        " 'stdout': p.stdout[-4000:], 'stderr': p.stderr[-4000:]}))\n"
    )
    out = subprocess.run(
        [PY, "-c", launcher, *command],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise RuntimeError(f"{command[:4]} failed ({result['rc']}): {result['stderr'][-800:]}")
    return result


def feature_rows(n: int, data_dir: Path | None, seed: int = 0) -> tuple[np.ndarray, str]:
    """(n, len(FEATURE_NAMES)) raw feature rows, NaN where missing: real clients' features when
    the shared data is there, synthetic ones otherwise. Rows are kept only if every feature the
    API requires (`FeatureSpec.required`) has a value, so each one can be sent as a body."""
    from detector.features import FEATURES, compute_features
    from detector.schema import prepare_clients, prepare_invoices

    source = "synthetic (tests/synthetic.py)"
    if data_dir is not None and (data_dir / "invoices_train.parquet").is_file():
        import pandas as pd
        import pyarrow.parquet as pq

        from detector.batch import CLIENT_COLUMNS, INVOICE_COLUMNS

        table = pq.read_table(data_dir / "invoices_train.parquet")
        columns = [c for c in INVOICE_COLUMNS if c in table.column_names]
        invoices = table.select(columns).to_pandas()
        ids = invoices["client_id"].drop_duplicates().to_numpy()
        rng = np.random.default_rng(seed)
        chosen = set(rng.choice(ids, size=min(len(ids), n), replace=False).tolist())
        invoices = invoices[invoices["client_id"].isin(chosen)]
        clients = pd.read_parquet(data_dir / "clients_train.parquet")
        clients = clients[[c for c in CLIENT_COLUMNS if c in clients.columns]]
        clients = clients[clients["client_id"].isin(chosen)]
        features = compute_features(prepare_invoices(invoices).frame, prepare_clients(clients))
        source = f"real STEG clients ({len(features):,} sampled)"
    else:
        sys.path.insert(0, str(REPO))
        from tests.synthetic import make_steg

        clients, invoices = make_steg(n_clients=min(n, 2000), seed=seed)
        features = compute_features(prepare_invoices(invoices).frame, prepare_clients(clients))
    values = features.to_numpy(dtype=np.float64)
    required = [i for i, spec in enumerate(FEATURES) if spec.required]
    values = values[np.isfinite(values[:, required]).all(axis=1)]
    reps = -(-n // len(values))
    return np.tile(values, (reps, 1))[:n], source


def history_records(
    n: int, data_dir: Path | None, seed: int = 1
) -> tuple[list[dict[str, Any]], int]:
    """`n` raw-history API records (invoices + client) of real clients, and their invoice count;
    synthetic clients when the shared data is absent."""
    import pandas as pd

    from detector.schema import CLIENT_COLUMNS, INVOICE_COLUMNS

    if data_dir is not None and (data_dir / "invoices_train.parquet").is_file():
        clients = pd.read_parquet(data_dir / "clients_train.parquet", columns=list(CLIENT_COLUMNS))
        chosen = clients.sample(n=min(n, len(clients)), random_state=seed)
        invoices = pd.read_parquet(
            data_dir / "invoices_train.parquet",
            columns=list(INVOICE_COLUMNS),
            filters=[("client_id", "in", chosen["client_id"].tolist())],
        )
    else:
        sys.path.insert(0, str(REPO))
        from tests.synthetic import make_steg

        clients, invoices = make_steg(n_clients=n, seed=seed)
        chosen = clients[list(CLIENT_COLUMNS)]
    by_client: dict[str, list[dict[str, Any]]] = {}
    for row in invoices.to_dict("records"):
        by_client.setdefault(str(row.pop("client_id")), []).append(row)
    records = [
        {
            "customer_id": client["client_id"],
            "invoices": by_client[client["client_id"]],
            "client": client,
        }
        for client in chosen.to_dict("records")
        if client["client_id"] in by_client
    ]
    return records, sum(len(r["invoices"]) for r in records)


def features_body(row: np.ndarray, customer_id: str) -> dict[str, Any]:
    """A /api/predict body for one row of raw features, as the strict API takes it: a
    categorical code (`FeatureSpec.kind`) as a JSON integer (101.0 is refused), a number as a
    float, a missing value as null (only features that are not `required` may be missing)."""
    from detector.features import FEATURES

    values: dict[str, float | int | None] = {}
    for spec, v in zip(FEATURES, row.tolist(), strict=True):
        if not math.isfinite(v):
            values[spec.name] = None
        elif spec.kind == "categorical":
            values[spec.name] = int(v)
        else:
            values[spec.name] = float(v)
    return {"customer_id": customer_id, "features": values}
