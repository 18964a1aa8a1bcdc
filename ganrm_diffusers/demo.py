"""`ganrm demo`: the main job, end to end, on the embedded digits world.

1. Build (or load) the world: a tiny SD-shaped model, a tiny CLIP, a target style, independent judges.
2. Sample base images for all ten prompts: reward-model negatives, a bootstrapping pool, and an evaluation set.
3. Train a GAN-RM (target set vs base samples, one rank-based bootstrapping round); keep it in demo-out/reward_model.
4. Measure it on images it never saw: AUC target vs base, AUC target vs other real digits (does it see the style
   itself, not only "real vs generated"?), and the Spearman correlation of reward and the style's pixel measure.
5. Compare the ways to use the reward (best-of-N, early pruning, FK resampling, SFT, DPO, PRDP) on the same prompts
   and seeds, judged by the world's judges.
6. Write report.json, report.md and PNGs (grids sorted by reward, training curves).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from tqdm.auto import tqdm

from ganrm_diffusers.plots import score_grid
from ganrm_diffusers.reward_model import GANRewardModel
from ganrm_diffusers.rm_training import RewardTrainingConfig, fit_reward_model, roc_auc, save_training_outputs

METHOD_GROUPS = ("selection", "sft", "dpo", "prdp")
# `--quick`: every trainer runs a few steps, enough to prove the path works end to end, not to move the figures.
QUICK_FINETUNE = {
    "sft": {"max_train_steps": 4, "eval_every": 2},
    "dpo": {"max_train_steps": 4, "eval_every": 2},
    "prdp": {"epochs": 2, "inner_steps": 1, "prompts_per_epoch": 2, "samples_per_prompt": 4, "eval_every": 1},
}


@dataclass
class DemoSettings:
    """What the demo runs. Seeds of the three base sample sets never overlap, nor those of the selection study."""

    out: Path = Path("demo-out")
    world: Path | None = None
    seed: int = 0
    eval_per_digit: int = 50  # 500 evaluation samples: the `base` row and the held-out side of the AUC
    negatives_per_digit: int = 40  # 400 reward-model negatives
    pool_per_digit: int = 30  # 300 fresh samples ranked in the bootstrapping round
    bootstrap_m: int = 32
    bootstrap_alpha: float = 0.1
    batch_size: int = 100
    methods: tuple[str, ...] = METHOD_GROUPS
    quick: bool = False  # fewer samples everywhere: a smoke run, not figures

    def __post_init__(self) -> None:
        if self.quick:
            self.eval_per_digit, self.negatives_per_digit, self.pool_per_digit, self.bootstrap_m = 6, 8, 4, 8


@dataclass
class SampleSet:
    images: torch.Tensor  # NCHW in [0, 1], CPU
    digits: np.ndarray
    unet_evaluations: int
    seconds: float
    seeds: list[int] = field(default_factory=list)


def sample_digits(
    pipe: object, world: object, per_digit: int, first_seed: int, batch_size: int, desc: str
) -> SampleSet:
    """`per_digit` samples of each of the ten prompts at the world's recommended settings, one seed each."""
    from ganrm_diffusers.pruning import count_unet_rows

    digits = np.repeat(np.arange(10), per_digit)
    seeds = [first_seed + index for index in range(len(digits))]
    images = []
    started = time.perf_counter()
    with count_unet_rows(pipe.unet) as rows:
        for start in tqdm(range(0, len(digits), batch_size), desc=desc, leave=False):
            batch = slice(start, start + batch_size)
            output = pipe(
                prompt=[world.prompts[digit] for digit in digits[batch]],
                generator=[torch.Generator().manual_seed(seed) for seed in seeds[batch]],
                output_type="pt",
                **world.sampling_kwargs,
            )
            images.append(output.images.float().cpu())
    return SampleSet(torch.cat(images), digits, sum(rows), time.perf_counter() - started, seeds)


def _judge(world: object, reward_model: GANRewardModel, samples: SampleSet) -> dict:
    return {
        "style_rate": world.judges.style_rate(samples.images),
        "class_accuracy": world.judges.class_accuracy(samples.images, samples.digits),
        "mean_reward": float(reward_model.score(samples.images).mean()),
        "unet_evaluations": samples.unet_evaluations,
        "seconds": samples.seconds,
        "selections": len(samples.images),
    }


def heldout_grid(world: object, reward_model: GANRewardModel, base: SampleSet, path: Path, count: int = 48) -> Path:
    """Held-out images (base samples and real target digits) sorted by reward; captions mark target digits and
    base samples that have the style."""
    targets, _ = world.heldout_target_images()
    picks = torch.cat([base.images[: count - count // 4], targets[: count // 4]])
    kinds = ["gen"] * (count - count // 4) + ["target"] * (count // 4)
    scores = reward_model.score(picks)
    styled = world.judges.has_style(picks).tolist()
    captions = [
        f"{score:+.2f} {kind}{'*' if has and kind == 'gen' else ''}"
        for score, kind, has in zip(scores.tolist(), kinds, styled, strict=True)
    ]
    order = scores.argsort(descending=True).tolist()
    grid = score_grid(picks[order], captions=[captions[index] for index in order], columns=8, cell=96)
    grid.save(path)
    return path


def reward_model_figures(world: object, reward_model: GANRewardModel, base: SampleSet) -> dict:
    """AUCs on images no training saw, and how the reward follows the style's pixel measure among base samples."""
    targets, _ = world.heldout_target_images()
    others, _ = world.heldout_other_images()
    target_scores = reward_model.score(targets).cpu().numpy()
    base_scores = reward_model.score(base.images).cpu().numpy()
    other_scores = reward_model.score(others).cpu().numpy()

    def auc(positives: np.ndarray, negatives: np.ndarray) -> float:
        labels = np.concatenate([np.ones(len(positives)), np.zeros(len(negatives))])
        return roc_auc(np.concatenate([positives, negatives]), labels)

    correlation = spearmanr(base_scores, world.judges.style_measure(base.images).numpy()).statistic
    return {
        "auc": auc(target_scores, base_scores),
        "auc_style_among_real": auc(target_scores, other_scores),
        "spearman_reward_vs_style": float(correlation),
        "heldout_sizes": {"target": len(targets), "base": len(base.images), "real_other": len(others)},
    }


def train_demo_reward_model(world: object, negatives: SampleSet, pool: SampleSet, settings: DemoSettings):
    config = RewardTrainingConfig(
        seed=settings.seed,
        bootstrap_rounds=1,
        bootstrap_m=settings.bootstrap_m,
        bootstrap_alpha=settings.bootstrap_alpha,
        min_images_per_class=8,
    )
    return fit_reward_model(
        world.target_dir,
        negatives.images,
        backbone=world.backbone,
        pretrained=None,
        config=config,
        pools=[pool.images],
        description="thin-stroke handwritten digits (the embedded world's target set)",
    )


def _world(settings: DemoSettings) -> object:
    """The world at `settings.world` (default: `ganrm world path`) as it is, whatever preset built it; built from
    `settings.seed` only where there is none (or one of an older format)."""
    from ganrm_diffusers.world import WorldError, ensure_world, load_world

    try:
        return load_world(settings.world)
    except WorldError:
        return ensure_world(settings.world, seed=settings.seed)


def run_demo(settings: DemoSettings) -> dict:
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    world = _world(settings)
    pipe = world.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(settings.seed)

    negatives = sample_digits(pipe, world, settings.negatives_per_digit, 10_000_000, settings.batch_size, "negatives")
    pool = sample_digits(pipe, world, settings.pool_per_digit, 20_000_000, settings.batch_size, "bootstrap pool")
    base = sample_digits(pipe, world, settings.eval_per_digit, 30_000_000, settings.batch_size, "evaluation set")

    started = time.perf_counter()
    reward_model, fit = train_demo_reward_model(world, negatives, pool, settings)
    train_seconds = time.perf_counter() - started
    save_training_outputs(reward_model, fit, out / "reward_model")
    heldout_grid(world, reward_model, base, out / "heldout_by_reward.png")

    info = world.info
    report: dict = {
        "world": {
            "path": str(world.root),
            "build_seconds": info.get("build_seconds"),
            **{key: info["figures"][key] for key in ("base", "target", "real_other")},
            "sampling": world.sampling_kwargs,
        },
        "reward_model": {
            **reward_model_figures(world, reward_model, base),
            "train_seconds": train_seconds,
            "validation": {key: value for key, value in fit.metrics.items() if key.startswith("val_")},
            "rounds": fit.rounds,
            "path": str(out / "reward_model"),
        },
        "methods": {"base": _judge(world, reward_model, base)},
        "settings": {key: str(value) if isinstance(value, Path) else value for key, value in asdict(settings).items()},
    }
    _write_report(report, out)  # the first results are worth keeping even if a later step fails

    if "selection" in settings.methods:
        from ganrm_diffusers.selection_study import selection_rows

        report["methods"].update(
            selection_rows(
                world.pipeline_dir,
                reward_model,
                world.judges,
                prompts_per_digit=settings.eval_per_digit,
                seed=settings.seed,
                # --quick: best-of-8 and the default pruning only (the other rows run the same code).
                extra_prune_settings={} if settings.quick else None,
                stochastic=not settings.quick,
                **world.sampling_kwargs,
            )
        )
        _write_report(report, out)
    finetune_methods = [method for method in ("sft", "dpo", "prdp") if method in settings.methods]
    if finetune_methods:
        from ganrm_diffusers.finetune_study import training_rows

        report["methods"].update(
            training_rows(
                world,
                reward_model,
                out,
                methods=finetune_methods,
                eval_per_digit=settings.eval_per_digit,
                prompt_repeats=2 if settings.quick else 20,
                overrides=QUICK_FINETUNE if settings.quick else None,
            )
        )
    _write_report(report, out)
    return report


# --------------------------------------------------------------------------------------------------------------
# Report


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return "" if value is None else str(value)


def methods_table(methods: dict[str, dict]) -> str:
    columns = ["style_rate", "class_accuracy", "mean_reward", "reward_gain", "unet_evaluations", "seconds"]
    optional = ("unet_cost", "reward_gain_kept", "style_gain_kept", "train_seconds", "peak_rss_mib", "peak_cuda_mib")
    columns += [key for key in optional if any(key in row for row in methods.values())]
    lines = ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in methods.items():
        lines.append(f"| {name} | " + " | ".join(_cell(row.get(column)) for column in columns) + " |")
    return "\n".join(lines)


def _write_report(report: dict, out: Path) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    world, rm = report["world"], report["reward_model"]
    pictures = sorted(path.relative_to(out).as_posix() for path in out.rglob("*.png"))
    text = (
        f"""# GAN-RM on the embedded digits world

The world ({world["path"]}) was built in {_cell(world["build_seconds"])} s. Its base model draws the target style
("thin" strokes) in {world["base"]["style_rate"]:.1%} of samples and the prompted digit in
{world["base"]["class_accuracy"]:.1%}; real target digits have the style {world["target"]["style_rate"]:.1%} of the
time, other real digits {world["real_other"]["style_rate"]:.1%}.

## The reward model
| figure | value |
|---|---|
| AUC, held-out target digits vs base samples | {rm["auc"]:.3f} |
| AUC, held-out target digits vs other real digits (the style itself) | {rm["auc_style_among_real"]:.3f} |
| Spearman, reward vs the style's pixel measure (base samples) | {rm["spearman_reward_vs_style"]:.3f} |
| training seconds (embedding + head, with one bootstrapping round) | {rm["train_seconds"]:.1f} |

The reward model is in `reward_model/` (`GANRewardModel.from_pretrained("{rm["path"]}")`); its curves are in
`reward_model/training_curves.png`; `heldout_by_reward.png` shows held-out images sorted by reward (`target` = a
real target digit, `*` = a base sample with the style).

## Methods (same prompts and seeds; judged by the world's judges)
{methods_table(report["methods"])}

`base`: one sample per prompt from the base model. Selection rows (best-of-N, pruning, FK resampling) come with a
`random_candidate` row, the mean over all their candidates; `reward_gain` is measured against it, and `unet_cost`,
`reward_gain_kept` and `style_gain_kept` against full best-of-N with the same sampler (`*_eta1` and `fk_*` rows:
DDIM eta = 1, which FK resampling needs). `unet_evaluations` counts latents through the UNet (guidance doubles
them); `seconds` is sampling time. Fine-tuned rows (`sft`, `dpo`, `prdp`) sample the evaluation prompts and seeds of
`base` with their LoRA (kept in `lora/<method>/`); `train_seconds` and `peak_rss_mib` are the fine-tuning run's
(peak resident memory of the demo process, which already held the rest of the demo).

## Pictures
"""
        + "\n".join(f"- `{name}`" for name in pictures)
        + "\n"
    )
    (out / "report.md").write_text(text)


# --------------------------------------------------------------------------------------------------------------
# CLI


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
        default=",".join(METHOD_GROUPS),
        help=f"comma-separated method groups to run after the reward model (of {', '.join(METHOD_GROUPS)})",
    )
    parser.add_argument("--quick", action="store_true", help="a few samples everywhere: a smoke run, not figures")
    parser.set_defaults(func=demo_command)


def demo_command(args: argparse.Namespace) -> int:
    methods = tuple(method for method in args.methods.split(",") if method)
    unknown = set(methods) - set(METHOD_GROUPS)
    if unknown:
        raise SystemExit(f"ganrm demo: unknown method group(s) {sorted(unknown)}; choose from {METHOD_GROUPS}")
    report = run_demo(DemoSettings(out=args.out, world=args.world, seed=args.seed, methods=methods, quick=args.quick))
    rm = report["reward_model"]
    print(
        f"reward model: AUC {rm['auc']:.3f}, AUC among real {rm['auc_style_among_real']:.3f}, "
        f"Spearman {rm['spearman_reward_vs_style']:.3f}"
    )
    print(methods_table(report["methods"]))
    print(f"report: {args.out / 'report.md'}")
    return 0
