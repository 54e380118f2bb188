"""The documentation cannot rot: its commands are run and its claims checked against the code.

* README.md: its quick start is followed in a fresh `git clone` of the committed HEAD (`make -n
  run` / `make -n test` show that both build `.venv`; the `ptd score` command and every ```bash
  block starting with `curl` are run against a server started from the clone; a ```json block
  right after a command block must match the real answer).
* docs/QUICKSTART.md: every ```bash block is run, in order, in an empty folder (```sh blocks
  are the ones covered by the `make -n` checks instead); ```json / ```csv blocks right after a
  command block are compared with its output.
* docs/API.md: every ```bash (curl) example is run, and the ```json answer after it compared.
* docs/TROUBLESHOOTING.md: every **Message:** quoted there occurs in the code.
* docs/RUNBOOKS.md: the customer-erasure script is run against Azurite.
* Relative links (and their #anchors) in README.md and docs/*.md point to files and headings that
  exist.

Conventions the docs follow: examples target http://127.0.0.1:7071 (the test substitutes its own
port); `.venv/bin/ptd` and `.venv/bin/python` are replaced by the interpreter running the tests.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from tests.azurite import free_port

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
DOC_HOST = "127.0.0.1:7071"
PYTHON = sys.executable


# --- markdown ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """A fenced code block: its info string's language, its text (dedented), where it lies."""

    lang: str
    text: str
    start: int
    end: int


FENCE = re.compile(
    r"^(?P<indent>[ ]*)(?P<fence>`{3,})(?P<lang>[\w+-]*)[^\n]*\n"
    r"(?P<body>.*?)^(?P=indent)(?P=fence)[ \t]*$",
    re.M | re.S,
)


def fenced_blocks(markdown: str) -> list[Block]:
    blocks = []
    for match in FENCE.finditer(markdown):
        indent = len(match["indent"])
        lines = [
            line[indent:] if line[:indent].isspace() else line
            for line in match["body"].splitlines()
        ]
        blocks.append(
            Block(match["lang"].lower(), "\n".join(lines) + "\n", match.start(), match.end())
        )
    return blocks


def expected_output(markdown: str, blocks: list[Block], i: int) -> Block | None:
    """The block right after block i (only blank lines between), if it shows an answer."""
    if i + 1 >= len(blocks):
        return None
    following = blocks[i + 1]
    if markdown[blocks[i].end : following.start].strip():
        return None
    return following if following.lang in ("json", "csv") else None


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    without_code = FENCE.sub("", markdown)
    seen: dict[str, int] = {}
    result = set()
    for match in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", without_code, re.M):
        slug = github_slug(match[1])
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


# --- comparing documented answers with real ones -----------------------------------------------


def _decimals(value: float) -> int | None:
    text = repr(float(value))
    if "e" in text or "inf" in text or "nan" in text:
        return None
    return len(text.split(".", 1)[1].rstrip("0")) if "." in text else 0


def assert_documented(doc: Any, real: Any, path: str = "$") -> None:
    """`real` has what `doc` shows: every documented key and value. `"...": "..."` entries and
    `"..."` strings mark cut parts; a documented number matches to its printed precision."""
    if isinstance(doc, dict):
        assert isinstance(real, dict), f"{path}: documented an object, got {real!r}"
        for key, value in doc.items():
            if key == "...":
                continue
            assert key in real, f"{path}: documented key {key!r} is not in the answer"
            assert_documented(value, real[key], f"{path}.{key}")
    elif isinstance(doc, list):
        assert isinstance(real, list), f"{path}: documented a list, got {real!r}"
        if any(isinstance(item, str) and item.startswith("...") for item in doc):
            return
        assert len(doc) == len(real), f"{path}: {len(doc)} items documented, {len(real)} answered"
        for k, (d, r) in enumerate(zip(doc, real, strict=True)):
            assert_documented(d, r, f"{path}[{k}]")
    elif isinstance(doc, str) and doc.startswith("..."):
        return
    elif isinstance(doc, bool) or doc is None or isinstance(doc, str):
        assert doc == real, f"{path}: documented {doc!r}, answered {real!r}"
    else:
        assert isinstance(real, int | float) and not isinstance(real, bool), f"{path}: {real!r}"
        decimals = _decimals(doc)
        tolerance = 1e-12 * abs(doc) if decimals is None else 0.5 * 10.0**-decimals + 1e-15
        assert abs(real - doc) <= tolerance, f"{path}: documented {doc}, answered {real}"


def check_output(expected: Block, stdout: str, where: str) -> None:
    if expected.lang == "json":
        assert_documented(json.loads(expected.text), json.loads(stdout), where)
    else:
        assert stdout.strip() == expected.text.strip(), f"{where}: output differs"


# --- processes ---------------------------------------------------------------------------------


def clean_env(pythonpath: Path) -> dict[str, str]:
    """The environment of a newcomer's shell: no PTD_*, storage or telemetry settings."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PTD_", "STORAGE", "APPLICATIONINSIGHTS", "AzureWebJobs"))
    }
    env["PYTHONPATH"] = str(pythonpath)
    return env


@dataclass
class Server:
    port: int
    process: subprocess.Popen[bytes]


def start_server(root: Path, log: Path) -> Server:
    """`python -m detector serve` from `root` on a free port, once /api/health answers 200."""
    port = free_port()
    handle = log.open("wb")
    process = subprocess.Popen(
        [PYTHON, "-m", "detector", "serve", "--port", str(port)],
        cwd=root,
        env=clean_env(root),
        stdout=handle,
        stderr=subprocess.STDOUT,
    )
    handle.close()
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as answer:
                if answer.status == 200:
                    return Server(port, process)
        except (urllib.error.URLError, OSError):
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"ptd serve did not come up: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.1)


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait(timeout=10)


def localise(command: str, port: int) -> str:
    """A documented command as the test runs it: its port, this interpreter."""
    command = command.replace(DOC_HOST, f"127.0.0.1:{port}")
    python = shlex.quote(PYTHON)
    return re.sub(
        r"(?<![\w/])\.venv/bin/(ptd|python)\b",
        lambda m: f"{python} -m detector" if m[1] == "ptd" else python,
        command,
    )


def run_bash(command: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def needs(*programs: str) -> None:
    for program in programs:
        if shutil.which(program) is None:
            pytest.skip(f"{program} is not installed")


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh clone of the committed HEAD, as a newcomer gets it."""
    needs("git")
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    target = tmp_path_factory.mktemp("clone") / "power-theft-detector"
    subprocess.run(
        ["git", "clone", "--quiet", "--no-hardlinks", str(REPO), str(target)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return target


@pytest.fixture(scope="module")
def clone_server(clone: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(clone, tmp_path_factory.mktemp("clone-serve") / "serve.log")
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def repo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(REPO, tmp_path_factory.mktemp("serve") / "serve.log")
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def clone_readme(clone: Path) -> str:
    readme = clone / "README.md"
    assert readme.is_file(), "README.md is not in the committed HEAD"
    return readme.read_text()


# --- README, from a fresh clone --------------------------------------------------------------


def test_readme_names_the_two_commands(clone_readme: str) -> None:
    commands = " ".join(b.text for b in fenced_blocks(clone_readme) if b.lang in ("bash", "sh"))
    assert "make run" in commands and "make test" in commands


@pytest.mark.parametrize("target", ["run", "test"])
def test_make_targets_build_the_venv_in_a_fresh_clone(clone: Path, target: str) -> None:
    """`make -n` (nothing executed): both commands create .venv and install by themselves."""
    needs("make")
    assert not (clone / ".venv").exists()
    plan = subprocess.run(
        ["make", "-n", target], cwd=clone, capture_output=True, text=True, timeout=60
    )
    assert plan.returncode == 0, plan.stderr
    out = plan.stdout
    assert "-m venv .venv" in out
    assert "pip install" in out and "-r requirements-dev.txt" in out and "-e ." in out
    if target == "run":
        assert ".venv/bin/ptd serve --host 127.0.0.1 --port 7071" in out
    else:
        assert "npm install" in out  # Azurite for the integration tests
        assert ".venv/bin/python -m pytest" in out


def _synthetic_export(directory: Path) -> tuple[Path, Path, int]:
    from tests.synthetic import make_steg

    clients, invoices = make_steg(n_clients=60, seed=7)
    invoices_path, clients_path = directory / "invoices.parquet", directory / "clients.csv"
    invoices.to_parquet(invoices_path, index=False)
    clients.drop(columns="target").to_csv(clients_path, index=False)
    return invoices_path, clients_path, int(invoices["client_id"].nunique())


@pytest.mark.slow
def test_readme_score_command_in_a_fresh_clone(
    clone: Path, clone_readme: str, tmp_path: Path
) -> None:
    """The README's `ptd score` line, with a small synthetic export in place of the STEG data."""
    blocks = fenced_blocks(clone_readme)
    found = [
        (i, line)
        for i, block in enumerate(blocks)
        if block.lang == "bash"
        for line in block.text.splitlines()
        if re.match(r"^(\.venv/bin/)?ptd score |^python -m detector score ", line.strip())
    ]
    assert found, "README shows no `ptd score` command"
    invoices, clients, n_clients = _synthetic_export(tmp_path)
    manifest = json.loads((clone / "models_artifacts" / "manifest.json").read_text())
    for i, line in found:
        words = shlex.split(line)
        words = words[words.index("score") :]
        args: list[str] = ["score"]
        rest = iter(words[1:])
        out = tmp_path / "results.csv"
        for word in rest:
            if word == "--clients":
                next(rest)
                args += ["--clients", str(clients)]
            elif word == "--out":
                next(rest)
                args += ["--out", str(out)]
            elif word.startswith("-"):
                args.append(word)
            else:
                args.append(str(invoices))
        result = subprocess.run(
            [PYTHON, "-m", "detector", *args],
            cwd=clone,
            env=clean_env(clone),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        assert result.stderr.startswith(f"scored {n_clients} clients with ")
        results = pd.read_csv(out)
        assert {"client_id", "theft_probability", "flagged"} <= set(results.columns)
        assert len(results) == n_clients
        shown = blocks[i + 1] if i + 1 < len(blocks) else None
        if shown is not None and (
            m := re.search(r"scored \d+ clients with (\w+) (\S+):", shown.text)
        ):
            assert m[2] == manifest["model_version"], "README shows another model version"


@pytest.mark.slow
def test_readme_curl_examples_in_a_fresh_clone(clone_readme: str, clone_server: Server) -> None:
    needs("curl", "bash")
    blocks = fenced_blocks(clone_readme)
    ran = 0
    for i, block in enumerate(blocks):
        if block.lang != "bash" or not block.text.lstrip().startswith("curl"):
            continue
        result = run_bash(localise(block.text, clone_server.port), REPO, clean_env(REPO))
        assert result.returncode == 0, f"README block {i}: {result.stderr}"
        answer = json.loads(result.stdout)
        assert "error" not in answer or "results" in answer, f"README block {i}: {answer}"
        expected = expected_output(clone_readme, blocks, i)
        if expected is not None:
            check_output(expected, result.stdout, f"README block {i}")
        ran += 1
    assert ran >= 2, "README shows fewer than two curl examples"


# --- QUICKSTART and API.md, against the working tree ------------------------------------------


def test_quickstart_runs(repo_server: Server, tmp_path: Path) -> None:
    """Every ```bash block of the quickstart, in order, in an empty folder."""
    needs("bash", "curl")
    markdown = (DOCS / "QUICKSTART.md").read_text()
    blocks = fenced_blocks(markdown)
    env = clean_env(REPO)
    ran = 0
    for i, block in enumerate(blocks):
        if block.lang != "bash":
            continue
        result = run_bash(localise(block.text, repo_server.port), tmp_path, env)
        assert result.returncode == 0, (
            f"QUICKSTART block {i} failed:\n{block.text}\n{result.stderr}"
        )
        expected = expected_output(markdown, blocks, i)
        if expected is not None:
            check_output(expected, result.stdout, f"QUICKSTART block {i}")
        ran += 1
    assert ran >= 5


def test_api_examples_are_real(repo_server: Server, tmp_path: Path) -> None:
    needs("bash", "curl")
    markdown = (DOCS / "API.md").read_text()
    blocks = fenced_blocks(markdown)
    compared = 0
    for i, block in enumerate(blocks):
        if block.lang != "bash":
            continue
        result = run_bash(localise(block.text, repo_server.port), tmp_path, clean_env(REPO))
        assert result.returncode == 0, f"API.md block {i}: {result.stderr}"
        expected = expected_output(markdown, blocks, i)
        if expected is not None:
            check_output(expected, result.stdout, f"API.md block {i}")
            compared += 1
    assert compared >= 5


def test_documented_model_version_is_the_bundled_one() -> None:
    version = json.loads((REPO / "models_artifacts" / "manifest.json").read_text())["model_version"]
    for name in ("API.md", "QUICKSTART.md"):
        shown = set(re.findall(r"\b20\d{6}-[0-9a-f]{10}\b", (DOCS / name).read_text()))
        assert shown == {version}, f"{name} shows model versions {shown}, bundled is {version}"


# --- TROUBLESHOOTING messages are the code's ---------------------------------------------------


def _code_strings() -> list[str]:
    """Every string literal in the code, f-string fields replaced by NUL (never in a doc)."""
    texts = []
    for path in [*sorted((REPO / "detector").rglob("*.py")), REPO / "function_app.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                texts.append(node.value)
            elif isinstance(node, ast.JoinedStr):
                texts.append(
                    "".join(
                        part.value
                        if isinstance(part, ast.Constant) and isinstance(part.value, str)
                        else "\0"
                        for part in node.values
                    )
                )
    makefile = (REPO / "Makefile").read_text()
    # The Makefile's messages as a user sees them: variables at their defaults (`PYTHON ?= ...`).
    defaults = dict(re.findall(r"^(\w+)\s*\??:?=\s*(.*?)\s*$", makefile, re.M))
    texts.append(re.sub(r"\$\((\w+)\)", lambda m: defaults.get(m[1], m[0]), makefile))
    return texts


def troubleshooting_messages() -> list[str]:
    markdown = (DOCS / "TROUBLESHOOTING.md").read_text()
    messages = []
    for line in markdown.splitlines():
        if line.startswith("**Message:**"):
            span = re.search(r"(`+)\s?(.+?)\s?\1(?!`)", line)
            assert span, f"no quoted message in: {line}"
            messages.append(span[2])
    return messages


def test_troubleshooting_quotes_real_messages() -> None:
    messages = troubleshooting_messages()
    assert len(messages) >= 20
    corpus = _code_strings()
    for message in messages:
        fragments = [
            f.strip() for f in re.split(r"<[^<>]+>|\.\.\.", message) if len(f.strip()) >= 3
        ]
        assert fragments, f"nothing checkable in {message!r}"
        assert max(len(f) for f in fragments) >= 8, f"too vague to check: {message!r}"
        for fragment in fragments:
            assert any(fragment in text for text in corpus), (
                f"TROUBLESHOOTING.md quotes {message!r}, but {fragment!r} is not in the code"
            )


# --- links ---------------------------------------------------------------------------------------


def test_relative_links_resolve() -> None:
    pages = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]
    pages = [p for p in pages if p.is_file()]
    assert len(pages) >= 5
    problems = []
    for page in pages:
        markdown = page.read_text()
        text = FENCE.sub("", markdown)
        text = re.sub(r"`[^`\n]*`", "", text)
        for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                continue  # http:, https:, mailto:
            path_part, _, anchor = target.partition("#")
            destination = (page.parent / path_part).resolve() if path_part else page
            if not destination.exists():
                problems.append(f"{page.name}: {target} (no such file)")
            elif (
                anchor
                and destination.suffix == ".md"
                and anchor not in anchors(destination.read_text())
            ):
                problems.append(f"{page.name}: {target} (no such heading)")
    assert not problems, "\n".join(problems)


# --- RUNBOOKS: the erasure script, against Azurite -----------------------------------------------


def erase_script() -> str:
    markdown = (DOCS / "RUNBOOKS.md").read_text()
    scripts = [
        b.text for b in fenced_blocks(markdown) if b.lang == "python" and "erase_customer" in b.text
    ]
    assert len(scripts) == 1, "RUNBOOKS.md has no (or more than one) erase_customer.py block"
    return scripts[0]


@pytest.mark.azurite
@pytest.mark.xdist_group("azurite")
def test_runbook_erases_one_customer_from_batch_outputs(azurite: str, tmp_path: Path) -> None:
    from azure.storage.blob import BlobServiceClient

    from detector.batch import score_file
    from detector.model import ArtifactSet

    invoices, clients, _ = _synthetic_export(tmp_path)
    # A real batch output with a reject row: one invoice of the first client is made invalid.
    # The customer gets an id no other test uses (they share the emulator).
    frame = pd.read_parquet(invoices)
    first = str(frame["client_id"].iloc[0])
    victim = f"erase-me-{tmp_path.name}"
    frame["client_id"] = frame["client_id"].replace(first, victim)
    frame.loc[frame.index[0], "consommation_level_1"] = -1
    frame.to_parquet(invoices, index=False)
    attributes = pd.read_csv(clients)
    attributes["client_id"] = attributes["client_id"].replace(first, victim)
    attributes.to_csv(clients, index=False)
    out = tmp_path / "results.csv"
    result = score_file(invoices, ArtifactSet(REPO / "models_artifacts"), out, clients_path=clients)
    assert result.rejects_path is not None

    service = BlobServiceClient.from_connection_string(azurite)
    container = service.get_container_client("batch-out")
    if not container.exists():
        container.create_container()
    prefix = f"erase-test-{tmp_path.name}"
    originals = {
        f"{prefix}/2025-01/invoices.csv/results.csv": out.read_bytes(),
        f"{prefix}/2025-01/invoices.csv/rejects.csv": result.rejects_path.read_bytes(),
        f"{prefix}/2025-01/invoices.csv/summary.json": b'{"clients_scored": 60}',
    }
    for name, data in originals.items():
        container.upload_blob(name, data, overwrite=True)
    assert any(victim in data.decode() for data in originals.values())

    script = tmp_path / "erase_customer.py"
    script.write_text(erase_script())
    env = {**clean_env(REPO), "STORAGE": azurite}
    dry = subprocess.run(
        [PYTHON, str(script), victim, "--dry-run"], env=env, capture_output=True, text=True
    )
    assert dry.returncode == 0, dry.stderr
    assert "(dry run)" in dry.stdout
    for name, data in originals.items():
        assert container.download_blob(name).readall() == data, "dry run changed a blob"

    run = subprocess.run([PYTHON, str(script), victim], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "results.csv: 1 row(s)" in run.stdout and "rejects.csv: 1 row(s)" in run.stdout
    for name, data in originals.items():
        after = container.download_blob(name).readall()
        if name.endswith(".json"):
            assert after == data
            continue
        rows = list(csv.reader(io.StringIO(after.decode(), newline="")))
        column = rows[0].index("client_id")
        assert victim not in [row[column] for row in rows[1:]]
        # Every other line is exactly what the batch wrote.
        kept = [
            line
            for line in data.decode().splitlines(keepends=True)
            if next(csv.reader([line]))[column] != victim
        ]
        assert after.decode() == "".join(kept)
    again = subprocess.run([PYTHON, str(script), victim], env=env, capture_output=True, text=True)
    assert again.returncode == 0 and victim not in again.stdout


def test_model_card_pictures_are_the_bundled_models() -> None:
    """The card shows the four pictures `make train` draws (training/plots.py), each titled
    with the bundled model's version: a retrain that forgot to redraw them fails here."""
    from detector.training.plots import FILES

    version = json.loads((REPO / "models_artifacts" / "manifest.json").read_text())["model_version"]
    card = (DOCS / "MODEL_CARD.md").read_text()
    shown = re.findall(r"!\[[^\]]*\]\((model_card/[^)]+\.svg)\)", card)
    assert sorted(shown) == sorted(f"model_card/{name}" for name in FILES)
    for relative in shown:
        svg = (DOCS / relative).read_text()
        title = re.search(r"<title>([^<]*)</title>", svg)
        assert title and title[1].endswith(f"model {version}"), relative
        assert (DOCS / relative).stat().st_size < 64 * 1024, f"{relative} is too large"
