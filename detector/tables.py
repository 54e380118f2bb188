"""Reading the tables utilities export: CSV in its many dialects, and Parquet.

Exports come from billing systems and from Excel: `;`, tab or `|` instead of commas (Excel
writes `;` where the decimal separator is a comma, and then writes decimal commas), a UTF-8
byte-order mark, CRLF line ends, Windows-1252 text, header names with spaces or capitals (the
STEG data dictionary writes `Client_id`, `Invoice_date`). `open_table` looks at the header once
and says how to read the file: its format, separator, encoding and which raw column is which
schema column; `read_table` and `batch.score_file` then read with that. A file that cannot be
used raises `InputError` with one line that says what and where (for a missing column: the header
as read and the separator detected), never a traceback.

A CSV line longer than MAX_LINE_BYTES (64 KiB; a billing row is about 100 bytes) stops the
read with an InputError: a parser holds a whole line, and more, so one huge field would cost
memory in proportion to its size (a 1 GiB client id took 12.8 GB). Client ids are keys: in
CSV only an empty cell is a missing id (`NA`, `null`, `N/A` are ids a utility may use), while
the readings keep pandas' usual missing-value words.

Spreadsheets evaluate a cell that starts with `=`, `+`, `-`, `@`, a tab or a carriage return
(CSV injection, OWASP): `spreadsheet_safe` neutralises such text before it is written to any CSV
the product produces.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from detector.compression import GZIP_MAGIC
from detector.schema import InputError

if TYPE_CHECKING:
    import pandas as pd

PARQUET_MAGIC = b"PAR1"
CSV_SUFFIXES = (".csv", ".txt", ".tsv", "")
PARQUET_SUFFIXES = (".parquet", ".pq")
SEPARATORS = (",", ";", "\t", "|")
SEPARATOR_NAMES = {",": "','", ";": "';'", "\t": "tab", "|": "'|'"}
HEADER_BYTES = 1 << 16  # the header must fit in the first 64 KiB
MAX_LINE_BYTES = 1 << 16  # any CSV line (physical: up to a line feed or carriage return)
ID_COLUMNS = ("client_id",)  # read as text; only an empty cell is missing
ENCODING_BLOCK = 8 << 20  # bytes read at a time to tell UTF-8 from Windows-1252
# A cell a spreadsheet would evaluate as a formula (OWASP "CSV Injection").
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def canonical(name: object) -> str:
    """A header name as the schema spells it: `" Invoice Date "` -> `invoice_date`."""
    return re.sub(r"[\s\-]+", "_", str(name).strip().lower())


@dataclass(frozen=True)
class TableSource:
    """How to read one file: format, CSV dialect, and the raw name of each schema column."""

    path: Path
    format: str  # "csv" or "parquet"
    raw_columns: tuple[str, ...]
    separator: str = ","
    encoding: str = "utf-8-sig"
    mixed: bool = False  # UTF-8 and Windows-1252 lines: read through `Utf8Lines`
    renames: dict[str, str] = field(default_factory=dict)  # raw name -> schema name

    @property
    def columns(self) -> list[str]:
        """The file's columns under their schema names (unrecognised ones as they are)."""
        return [self.renames.get(c, c) for c in self.raw_columns]

    def describe(self) -> str:
        """The header as read, for error messages."""
        header = (self.separator if self.format == "csv" else ", ").join(self.raw_columns)
        if len(header) > 300:
            header = header[:300] + "..."
        if self.format == "csv":
            return f"header read as {header!r} with separator {SEPARATOR_NAMES[self.separator]}"
        return f"Parquet columns {header!r}"

    def raw_names(self, wanted: Iterable[str]) -> list[str]:
        """The raw names of the wanted schema columns that the file has."""
        back = {self.renames.get(c, c): c for c in self.raw_columns}
        return [back[name] for name in wanted if name in back]

    def rename(self, frame: pd.DataFrame) -> pd.DataFrame:
        present = {k: v for k, v in self.renames.items() if k in frame.columns and k != v}
        return frame.rename(columns=present) if present else frame


def file_format(path: Path) -> str:
    """ "parquet" or "csv": by the name's suffix, else by content (Parquet's magic bytes)."""
    suffix = path.suffix.lower()
    with path.open("rb") as handle:
        sample = handle.read(4096)
    if sample[:2] == GZIP_MAGIC:
        raise InputError(f"{path.name}: gzip-compressed; decompress it first")
    if suffix in PARQUET_SUFFIXES or sample[:4] == PARQUET_MAGIC:
        return "parquet"
    if suffix in CSV_SUFFIXES:
        return "csv"
    # Unknown suffix (".export", ".dat"...): text is read as CSV, anything else is refused.
    if b"\0" in sample:
        raise InputError(f"{path.name}: neither CSV nor Parquet (binary content)")
    return "csv"


MIXED = "mixed"  # `_encoding`'s answer for a file of UTF-8 lines and Windows-1252 lines


def _encoding(path: Path) -> str:
    """How the file's text is encoded: "utf-16", "utf-8-sig", "cp1252" or MIXED.

    UTF-16 when the file starts with a UTF-16 byte-order mark (Excel's "Unicode Text", which is
    tab-separated). UTF-8 (a UTF-8 byte-order mark is skipped) when every byte decodes.
    Windows-1252, what Excel writes on a Western-European Windows, when some bytes are not UTF-8
    and no character beyond ASCII is valid UTF-8. Otherwise the file mixes the two (a UTF-8
    export with rows appended by a Windows-1252 system; a Windows-1252 file behind a UTF-8
    byte-order mark; a Windows-1252 file in which `Ã©` or `É` + no-break space happen to form
    valid UTF-8): `Utf8Lines` then reads each line in the encoding it is valid in. Decoding such
    a file whole as Windows-1252 had turned every UTF-8 `é` into `Ã©` (no id joined, exit 0),
    and whole as UTF-8 would lose the Windows-1252 rows.

    The whole file is checked, not a sample: an export's first accented name may come after a
    million ASCII rows. ASCII blocks (nearly all of an export) are passed by `bytes.isascii` at
    memory speed; others go through an incremental decoder whose `surrogateescape` handler
    turns each undecodable byte into a lone surrogate (U+DC80..U+DCFF), which valid UTF-8
    never decodes to, so a character split between blocks is still one character.
    """
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
    invalid = valid = False
    with path.open("rb") as handle:
        start = handle.read(3)
        if start[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
            return "utf-16"  # the codec reads the byte-order mark
        bom = start == codecs.BOM_UTF8
        if not bom:
            handle.seek(0)
        while True:
            block = handle.read(ENCODING_BLOCK)
            if block.isascii() and not decoder.getstate()[0]:
                if not block:
                    break
                continue
            text = decoder.decode(block, final=not block)
            invalid = invalid or _UNDECODABLE.search(text) is not None
            valid = valid or _UTF8_BEYOND_ASCII.search(text) is not None
            if invalid and valid:
                return MIXED
            if not block:
                break
    if not invalid:
        return "utf-8-sig"
    return MIXED if bom else "cp1252"


_UNDECODABLE = re.compile("[\udc80-\udcff]")
_UTF8_BEYOND_ASCII = re.compile("[^\x00-\x7f\udc80-\udcff]")


def decode_line(line: bytes) -> str:
    """One line of a MIXED file: UTF-8 if it is valid UTF-8, else Windows-1252 (its five
    unassigned bytes become U+FFFD, and an id holding one is rejected)."""
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        return line.decode("cp1252", errors="replace")


class Utf8Lines(io.RawIOBase):
    """A MIXED file as UTF-8: each line (ended by a line feed or a carriage return) passed
    through when it is valid UTF-8, transcoded from Windows-1252 otherwise (`decode_line`).
    A block of lines that is valid UTF-8 as a whole is passed through at memory speed.
    `windows_1252_lines` counts the lines transcoded. Reads from a stream whose lines are
    bounded (`BoundedLines`), so what it holds is bounded too."""

    def __init__(self, source: Any, block: int = 1 << 18) -> None:
        super().__init__()
        self._source, self._block = source, block
        self._carry = b""  # the start of a line whose end is not read yet
        self._pending = memoryview(b"")
        self.windows_1252_lines = 0

    def readable(self) -> bool:
        return True

    def _transcode(self, lines: bytes) -> bytes:
        try:
            lines.decode("utf-8")
            return lines
        except UnicodeDecodeError:
            pass
        out = []
        for line in lines.splitlines(keepends=True):
            try:
                line.decode("utf-8")
                out.append(line)
            except UnicodeDecodeError:
                out.append(decode_line(line).encode("utf-8"))
                self.windows_1252_lines += 1
        return b"".join(out)

    def readinto(self, buffer: Any) -> int:
        while not len(self._pending):
            data = self._source.read(self._block)
            if not data:
                if not self._carry:
                    return 0
                data, self._carry = self._carry, b""
                self._pending = memoryview(self._transcode(data))
                break
            data = self._carry + data
            cut = max(data.rfind(b"\n"), data.rfind(b"\r")) + 1
            self._carry = data[cut:]
            if cut:
                self._pending = memoryview(self._transcode(data[:cut]))
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def _header_line(path: Path, encoding: str, mixed: bool = False) -> str:
    with path.open("rb") as handle:
        raw = handle.read(HEADER_BYTES)
    if mixed:  # the header line in the encoding it is valid in, as `Utf8Lines` reads it
        end = min((i for i in (raw.find(b"\n"), raw.find(b"\r")) if i >= 0), default=-1)
        text = decode_line(raw if end < 0 else raw[:end])
    else:
        text = raw.decode(encoding, errors="replace")
        end = min((i for i in (text.find("\n"), text.find("\r")) if i >= 0), default=-1)
    if end < 0 and len(raw) == HEADER_BYTES:
        raise InputError(f"{path.name}: no line break in the first 64 KiB; not a CSV header")
    return text if end < 0 or mixed else text[:end]


def _separator(header: str) -> str:
    """The candidate that splits the header into the most fields (outside quotes)."""
    best, fields = ",", 1
    for candidate in SEPARATORS:
        count = len(next(csv.reader([header], delimiter=candidate)))
        if count > fields:
            best, fields = candidate, count
    return best


def _renames(path: Path, raw: list[str], known: Iterable[str]) -> dict[str, str]:
    """Map raw names to schema names; two raw columns for one name is an error."""
    known_set = set(known)
    seen: dict[str, str] = {}
    renames = {}
    for name in raw:
        target = canonical(name)
        if target not in known_set:
            continue
        if target in seen:
            raise InputError(
                f"{path.name}: columns {seen[target]!r} and {name!r} are both {target!r}"
            )
        seen[target] = name
        renames[name] = target
    return renames


def _check_parquet_types(path: Path, schema: Any, renames: dict[str, str]) -> None:
    """Columns the scorer reads must hold scalars; client_id text or whole numbers."""
    import pyarrow as pa

    for raw, name in renames.items():
        kind = schema.field(raw).type
        if pa.types.is_dictionary(kind):
            kind = kind.value_type
        nested = pa.types.is_nested(kind) or pa.types.is_union(kind)
        binary = pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
        binary = binary or pa.types.is_fixed_size_binary(kind)
        if nested or (name == "client_id" and (binary or pa.types.is_floating(kind))):
            expected = "text or whole numbers" if name == "client_id" else "one value per row"
            raise InputError(
                f"{path.name}: column {raw!r} holds {kind} values; {name} must be {expected}"
            )


def open_table(path: Path, known: Iterable[str]) -> TableSource:
    """Look at a file's header: format, dialect, which column is which of the `known` names.

    Raises InputError for a missing, empty, unreadable or ambiguous file (two columns that
    both mean one schema name, nested Parquet columns, a binary client_id).
    """
    path = Path(path)
    known = tuple(known)
    if path.is_dir():
        raise InputError(f"{path}: a folder, not a file")
    if path.exists() and not path.is_file():
        raise InputError(
            f"{path}: not a regular file (a pipe or a device is read once; save the export "
            "to a file)"
        )
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise InputError(f"{path.name}: the file is empty")
    fmt = file_format(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(path)
        except read_errors() as exc:
            raise unreadable(path, fmt, exc) from None
        raw = list(schema.names)
        duplicated = sorted({name for name in raw if raw.count(name) > 1})
        if duplicated:
            raise InputError(f"{path.name}: column name(s) used twice: {', '.join(duplicated)}")
        renames = _renames(path, raw, known)
        _check_parquet_types(path, schema, renames)
        return TableSource(path, fmt, tuple(raw), renames=renames)
    encoding = _encoding(path)
    mixed = encoding == MIXED
    if mixed:
        encoding = "utf-8-sig"  # what `Utf8Lines` makes of it
    header = _header_line(path, encoding, mixed).lstrip("\ufeff")
    if not header.strip():
        raise InputError(f"{path.name}: the first line is empty; expected a header row")
    if "\x00" in header:
        with path.open("rb") as handle:
            start = handle.read(64)
        # Every other byte NUL: UTF-16 text whose byte-order mark was lost.
        if len(start) >= 8 and (not any(start[1::2]) or not any(start[0::2])):
            raise InputError(
                f"{path.name}: the header holds NUL bytes (UTF-16 without a byte-order mark?); "
                "save the file as CSV UTF-8"
            )
        raise InputError(f"{path.name}: neither CSV nor Parquet (binary content)")
    separator = _separator(header)
    raw = next(csv.reader([header], delimiter=separator))
    duplicated = sorted({name for name in raw if raw.count(name) > 1})
    if duplicated:
        raise InputError(f"{path.name}: column name(s) used twice: {', '.join(duplicated)}")
    renames = _renames(path, raw, known)
    return TableSource(path, fmt, tuple(raw), separator, encoding, mixed, renames)


def unreadable(path: Path, fmt: str, exc: BaseException) -> InputError:
    text = str(exc).strip()
    first = text.splitlines()[0][:300] if text else type(exc).__name__
    return InputError(f"{path.name}: cannot read as {fmt}: {first}")


def read_errors() -> tuple[type[BaseException], ...]:
    """What pandas and pyarrow raise for a file that is not the table it claims to be."""
    import pandas as pd
    import pyarrow as pa

    return (ValueError, OSError, UnicodeDecodeError, pd.errors.ParserError, pa.ArrowException)


def csv_options(source: TableSource, usecols: list[str] | None = None) -> dict[str, Any]:
    """pandas.read_csv arguments for the file's dialect. Text columns stay text; with `;` a
    decimal comma is read as Excel writes it where the comma is the decimal separator. Ids
    are missing only when empty; other columns use pandas' missing-value words."""
    from pandas._libs.parsers import STR_NA_VALUES

    ids = set(source.raw_names(ID_COLUMNS))
    read = usecols if usecols is not None else list(source.raw_columns)
    options: dict[str, Any] = {
        "sep": source.separator,
        "encoding": source.encoding,
        "dtype": {raw: "string" for raw in source.raw_names(("client_id", "counter_statue"))},
        "low_memory": False,
        "keep_default_na": False,
        "na_values": {raw: [""] if raw in ids else sorted(STR_NA_VALUES) for raw in read},
    }
    if source.separator == ";":
        options["decimal"] = ","
    return options


def arrow_table(frame: pd.DataFrame) -> Any:
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


def iter_chunks(source: TableSource, wanted: Iterable[str], rows: int) -> Iterator[Any]:
    """The file as Arrow tables of at most `rows` rows: only the wanted schema columns that it
    has, under their schema names. Raises InputError when the content cannot be parsed."""
    import pandas as pd
    import pyarrow as pa

    raw = source.raw_names(wanted)
    try:
        if source.format == "parquet":
            import pyarrow.parquet as pq

            names = [source.renames.get(c, c) for c in raw]
            for batch in pq.ParquetFile(source.path).iter_batches(batch_size=rows, columns=raw):
                yield _dates_as_timestamps(pa.Table.from_batches([batch]).rename_columns(names))
            return
        with source.path.open("rb", buffering=0) as handle:
            stream: Any = io.BufferedReader(BoundedLines(handle, source.path.name), 1 << 18)
            if source.mixed:
                stream = io.BufferedReader(Utf8Lines(stream), 1 << 18)
            reader = pd.read_csv(
                stream,
                usecols=raw,
                chunksize=rows,
                compression=None,  # by content, not by name: a plain CSV may be called x.gz
                **csv_options(source, raw),
            )
            with reader:
                for chunk in reader:
                    yield arrow_table(source.rename(chunk))
    except InputError:
        raise
    except pd.errors.EmptyDataError:
        raise InputError(f"{source.path.name}: the file has no data rows") from None
    except read_errors() as exc:
        raise unreadable(source.path, source.format, exc) from None


def _dates_as_timestamps(table: Any) -> Any:
    """Parquet date32/date64 columns as second timestamps. pandas turns an Arrow date into
    Python `datetime.date` objects, which cannot hold a year before 1 or after 9999 (a
    placeholder such as year -768 raised ValueError and stopped the whole file); seconds cover
    any date32, so the schema sees the day and rejects it as out of the plausible window."""
    import pyarrow as pa

    for i, kind in enumerate(table.schema.types):
        if pa.types.is_date(kind):
            name = table.schema.names[i]
            table = table.set_column(i, name, table.column(i).cast(pa.timestamp("s")))
    return table


class BoundedLines(io.RawIOBase):
    """A binary file that raises InputError as soon as one line passes MAX_LINE_BYTES, so a
    parser reading through it never holds more than that of one line. Line breaks are line
    feeds and carriage returns; the check is vectorised (about 1 ms per MiB)."""

    def __init__(self, raw: Any, name: str, limit: int = MAX_LINE_BYTES) -> None:
        super().__init__()
        self._raw, self._name, self._limit = raw, name, limit
        self._run = 0  # bytes since the last line break
        self._line = 1  # line number (line feeds seen + 1) at the start of the next read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        import numpy as np

        n: int = self._raw.readinto(buffer)
        if not n:
            return 0
        data = np.frombuffer(memoryview(buffer)[:n], dtype=np.uint8)
        breaks = np.flatnonzero((data == 10) | (data == 13))
        if not len(breaks):
            self._run += n
            longest, where = self._run, 0
        else:
            gaps = np.diff(breaks) - 1
            first = self._run + int(breaks[0])
            inner = int(gaps.max()) if len(gaps) else 0
            longest = max(first, inner)
            where = 0 if first >= inner else int(np.argmax(gaps)) + 1
            self._run = n - int(breaks[-1]) - 1
        if longest > self._limit:
            line = self._line + int(np.count_nonzero(data[breaks[:where]] == 10))
            raise InputError(
                f"{self._name}: line {line:,} is longer than {self._limit // 1024} KiB; a "
                "billing export's row is a few hundred bytes (is this the right file?)"
            )
        self._line += int(np.count_nonzero(data[breaks] == 10)) if len(breaks) else 0
        return n


def read_table(path: Path, columns: tuple[str, ...] | None = None) -> pd.DataFrame:
    """Read a whole (small) table: the schema `columns` it has, under their schema names (all
    columns when None). Raises InputError when the file cannot be used."""
    import pandas as pd
    import pyarrow as pa

    source = open_table(Path(path), columns or ())
    wanted = columns if columns is not None else source.raw_columns
    chunks = list(iter_chunks(source, wanted, 1 << 20))
    if not chunks:
        return pd.DataFrame(columns=[source.renames.get(c, c) for c in source.raw_names(wanted)])
    try:
        frame: pd.DataFrame = pa.concat_tables(chunks).to_pandas()
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # CSV chunks typed a column differently
        frame = pd.concat([t.to_pandas() for t in chunks], ignore_index=True)
    return frame


def spreadsheet_safe(values: pd.Series) -> pd.Series:
    """Text a spreadsheet will not evaluate: a cell starting with `=`, `+`, `-`, `@`, a tab, a
    carriage return or an apostrophe gets one more apostrophe in front (OWASP, "CSV Injection").
    The original is the cell without its first apostrophe, whenever the cell starts with one."""
    text = values.astype("string")
    risky = text.str.startswith((*FORMULA_START, "'")).fillna(False).astype(bool)
    if not risky.any():
        return values
    return text.mask(risky, "'" + text)
