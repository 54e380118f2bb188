"""Reading CSV and Parquet tables in the STEG schema, with one-line errors for unusable files."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from detector.schema import InputError

TABLE_SUFFIXES = (".csv", ".parquet", ".pq")


def table_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise InputError(f"{path}: unsupported file type {suffix or '(none)'}; use .csv or .parquet")


def read_table(path: Path, columns: tuple[str, ...] | None = None) -> pd.DataFrame:
    """Read a whole table; `columns` limits what is kept (those absent are simply not read)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    fmt = table_format(path)
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            names = pq.read_schema(path).names
            wanted = [c for c in columns if c in names] if columns else None
            return pd.read_parquet(path, columns=wanted)
        wanted_set = set(columns) if columns else None
        return pd.read_csv(
            path,
            usecols=(lambda c: c in wanted_set) if wanted_set else None,
            dtype={"client_id": "string", "counter_statue": "string"},
            low_memory=False,
        )
    except pd.errors.EmptyDataError:
        raise InputError(f"{path}: the file is empty") from None
    except (ValueError, OSError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: cannot read as {fmt}: {first_line}") from None
    except Exception as exc:  # pyarrow raises its own types for corrupt files
        if type(exc).__module__.startswith("pyarrow"):
            raise InputError(f"{path}: cannot read as {fmt}: {exc}") from None
        raise
