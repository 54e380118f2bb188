"""Whole-table rows: `ptd score` of the shared invoice table, features of it, training time.

Each runs in a fresh process under a launcher that reports wall time and the child's own peak
RSS (getrusage RUSAGE_CHILDREN of a launcher with one child), so nothing else the suite did
inflates the memory figure.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from benchmarks.common import PY, REPO, Row, timed_child, yes_no

FEATURES_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from pathlib import Path
from detector.batch import CLIENT_COLUMNS, INVOICE_COLUMNS
from detector.features import compute_features
from detector.schema import prepare_clients, prepare_invoices
from detector.tables import read_table
t1 = time.perf_counter()
invoices = read_table(Path(sys.argv[1]), INVOICE_COLUMNS)
clients = read_table(Path(sys.argv[2]), CLIENT_COLUMNS)
t2 = time.perf_counter()
prepared = prepare_invoices(invoices)
prepared_clients = prepare_clients(clients)
t3 = time.perf_counter()
features = compute_features(prepared.frame, prepared_clients)
t4 = time.perf_counter()
print(json.dumps({"imports": t1 - t0, "read": t2 - t1, "prepare": t3 - t2, "features": t4 - t3,
                  "rows": len(invoices), "clients": len(features)}))
"""


def _slice(src: Path, rows: int, tmp: Path) -> Path:
    """The first `rows` invoice rows as their own Parquet file (for --quick)."""
    import pyarrow.parquet as pq

    out = tmp / f"invoices_first_{rows}.parquet"
    if not out.exists():
        pq.write_table(pq.read_table(src).slice(0, rows), out)
    return out


def run(
    data_dir: Path | None, cfg: dict[str, Any], tmp: Path, artifacts: Path
) -> tuple[list[Row], dict[str, Any]]:
    """`ptd score` of the invoice table with the set in `artifacts` (its default model), and
    the features step alone; a slice of the table when `cfg["table_rows"]` is set."""
    invoices = data_dir / "invoices_train.parquet" if data_dir else None
    clients = data_dir / "clients_train.parquet" if data_dir else None
    if invoices is None or clients is None or not invoices.is_file() or not clients.is_file():
        note = f"skipped: the shared data is not at {data_dir} (invoices_train.parquet)"
        return [
            Row("whole table", "batch-file scoring (ptd score)", note, met="n/a"),
            Row("whole table", "features (prepare_invoices + compute_features)", note, met="n/a"),
        ], {}
    import pyarrow.parquet as pq

    total_rows = pq.ParquetFile(invoices).metadata.num_rows
    what = f"whole table, {total_rows / 1e6:.1f} M rows"
    if cfg["table_rows"]:
        invoices = _slice(invoices, cfg["table_rows"], tmp)
        what = f"first {cfg['table_rows']:,} of {total_rows:,} rows: a slice, not the goal"
    rows: list[Row] = []
    extra: dict[str, Any] = {}

    scores = []
    for _ in range(cfg["table_runs"]):
        result = timed_child(
            [
                *(PY, "-m", "detector", "score", str(invoices)),
                *("--clients", str(clients), "--out", str(tmp / "scores.csv")),
                *("--model-dir", str(artifacts)),
            ]
        )
        scores.append(result)
    walls = [r["wall"] for r in scores]
    peaks = [r["peak_rss"] / 2**30 for r in scores]
    wall, peak = statistics.median(walls), max(peaks)
    message = scores[-1]["stderr"].strip().splitlines()
    extra["score_stderr"] = message[-3:]
    rows.append(
        Row(
            "whole table",
            f"batch-file scoring, `ptd score` ({what})",
            f"{wall:.1f} s (runs {', '.join(f'{w:.1f}' for w in walls)}); peak RSS {peak:.2f} GB",
            goal="≤ 30 s in ≤ 1 GB",
            met=yes_no(wall <= 30 and peak <= 1) if not cfg["table_rows"] else "",
            note=message[0][:160] if message else "",
            data={"walls": walls, "peaks_gb": peaks},
        )
    )

    rows.append(_csv_dialects(invoices, clients, artifacts, tmp, cfg, what))
    if not cfg["table_rows"]:
        rows.append(_partial_export(data_dir / "invoices_train.parquet", clients, artifacts, tmp))

    feats = []
    for _ in range(cfg["features_runs"]):
        result = timed_child([PY, "-c", FEATURES_CHILD, str(invoices), str(clients)])
        feats.append({**json.loads(result["stdout"].strip().splitlines()[-1]), **result})
    compute = [f["prepare"] + f["features"] for f in feats]
    median = statistics.median(compute)
    best = min(feats, key=lambda f: f["prepare"] + f["features"])
    rows.append(
        Row(
            "whole table",
            f"features: prepare_invoices + compute_features ({what})",
            f"{median:.1f} s (runs {', '.join(f'{c:.1f}' for c in compute)}); "
            f"peak RSS {max(f['peak_rss'] for f in feats) / 2**30:.2f} GB",
            goal="< 20 s",
            met=yes_no(median < 20) if not cfg["table_rows"] else "",
            note=f"fastest run: prepare {best['prepare']:.1f} s + features "
            f"{best['features']:.1f} s; read Parquet {best['read']:.1f} s and process "
            f"{best['wall']:.1f} s in all; {best['clients']:,} clients",
            data={"runs": feats},
        )
    )
    return rows, extra


def _csv_copies(invoices: Path, tmp: Path) -> tuple[Path, Path]:
    """The invoice table as a plain comma CSV and as an Excel-style export of the same rows
    (`;` separator, UTF-8 byte-order mark, CRLF line ends), written once per run."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    plain, excel = tmp / f"{invoices.stem}.csv", tmp / f"{invoices.stem}.excel.csv"
    if not plain.exists():
        pacsv.write_csv(pq.read_table(invoices), plain)
    if not excel.exists():
        with plain.open("rb") as source, excel.open("wb") as target:
            target.write(b"\xef\xbb\xbf")
            for line in source:  # no field of the table holds a comma or a quote
                target.write(line.rstrip(b"\n").replace(b",", b";").replace(b'"', b"") + b"\r\n")
    return plain, excel


def _csv_dialects(
    invoices: Path, clients: Path, artifacts: Path, tmp: Path, cfg: dict[str, Any], what: str
) -> Row:
    """`ptd score` of the table as an Excel-style CSV against the same rows as a plain comma
    CSV (the reference), runs interleaved: what reading a real export's dialect costs."""
    plain, excel = _csv_copies(invoices, tmp)
    walls: dict[str, list[float]] = {"plain": [], "excel": []}
    peaks: list[float] = []
    for _ in range(cfg["table_runs"]):
        for kind, path in (("plain", plain), ("excel", excel)):
            result = timed_child(
                [
                    *(PY, "-m", "detector", "score", str(path)),
                    *("--clients", str(clients), "--out", str(tmp / f"scores-{kind}.csv")),
                    *("--model-dir", str(artifacts)),
                ]
            )
            walls[kind].append(result["wall"])
            peaks.append(result["peak_rss"] / 2**30)
    ours, reference = statistics.median(walls["excel"]), statistics.median(walls["plain"])
    # The same lines, in any order: rows come partition by partition, and the number of
    # partitions follows the file's size in bytes, which the dialect changes.
    same = sorted((tmp / "scores-plain.csv").read_bytes().splitlines()) == sorted(
        (tmp / "scores-excel.csv").read_bytes().splitlines()
    )
    return Row(
        "whole table",
        f"batch-file scoring of a CSV export: `;`, byte-order mark, CRLF ({what})",
        f"{ours:.1f} s (runs {', '.join(f'{w:.1f}' for w in walls['excel'])}); "
        f"peak RSS {max(peaks):.2f} GB",
        limit=f"the same rows as a comma CSV: {reference:.1f} s "
        f"(runs {', '.join(f'{w:.1f}' for w in walls['plain'])})",
        ratio=f"{ours / reference:.2f}x comma CSV",
        goal="≤ 1.05x comma CSV; same scores",
        met=yes_no(ours <= 1.05 * reference and same) if not cfg["table_rows"] else "",
        note=f"the same result rows as the comma CSV's (sorted): {yes_no(same)}; "
        f"CSV {plain.stat().st_size / 1e6:.0f} MB",
        data={"walls": walls, "peaks_gb": peaks, "same": same},
    )


def _partial_export(invoices: Path, clients: Path, artifacts: Path, tmp: Path) -> Row:
    """`ptd score` of a tenth of the invoice rows with the whole clients file (so most clients
    have no invoice and are each rejected with a reason) against the same rows without the
    clients file: what accounting for every client of a master file costs."""
    part = _slice(invoices, 360_000, tmp)
    walls: dict[str, list[float]] = {"with": [], "without": []}
    for _ in range(2):
        for kind in ("with", "without"):
            extra = ["--clients", str(clients)] if kind == "with" else []
            result = timed_child(
                [
                    *(PY, "-m", "detector", "score", str(part), *extra),
                    *("--out", str(tmp / "scores-part.csv"), "--model-dir", str(artifacts)),
                ]
            )
            walls[kind].append(result["wall"])
    ours, reference = statistics.median(walls["with"]), statistics.median(walls["without"])
    return Row(
        "whole table",
        "a partial export: the first 360,000 invoice rows with the whole clients file "
        "(108,276 clients, most without an invoice)",
        f"{ours:.1f} s (runs {', '.join(f'{w:.1f}' for w in walls['with'])})",
        limit=f"the same rows without the clients file: {reference:.1f} s",
        ratio=f"{ours / reference:.2f}x",
        goal="≤ 2x without it",
        met=yes_no(ours <= 2 * reference),
        note="every client without an invoice is one reject row; before the fix (np.isin on "
        "object ids) this took 80 s",
        data={"walls": walls},
    )


def training(data_dir: Path | None, artifacts: Path, opt_in: bool, tmp: Path) -> list[Row]:
    results = json.loads((artifacts / "training_results.json").read_text())
    recorded = results.get("total_seconds")
    row = Row(
        "training",
        "full training (from training_results.json, not re-run)",
        f"{recorded:.0f} s" if isinstance(recorded, (int, float)) else "not recorded",
        note=f"model {results.get('model_version')}, trained {results.get('trained_at')}; "
        f"features {results.get('features_seconds', 'n/a')} s of it",
    )
    rows = [row]
    if opt_in and data_dir is not None and (data_dir / "invoices_train.parquet").is_file():
        walls = []
        for _ in range(2):
            result = timed_child(
                [
                    *(PY, "-m", "detector", "train", "--data", str(data_dir)),
                    *("--out", str(tmp / "trained"), "--folds", "2"),
                ]
            )
            walls.append(result["wall"])
        rows.append(
            Row(
                "training",
                "`ptd train --folds 2` (--with-training)",
                f"{statistics.median(walls):.0f} s (runs {', '.join(f'{w:.0f}' for w in walls)})",
            )
        )
    elif opt_in:
        rows.append(Row("training", "`ptd train --folds 2`", "skipped: no shared data"))
    return rows


__all__ = ["REPO", "run", "training"]
