"""The `ptd` command: serve, score, train, publish. Errors are one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from detector.config import BUNDLED_MODEL_DIR, MODEL_NAMES, ConfigError


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 2."""


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    uvicorn.run("detector.api:create_app", factory=True, host=args.host, port=args.port,
                log_level="warning")
    return 0


def _score(args: argparse.Namespace) -> int:
    from detector.batch import score_frames
    from detector.model import ArtifactSet
    from detector.schema import CLIENT_COLUMNS, INVOICE_COLUMNS
    from detector.features import FEATURE_NAMES
    from detector.tables import read_table

    artifacts = ArtifactSet(Path(args.model_dir))
    wanted = tuple(dict.fromkeys((*INVOICE_COLUMNS, *CLIENT_COLUMNS, *FEATURE_NAMES)))
    table = read_table(Path(args.invoices), wanted)
    clients = read_table(Path(args.clients), CLIENT_COLUMNS) if args.clients else None
    result = score_frames(table, artifacts, clients=clients, model=args.model)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.results.to_csv(out, index=False)
    summary = result.summary
    print(
        f"scored {summary['clients_scored']} clients with {summary['model']} "
        f"{summary['model_version']}: {summary['clients_flagged']} flagged "
        f"({summary['flagged_rate']:.1%}); results in {out}",
        file=sys.stderr,
    )
    if len(result.rejects):
        rejects_path = out.with_name(out.stem + ".rejects.csv")
        result.rejects.to_csv(rejects_path, index=False)
        reasons = ", ".join(f"{k}: {v}" for k, v in summary["rows_rejected_by_reason"].items())
        print(
            f"rejected {summary['rows_rejected']} rows ({reasons}); "
            f"{summary['clients_rejected']} clients not scored; each row with its reason "
            f"in {rejects_path}",
            file=sys.stderr,
        )
    return 0


def _train(args: argparse.Namespace) -> int:
    from detector.training import train

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = train(Path(args.data), Path(args.out), cv_folds=args.folds)
    for name, entry in results["models"].items():
        holdout, cv = entry["holdout"], entry["cross_validation"]
        print(
            f"{name}: holdout ROC-AUC {holdout['roc_auc']:.4f}, PR-AUC {holdout['pr_auc']:.4f}, "
            f"top-1% precision {holdout['precision_top_1pct']:.3f}; "
            f"CV ROC-AUC {cv['roc_auc_mean']:.4f} ± {cv['roc_auc_std']:.4f}",
            file=sys.stderr,
        )
    print(f"model version {results['model_version']} written to {args.out} "
          f"in {results['total_seconds']:.0f} s", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ptd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the HTTP API locally (uvicorn)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=7071)
    serve.set_defaults(handler=_serve)

    score = sub.add_parser("score", help="score a CSV/Parquet file of invoices (or features)")
    score.add_argument("invoices", help="invoice rows in the STEG schema, .csv or .parquet")
    score.add_argument("--clients", help="client attributes, .csv or .parquet (optional)")
    score.add_argument("--out", required=True, help="results CSV to write")
    score.add_argument("--model", choices=MODEL_NAMES, default=None)
    score.add_argument("--model-dir", default=str(BUNDLED_MODEL_DIR), help=argparse.SUPPRESS)
    score.set_defaults(handler=_score)

    train = sub.add_parser("train", help="train the models on labelled STEG data")
    train.add_argument("--data", required=True, help="folder with clients_train and invoices_train")
    train.add_argument("--out", required=True, help="artifact folder to write")
    train.add_argument("--folds", type=int, default=5, help="cross-validation folds")
    train.set_defaults(handler=_train)
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
        print(f"ptd {args.command}: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "),
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

