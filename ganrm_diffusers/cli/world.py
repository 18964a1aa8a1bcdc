"""`ganrm world build` and `ganrm world path`: build the embedded digits world, or say where it lives."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    world = subparsers.add_parser(
        "world",
        help="the embedded digits world (a tiny text-to-image model, CLIP, target set and judges)",
        description="Build or locate the embedded digits world that `make demo` and the tests run on.",
    )
    commands = world.add_subparsers(dest="world_command", metavar="WORLD_COMMAND")
    commands.required = True

    build = commands.add_parser(
        "build",
        help="build the world from a seed (about 20 CPU minutes; seconds with --reduced)",
        description="Train the world's generators, CLIP and judges from scikit-learn's digits, deterministically from "
        "the seed, and write them into a folder (replacing a world already there). A world of a previous format "
        "built with the same seed and preset is upgraded in place instead: only what the new format changed (the "
        "judges, and a missing or outdated flow-matching generator) is fitted again, which gives the same world as a "
        "full build.",
    )
    build.add_argument(
        "--out", type=Path, default=None, help="world folder (default: the one `ganrm world path` prints)"
    )
    build.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    build.add_argument("--reduced", action="store_true", help="a reduced world in seconds (fewer steps; for tests)")
    build.add_argument(
        "--rebuild", action="store_true", help="build everything, even where a previous-format world could be upgraded"
    )
    build.set_defaults(func=build_command)

    path = commands.add_parser(
        "path", help="print the default world folder", description="Print the default world folder ($GANRM_HOME/world)."
    )
    path.set_defaults(func=path_command)


def build_command(args: argparse.Namespace) -> int:
    from ganrm_diffusers.world.build import build_world, load_world

    root = build_world(args.out, seed=args.seed, preset="reduced" if args.reduced else "full", rebuild=args.rebuild)
    world = load_world(root)
    print(
        json.dumps(
            {"world": str(root), "build_seconds": world.info["build_seconds"], **world.info["figures"]}, indent=2
        )
    )
    return 0


def path_command(args: argparse.Namespace) -> int:
    from ganrm_diffusers.world.build import default_world_dir

    print(default_world_dir())
    return 0
