"""GAN-RM's round loop (Liu et al. 2025): the reward model and the generator take turns, as in a GAN.

    accelerate launch training/train_rounds.py --pretrained_model PIPELINE --target_dir TARGET_IMAGES \
        --prompts prompts.txt --finetune dpo --rounds 3 --output_dir out/rounds

Round t: sample N candidates per prompt from the current generator G_t (the base model with the LoRA so far);
train the reward model R_t on the target images against them (round 0: `fit_reward_model`, target vs G_0's
samples; later rounds: `bootstrap_round`, which ranks G_t's candidates and adds the top M as soft positives with
label exp(-alpha * rank) and the bottom M as negatives, then retrains the head); score the candidates with R_t and
fine-tune the LoRA on the best (SFT) or on (best, worst) pairs (DPO), giving G_{t+1}.

Every round is kept: out/rounds/round-<t>/reward_model/ (GANRewardModel.from_pretrained), round-<t>/lora/ (diffusers
and ComfyUI files), round-<t>/metrics.jsonl and curves.png; the final LoRA is also written to out/rounds/. A resumed
run (--resume latest) skips finished rounds and continues the unfinished one from its checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from ganrm_training.train_dpo import BETA_HELP, dpo_loss
from ganrm_training.train_sft import sft_loss

from ganrm_diffusers.atomic import save_tensors_atomic, write_json_atomic
from ganrm_diffusers.backbone import DEFAULT_BACKBONE, DEFAULT_PRETRAINED
from ganrm_diffusers.finetune import (
    DATA_DIR,
    METRICS_NAME,
    FinetuneConfig,
    FinetuneRun,
    MetricsLog,
    TrainingConfigError,
    computed_in_parts,
    examples_from_candidates,
    finish_run,
    option,
    parse_config,
    read_prompts,
    sample_candidates,
    score_images,
    setup_run,
    train_on_examples,
)
from ganrm_diffusers.lora import save_lora
from ganrm_diffusers.plots import plot_metric_curves
from ganrm_diffusers.reward_model import GANRewardModel
from ganrm_diffusers.rm_training import RewardDataset, RewardTrainingConfig, bootstrap_round, fit_reward_model
from ganrm_diffusers.sampling import decode_latents
from ganrm_diffusers.training_state import (
    load_lora_weights_into,
    lora_weights,
    read_tensors,
)


@dataclass
class RoundsConfig(FinetuneConfig):
    """GAN-RM rounds: retrain the reward model on the current generator's samples, then fine-tune with SFT or DPO."""

    target_dir: str = option("", "folder of target images: the preference proxy data (positives)", required=True)
    finetune: str = option("dpo", "how each round fine-tunes the generator", choices=("dpo", "sft"))
    rounds: int = option(2, "rounds T (each: sample, retrain the reward model, fine-tune max_train_steps steps)")
    num_candidates: int = option(8, "candidates sampled per prompt and round")
    top_k: int = option(1, "SFT: best candidates per prompt kept")
    beta: float = option(5000.0, "DPO: " + BETA_HELP)
    rm_backbone: str = option(
        DEFAULT_BACKBONE, "open_clip backbone of a new reward model (ignored with --reward_model)"
    )
    rm_pretrained: str | None = option(DEFAULT_PRETRAINED, "its open_clip weights tag (none: random)")
    rm_hidden_sizes: str = option("512,128", "hidden sizes of a new reward model's head")
    rm_max_epochs: int = option(100, "head training epochs (early stopping)")
    bootstrap_m: int = option(32, "M: top and bottom candidates added per round (rank-based bootstrapping)")
    bootstrap_alpha: float = option(0.1, "alpha: soft label exp(-alpha * rank) of the top-M pseudo-positives")
    reward_model: str | None = option(None, "a reward model whose backbone and head shape to reuse (head retrained)")

    @property
    def method(self) -> str:
        return f"rounds-{self.finetune}"

    def check(self) -> None:
        super().check()
        if not self.target_dir:
            raise TrainingConfigError("--target_dir (the target images) is required")
        if self.rounds < 1:
            raise TrainingConfigError("--rounds must be at least 1")

    def reward_training(self) -> RewardTrainingConfig:
        return RewardTrainingConfig(
            max_epochs=self.rm_max_epochs,
            seed=self.seed,
            bootstrap_m=self.bootstrap_m,
            bootstrap_alpha=self.bootstrap_alpha,
        )


def round_dir(config: RoundsConfig, index: int) -> Path:
    return Path(config.output_dir) / f"round-{index:02d}"


def new_reward_model(config: RoundsConfig) -> GANRewardModel:
    if config.reward_model:
        model = GANRewardModel.from_pretrained(config.reward_model)
    else:
        hidden = tuple(int(size) for size in config.rm_hidden_sizes.split(",") if size.strip())
        model = GANRewardModel(backbone=config.rm_backbone, pretrained=config.rm_pretrained, hidden_sizes=hidden)
    if model.config.prompt_aware:
        raise TrainingConfigError(
            "the round loop trains image-only reward models (as the paper); this one is prompt-aware"
        )
    return model


def sample_pool(run: FinetuneRun, prompts: list[str], index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """G_t's candidates for every prompt (latents and images), sampled in parts by all processes and kept in the
    round's data folder, so that a resumed round sees the same pool."""
    config, folder = run.config, round_dir(run.config, index) / DATA_DIR
    seed = config.seed + 7919 * index  # fresh samples every round

    def part_path(rank: int, processes: int) -> Path:
        return folder / f"pool-{rank}-of-{processes}.safetensors"

    def compute(mine: list) -> torch.Tensor:
        return sample_candidates(run, [prompts[i] for i in mine], mine, config.num_candidates, seed)[0]

    def save(latents: torch.Tensor, path: Path) -> None:
        save_tensors_atomic(path, {"latents": latents})

    def load(path: Path) -> torch.Tensor:
        return read_tensors(path)[0]["latents"]

    latents = torch.cat(computed_in_parts(run, range(len(prompts)), part_path, compute, save, load))
    images = decode_latents(run.pipe, latents.to(run.device, run.weight_dtype), config.sample_batch_size)
    return latents, images


def train_reward_model(
    run: FinetuneRun, index: int, images: torch.Tensor, previous: tuple | None
) -> tuple[GANRewardModel, RewardDataset, tuple[torch.Tensor, torch.Tensor], dict]:
    """R_t, its training set and split, and its held-out metrics. The main process trains it (the head only: seconds)
    and saves it; the others load it."""
    config, accelerator = run.config, run.accelerator
    folder = round_dir(config, index)
    if accelerator.is_main_process and not (folder / "reward_model").is_dir():
        if previous is None:
            model, report = fit_reward_model(
                config.target_dir,
                images,
                model=new_reward_model(config).to(run.device),
                config=config.reward_training(),
            )
            dataset, split, metrics = report.dataset, report.split, report.metrics
        else:
            model, dataset, split = previous
            pool = model.encoder.encode_images(images).clone()
            dataset, result = bootstrap_round(model, dataset, pool, config.reward_training(), split, round_index=index)
            metrics = result.metrics
        save_reward_state(folder, dataset, split, metrics)
        model.save_pretrained(folder / "reward_model")
    accelerator.wait_for_everyone()
    return load_reward_state(folder, run.device)


def save_reward_state(folder: Path, dataset: RewardDataset, split: tuple, metrics: dict) -> None:
    tensors = {
        "features": dataset.features,
        "labels": dataset.labels,
        "hard": dataset.hard,
        "train": split[0],
        "validation": split[1],
    }
    metrics = {key: value for key, value in metrics.items() if isinstance(value, (int, float))}
    save_tensors_atomic(folder / "reward_dataset.safetensors", tensors, {"metrics": json.dumps(metrics)})


def load_reward_state(folder: Path, device: torch.device):
    model = GANRewardModel.from_pretrained(folder / "reward_model", device=device)
    tensors, metadata = read_tensors(folder / "reward_dataset.safetensors")
    dataset = RewardDataset(tensors["features"].to(device), tensors["labels"].to(device), tensors["hard"].to(device))
    return model, dataset, (tensors["train"], tensors["validation"]), json.loads(metadata["metrics"])


def train(config: RoundsConfig, run: FinetuneRun | None = None) -> dict:
    """Run the rounds; returns the summary (also in output_dir/metrics.json), one entry per round."""
    config.check()
    run = run or setup_run(config)
    prompts = read_prompts(config)
    loss = dpo_loss if config.finetune == "dpo" else sft_loss
    summary_log = MetricsLog(Path(config.output_dir) / METRICS_NAME, run.is_main)
    previous, rounds = None, []
    for index in range(config.rounds):
        folder = round_dir(config, index)
        done = folder / "round.json"
        if folder.exists() and not config.resume:
            raise TrainingConfigError(
                f"{folder} holds a round of an earlier run: continue it with --resume latest, or train into another "
                "output_dir"
            )
        if done.is_file():  # finished before a restart: take its LoRA and reward model
            load_lora_weights_into(run.unet, read_tensors(folder / "lora_state.safetensors")[0], str(folder))
            model, dataset, split, _ = load_reward_state(folder, run.device)
            previous = (model, dataset, split)
            rounds.append(json.loads(done.read_text()))
            continue
        latents, images = sample_pool(run, prompts, index)
        model, dataset, split, rm_metrics = train_reward_model(run, index, images, previous)
        previous, run.reward_model = (model, dataset, split), model
        texts = [prompt for prompt in prompts for _ in range(config.num_candidates)]
        scores = score_images(run, images, texts)
        examples = examples_from_candidates(
            prompts, latents, scores, config.num_candidates, config.top_k, pairs=config.finetune == "dpo"
        )
        run.metrics = MetricsLog(folder / METRICS_NAME, run.is_main)
        train_on_examples(run, examples, loss, eval_prompts=prompts, output_dir=folder)
        records = run.metrics.records()
        entry = {
            "round": index,
            "reward_model": {
                key: rm_metrics[key] for key in ("val_auc", "val_loss", "val_accuracy") if key in rm_metrics
            },
            "pool_mean_reward": float(scores.mean()),
            "eval_reward_start": records[0].get("eval_reward") if records else None,
            "eval_reward_end": records[-1].get("eval_reward") if records else None,
            "examples": len(examples),
        }
        if run.is_main:
            save_lora(run.unet, folder / "lora", pretrained_model=config.pretrained_model)
            save_tensors_atomic(folder / "lora_state.safetensors", lora_weights(run.unet))
            plot_metric_curves(records, CURVES[config.finetune], folder / "curves.png", title=f"round {index}")
            write_json_atomic(done, entry)
            summary_log.append({"step": index + 1, **entry, "rm_val_auc": entry["reward_model"].get("val_auc")})
        run.accelerator.wait_for_everyone()
        rounds.append(entry)
    run.metrics = summary_log
    return finish_run(run, ROUND_CURVES, {"rounds": rounds}, x_key="round")


CURVES = {
    "dpo": (("DPO loss", ("loss",)), ("reward of fixed samples", ("eval_reward",))),
    "sft": (("denoising loss", ("loss",)), ("reward of fixed samples", ("eval_reward",))),
}
ROUND_CURVES = (
    ("reward of fixed samples (that round's reward model)", ("eval_reward_start", "eval_reward_end")),
    ("reward model held-out AUC", ("rm_val_auc",)),
)


def main(argv: list[str] | None = None) -> None:
    train(parse_config(RoundsConfig, argv))


if __name__ == "__main__":
    main()
