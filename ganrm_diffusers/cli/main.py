"""The `ganrm` command line: one sub-command per job, each registered by the module that owns the job."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from ganrm_diffusers.utils.errors import GanrmError
from ganrm_diffusers.utils.options import OptionParser

# Modules that add sub-commands. Each exposes `add_commands(subparsers)`; every sub-command stores its
# handler in `func` (a callable taking the parsed namespace and returning an exit code).
COMMAND_MODULES: tuple[str, ...] = (
    "ganrm_diffusers.cli.reward",
    "ganrm_diffusers.cli.sample",
    "ganrm_diffusers.cli.train",
    "ganrm_diffusers.cli.world",
    "ganrm_diffusers.cli.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = OptionParser(
        prog="ganrm",
        description="GAN-RM: reward models from a few hundred target images, and reward-guided generation.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OptionParser)
    subparsers.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    handler: Callable[[argparse.Namespace], int] = args.func
    try:
        return int(handler(args) or 0)
    except (GanrmError, FileNotFoundError, NotADirectoryError) as error:
        # User mistakes (bad folders, bad files, bad checkpoints) are named in one line.
        print(f"ganrm {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ganrm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
