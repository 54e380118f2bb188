"""Batch scoring of whole tables: invoice rows (or a features table) in, one result per client.

The `ptd score` command and the blob-triggered function both call `score_frames`, so a file
scored locally and one dropped into `batch-in` give the same results. Nothing is lost silently:
every client in the input is in `results` or, with the reason, in `rejects`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from detector.features import FEATURE_NAMES, FEATURES, compute_features
from detector.model import ArtifactSet, Scores
from detector.reasons import explain_rows
from detector.schema import (
    CLIENT_COLUMNS,
    INVOICE_COLUMNS,
    REQUIRED_INVOICE_COLUMNS,
    InputError,
    Rejects,
    prepare_clients,
    prepare_invoices,
)

RESULT_COLUMNS = (
    "client_id",
    "theft_probability",
    "flagged",
    "risk_level",
    "reasons",
    "model",
    "model_version",
)
REJECT_COLUMNS = ("source", "row", "client_id", "reason")


@dataclass
class BatchResult:
    """Scored clients, rejected rows with reasons, and a summary for humans and monitoring."""

    results: pd.DataFrame
    rejects: pd.DataFrame
    summary: dict[str, Any] = field(default_factory=dict)


def is_features_table(columns: pd.Index) -> bool:
    return "client_id" in columns and all(name in columns for name in FEATURE_NAMES)


def row_labels(table: pd.DataFrame) -> np.ndarray:
    """The row number to report for each row: the table's integer index labels (a slice of a
    larger input keeps its rows' original positions there), else the position in the table."""
    if pd.api.types.is_integer_dtype(table.index.dtype):
        return np.asarray(table.index, dtype=np.int64)
    return np.arange(len(table), dtype=np.int64)


def _reject_frame(source: str, rejects: Rejects, labels: np.ndarray | None = None) -> pd.DataFrame:
    frame = rejects.to_frame()
    if labels is not None and len(frame):
        frame["row"] = labels[rejects.rows]
    frame.insert(0, "source", source)
    return frame


def check_columns(columns: pd.Index | list[str]) -> None:
    """Raise InputError unless the columns make a features table or invoice rows."""
    columns = pd.Index(columns)
    if is_features_table(columns):
        return
    missing = [c for c in ("client_id", "invoice_date") if c not in columns]
    if missing:
        raise InputError(
            "input is neither invoice rows nor a features table: missing column(s) "
            f"{', '.join(missing)}"
        )
    missing = [c for c in REQUIRED_INVOICE_COLUMNS if c not in columns]
    if missing:
        raise InputError(f"invoice data is missing required column(s): {', '.join(missing)}")


def _features_from_table(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Validate a ready features table: finite numbers within each feature's range."""
    ids = table["client_id"].astype("string").str.strip()
    reasons = pd.Series("", index=table.index, dtype=object)
    reasons[ids.isna() | (ids == "")] = "missing client_id"
    values = {}
    for spec in FEATURES:
        column = pd.to_numeric(table[spec.name], errors="coerce").astype(np.float64)
        # Features that every client has may not be missing; the others may (then unknown).
        bad = (column < spec.min) | (column > spec.max) | np.isinf(column)
        if spec.required:
            bad |= column.isna()
        if spec.kind == "categorical":
            bad |= column.notna() & (column != np.trunc(column))
        reasons[bad & (reasons == "")] = (
            f"invalid {spec.name}: "
            + ("missing or " if spec.required else "")
            + ("not an integer code " if spec.kind == "categorical" else "")
            + f"outside [{spec.min:g}, {spec.max:g}]"
        ).replace("code outside", "code or outside")
        values[spec.name] = column
    duplicated = ids.duplicated(keep="first") & (reasons == "")
    reasons[duplicated] = "duplicate client_id: first row used"
    good = (reasons == "").to_numpy()
    features = pd.DataFrame(values)[good]
    features.index = pd.Index(ids[good].to_numpy(), name="client_id")
    bad_rows = np.flatnonzero(~good)
    rejects = pd.DataFrame(
        {
            "source": "features",
            "row": row_labels(table)[bad_rows],
            "client_id": ids.fillna("").to_numpy(dtype=object)[bad_rows],
            "reason": reasons.to_numpy()[bad_rows],
        }
    )
    return features, rejects


def results_frame(client_ids: pd.Index, scores: Scores, typical: np.ndarray) -> pd.DataFrame:
    """One row per client, with the top reasons joined as text."""
    if scores.contributions is None:
        reasons = [""] * len(client_ids)
    else:
        reasons = [
            "; ".join(r.text for r in row)
            for row in explain_rows(scores.features, scores.contributions, typical)
        ]
    return pd.DataFrame(
        {
            "client_id": np.asarray(client_ids, dtype=object),
            "theft_probability": np.round(scores.probability, 6),
            "flagged": scores.flagged,
            "risk_level": scores.risk_level,
            "reasons": reasons,
            "model": scores.model,
            "model_version": scores.model_version,
        }
    )


def score_frames(
    table: pd.DataFrame,
    artifacts: ArtifactSet,
    clients: pd.DataFrame | None = None,
    model: str | None = None,
    with_reasons: bool = True,
) -> BatchResult:
    """Score a table of invoice rows (client attributes as extra columns or in `clients`),
    or a features table (client_id and the served features)."""
    started = time.perf_counter()
    name = artifacts.resolve(model)
    if is_features_table(table.columns):
        features, rejects = _features_from_table(table)
        input_kind, input_rows = "features", len(table)
    else:
        check_columns(table.columns)
        invoices = prepare_invoices(table)
        if clients is None and any(c in table.columns for c in ("region", "creation_date")):
            attrs = [c for c in CLIENT_COLUMNS if c in table.columns]
            clients = table[attrs].drop_duplicates(subset="client_id", keep="first")
            client_source = "invoices (client columns)"
        else:
            client_source = "clients"
        prepared_clients = prepare_clients(clients)
        features = compute_features(invoices.frame, prepared_clients)
        rejects = pd.concat(
            [
                _reject_frame("invoices", invoices.rejects, row_labels(table)),
                _reject_frame(
                    client_source,
                    prepared_clients.rejects,
                    row_labels(clients) if clients is not None else None,
                ),
            ],
            ignore_index=True,
        )
        input_kind, input_rows = "invoices", len(table)
    features_done = time.perf_counter()
    scores = artifacts.score(features.to_numpy(dtype=np.float64), name, with_reasons)
    results = results_frame(features.index, scores, artifacts.typical)
    finished = time.perf_counter()
    scored_ids = set(features.index)
    unscored = {str(c) for c in rejects["client_id"] if c and c not in scored_ids}
    summary = {
        "input_kind": input_kind,
        "input_rows": int(input_rows),
        "clients_scored": len(results),
        "clients_flagged": int(results["flagged"].sum()),
        "flagged_rate": round(float(results["flagged"].mean()), 5) if len(results) else 0.0,
        "clients_rejected": len(unscored),
        "rows_rejected": len(rejects),
        "rows_rejected_by_reason": {
            str(k): int(v)
            for k, v in rejects["reason"].str.split(":", n=1).str[0].value_counts().items()
        },
        "model": name,
        "model_version": artifacts.version,
        "seconds": {
            "features": round(features_done - started, 3),
            "scoring": round(finished - features_done, 3),
        },
    }
    return BatchResult(results=results, rejects=rejects, summary=summary)


# -- streaming: files of any size in bounded memory -----------------------------------------------
# A file is read in chunks (Parquet record batches, CSV chunks), its rows are hash-partitioned by
# client_id into temporary Parquet files (every row of a client lands in the same partition, with
# its original row number), and each partition is scored with `score_frames`. Memory is bounded by
# one chunk plus one partition, whatever the file size; results equal those of `score_frames` on
# the whole table (tests check it), in partition order.

READ_COLUMNS = tuple(dict.fromkeys((*INVOICE_COLUMNS, *CLIENT_COLUMNS, *FEATURE_NAMES)))
CHUNK_ROWS = 500_000  # rows read at a time
PARTITION_ROWS = 400_000  # target rows per partition (the unit scored in memory)
CSV_BYTES_PER_ROW = 100  # to size partitions of a CSV before reading it
MAX_PARTITIONS = 512
ROW_COLUMN = "__ptd_row__"
PARQUET_MAGIC = b"PAR1"


@dataclass
class FileResult:
    """What `score_file` wrote, and the summary of the run."""

    summary: dict[str, Any]
    results_path: Path
    rejects_path: Path | None


def file_format(path: Path) -> str:
    """ "parquet" or "csv": by the name's suffix, else by content (Parquet's magic bytes)."""
    suffix = path.suffix.lower()
    with path.open("rb") as handle:
        head = handle.read(4)
    if suffix in (".parquet", ".pq") or head == PARQUET_MAGIC:
        return "parquet"
    if suffix in (".csv", ".txt", ""):
        return "csv"
    # Unknown suffix (".export", ".dat"...): text is read as CSV, anything else is refused.
    with path.open("rb") as handle:
        sample = handle.read(4096)
    if b"\0" in sample:
        raise InputError(f"{path.name}: neither CSV nor Parquet (binary content)")
    return "csv"


def _unreadable(path: Path, fmt: str, exc: BaseException) -> InputError:
    text = str(exc).strip()
    first = text.splitlines()[0][:300] if text else type(exc).__name__
    return InputError(f"{path.name}: cannot read as {fmt}: {first}")


def _read_errors() -> tuple[type[BaseException], ...]:
    """What pandas and pyarrow raise for a file that is not the table it claims to be."""
    import pyarrow as pa

    return (ValueError, OSError, UnicodeDecodeError, pd.errors.ParserError, pa.ArrowException)


def _columns(path: Path, fmt: str) -> list[str]:
    import pyarrow.parquet as pq

    try:
        if fmt == "parquet":
            return list(pq.read_schema(path).names)
        return [str(c) for c in pd.read_csv(path, nrows=0).columns]
    except pd.errors.EmptyDataError:
        raise InputError(f"{path.name}: the file is empty") from None
    except _read_errors() as exc:
        raise _unreadable(path, fmt, exc) from None


def _chunks(path: Path, fmt: str, columns: list[str]) -> Iterator[Any]:
    """The file as Arrow tables of at most CHUNK_ROWS rows, only the columns the scorer reads."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    wanted = [c for c in columns if c in READ_COLUMNS]
    try:
        if fmt == "parquet":
            for batch in pq.ParquetFile(path).iter_batches(batch_size=CHUNK_ROWS, columns=wanted):
                yield pa.Table.from_batches([batch])
            return
        reader = pd.read_csv(
            path,
            usecols=wanted,
            dtype={"client_id": "string", "counter_statue": "string"},
            chunksize=CHUNK_ROWS,
            low_memory=False,
        )
        with reader:
            for chunk in reader:
                yield _arrow(chunk)
    except _read_errors() as exc:
        raise _unreadable(path, fmt, exc) from None


def _arrow(frame: pd.DataFrame) -> Any:
    """A pandas chunk as an Arrow table; mixed-type text columns become strings."""
    import pyarrow as pa

    try:
        return pa.Table.from_pandas(frame, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        fixed = frame.copy()
        for name in fixed.columns:
            if fixed[name].dtype == object:
                fixed[name] = fixed[name].astype("string")
        return pa.Table.from_pandas(fixed, preserve_index=False)


def partition_of(client_ids: Any, n_partitions: int) -> np.ndarray:
    """Partition number of each row from its client_id (stripped, as the schema reads it).

    Deterministic across processes (pandas' fixed-key hash), so re-runs write the same files.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if n_partitions == 1:
        return np.zeros(len(client_ids), dtype=np.int64)
    if isinstance(client_ids, pa.ChunkedArray | pa.Array):
        column = pc.fill_null(pc.cast(client_ids, pa.large_string()), "")
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        encoded = column.dictionary_encode()
        uniques = pd.Series(encoded.dictionary.to_pylist(), dtype=object)
        codes = encoded.indices.to_numpy(zero_copy_only=False)
    else:
        codes, raw_uniques = pd.factorize(pd.Series(client_ids), use_na_sentinel=False)
        uniques = pd.Series(raw_uniques, dtype=object)
    stripped = uniques.astype("string").str.strip().fillna("").to_numpy(dtype=object)
    hashes = np.asarray(pd.util.hash_array(stripped, categorize=False)) % np.uint64(n_partitions)
    result: np.ndarray = hashes.astype(np.int64)[np.asarray(codes)]
    return result


def _n_partitions(path: Path, fmt: str) -> int:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        rows = pq.ParquetFile(path).metadata.num_rows
    else:
        rows = path.stat().st_size // CSV_BYTES_PER_ROW
    return int(min(MAX_PARTITIONS, max(1, -(-rows // PARTITION_ROWS))))


def _write_partitions(
    path: Path, fmt: str, columns: list[str], workdir: Path, n_partitions: int
) -> tuple[int, list[list[Path]]]:
    """Split the file by client into Parquet pieces; returns (rows read, pieces per partition)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pieces: list[list[Path]] = [[] for _ in range(n_partitions)]
    offset = 0
    for k, chunk in enumerate(_chunks(path, fmt, columns)):
        n = chunk.num_rows
        if n == 0:
            continue
        chunk = chunk.append_column(ROW_COLUMN, pa.array(np.arange(offset, offset + n)))
        parts = partition_of(chunk.column("client_id"), n_partitions)
        order = np.argsort(parts, kind="stable")
        counts = np.bincount(parts, minlength=n_partitions)
        ordered = chunk.take(pa.array(order)) if n_partitions > 1 else chunk
        start = 0
        for p, count in enumerate(counts):
            if count:
                piece = workdir / f"p{p:04d}-{k:06d}.parquet"
                pq.write_table(ordered.slice(start, int(count)), piece, compression="lz4")
                pieces[p].append(piece)
            start += int(count)
        offset += n
    return offset, pieces


def _read_partition(pieces: list[Path]) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pq.read_table(piece) for piece in pieces]
    frame: pd.DataFrame
    try:
        frame = pa.concat_tables(tables).to_pandas()
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # CSV chunks typed a column differently
        frame = pd.concat([t.to_pandas() for t in tables], ignore_index=True)
    rows = frame.pop(ROW_COLUMN).to_numpy(dtype=np.int64)
    frame.index = pd.Index(rows)
    return frame


def score_file(
    path: Path,
    artifacts: ArtifactSet,
    out: Path,
    rejects_out: Path | None = None,
    clients_path: Path | None = None,
    model: str | None = None,
    with_reasons: bool = True,
    workdir: Path | None = None,
) -> FileResult:
    """Score a CSV or Parquet file of invoice rows (or a features table) in bounded memory.

    Writes one results row per scored client to `out` (CSV) and, if any row was rejected, each
    with its reason to `rejects_out` (default `<out stem>.rejects.csv`; removed when there is
    none). Raises InputError when the file cannot be used at all.
    """
    import tempfile

    from detector.tables import read_table

    started = time.perf_counter()
    path, out = Path(path), Path(out)
    rejects_out = Path(rejects_out) if rejects_out else out.with_name(out.stem + ".rejects.csv")
    name = artifacts.resolve(model)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise InputError(f"{path.name}: the file is empty")
    fmt = file_format(path)
    columns = _columns(path, fmt)
    check_columns(columns)
    features_table = is_features_table(pd.Index(columns))
    n_partitions = _n_partitions(path, fmt)
    clients = None
    if clients_path is not None and not features_table:
        clients = read_table(Path(clients_path), CLIENT_COLUMNS)
        client_parts = partition_of(clients["client_id"], n_partitions)

    totals: dict[str, Any] = {
        "clients_scored": 0,
        "clients_flagged": 0,
        "clients_rejected": 0,
        "rows_rejected": 0,
    }
    by_reason: dict[str, int] = {}
    seconds = {"read_and_partition": 0.0, "features": 0.0, "scoring": 0.0, "write": 0.0}
    out.parent.mkdir(parents=True, exist_ok=True)
    rejects_handle = None
    with (
        tempfile.TemporaryDirectory(prefix="ptd-score-", dir=workdir) as tmp,
        out.open("w", newline="", encoding="utf-8") as results_handle,
    ):
        input_rows, pieces = _write_partitions(path, fmt, columns, Path(tmp), n_partitions)
        if input_rows == 0:
            raise InputError(f"{path.name}: the file has no data rows")
        seconds["read_and_partition"] = time.perf_counter() - started
        pd.DataFrame(columns=list(RESULT_COLUMNS)).to_csv(results_handle, index=False)
        try:
            for p in range(n_partitions):
                if not pieces[p] and (clients is None or not (client_parts == p).any()):
                    continue
                t0 = time.perf_counter()
                table = _read_partition(pieces[p]) if pieces[p] else pd.DataFrame(columns=columns)
                part_clients = clients[client_parts == p] if clients is not None else None
                seconds["read_and_partition"] += time.perf_counter() - t0
                result = score_frames(table, artifacts, part_clients, name, with_reasons)
                del table
                t1 = time.perf_counter()
                result.results.to_csv(results_handle, header=False, index=False)
                if len(result.rejects):
                    if rejects_handle is None:
                        rejects_handle = rejects_out.open("w", newline="", encoding="utf-8")
                        pd.DataFrame(columns=list(REJECT_COLUMNS)).to_csv(
                            rejects_handle, index=False
                        )
                    result.rejects.to_csv(rejects_handle, header=False, index=False)
                summary = result.summary
                for key in totals:
                    totals[key] += summary[key]
                for reason, count in summary["rows_rejected_by_reason"].items():
                    by_reason[reason] = by_reason.get(reason, 0) + count
                seconds["features"] += summary["seconds"]["features"]
                seconds["scoring"] += summary["seconds"]["scoring"]
                seconds["write"] += time.perf_counter() - t1
        finally:
            if rejects_handle is not None:
                rejects_handle.close()
    if rejects_handle is None:
        rejects_out.unlink(missing_ok=True)
    scored = totals["clients_scored"]
    seconds["total"] = time.perf_counter() - started
    summary = {
        "input_kind": "features" if features_table else "invoices",
        "input_format": fmt,
        "input_rows": int(input_rows),
        **totals,
        "flagged_rate": round(totals["clients_flagged"] / scored, 5) if scored else 0.0,
        "rows_rejected_by_reason": dict(sorted(by_reason.items())),
        "model": name,
        "model_version": artifacts.version,
        "partitions": n_partitions,
        "seconds": {key: round(value, 3) for key, value in seconds.items()},
    }
    return FileResult(summary, out, rejects_out if rejects_handle is not None else None)


__all__ = [
    "INVOICE_COLUMNS",
    "REJECT_COLUMNS",
    "RESULT_COLUMNS",
    "BatchResult",
    "FileResult",
    "score_file",
    "score_frames",
]
