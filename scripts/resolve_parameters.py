"""Resolve infra/main.parameters.json for one deployment, the way `azd` does.

The parameters file is shared by both delivery paths. Its values may be `${NAME}` or
`${NAME=default}` placeholders: `azd provision` substitutes them from the azd environment
(`azd env set NAME value`), and the GitHub deploy workflow runs this script, which substitutes
them from the process environment (the GitHub environment's variables). An unset `NAME` without
a default becomes an empty string, as with azd. Values of `int` and `bool` parameters of
main.bicep are converted from the substituted text, since ARM refuses "true" for a bool.

Checks that fail here rather than 20 minutes later in ARM (exit status 2, a GitHub `::error::`):
  * alerts enabled without any receiver (ALERT_EMAIL or ALERT_WEBHOOK_URL);
  * an unresolved placeholder.

`--set name=value` adds or overrides one parameter (e.g. the deployer's object id, when the
AZURE_DEPLOYER_OBJECT_ID variable is set; otherwise main.bicep defaults to `deployer().objectId`).

Usage: python scripts/resolve_parameters.py infra/main.parameters.json --out FILE [--set k=v]...
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:=([^}]*))?\}")
PARAM = re.compile(r"^param\s+([A-Za-z_][A-Za-z0-9_]*)\s+(int|bool|string|object|array)\b", re.M)


class ParameterError(ValueError):
    pass


def bicep_param_types(main_bicep: Path) -> dict[str, str]:
    """`param name type` declarations of a Bicep file (the parameter file's target)."""
    return dict(PARAM.findall(main_bicep.read_text(encoding="utf-8")))


def substitute(text: str, environ: Mapping[str, str]) -> str:
    """`${NAME}` -> environ[NAME] or ""; `${NAME=default}` -> environ[NAME] or default."""

    def value(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        found = environ.get(name)
        if found is not None and found != "":
            return found
        return default if default is not None else ""

    return PLACEHOLDER.sub(value, text)


def convert(name: str, text: str, kind: str | None) -> Any:
    if kind == "bool":
        lowered = text.strip().lower()
        if lowered not in ("true", "false"):
            raise ParameterError(f"parameter {name}: {text!r} is not true or false")
        return lowered == "true"
    if kind == "int":
        try:
            return int(text.strip())
        except ValueError:
            raise ParameterError(f"parameter {name}: {text!r} is not an integer") from None
    return text


def resolve(
    doc: dict[str, Any], types: Mapping[str, str], environ: Mapping[str, str]
) -> dict[str, Any]:
    out = json.loads(json.dumps(doc))
    params = out["parameters"]
    for name, spec in params.items():
        value = spec.get("value")
        if isinstance(value, str) and PLACEHOLDER.search(value):
            text = substitute(value, environ)
            if PLACEHOLDER.search(text):
                raise ParameterError(f"parameter {name}: unresolved placeholder in {text!r}")
            spec["value"] = convert(name, text, types.get(name))
    return out


def check(params: Mapping[str, Any]) -> None:
    def value(name: str, default: Any) -> Any:
        return params.get(name, {}).get("value", default)

    if value("alertsEnabled", True) and not (
        value("alertEmail", "") or value("alertWebhookUrl", "")
    ):
        raise ParameterError(
            "alerts are enabled but have no receiver: set ALERT_EMAIL and/or ALERT_WEBHOOK_URL, "
            "or ALERTS_ENABLED=false to deploy without alerts"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parameters", type=Path)
    parser.add_argument("--main", type=Path, default=Path("infra/main.bicep"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args(argv)
    try:
        types = bicep_param_types(args.main)
        doc = resolve(json.loads(args.parameters.read_text(encoding="utf-8")), types, os.environ)
        for item in args.set:
            name, sep, text = item.partition("=")
            if not sep or name not in types:
                raise ParameterError(f"--set {item!r}: not NAME=VALUE of a main.bicep parameter")
            doc["parameters"][name] = {"value": convert(name, text, types[name])}
        check(doc["parameters"])
    except ParameterError as exc:
        print(f"::error::{exc}", file=sys.stderr)
        return 2
    args.out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    os.chmod(args.out, 0o600)  # may hold the alert webhook URL
    print(f"parameters written to {args.out}: {', '.join(sorted(doc['parameters']))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
