"""The ``stackwise`` command (also ``python -m stackwise``).

    stackwise info [--json]                      versions, build record, ops and kernels, GPUs
    stackwise config show FILE [key=value ...]   the resolved configuration as YAML
    stackwise config validate FILE [key=value ...]

Errors print one line (``stackwise: error: ...``) and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys

from stackwise.exceptions import StackWiseError


def _config_command(args: argparse.Namespace) -> int:
    from stackwise.config.base import StackWiseConfig

    config = StackWiseConfig.from_yaml(args.file, overrides=args.overrides)
    config.validate()
    if args.action == "show":
        sys.stdout.write(config.to_yaml())
    else:
        print(f"{args.file}: valid")
    return 0


def _info_command(args: argparse.Namespace) -> int:
    from stackwise.info import main as info_main

    return info_main(["--json"] if args.json else [])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stackwise", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = sub.add_parser("info", help="versions, build record, ops and their kernels, GPUs")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=_info_command)
    cfg = sub.add_parser("config", help="show or validate a configuration file")
    cfg.add_argument("action", choices=["show", "validate"])
    cfg.add_argument("file", help="YAML configuration")
    cfg.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="dotted overrides, e.g. training.lr=3e-4",
    )
    cfg.set_defaults(func=_config_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except StackWiseError as exc:
        message = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"stackwise: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
