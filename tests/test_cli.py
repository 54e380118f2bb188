"""The `ptd` command: score (the streaming path), publish/activate/versions, one-line errors."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import uuid
from pathlib import Path

import pandas as pd
import pytest

from detector.cli import main
from tests.azurite import connection_string, free_port
from tests.synthetic import make_steg


def _one_line_error(capsys: pytest.CaptureFixture[str], command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ptd {command}: error: "), err
    assert "\n" not in err and "Traceback" not in err
    return err


# -- score ----------------------------------------------------------------------------------------
def test_score_writes_results_and_rejects(
    tmp_path: Path, tiny_artifacts_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clients, invoices = make_steg(60, seed=5)
    invoices.loc[2, "months_number"] = -4
    invoices.to_csv(tmp_path / "invoices.csv", index=False)
    clients.to_parquet(tmp_path / "clients.parquet", index=False)
    out = tmp_path / "out" / "results.csv"
    code = main(
        [
            "score",
            str(tmp_path / "invoices.csv"),
            "--clients",
            str(tmp_path / "clients.parquet"),
            "--out",
            str(out),
            "--model-dir",
            str(tiny_artifacts_dir),
        ]
    )
    assert code == 0
    results = pd.read_csv(out)
    assert {"client_id", "theft_probability", "flagged"} <= set(results.columns)
    assert set(results["client_id"]) == set(invoices["client_id"])
    rejects = pd.read_csv(out.with_name("results.rejects.csv"))
    assert list(rejects["row"]) == [2]
    err = capsys.readouterr().err
    assert "scored 60 clients" in err and "rejected 1 rows" in err


@pytest.mark.parametrize(
    ("content", "name", "message"),
    [
        (None, "missing.csv", "no such file"),
        (b"", "empty.csv", "empty"),
        (b"a,b\n1,2\n", "wrong.csv", "neither invoice rows nor a features table"),
        (b"PAR1garbage", "bad.parquet", "cannot read as parquet"),
    ],
)
def test_score_errors_are_one_line(
    tmp_path: Path,
    tiny_artifacts_dir: Path,
    capsys: pytest.CaptureFixture[str],
    content: bytes | None,
    name: str,
    message: str,
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    code = main(
        [
            "score",
            str(path),
            "--out",
            str(tmp_path / "o.csv"),
            "--model-dir",
            str(tiny_artifacts_dir),
        ]
    )
    assert code == 2
    assert message in _one_line_error(capsys, "score")


@pytest.mark.parametrize("out", ["", ".", "..", "/", "folder", "x/", "x/.", "nd/.."])
def test_an_out_that_names_no_file_is_one_line(
    tmp_path: Path,
    tiny_artifacts_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    out: str,
) -> None:
    """`--out .` raised ValueError with a traceback; `--out x/` wrote a file named `x`."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    data = tmp_path / "invoices.csv"
    make_steg(n_clients=5)[1].to_csv(data, index=False)
    code = main(["score", str(data), "--out", out, "--model-dir", str(tiny_artifacts_dir)])
    assert code == 2
    assert f"--out {out!r}: not a file name" in _one_line_error(capsys, "score")
    assert not (tmp_path / "x").exists() and not (tmp_path / "nd").exists()


@pytest.mark.parametrize("which", ["results", "rejects", "summary"])
def test_an_out_that_is_a_pipe_is_refused_not_replaced(
    tmp_path: Path, tiny_artifacts_dir: Path, capsys: pytest.CaptureFixture[str], which: str
) -> None:
    """Results are renamed into place: over a named pipe (or /dev/null, as root) that replaced
    it with a regular file."""
    data = tmp_path / "invoices.csv"
    make_steg(n_clients=5)[1].to_csv(data, index=False)
    out = tmp_path / "r.csv"
    pipe = {"results": out, "rejects": tmp_path / "r.rejects.csv"}.get(
        which, tmp_path / "r.summary.json"
    )
    os.mkfifo(pipe)
    code = main(["score", str(data), "--out", str(out), "--model-dir", str(tiny_artifacts_dir)])
    assert code == 2
    assert "is not a regular file" in _one_line_error(capsys, "score")
    assert stat.S_ISFIFO(pipe.stat().st_mode)


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--port", "99999"),
        ("--port", "-1"),
        ("--port", "8_0"),
        ("--port", "+80"),
        ("--port", "\u0668\u0660"),
        ("--max-header-bytes", "0"),
        ("--max-header-bytes", "1_000"),
    ],
)
def test_serve_refuses_impossible_numbers(
    capsys: pytest.CaptureFixture[str], flag: str, value: str
) -> None:
    """uvicorn took port 99999 as 34463 (modulo 65536), silently."""
    with pytest.raises(SystemExit) as exited:
        main(["serve", flag, value])
    assert exited.value.code == 2
    assert f"argument {flag}: " in capsys.readouterr().err


def test_score_with_a_broken_model_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["score", "x.csv", "--out", "o.csv", "--model-dir", str(tmp_path / "nope")])
    assert code == 2
    assert "does not exist" in _one_line_error(capsys, "score")


# -- publish / activate / versions ----------------------------------------------------------------
def test_store_commands_need_a_connection(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("STORAGE", "STORAGE__blobServiceUri", "STORAGE__serviceUri"):
        monkeypatch.delenv(name, raising=False)
    assert main(["versions"]) == 2
    assert "no storage connection" in _one_line_error(capsys, "versions")


def test_unreachable_storage_is_a_one_line_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("STORAGE", connection_string(free_port()))
    assert main(["activate", "v1"]) == 2
    assert "unreachable" in _one_line_error(capsys, "activate")


@pytest.mark.azurite
@pytest.mark.xdist_group("azurite")
def test_publish_activate_versions_rollback(
    azurite: str,
    tmp_path: Path,
    tiny_artifacts_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("STORAGE", azurite)
    monkeypatch.setenv("PTD_MODEL_CONTAINER", f"cli-{uuid.uuid4().hex[:10]}")
    artifacts = str(tiny_artifacts_dir)
    sets = {}
    for version in ("v1", "v2"):  # a set is published under its manifest's own model_version
        sets[version] = tmp_path / version
        shutil.copytree(tiny_artifacts_dir, sets[version])
        manifest = json.loads((sets[version] / "manifest.json").read_text())
        manifest["model_version"] = version
        (sets[version] / "manifest.json").write_text(json.dumps(manifest, indent=2))

    # No container yet (Bicep creates `models`; here a fresh name): an error, not an empty store.
    assert main(["versions"]) == 2
    assert "container not found" in capsys.readouterr().err

    assert main(["publish", "--artifacts", str(sets["v1"]), "--version", "v1", "--activate"]) == 0
    assert capsys.readouterr().out.strip() == "v1"
    assert main(["publish", "--artifacts", str(sets["v2"]), "--activate"]) == 0
    assert capsys.readouterr().out.strip() == "v2"
    assert main(["publish", "--artifacts", artifacts]) == 0  # default: the manifest's version
    default_version = capsys.readouterr().out.strip()
    manifest = json.loads((tiny_artifacts_dir / "manifest.json").read_text())
    assert default_version == manifest["model_version"]

    assert main(["versions"]) == 0
    lines = capsys.readouterr().out.splitlines()
    sets[default_version] = tiny_artifacts_dir
    digest = {
        v: hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()[:12]
        for v, folder in sets.items()
    }
    # The manifests alone were compared, and the listing says so.
    note = "manifest as published; files not checked (ptd versions --verify)"
    assert f"* v2  sha256 {digest['v2']}  {note}" in lines
    assert f"  v1  sha256 {digest['v1']}  {note}" in lines
    assert f"  {default_version}  sha256 {digest[default_version]}  {note}" in lines

    assert main(["activate", "v1"]) == 0  # the rollback
    assert capsys.readouterr().out.strip() == "v1"
    assert main(["versions", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["current"] == "v1" and listing["pointer"]["previous"] == "v2"

    assert main(["activate", "v9"]) == 2
    assert "not found" in _one_line_error(capsys, "activate")
    assert main(["publish", "--artifacts", str(tmp_path / "none")]) == 2
    assert "manifest.json" in _one_line_error(capsys, "publish")
