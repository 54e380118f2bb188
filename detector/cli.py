"""The `ptd` command: serve, score, train, publish. Errors are one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from detector.config import BUNDLED_MODEL_DIR, MODEL_NAMES, ConfigError

if TYPE_CHECKING:
    from detector.store import ModelStore


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 2."""


def _serve(args: argparse.Namespace) -> int:
    from detector.serve import run

    if args.max_header_bytes < 1024:
        raise CommandError("--max-header-bytes must be at least 1024")
    run(args.host, args.port, args.max_header_bytes, args.forwarded_allow_ips)
    return 0


def _score(args: argparse.Namespace) -> int:
    """The same streaming path as the blob trigger: any file size in bounded memory. Writes
    RESULTS.csv, RESULTS.rejects.csv (when rows were rejected) and RESULTS.summary.json (the
    summary the blob trigger writes to summary.json, drift included)."""
    import json

    from detector.batch import check_output, score_file
    from detector.config import Settings
    from detector.model import ArtifactSet
    from detector.schema import InputError

    settings = Settings.from_env()
    out = Path(args.out)
    last = re.split(r"[/\\]", args.out)[-1]  # as typed: Path drops a trailing "/."
    if last in ("", ".", "..") or out.is_dir():
        raise InputError(
            f"--out {args.out!r}: not a file name (empty, or a folder); give the results file, "
            "such as results.csv"
        )
    summary_path = Path(args.out).with_name(Path(args.out).stem + ".summary.json")
    check_output(summary_path, *(Path(p) for p in (args.invoices, args.clients) if p))
    if args.model_dir:
        artifacts = ArtifactSet(Path(args.model_dir))
    else:
        from detector.store import load_artifacts

        # The model the API and the blob trigger would load with these settings: the active
        # version of the store with PTD_MODEL_SOURCE=blob, else PTD_MODEL_DIR (the bundled set).
        artifacts = load_artifacts(settings)
    result = score_file(
        Path(args.invoices),
        artifacts,
        Path(args.out),
        clients_path=Path(args.clients) if args.clients else None,
        model=args.model,
        max_invoices_per_client=settings.max_invoices_per_customer,
        max_decompressed_bytes=settings.max_decompressed_bytes,
    )
    summary = result.summary
    summary_path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    print(
        f"scored {summary['clients_scored']} clients with {summary['model']} "
        f"{summary['model_version']}: {summary['clients_flagged']} flagged "
        f"({summary['flagged_rate']:.1%}) in {summary['seconds']['total']:.1f} s; "
        f"results in {result.results_path}",
        file=sys.stderr,
    )
    if result.rejects_path is not None:
        reasons = ", ".join(f"{k}: {v}" for k, v in summary["rows_rejected_by_reason"].items())
        print(
            f"rejected {summary['rows_rejected']} rows ({reasons}); "
            f"{summary['clients_rejected']} clients not scored; each row with its reason "
            f"in {result.rejects_path}",
            file=sys.stderr,
        )
    if summary.get("csv_dialect", {}).get("mixed_encoding"):
        print(
            f"{Path(args.invoices).name} mixes UTF-8 and Windows-1252 lines: each line was read "
            "in the encoding it is valid in; re-export the file as UTF-8 to be sure of its text",
            file=sys.stderr,
        )
    drifted = summary.get("drift", {}).get("drifted") or []
    if drifted:
        print(
            f"drift: {len(drifted)} feature(s) far from the training data (PSI > "
            f"{summary['drift']['threshold']}): {', '.join(drifted)}; see {summary_path}",
            file=sys.stderr,
        )
    return 0


def _model_store(args: argparse.Namespace) -> ModelStore:
    from detector.config import Settings
    from detector.store import ModelStore

    return ModelStore.from_settings(Settings.from_env())


def _publish(args: argparse.Namespace) -> int:
    from detector.model import ModelError

    store = _model_store(args)
    try:
        before = store.current()
    except ModelError:  # no container yet: publish creates it
        before = None
    version = store.publish(
        Path(args.artifacts),
        version=args.version,
        activate=args.activate,
        activate_if_none=args.activate_if_none,
    )
    after = store.current()
    if after and after["version"] == version and (not before or before != after):
        state = "published and activated"
    elif after:
        state = f"published (not active; {after['version']} stays active)"
    else:
        state = "published (not active)"
    print(f"model version {version} {state} in {store.where}", file=sys.stderr)
    print(version)
    return 0


def _activate(args: argparse.Namespace) -> int:
    store = _model_store(args)
    pointer = store.activate(args.version)
    print(
        f"model version {pointer['version']} is now active (manifest SHA-256 "
        f"{pointer['manifest_sha256'][:12]}..., previous: {pointer['previous'] or 'none'}); "
        "running instances pick it up when they restart",
        file=sys.stderr,
    )
    print(pointer["version"])
    return 0


# What `ptd versions` says of a manifest (`ModelStore.describe`'s state): it compared the manifest
# alone with the hash recorded at publish (and the pointer's), never the files it lists.
MANIFEST_STATES = {
    "ok": "manifest as published",
    "changed": "manifest CHANGED since published or activated",
    "unknown": "manifest published before hashes were recorded",
}


def _versions(args: argparse.Namespace) -> int:
    """List the versions. Default: manifests only (one small read each); `--verify` checks every
    file of every version as activation does (exit 1 if one fails)."""
    import json

    from detector.model import ModelError
    from detector.store import storage_error

    store = _model_store(args)
    described = store.describe(verify=args.verify)
    exists = True
    if not described["versions"] and not described["invalid_names"]:
        try:
            exists = store.container.exists()
        except Exception as exc:
            raise storage_error(exc, "cannot list model versions", store.where) from None
        # A person reading the list: a mistyped PTD_MODEL_CONTAINER must not look like an empty
        # store. Scripts (--json) get `container_exists` instead: a first publish creates it.
        if not exists and not args.json:
            raise ModelError(
                f"container not found ({store.where}): check PTD_MODEL_CONTAINER "
                "(`ptd publish` creates it)"
            )
    entries = described["versions"]
    pointer = described["pointer"]
    current = pointer["version"] if pointer else None
    if args.json:
        print(
            json.dumps(
                {
                    "versions": [e["version"] for e in entries],
                    "current": current,
                    "pointer": pointer,
                    "details": entries,
                    "invalid_names": described["invalid_names"],
                    "container_exists": exists,
                }
            )
        )
        return 1 if any(e["verified"] is False for e in entries) else 0
    if not entries:
        print(f"no model version published in {store.where}", file=sys.stderr)
    for entry in entries:
        mark = "*" if entry["current"] else " "
        note = MANIFEST_STATES.get(entry["state"], MANIFEST_STATES["unknown"])
        if entry["verified"] is None:
            files = "files not checked (ptd versions --verify)"
        elif entry["verified"]:
            files = "every file verified"
        else:
            files = f"FAILS: {entry['verify_error']}"
        sha = entry["manifest_sha256"][:12]
        print(f"{mark} {entry['version']}  sha256 {sha}  {note}; {files}")
    if described["invalid_names"]:
        print(
            f"not versions (invalid names, never served): {len(described['invalid_names'])}",
            file=sys.stderr,
        )
    failed = [e["version"] for e in entries if e["verified"] is False]
    if failed:
        print(
            f"{len(failed)} version(s) fail verification, and `ptd activate` refuses them: "
            f"{', '.join(failed)}",
            file=sys.stderr,
        )
        return 1
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from detector.store import open_version

    store = _model_store(args)
    pointer = store.current()
    version = args.version or (pointer["version"] if pointer else "")
    if not version:
        raise CommandError(f"no model is active in {store.where}; name a version")
    pinned = pointer.get("manifest_sha256") if pointer and pointer["version"] == version else None
    directory = store.download(version, Path(args.out), pinned)
    open_version(directory, version)  # validated as a cold start would
    print(f"model version {version}: serving files verified in {directory}", file=sys.stderr)
    print(directory)
    return 0


def _train(args: argparse.Namespace) -> int:
    from detector.training import train
    from detector.training.outcomes import counts_line

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = train(
        Path(args.data),
        Path(args.out),
        cv_folds=args.folds,
        baseline=Path(args.baseline) if args.baseline else None,
        plots=Path(args.plots) if args.plots else None,
    )
    for name, entry in results["models"].items():
        holdout = entry["holdout"]
        views = ", ".join(f"{view} {m['roc_auc']:.4f}" for view, m in holdout.items())
        print(
            f"{name} ({entry['strategy']}): holdout ROC-AUC {views}; full histories: PR-AUC "
            f"{holdout['full']['pr_auc']:.4f}, top-1% precision "
            f"{holdout['full']['precision_top_1pct']:.3f}",
            file=sys.stderr,
        )
    outcomes = results["data"].get("outcomes")
    if outcomes:
        print(counts_line(outcomes), file=sys.stderr)
    print(
        f"model version {results['model_version']} written to {args.out} "
        f"in {results['total_seconds']:.0f} s",
        file=sys.stderr,
    )
    return 0


def _select_features(args: argparse.Namespace) -> int:
    import json

    from detector.training.selection import markdown, select_features

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report = select_features(Path(args.data), cv_folds=args.folds)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(markdown(report))
    print(
        f"ranked {report['usable_candidates']} candidates in {report['seconds']:.0f} s; the top "
        f"{report['chosen_size']}: {', '.join(report['chosen'])}; report in {args.out}",
        file=sys.stderr,
    )
    return 0


def _compare(args: argparse.Namespace) -> int:
    import json

    from detector.training.compare import compare

    result = compare(
        Path(args.challenger),
        Path(args.champion),
        Path(args.invoices),
        Path(args.clients),
        Path(args.outcomes) if args.outcomes else None,
        args.model,
    )
    print(result.table())
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return 0 if result.promote else 1


def _snapshot(args: argparse.Namespace) -> int:
    """Download a retrain's data; JSON summary on stdout, the outcome counts on stderr."""
    import json

    from detector.config import Settings
    from detector.training.outcomes import counts_line
    from detector.training.snapshot import take_snapshot

    taken = take_snapshot(Path(args.out), Settings.from_env())
    print(json.dumps(taken, indent=2))
    if taken["outcome_files"]:
        line = counts_line(taken, len(taken["outcome_files"]))
        if taken.get("outcome_rejects"):
            line += f"; each rejected row with its reason in {taken['outcome_rejects']}"
        print(line, file=sys.stderr)
    return 0


def _port(text: str) -> int:
    """A TCP port, 0 (any free port) to 65535 (RFC 793); uvicorn would wrap 99999 silently."""
    if not re.fullmatch(r"[0-9]{1,5}", text):  # int() would take "8_0", " 80", "+80", "٨٠"
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number")
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port (0 to 65535)")
    return port


def _positive(text: str) -> int:
    if not re.fullmatch(r"[0-9]{1,12}", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not positive")
    return value


def build_parser() -> argparse.ArgumentParser:
    from detector.serve import DEFAULT_MAX_HEADER_BYTES

    parser = argparse.ArgumentParser(prog="ptd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the HTTP API locally (uvicorn)")
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    serve.add_argument("--port", type=_port, default=7071, help="port (default 7071)")
    serve.add_argument(
        "--max-header-bytes",
        type=_positive,
        default=DEFAULT_MAX_HEADER_BYTES,
        help="largest request line + headers accepted, in bytes; larger ones get 431 "
        f"(default {DEFAULT_MAX_HEADER_BYTES})",
    )
    serve.add_argument(
        "--forwarded-allow-ips",
        default="",
        metavar="IPS",
        help="comma-separated addresses (or networks) of reverse proxies whose X-Forwarded-For "
        "names the caller; default none: the caller is the socket peer, even over loopback",
    )
    serve.set_defaults(handler=_serve)

    score = sub.add_parser("score", help="score a CSV/Parquet file of invoices (or features)")
    score.add_argument(
        "invoices",
        help="invoice rows in the STEG schema (or a features table): CSV in any common dialect "
        "or Parquet, gzip-compressed or not",
    )
    score.add_argument("--clients", help="client attributes, CSV or Parquet (optional)")
    score.add_argument("--out", required=True, help="results CSV to write")
    score.add_argument("--model", choices=MODEL_NAMES, default=None)
    score.add_argument(
        "--model-dir",
        default=None,
        metavar="DIR",
        help="a model folder to score with; default: the model the settings name, as the API "
        "and the blob trigger load it (PTD_MODEL_SOURCE, PTD_MODEL_DIR, PTD_MODEL_VERSION: the "
        "store's active version with PTD_MODEL_SOURCE=blob, else the bundled set)",
    )
    score.set_defaults(handler=_score)

    publish = sub.add_parser("publish", help="upload model artifacts to blob storage as a version")
    publish.add_argument("--artifacts", default=str(BUNDLED_MODEL_DIR), help="artifact folder")
    publish.add_argument(
        "--version",
        default=None,
        help="the version name; must be the manifest's model_version (the default): a set is "
        "published under its own version",
    )
    publish.add_argument("--activate", action="store_true", help="make it the served version")
    publish.add_argument(
        "--activate-if-none",
        action="store_true",
        help="make it the served version only when no version is active",
    )
    publish.set_defaults(handler=_publish)

    activate = sub.add_parser(
        "activate",
        help="serve a published version (rollback: the previous), once every file of it is "
        "verified as a cold start would",
    )
    activate.add_argument("version")
    activate.set_defaults(handler=_activate)

    versions = sub.add_parser(
        "versions",
        help="list published versions and whether each manifest is as published (the manifest "
        "alone; --verify checks every file); * marks the current",
    )
    versions.add_argument("--json", action="store_true", help="print JSON")
    versions.add_argument(
        "--verify",
        action="store_true",
        help="also download and check every file of every version as `ptd activate` does "
        "(exit status 1 when one fails)",
    )
    versions.set_defaults(handler=_versions)

    fetch = sub.add_parser(
        "fetch", help="download a published version's serving files and verify them"
    )
    fetch.add_argument("version", nargs="?", default="", help="the version (default: the active)")
    fetch.add_argument("--out", required=True, help="cache folder (the set lands in OUT/VERSION)")
    fetch.set_defaults(handler=_fetch)

    train = sub.add_parser("train", help="train the models on labelled STEG data")
    train.add_argument("--data", required=True, help="folder with clients_train and invoices_train")
    train.add_argument("--out", required=True, help="artifact folder to write")
    train.add_argument("--folds", type=int, default=5, help="cross-validation folds")
    train.add_argument(
        "--baseline", help="JSON figures of the model this one replaces (for the model card)"
    )
    train.add_argument("--plots", help="folder for the model card's pictures (SVG)")
    train.set_defaults(handler=_train)

    compare = sub.add_parser(
        "compare",
        help="champion/challenger on labelled data: exit 0 promote the challenger, 1 keep",
    )
    compare.add_argument("challenger", help="the new artifact set (folder)")
    compare.add_argument("champion", help="the served artifact set (folder; `ptd fetch`)")
    compare.add_argument("--invoices", required=True, help="invoices of the labelled clients")
    compare.add_argument("--clients", required=True, help="clients, with a `target` column")
    compare.add_argument("--outcomes", help="inspection outcomes (labels, histories cut there)")
    compare.add_argument("--model", choices=MODEL_NAMES, default=None)
    compare.add_argument("--json", help="also write the comparison as JSON")
    compare.set_defaults(handler=_compare)

    snapshot = sub.add_parser(
        "snapshot", help="download the training data of a retrain from the training container"
    )
    snapshot.add_argument("--out", required=True, help="folder to fill")
    snapshot.set_defaults(handler=_snapshot)

    select = sub.add_parser(
        "select-features", help="rank the candidate features on the training split"
    )
    select.add_argument(
        "--data", required=True, help="folder with clients_train and invoices_train"
    )
    select.add_argument("--out", required=True, help="JSON report to write")
    select.add_argument("--markdown", help="also write the report as Markdown")
    select.add_argument("--folds", type=int, default=5, help="cross-validation folds")
    select.set_defaults(handler=_select_features)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from detector.model import ModelError
    from detector.schema import InputError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except (InputError, ModelError, ConfigError, CommandError, KeyError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"ptd {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ptd {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        print(
            f"ptd {args.command}: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "),
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
