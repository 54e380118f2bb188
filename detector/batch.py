"""Batch scoring of whole tables: invoice rows (or a features table) in, one result per client.

The `ptd score` command and the blob-triggered function both call `score_frames`, so a file
scored locally and one dropped into `batch-in` give the same results. Nothing is lost silently:
every client in the input is in `results` or, with the reason, in `rejects`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from detector import drift
from detector.compression import gunzip_to, is_gzip
from detector.config import DEFAULT_MAX_DECOMPRESSED_BYTES
from detector.features import FEATURE_NAMES, FEATURES, compute_features
from detector.model import ArtifactSet, Scores
from detector.reasons import explain_rows
from detector.schema import (
    CLIENT_COLUMNS,
    INVOICE_COLUMNS,
    LONG_ID,
    REQUIRED_INVOICE_COLUMNS,
    UNDECODABLE_ID,
    InputError,
    Rejects,
    long_ids,
    prepare_clients,
    prepare_invoices,
    undecodable_ids,
)
from detector.tables import TableSource, iter_chunks, open_table, read_table, spreadsheet_safe

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
    """Scored clients, rejected rows with reasons, and a summary for humans and monitoring;
    `drift_counts` (clients per reference bin of each feature) add up across partitions."""

    results: pd.DataFrame
    rejects: pd.DataFrame
    summary: dict[str, Any] = field(default_factory=dict)
    drift_counts: list[np.ndarray] | None = None


def is_features_table(columns: pd.Index) -> bool:
    return "client_id" in columns and all(name in columns for name in FEATURE_NAMES)


def _ids(series: pd.Series) -> np.ndarray:
    """Client ids as the schema reads them (stripped text; missing as "")."""
    return series.astype("string").str.strip().fillna("").to_numpy(dtype=object)


def _absent_clients(source: str, clients: pd.DataFrame, absent: list[str]) -> pd.DataFrame:
    """One reject row per client of the clients table that has no invoice row at all."""
    ids = _ids(clients["client_id"])
    series = pd.Series(ids)
    # Series.isin hashes; np.isin on object arrays compares every pair (80 s for 100k clients).
    rows = np.flatnonzero(~series.duplicated().to_numpy() & series.isin(set(absent)).to_numpy())
    return pd.DataFrame(
        {
            "source": source,
            "row": row_labels(clients)[rows],
            "client_id": ids[rows],
            "reason": "no invoice rows for this client: nothing to score",
        }
    )


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


def check_columns(columns: pd.Index | list[str], header: str = "") -> None:
    """Raise InputError unless the columns make a features table or invoice rows; `header`
    (how the file's header was read) is added to the message so a user sees what went wrong."""
    columns = pd.Index(columns)
    if is_features_table(columns):
        return
    where = f" ({header})" if header else ""
    missing = [c for c in ("client_id", "invoice_date") if c not in columns]
    if missing:
        raise InputError(
            "input is neither invoice rows nor a features table: missing column(s) "
            f"{', '.join(missing)}{where}"
        )
    missing = [c for c in REQUIRED_INVOICE_COLUMNS if c not in columns]
    if missing:
        raise InputError(f"invoice data is missing required column(s): {', '.join(missing)}{where}")


def _features_from_table(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Validate a ready features table: finite numbers within each feature's range."""
    ids = table["client_id"].astype("string").str.strip()
    reasons = pd.Series("", index=table.index, dtype=object)
    reasons[ids.isna() | (ids == "")] = "missing client_id"
    reasons[long_ids(ids) & (reasons == "")] = LONG_ID
    reasons[undecodable_ids(ids) & (reasons == "")] = UNDECODABLE_ID
    values = {}
    for spec in FEATURES:
        column = pd.to_numeric(table[spec.name], errors="coerce").astype(np.float64)
        # Features that every client has may not be missing; the others may (then unknown).
        bad = (column < spec.min) | (column > spec.max) | np.isinf(column)
        if spec.required:
            bad |= column.isna()
        if spec.whole:
            bad |= column.notna() & (column != np.trunc(column))
        what = "an integer code" if spec.kind == "categorical" else "a whole number"
        reasons[bad & (reasons == "")] = (
            f"invalid {spec.name}: "
            + ("missing or " if spec.required else "")
            + (f"not {what} or " if spec.whole else "")
            + f"outside [{spec.min:g}, {spec.max:g}]"
        )
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
        ids_in = set(_ids(table["client_id"]))
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
        invoice_ids = {*invoices.frame["client_id"].unique(), *invoices.rejects.client_ids}
        client_ids = set(prepared_clients.frame.index)
        frames = [
            _reject_frame("invoices", invoices.rejects, row_labels(table)),
            _reject_frame(
                client_source,
                prepared_clients.rejects,
                row_labels(clients) if clients is not None else None,
            ),
        ]
        # A client of the clients table without any invoice row: nothing to score, said so.
        absent = sorted(str(c) for c in client_ids - invoice_ids if c)
        if absent and clients is not None:
            frames.append(_absent_clients(client_source, clients, absent))
        rejects = pd.concat(frames, ignore_index=True)
        input_kind, input_rows = "invoices", len(table)
        ids_in = {str(c) for c in invoice_ids | client_ids}
    features_done = time.perf_counter()
    matrix = features.to_numpy(dtype=np.float64)
    drift_counts = (
        drift.bin_counts(artifacts.drift_references, matrix)
        if artifacts.drift_references is not None
        else None
    )
    scores = artifacts.score(matrix, name, with_reasons)
    results = results_frame(features.index, scores, artifacts.typical)
    finished = time.perf_counter()
    ids_in.discard("")  # a row without a client id belongs to no client (its reject says so)
    scored_ids = {str(c) for c in features.index}
    unscored = ids_in - scored_ids
    summary = {
        "input_kind": input_kind,
        "input_rows": int(input_rows),
        "clients_in": len(ids_in),
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
        "drift": drift.report(artifacts.drift_references, drift_counts),
        "seconds": {
            "features": round(features_done - started, 3),
            "scoring": round(finished - features_done, 3),
        },
    }
    return BatchResult(results, rejects, summary, drift_counts)


# -- streaming: files of any size in bounded memory -----------------------------------------------
# A file is read in chunks (Parquet record batches, CSV chunks), its rows are hash-partitioned by
# client_id into temporary Parquet files (every row of a client lands in the same partition, with
# its original row number), and each partition is scored with `score_frames`. Memory is bounded by
# one chunk plus one partition, whatever the file size; results equal those of `score_frames` on
# the whole table (tests check it), in partition order.

READ_COLUMNS = tuple(dict.fromkeys((*INVOICE_COLUMNS, *CLIENT_COLUMNS, *FEATURE_NAMES)))
CHUNK_ROWS = 500_000  # rows read at a time
PARTITION_ROWS = 400_000  # target rows per partition (the unit scored in memory)
# Clients scored at once: features, scores and reasons take ~2.5 KB per client, so a partition
# of one-invoice clients (400,000 of them) is split again into blocks of at most this many.
CLIENT_BLOCK = 100_000
PARTITION_KEY = "0123456789123456"  # pandas' default hash key: partitions as before
BLOCK_KEY = "ptd-client-block"  # another key, so blocks do not follow the partitions' residues
CSV_BYTES_PER_ROW = 100  # to size partitions of a CSV before reading it
MAX_PARTITIONS = 512
ROW_COLUMN = "__ptd_row__"


@dataclass
class FileResult:
    """What `score_file` wrote, and the summary of the run."""

    summary: dict[str, Any]
    results_path: Path
    rejects_path: Path | None


def partition_of(client_ids: Any, n_partitions: int, hash_key: str = PARTITION_KEY) -> np.ndarray:
    """Partition number of each row from its client_id (stripped, as the schema reads it).

    Deterministic across processes (pandas' fixed-key hash), so re-runs write the same files.
    A second `hash_key` (16 characters) splits a partition again independently of the first.
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
    hashed = pd.util.hash_array(stripped, hash_key=hash_key, categorize=False)
    hashes = np.asarray(hashed) % np.uint64(n_partitions)
    result: np.ndarray = hashes.astype(np.int64)[np.asarray(codes)]
    return result


def _n_partitions(source: TableSource) -> int:
    if source.format == "parquet":
        import pyarrow.parquet as pq

        rows = pq.ParquetFile(source.path).metadata.num_rows
    else:
        rows = source.path.stat().st_size // CSV_BYTES_PER_ROW
    return int(min(MAX_PARTITIONS, max(1, -(-rows // PARTITION_ROWS))))


@dataclass
class Partitions:
    """What `_write_partitions` read: rows, pieces per partition, rows over the per-client cap."""

    rows: int
    pieces: list[list[Path]]
    overflow: Path | None  # reject rows (CSV, no header) of the rows over the cap
    overflow_rows: int


def _arrow_ids(column: Any) -> np.ndarray:
    """Client ids of an Arrow column as the schema reads them (stripped text; missing: "")."""
    import pyarrow as pa
    import pyarrow.compute as pc

    text = pc.utf8_trim_whitespace(pc.cast(column, pa.large_string()))
    ids: np.ndarray = pc.fill_null(text, "").to_numpy(zero_copy_only=False)
    return ids


def _over_cap(ids: np.ndarray, counts: dict[str, int], cap: int) -> np.ndarray:
    """Which rows take their client past `cap` rows, counting rows of earlier chunks (`counts`,
    updated in place). Rows without a client id are not counted: they are rejected anyway."""
    codes, uniques = pd.factorize(ids)
    seen = np.array([counts.get(u, 0) for u in uniques], dtype=np.int64)
    within = pd.Series(codes).groupby(codes).cumcount().to_numpy()
    over = (seen[codes] + within >= cap) & (ids != "")
    for u, total in zip(uniques, seen + np.bincount(codes, minlength=len(uniques)), strict=True):
        counts[u] = int(total)
    result: np.ndarray = over
    return result


def _write_partitions(
    source: TableSource, workdir: Path, n_partitions: int, cap: int
) -> Partitions:
    """Split the file by client into Parquet pieces, each row with its row number; rows past
    `cap` rows of one client go to an overflow file of rejects instead (streaming: memory is
    one chunk and a count per client)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pieces: list[list[Path]] = [[] for _ in range(n_partitions)]
    counts: dict[str, int] = {}
    overflow_path = workdir / "overflow.csv"
    overflow_rows = 0
    offset = 0
    wanted = [c for c in source.columns if c in READ_COLUMNS]
    reason = f"too many invoices for one client: over {cap:,}; the first {cap:,} rows are scored"
    for k, chunk in enumerate(iter_chunks(source, wanted, CHUNK_ROWS)):
        n = chunk.num_rows
        if n == 0:
            continue
        numbers = np.arange(offset, offset + n)
        offset += n
        if "invoice_date" in chunk.column_names:  # invoice rows (not a features table): cap
            ids = _arrow_ids(chunk.column("client_id"))
            over = _over_cap(ids, counts, cap)
            if over.any():
                pd.DataFrame(
                    {
                        "source": "invoices",
                        "row": numbers[over],
                        "client_id": ids[over],
                        "reason": reason,
                    }
                ).to_csv(overflow_path, mode="a", header=False, index=False)
                overflow_rows += int(over.sum())
                chunk, numbers = chunk.filter(pa.array(~over)), numbers[~over]
        chunk = chunk.append_column(ROW_COLUMN, pa.array(numbers))
        parts = partition_of(chunk.column("client_id"), n_partitions)
        order = np.argsort(parts, kind="stable")
        part_counts = np.bincount(parts, minlength=n_partitions)
        ordered = chunk.take(pa.array(order)) if n_partitions > 1 else chunk
        start = 0
        for p, count in enumerate(part_counts):
            if count:
                piece = workdir / f"p{p:04d}-{k:06d}.parquet"
                pq.write_table(ordered.slice(start, int(count)), piece, compression="lz4")
                pieces[p].append(piece)
            start += int(count)
    return Partitions(offset, pieces, overflow_path if overflow_rows else None, overflow_rows)


def _client_blocks(
    table: pd.DataFrame, clients: pd.DataFrame | None
) -> Iterator[tuple[pd.DataFrame, pd.DataFrame | None]]:
    """The partition as it is, or split by client into blocks of about CLIENT_BLOCK clients
    (each client's invoice rows and clients-file rows in the same block) when it holds more."""
    ids = table["client_id"] if "client_id" in table.columns else pd.Series([], dtype=object)
    n_clients = ids.nunique() + (clients["client_id"].nunique() if clients is not None else 0)
    n_blocks = -(-n_clients // CLIENT_BLOCK)
    if n_blocks <= 1:
        yield table, clients
        return
    table_blocks = partition_of(ids, n_blocks, BLOCK_KEY)
    client_blocks = (
        partition_of(clients["client_id"], n_blocks, BLOCK_KEY) if clients is not None else None
    )
    for b in range(n_blocks):
        block: pd.DataFrame = table.loc[table_blocks == b]
        if clients is None or client_blocks is None:
            yield block, None
        else:
            selected: pd.DataFrame = clients.loc[client_blocks == b]
            yield block, selected


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


DEFAULT_MAX_INVOICES_PER_CLIENT = 2_000  # as the API's PTD_MAX_INVOICES_PER_CUSTOMER


def _write_csv(frame: pd.DataFrame, handle: Any, header: bool) -> None:
    """A results or rejects frame as CSV, every text cell safe to open in a spreadsheet."""
    safe = frame.copy(deep=False)
    for column in safe.columns:
        if safe[column].dtype == object or pd.api.types.is_string_dtype(safe[column]):
            safe[column] = spreadsheet_safe(safe[column])
    safe.to_csv(handle, header=header, index=False)


def check_output(target: Path, *inputs: Path | None) -> None:
    """Raise InputError when writing `target` would overwrite one of the `inputs`, or when it
    exists and is not a regular file: outputs are renamed into place, which would replace a
    pipe or a device."""
    if target.resolve() in {Path(p).resolve() for p in inputs if p is not None}:
        raise InputError(
            f"{target.name}: an output of this run would overwrite its input; choose another --out"
        )
    if target.exists() and not target.is_file():
        raise InputError(f"{target}: exists and is not a regular file; choose another --out")


@dataclass(frozen=True)
class _Run:
    """What one `score_file` call was asked for, shared by its stages."""

    artifacts: ArtifactSet
    model: str  # resolved: a name the artifact set serves
    with_reasons: bool
    max_invoices_per_client: int
    max_decompressed_bytes: int
    started: float  # time.perf_counter() when the call began


def score_file(
    path: Path,
    artifacts: ArtifactSet,
    out: Path,
    rejects_out: Path | None = None,
    clients_path: Path | None = None,
    model: str | None = None,
    with_reasons: bool = True,
    workdir: Path | None = None,
    max_invoices_per_client: int = DEFAULT_MAX_INVOICES_PER_CLIENT,
    max_decompressed_bytes: int = DEFAULT_MAX_DECOMPRESSED_BYTES,
) -> FileResult:
    """Score a CSV or Parquet file of invoice rows (or a features table) in bounded memory.

    Writes one results row per scored client to `out` (CSV) and, if any row was rejected, each
    with its reason to `rejects_out` (default `<out stem>.rejects.csv`; removed when there is
    none). Every client id of the inputs is in one of them: `clients_in` = `clients_scored` +
    `clients_rejected` in the summary. A client's rows past `max_invoices_per_client` are
    rejected (the first ones in the file are scored). Text cells are written spreadsheet-safe
    (`tables.spreadsheet_safe`). A gzip file (`x.csv.gz`, `x.parquet.gz`, or any name whose
    bytes start 1f 8b) is first decompressed into the working folder by
    `compression.gunzip_to`, refused past `max_decompressed_bytes` (PTD_MAX_DECOMPRESSED_BYTES).
    Raises InputError when the file cannot be used at all.
    """

    run = _Run(
        artifacts,
        artifacts.resolve(model),
        with_reasons,
        max_invoices_per_client,
        max_decompressed_bytes,
        started=time.perf_counter(),
    )
    path, out = Path(path), Path(out)
    rejects_out = Path(rejects_out) if rejects_out else out.with_name(out.stem + ".rejects.csv")
    for target in (out, rejects_out):
        check_output(target, path, clients_path)
    # Written beside the targets and renamed at the end: a run that fails leaves the previous
    # results (and their summary) as they were, never a truncated file.
    partial_out = out.with_name(f".{out.name}.partial-{os.getpid()}")
    partial_rejects = rejects_out.with_name(f".{rejects_out.name}.partial-{os.getpid()}")
    try:
        result = _score_to(path, clients_path, partial_out, partial_rejects, run, workdir)
        os.replace(partial_out, out)
        if result.rejects_path is not None:
            os.replace(partial_rejects, rejects_out)
        else:
            rejects_out.unlink(missing_ok=True)
    finally:
        partial_out.unlink(missing_ok=True)
        partial_rejects.unlink(missing_ok=True)
    return FileResult(result.summary, out, rejects_out if result.rejects_path is not None else None)


def _score_to(
    path: Path,
    clients_path: Path | None,
    out: Path,
    rejects_out: Path,
    run: _Run,
    workdir: Path | None,
) -> FileResult:
    """`score_file` into the given output paths: gzip inputs decompressed first."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ptd-score-", dir=workdir) as tmp:
        plain = _plain(path, Path(tmp), run.max_decompressed_bytes)
        plain_clients = (
            _plain(Path(clients_path), Path(tmp), run.max_decompressed_bytes)
            if clients_path is not None
            else None
        )
        try:
            result = _score_plain_file(plain, plain_clients, out, rejects_out, run, Path(tmp))
        except InputError as exc:  # name the file the user gave, not its decompressed copy
            message = str(exc)
            for given, used in ((path, plain), (clients_path, plain_clients)):
                if given is not None and used is not None and used != Path(given):
                    message = message.replace(f"{used.name}:", f"{Path(given).name}:", 1)
            raise InputError(message) from None
        result.summary["input_gzip"] = plain != path
        if plain != path:
            result.summary["input_decompressed_bytes"] = plain.stat().st_size
        return result


def _plain(path: Path, tmp: Path, max_bytes: int) -> Path:
    """`path` itself, or its decompressed copy in `tmp` when its bytes are gzip. The copy keeps
    the inner name (`x.csv.gz` -> `x.csv`) because `tables.file_format` goes by the suffix."""
    if not path.is_file() or not is_gzip(path):  # a missing file is tables.open_table's error
        return path
    inner = path.name
    for suffix in (".gz", ".gzip"):
        if inner.lower().endswith(suffix) and len(inner) > len(suffix):
            inner = inner[: -len(suffix)]
            break
    target = tmp / "plain" / inner
    target.parent.mkdir(exist_ok=True)
    if target.exists():  # the clients file has the same name as the invoices file
        target = tmp / "plain-clients" / inner
        target.parent.mkdir(exist_ok=True)
    gunzip_to(path, target, max_bytes, name=path.name)
    return target


def _score_plain_file(
    path: Path,
    clients_path: Path | None,
    out: Path,
    rejects_out: Path,
    run: _Run,
    tmp: Path,
) -> FileResult:
    """`score_file` once its inputs are plain CSV or Parquet files."""
    source = open_table(path, READ_COLUMNS)
    columns = source.columns
    check_columns(columns, source.describe())
    features_table = is_features_table(pd.Index(columns))
    n_partitions = _n_partitions(source)
    clients = None
    if clients_path is not None and not features_table:
        clients = read_table(Path(clients_path), CLIENT_COLUMNS)
        if "client_id" not in clients.columns:
            raise InputError(f"{Path(clients_path).name}: client data has no client_id column")
        client_parts = partition_of(clients["client_id"], n_partitions)

    totals: dict[str, Any] = {
        "clients_in": 0,
        "clients_scored": 0,
        "clients_flagged": 0,
        "clients_rejected": 0,
        "rows_rejected": 0,
    }
    by_reason: dict[str, int] = {}
    drift_counts: list[np.ndarray] | None = None
    seconds = {"read_and_partition": 0.0, "features": 0.0, "scoring": 0.0, "write": 0.0}
    out.parent.mkdir(parents=True, exist_ok=True)
    rejects_handle = None

    def rejects_file() -> Any:
        nonlocal rejects_handle
        if rejects_handle is None:
            rejects_handle = rejects_out.open("w", newline="", encoding="utf-8")
            pd.DataFrame(columns=list(REJECT_COLUMNS)).to_csv(rejects_handle, index=False)
        return rejects_handle

    with out.open("w", newline="", encoding="utf-8") as results_handle:
        parts = _write_partitions(source, tmp, n_partitions, run.max_invoices_per_client)
        if parts.rows == 0:
            raise InputError(f"{path.name}: the file has no data rows")
        seconds["read_and_partition"] = time.perf_counter() - run.started
        pd.DataFrame(columns=list(RESULT_COLUMNS)).to_csv(results_handle, index=False)
        try:
            if parts.overflow is not None:
                with parts.overflow.open(newline="", encoding="utf-8") as overflow:
                    for chunk in pd.read_csv(
                        overflow,
                        names=list(REJECT_COLUMNS),
                        dtype={"client_id": "string"},
                        chunksize=CHUNK_ROWS,
                        keep_default_na=False,
                    ):
                        _write_csv(chunk, rejects_file(), header=False)
                totals["rows_rejected"] += parts.overflow_rows
                by_reason["too many invoices for one client"] = parts.overflow_rows
            for p in range(n_partitions):
                if not parts.pieces[p] and (clients is None or not (client_parts == p).any()):
                    continue
                t0 = time.perf_counter()
                table = (
                    _read_partition(parts.pieces[p])
                    if parts.pieces[p]
                    else pd.DataFrame(columns=columns)
                )
                part_clients = clients[client_parts == p] if clients is not None else None
                seconds["read_and_partition"] += time.perf_counter() - t0
                for block, block_clients in _client_blocks(table, part_clients):
                    result = score_frames(
                        block, run.artifacts, block_clients, run.model, run.with_reasons
                    )
                    del block, block_clients
                    t1 = time.perf_counter()
                    _write_csv(result.results, results_handle, header=False)
                    if len(result.rejects):
                        _write_csv(result.rejects, rejects_file(), header=False)
                    summary = result.summary
                    drift_counts = drift.add_counts(drift_counts, result.drift_counts)
                    for key in totals:
                        totals[key] += summary[key]
                    for reason, count in summary["rows_rejected_by_reason"].items():
                        by_reason[reason] = by_reason.get(reason, 0) + count
                    seconds["features"] += summary["seconds"]["features"]
                    seconds["scoring"] += summary["seconds"]["scoring"]
                    seconds["write"] += time.perf_counter() - t1
                del table
        finally:
            if rejects_handle is not None:
                rejects_handle.close()
    if rejects_handle is None:
        rejects_out.unlink(missing_ok=True)
    scored = totals["clients_scored"]
    seconds["total"] = time.perf_counter() - run.started
    summary = {
        "input_kind": "features" if features_table else "invoices",
        "input_format": source.format,
        "input_rows": int(parts.rows),
        **totals,
        "flagged_rate": round(totals["clients_flagged"] / scored, 5) if scored else 0.0,
        "rows_rejected_by_reason": dict(sorted(by_reason.items())),
        "model": run.model,
        "model_version": run.artifacts.version,
        "drift": drift.report(run.artifacts.drift_references, drift_counts),
        "partitions": n_partitions,
        "seconds": {key: round(value, 3) for key, value in seconds.items()},
    }
    if source.format == "csv":
        summary["csv_dialect"] = {
            "separator": source.separator,
            "encoding": "utf-8" if source.encoding == "utf-8-sig" else source.encoding,
            # UTF-8 lines and Windows-1252 lines, each read in its own (tables._encoding)
            "mixed_encoding": source.mixed,
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
