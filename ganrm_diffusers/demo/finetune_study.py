"""SFT, Diffusion-DPO and PRDP measured in the embedded world (rows `sft`, `dpo`, `prdp` of the demo report).

`training_rows` fine-tunes a LoRA on the world's pipeline with each method and the demo's GAN-RM, with the
settings of `demo_configs` (a few CPU minutes each; the trainers' own defaults are the papers'), then samples the
prompts and seeds of an `EvaluationPlan` (the evaluation set of the demo's `base` row, or a tuning set) with the LoRA
loaded through diffusers' `load_lora_weights`. It returns the samples for the caller to judge, and per method:

- train_seconds: wall time of the fine-tuning run (sampling its data included); peak_rss_mib: the process's peak
  resident memory during it (Linux VmHWM, reset at its start; it includes what the demo process already held,
  given as rss_before_mib); peak_cuda_mib on a GPU;
- lora: the folder with both LoRA files (`<out>/lora/<method>/`), curves: the training curves PNG, and the run's
  final metrics and settings.

The trainers draw their own samples from seeds below 10^7; evaluation and tuning sets start at 3 x 10^7 and
5 x 10^7, so no image a trainer saw is ever judged.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch

from ganrm_diffusers.demo.generators import Generator
from ganrm_diffusers.generation.lora import COMFYUI_WEIGHT_NAME, DIFFUSERS_WEIGHT_NAME
from ganrm_diffusers.reward.model import GANRewardModel
from ganrm_diffusers.training.run import peak_memory, setup_run
from ganrm_diffusers.world.samples import EvaluationPlan, SampleSet

METHODS = ("sft", "dpo", "prdp", "rounds")
# Rows whose trainer module is another's with other settings (`prdp_adversarial`: prdp.py --adversarial).
TRAINER_OF = {"prdp_adversarial": "prdp"}


def finetune_root(out_dir: Path, family: str = "") -> Path:
    """The folder of the demo's fine-tuning runs on one generator (`family`; "" for the UNet one)."""
    return out_dir / "finetune" / family


def candidate_cache_dir(out_dir: Path, family: str = "") -> Path:
    """Where those runs keep the candidates they draw from the generator's base model."""
    return finetune_root(out_dir, family) / "candidates"


def demo_configs(
    world: object,
    prompts_file: Path,
    run_root: Path,
    candidate_cache: Path,
    pipeline_dir: Path | None = None,
    sampling: dict | None = None,
) -> dict:
    """The world's fine-tuning settings of each method (see the module docstring and the team notes), for the
    generator at `pipeline_dir` sampled with `sampling` (default: the world's UNet generator and its settings);
    SFT and DPO keep their candidates in `candidate_cache`."""
    from ganrm_diffusers.training.dpo import DPOConfig
    from ganrm_diffusers.training.prdp import PRDPConfig
    from ganrm_diffusers.training.rounds import RoundsConfig
    from ganrm_diffusers.training.sft import SFTConfig

    sampling = world.sampling_kwargs if sampling is None else sampling
    shared = {
        "pretrained_model": str(pipeline_dir or world.pipeline_dir),
        "max_sequence_length": sampling.get("max_sequence_length"),  # the flow generator's T5-less text length
        "prompts": str(prompts_file),
        "num_inference_steps": int(sampling.get("num_inference_steps", 25)),
        "guidance_scale": float(sampling.get("guidance_scale", 2.0)),
        "lora_rank": 8,
        "checkpoint_every": 100,
        "checkpoints_total_limit": 1,
        "eval_prompts": 10,
        "eval_samples_per_prompt": 4,
        "sample_batch_size": 128,
        # SFT, DPO, their tuning runs and round 0 of the rounds rank the same candidates (same prompts, seeds and
        # base model): sampled once, kept here.
        "candidate_cache": str(candidate_cache),
    }
    # PRDP at the trainer's defaults (beta 30 on per-prompt standardised rewards, lr 3e-4, K 2, eps 1e-3; see
    # PRDPConfig): only the budget is the world's. Measured before those became the defaults: the authors' beta
    # (3e-5) on raw logits cost 3.6 points of class accuracy at lr 3e-4, while beta 30 stayed 8x closer to the
    # reference (mean log-ratio) and within 1.5 points; lr 1e-3 saturated the reward by epoch 15 at a cost of
    # 3-13 points of class accuracy.
    prdp = PRDPConfig(
        **{**shared, "num_inference_steps": 10, "checkpoint_every": 10},
        output_dir=str(run_root / "prdp"),
        epochs=24,  # 21 s an epoch on 2 cores: the demo's time budget
        prompts_per_epoch=10,
        samples_per_prompt=8,
        train_batch_size=80,
        eval_every=6,
    )
    return {
        "sft": SFTConfig(
            **shared,
            output_dir=str(run_root / "sft"),
            num_candidates=8,
            top_k=2,
            train_batch_size=32,
            max_train_steps=150,
            learning_rate=1e-3,
            eval_every=50,
        ),
        "dpo": DPOConfig(
            **shared,
            output_dir=str(run_root / "dpo"),
            num_candidates=8,
            train_batch_size=16,
            max_train_steps=150,
            learning_rate=1e-3,
            beta=5000.0,
            eval_every=50,
        ),
        "prdp": prdp,
        # Online PRDP (Adv-GRPO's scheme with PRDP's objective): the PRDP row's run, its reward model's head retrained
        # (warm) on the target digits against the samples of every epoch, with the two windows before it replayed.
        "prdp_adversarial": replace(
            prdp,
            output_dir=str(run_root / "prdp_adversarial"),
            adversarial=True,
            target_dir=str(world.target_dir),
            refresh_every=1,
            rm_replay=2,
            rm_max_epochs=30,
        ),
        # GAN-RM's round loop with DPO at the DPO row's total budget (2 rounds x 75 steps = 150 steps): each round a
        # fresh discriminator (the world's CLIP + the demo's head shape) against the current generator's 400
        # samples, bootstrapping on 400 more, selection on 8 fresh candidates per prompt line.
        "rounds": RoundsConfig(
            **shared,
            output_dir=str(run_root / "rounds"),
            target_dir=str(world.target_dir),
            finetune="dpo",
            rounds=2,
            num_candidates=8,
            train_batch_size=16,
            max_train_steps=75,
            learning_rate=1e-3,
            beta=5000.0,
            rm_backbone=world.backbone,
            rm_pretrained=None,
            rm_negatives_per_prompt=2,
            rm_pool_per_prompt=2,
            eval_every=25,
        ),
    }


def training_rows(
    world: object,
    reward_model: GANRewardModel,
    out_dir: str | Path,
    plan: EvaluationPlan,
    methods: tuple[str, ...] | list[str] = METHODS,
    prompt_repeats: int = 20,
    batch_size: int = 100,
    overrides: dict[str, dict] | None = None,
    label: str | None = None,
    generator: Generator | None = None,
    candidate_cache: Path | None = None,
) -> dict[str, tuple[SampleSet, dict]]:
    """Fine-tune with each method and sample the fine-tuned model on `plan`; returns {method: (samples, info)}.

    The training prompts are the world's ten prompts, each `prompt_repeats` times (a prompt index fixes the
    candidates' seeds, so repeats give new candidates). `overrides[method]` replaces config fields (a quick run, a
    tuning candidate); `label` names the LoRA folder (`<out>/lora/<label>/`, default the method). `generator`: the
    world's generator to fine-tune (default its UNet one), its runs and LoRAs under its family's folder
    (`<out>/lora/<family>/<method>/`). SFT and DPO draw their candidates through
    `candidate_cache` (default `candidate_cache_dir(out_dir, family)`): the same prompts, seeds and base model give the
    same candidates, sampled once."""
    out_dir = Path(out_dir)
    generator = generator or Generator.unet(world)
    family = generator.family
    run_root = finetune_root(out_dir, family)
    run_root.mkdir(parents=True, exist_ok=True)
    prompts_file = run_root / "prompts.txt"
    prompts_file.write_text("".join(f"{prompt}\n" for _ in range(prompt_repeats) for prompt in world.prompts))
    cache = candidate_cache or candidate_cache_dir(out_dir, family)
    configs = demo_configs(world, prompts_file, run_root, cache, generator.pipeline_dir, generator.sampling)
    rows = {}
    for method in methods:
        config = replace(configs[method], **(overrides or {}).get(method, {}))
        if label:
            config = replace(config, output_dir=str(run_root / label))
        shutil.rmtree(config.output_dir, ignore_errors=True)  # a fresh run: the figures come from these settings
        summary, cost = _train(method, config, reward_model)

        name = label or method
        lora_dir = out_dir / "lora" / family / name
        lora_dir.mkdir(parents=True, exist_ok=True)
        for weights in (DIFFUSERS_WEIGHT_NAME, COMFYUI_WEIGHT_NAME):
            shutil.copy2(Path(config.output_dir) / weights, lora_dir / weights)
        curves = out_dir / f"{family}{'_' if family else ''}{name}_curves.png"
        shutil.copy2(Path(config.output_dir) / "curves.png", curves)

        samples = generator.sample_with_lora(lora_dir, plan, batch_size, f"{name} evaluation")
        rows[method] = (
            samples,
            {
                **cost,
                "lora": str(lora_dir),
                "run_dir": str(config.output_dir),
                "curves": str(curves),
                "final_metrics": summary.get("final", {}),
                "settings": _settings(config),
            },
        )
    return rows


def _train(method: str, config, reward_model: GANRewardModel) -> tuple[dict, dict]:
    """Run one trainer in this process; its wall time and peak memory (VmHWM is reset first, where Linux allows)."""
    import importlib

    trainer = importlib.import_module(f"ganrm_diffusers.training.{TRAINER_OF.get(method, method)}")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS to the current RSS
    except OSError:
        pass
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    rss_before = _current_rss_mib()
    started = time.perf_counter()
    run = setup_run(config, reward_model=reward_model)
    summary = trainer.train(config, run)
    seconds = time.perf_counter() - started
    return summary, {"train_seconds": seconds, "rss_before_mib": rss_before, **peak_memory()}


def _current_rss_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _settings(config) -> dict:
    keep = (
        "learning_rate",
        "lora_rank",
        "train_batch_size",
        "max_train_steps",
        "num_candidates",
        "top_k",
        "beta",
        "epochs",
        "inner_steps",
        "prompts_per_epoch",
        "samples_per_prompt",
        "clip_eps",
        "num_inference_steps",
        "reward_scale",
        "guidance_scale",
        "rounds",
        "rm_negatives_per_prompt",
        "rm_pool_per_prompt",
        "refresh_every",
        "rm_replay",
        "rm_max_epochs",
    )
    return {key: getattr(config, key) for key in keep if hasattr(config, key)}
