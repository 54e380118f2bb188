"""The benchmark suite: `python -m benchmarks` (or `make bench`) writes docs/BENCHMARKS.md.

    .venv/bin/python -m benchmarks [--quick] [--with-training] [--only SECTIONS] [--out FILE]
        [--artifacts DIR]

Every figure is a median (and p99) of repeated runs after warm-up, beside the two references
measured in the same run. In process, they are LightGBM's own predictions of the served
gradient-boosted model (its `lightgbm.txt`): the plain approach is the Python `Booster.predict`
a naive server would call, the limit the same C++ prediction alone on 1 thread (and
`pred_contrib`, TreeSHAP in C++, beside our rows with contributions). Over HTTP the limit is the
round trip of an empty endpoint. Benchmarks report; they assert nothing about time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks.common import DATA_DIR, PY, REPO, Row, feature_rows, machine, ms, yes_no

SECTIONS = ("inprocess", "http", "cold", "table", "training")

FULL: dict[str, Any] = {
    "single_runs": 3000,
    "single_seconds": 10.0,
    "batch_sizes": [1_000, 10_000],
    "batch_runs": 7,
    "batch_seconds": 20.0,
    "http_runs": 3000,
    "http_seconds": 10.0,
    "load_seconds": 10.0,
    "clients": [8, 32],
    "load_batch_sizes": [1_000, 10_000],
    "profile_batch_seconds": 8.0,
    "history_records": 1_000,
    "cold_runs": 5,
    "table_rows": 0,
    "table_runs": 2,
    "features_runs": 3,
}
QUICK: dict[str, Any] = {
    **FULL,
    "single_runs": 500,
    "single_seconds": 3.0,
    "batch_runs": 3,
    "batch_seconds": 5.0,
    "http_runs": 500,
    "http_seconds": 3.0,
    "load_seconds": 3.0,
    "clients": [8],
    "load_batch_sizes": [1_000],
    "profile_batch_seconds": 3.0,
    "history_records": 200,
    "cold_runs": 2,
    "table_rows": 400_000,
    "table_runs": 2,
    "features_runs": 2,
}
# For the smoke test: every code path, tiny sizes, seconds in all.
TINY: dict[str, Any] = {
    **QUICK,
    "single_runs": 20,
    "single_seconds": 1.0,
    "batch_sizes": [50, 200],
    "batch_runs": 2,
    "batch_seconds": 1.0,
    "http_runs": 20,
    "http_seconds": 1.0,
    "load_seconds": 1.5,
    "clients": [2],
    "load_batch_sizes": [50],
    "profile_batch_seconds": 1.0,
    "history_records": 20,
    "cold_runs": 1,
    "table_rows": 20_000,
    "table_runs": 1,
    "features_runs": 1,
}


def run_suite(
    cfg: dict[str, Any],
    sections: tuple[str, ...],
    data_dir: Path | None,
    artifacts_dir: Path,
    with_training: bool = False,
) -> tuple[list[Row], dict[str, Any]]:
    """Run the chosen sections; a section that fails becomes a row saying why."""
    from detector.model import ArtifactSet

    rows: list[Row] = []
    extra: dict[str, Any] = {"load_before": os.getloadavg(), "seconds": {}}
    artifacts = ArtifactSet(artifacts_dir)
    extra["model_version"] = artifacts.version
    n_rows = max(max(cfg["batch_sizes"]), 512)
    with tempfile.TemporaryDirectory(prefix="ptd-bench-") as tmp_name:
        tmp = Path(tmp_name)
        features, source = (None, "")
        if {"inprocess", "http"} & set(sections):
            features, source = feature_rows(n_rows, data_dir)
            extra["rows_source"] = source
        for section in sections:
            started = time.perf_counter()
            _say(f"-- {section}")
            try:
                if section == "inprocess":
                    from benchmarks import inprocess
                    from benchmarks.references import LightGBMReference, agreement

                    ref = LightGBMReference(artifacts_dir)
                    assert features is not None
                    check = agreement(artifacts, ref, features)
                    extra["agreement"] = check.to_dict()
                    single_rows, _ = inprocess.single(artifacts, ref, features, cfg)
                    batch_rows, _ = inprocess.batches(artifacts, ref, features, cfg)
                    rows += [*single_rows, *batch_rows, inprocess.agreement_row(check)]
                    extra["score_steps"] = inprocess.steps(
                        artifacts, features, cfg["single_runs"], ref
                    )
                elif section == "http":
                    from benchmarks import http

                    assert features is not None
                    http_rows, http_extra = http.run(features, cfg, tmp, data_dir, artifacts_dir)
                    rows += http_rows
                    extra["http"] = http_extra
                elif section == "cold":
                    rows += _cold(artifacts_dir, cfg, extra)
                elif section == "table":
                    from benchmarks import files

                    table_rows, table_extra = files.run(data_dir, cfg, tmp, artifacts_dir)
                    rows += table_rows
                    extra["table"] = table_extra
                elif section == "training":
                    from benchmarks import files

                    rows += files.training(data_dir, artifacts_dir, with_training, tmp)
            except Exception as exc:
                _say(traceback.format_exc())
                rows.append(Row(section, "section failed", f"{type(exc).__name__}: {exc}"[:300]))
            extra["seconds"][section] = time.perf_counter() - started
            _say(f"   {section}: {extra['seconds'][section]:.0f} s")
    extra["load_after"] = os.getloadavg()
    return rows, extra


def _cold(artifacts_dir: Path, cfg: dict[str, Any], extra: dict[str, Any]) -> list[Row]:
    from benchmarks import cold_start

    runs = max(2, cfg["cold_runs"]) if cfg is not TINY else 1
    rows = []
    results: dict[str, Any] = {"local": cold_start.measure_local(artifacts_dir, runs)}
    try:
        from tests.azurite import AzuriteUnavailable

        try:
            results["blob"] = cold_start.measure_blob(artifacts_dir, runs)
        except AzuriteUnavailable as exc:
            results["blob"] = str(exc)
    except ImportError as exc:
        results["blob"] = str(exc)
    extra["cold"] = results
    extra["imports"] = slowest_imports()
    for source, label in (("local", "local files"), ("blob", "Azurite (blob, empty cache)")):
        result = results[source]
        if isinstance(result, str):
            rows.append(Row("cold start", f"model from {label}", f"skipped: {result}", met="n/a"))
            continue
        lib = statistics.median(s["total"] for s in result["steps"])
        app = statistics.median(s["total"] for s in result["function_app"])
        parts = _median_parts(result["steps"])
        rows.append(
            Row(
                "cold start",
                f"process start → first prediction, model from {label}",
                f"{app:.2f} s importing function_app; {lib:.2f} s library only",
                limit=f"interpreter alone {parts['interpreter']:.2f} s",
                goal="≤ 1 s",
                met=yes_no(app <= 1),
                note=", ".join(f"{k} {v * 1000:.0f} ms" for k, v in parts.items() if k != "total")
                + f" (library path, median of {len(result['steps'])})",
            )
        )
    return rows


def slowest_imports(top: int = 10) -> list[tuple[str, float]]:
    """Top-level packages by cumulative import time when a worker imports function_app."""
    import subprocess

    out = subprocess.run(
        [PY, "-X", "importtime", "-c", "import function_app"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "PTD_MODEL_SOURCE": "local"},
        capture_output=True,
        text=True,
        check=False,
    )
    # Lines come children first; a parent's line follows its children, indented one step less.
    found: list[tuple[str, float]] = []
    pending: list[tuple[int, str, float]] = []
    for line in out.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, raw = line[12:].split("|")
        name = raw.strip()
        depth = (len(raw) - len(raw.lstrip()) - 1) // 2
        seconds = int(cumulative) / 1e6
        if depth == 0:
            found.append((name, seconds))
        if depth in (1, 2):
            pending.append((depth, name, seconds))
        if depth == 0 and name == "function_app":
            parent = ""
            for level, child, secs in reversed(pending):
                parent = child if level == 1 else parent
                label = child if level == 1 else f"{parent} > {child}"
                found.append((label, secs))
        if depth == 0:
            pending = []
    found = [(n, s) for n, s in found if n != "function_app" and s > 0.005]
    return sorted(found, key=lambda kv: -kv[1])[:top]


def _median_parts(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render(
    rows: list[Row], extra: dict[str, Any], info: dict[str, Any], command: str, total: float
) -> str:
    v = info["versions"]
    lines = [
        "# Benchmarks",
        "",
        f"Written by `{command}` on {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC "
        f"in {total / 60:.1f} min (commit {info['commit']}, model {extra.get('model_version')}).",
        "Rerun with `make bench` (full, 3 to 5 min on 2 cores) or "
        "`.venv/bin/python -m benchmarks --quick`; both benchmark the bundled set "
        "(`--artifacts DIR` for another).",
        "",
        "## Machine",
        "",
        f"- {info['cores']} cores, {info['ram_gb']} GB RAM, {info['cpu']}; {info['os']}",
        f"- load average (1, 5, 15 min) before: "
        f"{', '.join(f'{x:.2f}' for x in extra['load_before'])}; after: "
        f"{', '.join(f'{x:.2f}' for x in extra['load_after'])}. The machine is shared with "
        "other jobs: absolute times are noisy, the ratios to the references measured in the "
        "same run are the figures to compare.",
        "- " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- feature rows: {extra.get('rows_source', 'n/a')}",
        "",
        "## Results",
        "",
        "Latencies are p50 · p99 over repeated runs after warm-up. In process, ours is the "
        "default model, LightGBM gradient boosting, served by our numpy tree walker "
        "(`ArtifactSet.score`, 1 thread), and both references are LightGBM itself on the same "
        "model (the set's `lightgbm.txt`, loaded with `lightgbm.Booster(model_file=...)`). "
        "*Plain* is LightGBM's Python `Booster.predict` as a naive server would call it "
        "(default threads: every core). *Limit* is the same C++ prediction without the Python "
        "wrapper, 1 thread: `LGBM_BoosterPredictForMatSingleRowFast` for one row, "
        "`LGBM_BoosterPredictForMat` for a batch; beside our rows with contributions, both "
        "are `pred_contrib` (TreeSHAP in C++). Over HTTP, the limit for single requests is the "
        "round trip of a bare ASGI endpoint on the same uvicorn and client; for batches, the "
        "route's own work (parse, validate, score, reasons, JSON) called in process on one "
        "thread, so the ratio is what HTTP and concurrency cost.",
        "",
        "| Section | Benchmark | Ours | Plain (LightGBM Booster.predict) | Limit "
        "| Ratio | Goal | Met | Notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = (r.section, r.name, r.ours, r.plain, r.limit, r.ratio, r.goal, r.met, r.note)
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    lines += _agreement(extra.get("agreement"))
    lines += _cold_table(extra.get("cold"))
    lines += _where(extra)
    misses = [r for r in rows if r.met.startswith("**no")]
    lines += ["", "## What misses its goal", ""]
    if misses:
        lines += [f"- {r.section}: {r.name}: {r.ours} (goal {r.goal})" for r in misses]
    else:
        lines.append("- nothing measured in this run misses its goal.")
    skipped = [r for r in rows if r.met == "n/a" or r.name == "section failed"]
    lines += [f"- not measured: {r.section}: {r.name}: {r.ours}" for r in skipped]
    lines += [
        "",
        "## Method",
        "",
        "- In process: `ArtifactSet.score` of the default model on one row (cycling over 512 "
        "real clients so each call walks different paths), with and without the per-feature "
        "contributions that /predict turns into reasons. Ours and LightGBM get the same raw "
        "rows (NaN where missing, categorical codes as they are): LightGBM decides missing "
        "values and category sets itself, as our walker does. For one row, ours and LightGBM's "
        "C++ single-row predict and pred_contrib (1 thread) are timed in turns on the same row "
        "(rotating order), so their ratios compare samples taken under the same load; ours and "
        "LightGBM's C++ each alone in a tight loop are in the note. Batches are timed in turns "
        "the same way. `Booster.predict` uses every core, so it is timed in its own turns "
        "afterwards: its OpenMP threads spin on after each call and would take a core from the "
        "1-thread samples.",
        "- Agreement: on every benchmark row, our probability against LightGBM's, our path "
        "contributions (Saabas, float32 per node) plus the base value against LightGBM's raw "
        "margin, and our top reason against TreeSHAP's (`pred_contrib`), both chosen by the "
        "API's rules (detector/reasons.py).",
        "- HTTP: uvicorn (httptools and uvloop, one worker, access log off, the app's own JSON "
        "request log and audit line on) on 127.0.0.1 and a free port, started and stopped by "
        "the suite. Latency rows use a minimal blocking client (one keep-alive connection, "
        "TCP_NODELAY, pre-built requests, Content-Length framing) for the app and the bare "
        "endpoint alike, so the figure is the server's round trip; the httpx row shows what a "
        "typical Python client adds on its side. The sustained load uses the same framing on "
        "asyncio streams, sharing the 2 cores with the server, for a fixed time; every non-200 "
        "answer counts as an error.",
        "- Cold start: fresh `python -c` processes timed from spawn (interpreter start "
        "included), empty model cache for blob; see benchmarks/cold_start.py.",
        "- Whole table: `python -m detector score` (the `ptd score` path) and the features "
        "step in fresh processes; peak RSS from getrusage of a launcher with that one child.",
        "- Training is not re-run by default; `--with-training` times `ptd train --folds 2`.",
    ]
    return "\n".join(lines) + "\n"


def _agreement(check: dict[str, Any] | None) -> list[str]:
    """Ours against LightGBM on the benchmark rows: the figures the model card can quote."""
    if not check:
        return []
    return [
        "",
        f"### Agreement with LightGBM ({check['rows']:,} clients)",
        "",
        "| Check | Figure |",
        "|---|---|",
        f"| max \\|our probability - LightGBM `predict`\\| | {check['max_dp']:.1e} |",
        "| max \\|base + Σ our contributions - LightGBM raw margin\\| "
        f"| {check['max_margin_gap']:.1e} |",
        "| max \\|Σ TreeSHAP (with its expected value) - raw margin\\| "
        f"| {check['max_shap_gap']:.1e} |",
        "| base value: ours (the trees' root values) · TreeSHAP's expected value "
        f"| {check['base']:.4f} · {check['shap_expected_value']:.4f} |",
        f"| clients given at least one reason | {check['explained_rows']:,} |",
        "| our top reason = TreeSHAP's top reason (same API rules) "
        f"| {check['top_reason_same']:.1%} |",
        f"| our top reason among TreeSHAP's top 3 | {check['top_in_shap_top3']:.1%} |",
        "| largest contribution on the same feature (no rules, all clients) "
        f"| {check['top_feature_same']:.1%} |",
        "",
        "Ours are path contributions (Saabas): each split's change of the node value, "
        "charged to the feature split on, along the path a client takes; TreeSHAP averages "
        "over feature orders. Both sum to the same margin, from different base values.",
    ]


def _cold_table(cold: dict[str, Any] | None) -> list[str]:
    if not cold:
        return []
    lines = [
        "",
        "### Cold start, step by step (median seconds; library path)",
        "",
        "| Model from | total | interpreter | imports | pointer | download | verify | load "
        "| first prediction | via function_app: import | load_artifacts |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for source, result in cold.items():
        if isinstance(result, str):
            continue
        p = _median_parts(result["steps"])
        a = _median_parts(result["function_app"])
        cells = [
            source,
            *(
                f"{p[k]:.3f}" if k in p else "-"
                for k in (
                    "total",
                    "interpreter",
                    "imports",
                    "pointer",
                    "download",
                    "verify",
                    "load",
                    "first_prediction",
                )
            ),
            f"{a['import_function_app']:.3f}",
            f"{a['load_artifacts']:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _where(extra: dict[str, Any]) -> list[str]:
    http = extra.get("http")
    lines = ["", "## Where the time goes", ""]
    if extra.get("score_steps"):
        lines += [
            "### ArtifactSet.score, one row, in process (median of each step alone; the "
            "default model)",
            "",
            "| Step | p50 |",
            "|---|---|",
            *(f"| {name} | {ms(seconds)} |" for name, seconds in extra["score_steps"]),
            "",
        ]
    if extra.get("imports"):
        lines += [
            "### Cold start: the slowest imports of `function_app` (python -X importtime)",
            "",
            "| Package | cumulative |",
            "|---|---|",
            *(f"| {name} | {ms(seconds)} |" for name, seconds in extra["imports"]),
            "",
        ]
    if not http:
        return [*lines, "HTTP section not run: no profile."]
    cpu_predict = http.get("cpu_per_predict")
    cpu_batch = http.get("cpu_per_batch")
    size = http.get("profile_batch_size")
    for title, key, cpu, profile in (
        (
            "POST /api/predict (one customer, features) under load",
            "buckets_predict",
            cpu_predict,
            "profile_predict",
        ),
        (
            f"POST /api/predict_batch of {size:,} customers",
            "buckets_batch",
            cpu_batch,
            "profile_batch",
        ),
    ):
        buckets = http.get(key) or []
        summary = http.get(profile)
        if not buckets or not summary:
            lines += [f"### {title}", "", "no profile (py-spy missing or failed)", ""]
            continue
        lines += [
            f"### {title}",
            "",
            f"Server CPU per request: **{cpu * 1000:.2f} ms** (psutil, user+system, "
            f"all threads). py-spy sampled the server at 250 Hz ({summary['samples']:,} "
            "samples); each sample is charged to the innermost frame that names an owner "
            "(numpy/pandas calls count for their caller). py-spy counts a thread as busy "
            "while it is runnable, so on a loaded machine a share is of busy wall time, not "
            "strictly CPU: the socket send in particular includes waiting for a core (the bare "
            f"ASGI server's whole request costs {_cpu(http.get('cpu_per_bare'))} of CPU, "
            "send included).",
            "",
            "| Where | share of samples | ≈ CPU ms per request (share x CPU) |",
            "|---|---|---|",
        ]
        lines += [f"| {name} | {share:.0%} | {share * cpu * 1000:.2f} |" for name, share in buckets]
        lines += ["", "Our functions (detector/) with the most samples (inclusive):", ""]
        lines += [f"- {share:.0%} {_cell(name)}" for name, share in summary["inclusive"][:10]]
        lines += ["", "Self time:", ""]
        lines += [f"- {share:.0%} {_cell(name)}" for name, share in summary["self"][:8]]
        lines.append("")
    return lines


def _cpu(seconds: float | None) -> str:
    return ms(seconds) if seconds is not None else "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short run (~2-3 min)")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--with-training", action="store_true", help="also time ptd train")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    parser.add_argument("--data", default=str(DATA_DIR), help="shared STEG data folder")
    parser.add_argument("--artifacts", default=str(REPO / "models_artifacts"))
    parser.add_argument("--out", default=str(REPO / "docs" / "BENCHMARKS.md"))
    args = parser.parse_args(argv)
    sections = tuple(s.strip() for s in args.only.split(",") if s.strip())
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    cfg = TINY if args.tiny else QUICK if args.quick else FULL
    data_dir = Path(args.data)
    if not (data_dir / "invoices_train.parquet").is_file():
        _say(f"shared data not found at {data_dir}: the whole-table rows will be skipped")
    started = time.perf_counter()
    info = machine()
    rows, extra = run_suite(cfg, sections, data_dir, Path(args.artifacts), args.with_training)
    command = "python -m benchmarks" + (" --quick" if args.quick else "")
    command += " --tiny" if args.tiny else ""
    command += " --with-training" if args.with_training else ""
    text = render(rows, extra, info, command, time.perf_counter() - started)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    _say(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
