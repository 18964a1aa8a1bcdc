"""The `ganrm` command line: one module per command group, registered in `main.COMMAND_MODULES`."""

from ganrm_diffusers.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
