"""`ganrm demo`: the main job on the embedded world (ganrm_diffusers.demo)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ganrm_diffusers.demo.report import goals_table, methods_table
from ganrm_diffusers.demo.run import DEFAULT_METHODS, METHOD_GROUPS, DemoSettings, run_demo


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the main job on the embedded digits world and write a report",
        description="Build or load the embedded world, train a GAN-RM on its target style, and measure best-of-N, "
        "pruning, SFT, DPO and PRDP with it. Writes report.json, report.md and PNGs into --out.",
    )
    parser.add_argument("--out", type=Path, default=Path("demo-out"), help="output folder")
    parser.add_argument("--world", type=Path, help="world folder (default: `ganrm world path`; built if missing)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated method groups to run after the reward model, of {', '.join(METHOD_GROUPS)} "
        "(fk: the eta = 1 sampler with FK resampling, about 14 more CPU minutes)",
    )
    parser.add_argument("--quick", action="store_true", help="a few samples everywhere: a smoke run, not figures")
    parser.add_argument(
        "--tune",
        action="store_true",
        help="first choose each fine-tuning method's settings on the tuning seeds (trains every candidate of "
        "FINETUNE_CANDIDATES: about 20 more CPU minutes), then evaluate the chosen ones",
    )
    parser.set_defaults(func=demo_command)


def demo_command(args: argparse.Namespace) -> int:
    methods = tuple(method for method in args.methods.split(",") if method)
    unknown = set(methods) - set(METHOD_GROUPS)
    if unknown:
        raise SystemExit(f"ganrm demo: unknown method group(s) {sorted(unknown)}; choose from {METHOD_GROUPS}")
    if "flow_finetune" in methods and "flow" not in methods:
        raise SystemExit(
            "ganrm demo: flow_finetune fine-tunes the flow generator with the flow group's reward model: add flow"
        )
    if "flow_adversarial" in methods and "flow_finetune" not in methods:
        raise SystemExit(
            "ganrm demo: flow_adversarial runs beside the fixed-reward rows at their chosen budgets: add flow_finetune"
        )
    report = run_demo(
        DemoSettings(out=args.out, world=args.world, seed=args.seed, methods=methods, quick=args.quick, tune=args.tune)
    )
    rm = report["reward_model"]
    print(
        f"reward model: AUC {rm['auc']:.3f}, AUC among real {rm['auc_style_among_real']:.3f}, "
        f"Spearman {rm['spearman_reward_vs_style']:.3f}"
    )
    print(methods_table(report["methods"]))
    print(goals_table(report["goals"]))
    print(f"report: {args.out / 'report.md'}")
    return 0
