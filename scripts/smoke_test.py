"""Post-deploy smoke test: the HTTP API and the blob trigger, checked against known scores.

Run by the deploy workflow (and azd's postdeploy hook) after the code, the model and the Event
Grid subscription are in place:

1. The golden records (`scripts/smoke/golden_invoices.csv`, raw invoices in the STEG schema)
   are scored here with the model bundled in the checkout (`ptd score`): the expected
   probability, flag and model version of each client. Nothing is hard-coded, so a retrained
   model needs no change here; the served model must be the bundled one (`--model-version`
   names another when the model in the container was published separately).
2. `GET /api/health` (retried through the cold start) must name that model version.
3. `POST /api/predict` of one golden client's invoices must give its expected probability.
4. The golden file is uploaded to `batch-in/smoke/<run>/golden_invoices.csv`; the Event Grid
   subscription must deliver it to `score_batch_blob` (which proves the subscription, the
   webhook key and the trigger's roles), whose results in
   `batch-out/smoke/<run>/golden_invoices.csv/` (the input's blob name is the folder:
   `detector.blob_batch.output_prefix`) must hold every golden client with its expected
   probability. Inputs and outputs are deleted afterwards.

Probabilities match to 1e-6 (batch results are rounded to 6 decimals). Storage is reached with
the same connection settings as `ptd` (STORAGE__blobServiceUri and az login, or STORAGE).

Usage: python scripts/smoke_test.py --app-url URL --run-id ID   (key in SMOKE_FUNCTION_KEY; with
built-in authentication on, an Entra ID access token for the API in SMOKE_BEARER_TOKEN)
Exit status 0 when every check passes, 1 otherwise (each failure is a GitHub ::error:: line).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "scripts" / "smoke" / "golden_invoices.csv"
TOLERANCE = 1e-6
# Invoice columns sent as text; every other column of the golden file is a number.
TEXT_COLUMNS = {"client_id", "invoice_date", "counter_statue", "counter_type"}


class SmokeFailure(Exception):
    pass


@dataclass(frozen=True)
class Expected:
    probability: float
    flagged: bool
    model_version: str


def expected_scores(
    golden: Path, workdir: Path, model_dir: Path | None = None
) -> dict[str, Expected]:
    """Score the golden file locally with `ptd score` (the bundled model unless model_dir)."""
    out = workdir / "expected.csv"
    command = [sys.executable, "-m", "detector", "score", str(golden), "--out", str(out)]
    if model_dir is not None:
        command += ["--model-dir", str(model_dir)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)  # noqa: S603
    if done.returncode != 0:
        raise SmokeFailure(f"ptd score of the golden file failed: {done.stderr.strip()}")
    return parse_results(out.read_text(encoding="utf-8"))


def parse_results(text: str) -> dict[str, Expected]:
    rows = csv.DictReader(io.StringIO(text))
    return {
        row["client_id"]: Expected(
            probability=float(row["theft_probability"]),
            flagged=row["flagged"].strip().lower() == "true",
            model_version=row["model_version"],
        )
        for row in rows
    }


def _number(text: str) -> int | float:
    value = float(text)
    return int(value) if value.is_integer() else value


def predict_body(golden: Path, client_id: str) -> dict[str, Any]:
    """The POST /api/predict body of one golden client: its invoice rows, typed as JSON."""
    invoices = []
    with golden.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["client_id"] != client_id:
                continue
            invoices.append(
                {k: (v if k in TEXT_COLUMNS else _number(v)) for k, v in row.items() if v != ""}
            )
    if not invoices:
        raise SmokeFailure(f"no invoice of {client_id} in {golden}")
    return {"customer_id": client_id, "invoices": invoices}


def compare(client_id: str, got_probability: float, got_flagged: bool, want: Expected) -> None:
    if abs(got_probability - want.probability) > TOLERANCE or got_flagged != want.flagged:
        raise SmokeFailure(
            f"{client_id}: scored {got_probability} (flagged {got_flagged}), "
            f"expected {want.probability} (flagged {want.flagged}) with model {want.model_version}"
        )


def _request(
    url: str, key: str, body: dict[str, Any] | None = None, timeout: float = 60
) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode("utf-8")
    request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")  # noqa: S310
    request.add_header("x-functions-key", key)
    token = os.environ.get("SMOKE_BEARER_TOKEN", "")
    if token:  # built-in authentication on: an Entra ID token for the API (client credentials)
        request.add_header("authorization", f"Bearer {token}")
    if body is not None:
        request.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        return 0, str(exc).encode("utf-8")


def check_http(
    app_url: str,
    key: str,
    golden: Path,
    expected: dict[str, Expected],
    *,
    attempts: int = 20,
    wait: float = 15,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Health through the cold start, then one golden prediction; returns the served version."""
    base = app_url.rstrip("/")
    want_version = next(iter(expected.values())).model_version
    status, body = 0, b""
    for attempt in range(1, attempts + 1):
        status, body = _request(f"{base}/api/health", key)
        if status == 200:
            break
        print(f"GET /api/health answered {status} (attempt {attempt}); waiting for the app")
        sleep(wait)
    if status != 200:
        raise SmokeFailure(f"/api/health never answered 200 (last {status}: {body[:300]!r})")
    health = json.loads(body)
    print(f"health: {json.dumps(health)}")
    if health.get("model_version") != want_version:
        raise SmokeFailure(
            f"the app serves model {health.get('model_version')}, the golden scores were "
            f"computed with {want_version}"
        )
    client_id = sorted(expected)[0]
    status, body = _request(f"{base}/api/predict", key, predict_body(golden, client_id))
    if status != 200:
        raise SmokeFailure(f"POST /api/predict answered {status}: {body[:300]!r}")
    answer = json.loads(body)
    if answer.get("model_version") != want_version or answer.get("customer_id") != client_id:
        raise SmokeFailure(f"unexpected /api/predict answer: {answer}")
    compare(
        client_id, float(answer["theft_probability"]), bool(answer["flagged"]), expected[client_id]
    )
    print(f"POST /api/predict {client_id}: {answer['theft_probability']} as expected")
    return str(want_version)


def check_batch(
    service: Any,
    batch_in: str,
    batch_out: str,
    golden: Path,
    expected: dict[str, Expected],
    run_id: str,
    *,
    timeout: float = 900,
    poll: float = 10,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Upload the golden file to batch-in and wait for score_batch_blob's outputs in batch-out."""
    from detector.blob_batch import output_prefix

    input_name = f"smoke/{run_id}/{golden.name}"
    prefix = f"{output_prefix(input_name)}/"
    source = service.get_container_client(batch_in)
    target = service.get_container_client(batch_out)
    source.upload_blob(input_name, golden.read_bytes(), overwrite=True)
    print(f"uploaded {batch_in}/{input_name}; waiting for {batch_out}/{prefix}summary.json")
    try:
        deadline = clock() + timeout
        while True:
            names = {blob.name for blob in target.list_blobs(name_starts_with=prefix)}
            if f"{prefix}error.json" in names:
                error = target.download_blob(f"{prefix}error.json").readall().decode("utf-8")
                raise SmokeFailure(f"the blob trigger could not use the golden file: {error}")
            if f"{prefix}summary.json" in names:
                break
            if clock() >= deadline:
                raise SmokeFailure(
                    f"no {batch_out}/{prefix}summary.json after {timeout:.0f} s: the upload was "
                    "not delivered to score_batch_blob (Event Grid subscription, webhook key, "
                    "trigger roles) or the run failed (batch_failed events, poison queue, "
                    "dead-letter container)"
                )
            sleep(poll)
        results = parse_results(
            target.download_blob(f"{prefix}results.csv").readall().decode("utf-8")
        )
        missing = sorted(set(expected) - set(results))
        if missing:
            raise SmokeFailure(f"batch results lack golden clients {missing}")
        for client_id, want in expected.items():
            got = results[client_id]
            if got.model_version != want.model_version:
                raise SmokeFailure(f"{client_id}: batch used model {got.model_version}")
            compare(client_id, got.probability, got.flagged, want)
        print(f"batch: {len(expected)} golden clients scored as expected by score_batch_blob")
    finally:
        for container, name in [(source, input_name)] + [
            (target, blob.name) for blob in target.list_blobs(name_starts_with=prefix)
        ]:
            try:
                container.delete_blob(name)
            except Exception as exc:  # cleanup only: the lifecycle rule removes leftovers
                print(f"could not delete {name}: {type(exc).__name__}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--app-url", required=True)
    parser.add_argument("--run-id", required=True, help="folder of this run under batch-in/smoke/")
    parser.add_argument("--golden", type=Path, default=GOLDEN)
    parser.add_argument("--model-dir", type=Path, help="score the golden file with this model set")
    parser.add_argument("--batch-in", default=os.environ.get("PTD_BATCH_IN_CONTAINER", "batch-in"))
    parser.add_argument(
        "--batch-out", default=os.environ.get("PTD_BATCH_OUT_CONTAINER", "batch-out")
    )
    parser.add_argument("--batch-timeout", type=float, default=900)
    parser.add_argument("--skip-batch", action="store_true", help="HTTP checks only")
    args = parser.parse_args(argv)
    key = os.environ.get("SMOKE_FUNCTION_KEY", "")
    try:
        if not key:
            raise SmokeFailure("set SMOKE_FUNCTION_KEY (the app's default function key)")
        with tempfile.TemporaryDirectory() as workdir:
            expected = expected_scores(args.golden, Path(workdir), args.model_dir)
        version = check_http(args.app_url, key, args.golden, expected)
        if not args.skip_batch:
            from detector.config import Settings
            from detector.store import blob_service_client

            service = blob_service_client(Settings.from_env())
            check_batch(
                service,
                args.batch_in,
                args.batch_out,
                args.golden,
                expected,
                args.run_id,
                timeout=args.batch_timeout,
            )
    except SmokeFailure as exc:
        print(f"::error::smoke test failed: {exc}")
        return 1
    print(f"smoke test passed: model {version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
