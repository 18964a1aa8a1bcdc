"""GAN-RM's round loop (Liu et al. 2025): the reward model and the generator take turns, as in a GAN.

    accelerate launch training/train_rounds.py --pretrained_model PIPELINE --target_dir TARGET_IMAGES \
        --prompts prompts.txt --finetune dpo --rounds 3 --output_dir out/rounds

Round t, with G_t the base model plus the LoRA so far:
1. sample three disjoint sets from G_t (seeds of their own every round): the discriminator's negatives
   (`rm_negatives_per_prompt` per prompt), a bootstrapping pool (`rm_pool_per_prompt`) and the selection pool
   (`num_candidates` per prompt);
2. train R_t from scratch on the target images against G_t's negatives (older rounds' negatives are dropped: R_t
   must separate the targets from the *current* generator), with a held-out split of both sides, then one round of
   rank-based bootstrapping on the pool (top-M as soft positives with label exp(-alpha * rank), bottom-M negatives);
3. score the selection pool with R_t (images its head never trained on) and fine-tune the LoRA
   `max_train_steps` steps on the best (SFT) or on (best, worst) pairs (DPO), giving G_{t+1}.

Each round records R_t's held-out AUC against G_t (`auc_vs_current`: held-out targets vs held-out G_t negatives) and
against G_0 (`auc_vs_base`: the same targets vs round 0's held-out negatives), the selection pool's reward
distribution, and the fine-tuning curves. As the generator improves R_{t-1}'s AUC against G_t falls
(`previous_auc_vs_current`), and retraining restores it. Every round is kept: out/rounds/round-<t>/reward_model/
(GANRewardModel.from_pretrained), round-<t>/lora/ (diffusers and ComfyUI files), round-<t>/metrics.jsonl and
curves.png; the final LoRA is also written to out/rounds/, with rounds.png. A resumed run (--resume latest) skips
finished rounds and continues the unfinished one from its checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ganrm_diffusers.generation.lora import save_lora
from ganrm_diffusers.generation.sampling import decode_latents
from ganrm_diffusers.reward.backbone import DEFAULT_BACKBONE, DEFAULT_PRETRAINED
from ganrm_diffusers.reward.model import GANRewardModel
from ganrm_diffusers.reward.training import RewardTrainingConfig, embeddings_auc, fit_reward_model
from ganrm_diffusers.training.config import FinetuneConfig, TrainingConfigError, option, parse_config
from ganrm_diffusers.training.dpo import BETA_HELP, check_pair_candidates, dpo_loss, report_dropped_pairs
from ganrm_diffusers.training.examples import (
    computed_in_parts,
    config_prompts,
    examples_from_candidates,
    sample_candidates,
    score_images,
)
from ganrm_diffusers.training.loop import train_on_examples
from ganrm_diffusers.training.run import DATA_DIR, METRICS_NAME, FinetuneRun, MetricsLog, finish_run, setup_run
from ganrm_diffusers.training.sft import sft_loss
from ganrm_diffusers.training.state import load_lora_weights_into, lora_weights, read_tensors
from ganrm_diffusers.utils.atomic import save_tensors_atomic, write_json_atomic
from ganrm_diffusers.utils.plots import plot_metric_curves

# The three sample sets of a round, each from seeds of its own (see `stream_seed`), kept under their names.
SELECTION, NEGATIVES, POOL = 0, 1, 2
STREAM_NAMES = ("selection", "negatives", "pool")


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
    rm_negatives_per_prompt: int = option(2, "G_t samples per prompt line the reward model trains against each round")
    rm_pool_per_prompt: int = option(2, "fresh G_t samples per prompt line ranked by rank-based bootstrapping")
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
        if self.rm_negatives_per_prompt < 1:
            raise TrainingConfigError("--rm_negatives_per_prompt must be at least 1")
        if self.finetune == "dpo":
            check_pair_candidates(self.num_candidates)

    def reward_training(self) -> RewardTrainingConfig:
        return RewardTrainingConfig(
            max_epochs=self.rm_max_epochs,
            seed=self.seed,
            bootstrap_rounds=1 if self.rm_pool_per_prompt > 0 else 0,
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


def stream_seed(config: RoundsConfig, prompts: int, index: int, stream: int) -> int:
    """The first seed of sample set `stream` of round `index`: blocks that never overlap (prompt i's candidates get
    seeds first + i * count + j, below first + block). Round 0's selection pool takes the first block: the seeds
    `ganrm sample` and the SFT and DPO trainers give the same prompts, so G_0's candidates are the ones those draw
    (and a `--candidate_cache` they filled serves them)."""
    block = prompts * max(config.num_candidates, config.rm_negatives_per_prompt, config.rm_pool_per_prompt)
    return config.seed + (3 * index + stream) * block


def sample_set(
    run: FinetuneRun, prompts: list[str], index: int, stream: int, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` samples of G_t for every prompt (latents and images), sampled in parts by all processes and kept in
    the round's data folder, so that a resumed round sees the same samples."""
    config, folder = run.config, round_dir(run.config, index) / DATA_DIR
    seed = stream_seed(config, len(prompts), index, stream)

    def part_path(rank: int, processes: int) -> Path:
        return folder / f"{STREAM_NAMES[stream]}-{rank}-of-{processes}.safetensors"

    def compute(mine: list) -> torch.Tensor:
        return sample_candidates(run, [prompts[i] for i in mine], mine, count, seed)[0]

    def save(latents: torch.Tensor, path: Path) -> None:
        save_tensors_atomic(path, {"latents": latents})

    def load(path: Path) -> torch.Tensor:
        return read_tensors(path)[0]["latents"]

    latents = torch.cat(computed_in_parts(run, range(len(prompts)), part_path, compute, save, load))
    images = decode_latents(run.pipe, latents.to(run.device, run.weight_dtype), config.sample_batch_size)
    return latents, images


def train_reward_model(run: FinetuneRun, prompts: list[str], index: int) -> tuple[GANRewardModel, dict]:
    """R_t: a fresh head trained on the targets against G_t's negatives, with bootstrapping on G_t's pool; and its
    held-out AUCs against G_t and G_0. The main process trains it (the head only: seconds) and saves it; the others
    load it."""
    config, accelerator = run.config, run.accelerator
    folder = round_dir(config, index)
    negatives = sample_set(run, prompts, index, NEGATIVES, config.rm_negatives_per_prompt)[1]
    pool = sample_set(run, prompts, index, POOL, config.rm_pool_per_prompt)[1] if config.rm_pool_per_prompt else None
    if accelerator.is_main_process and not (folder / "reward_model").is_dir():
        model, report = fit_reward_model(
            config.target_dir,
            negatives,
            model=new_reward_model(config).to(run.device),
            config=config.reward_training(),
            pools=None if pool is None else [pool],
        )
        validation = report.split[1]
        hard = validation[report.dataset.hard[validation].cpu()]
        labels = report.dataset.labels[hard].cpu()
        features = report.dataset.features[hard]
        heldout = {"targets": features[labels == 1].cpu(), "generated": features[labels == 0].cpu()}
        base_file = round_dir(config, 0) / "base_heldout.safetensors"
        if index == 0:
            save_tensors_atomic(base_file, {"generated": heldout["generated"]})
        base_generated = read_tensors(base_file)[0]["generated"]
        metrics = {
            "auc_vs_current": embeddings_auc(model, heldout["targets"], heldout["generated"]),
            "auc_vs_base": embeddings_auc(model, heldout["targets"], base_generated),
            **{key: value for key, value in report.metrics.items() if isinstance(value, (int, float))},
        }
        previous = round_dir(config, index - 1) / "reward_model"
        if index > 0 and previous.is_dir():  # the last discriminator against the generator it helped improve
            earlier = GANRewardModel.from_pretrained(previous, device=run.device)
            metrics["previous_auc_vs_current"] = embeddings_auc(earlier, heldout["targets"], heldout["generated"])
        model.save_pretrained(folder / "reward_model")
        write_json_atomic(folder / "reward_model.json", metrics)
    accelerator.wait_for_everyone()
    model = GANRewardModel.from_pretrained(folder / "reward_model", device=run.device)
    return model, json.loads((folder / "reward_model.json").read_text())


def reward_distribution(scores: torch.Tensor) -> dict:
    values = scores.float().cpu()
    quantiles = torch.quantile(values, torch.tensor([0.1, 0.5, 0.9]))
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        **{f"p{int(q * 100)}": float(v) for q, v in zip((0.1, 0.5, 0.9), quantiles, strict=True)},
    }


def train(config: RoundsConfig, run: FinetuneRun | None = None) -> dict:
    """Run the rounds; returns the summary (also in output_dir/metrics.json), one entry per round."""
    config.check()
    run = run or setup_run(config)
    prompts = config_prompts(config)
    loss = dpo_loss if config.finetune == "dpo" else sft_loss
    summary_log = MetricsLog(Path(config.output_dir) / METRICS_NAME, run.is_main)
    rounds = []
    for index in range(config.rounds):
        folder = round_dir(config, index)
        done = folder / "round.json"
        if folder.exists() and not config.resume:
            raise TrainingConfigError(
                f"{folder} holds a round of an earlier run: continue it with --resume latest, or train into another "
                "output_dir"
            )
        if done.is_file():  # finished before a restart: take its LoRA
            load_lora_weights_into(run.denoiser, read_tensors(folder / "lora_state.safetensors")[0], str(folder))
            rounds.append(json.loads(done.read_text()))
            continue
        model, rm_metrics = train_reward_model(run, prompts, index)
        run.reward_model = model
        latents, images = sample_set(run, prompts, index, SELECTION, config.num_candidates)
        texts = [prompt for prompt in prompts for _ in range(config.num_candidates)]
        scores = score_images(run, images, texts)
        examples = examples_from_candidates(
            prompts, latents, scores, config.num_candidates, config.top_k, pairs=config.finetune == "dpo"
        )
        if config.finetune == "dpo":
            report_dropped_pairs(run, examples)
        run.metrics = MetricsLog(folder / METRICS_NAME, run.is_main)
        train_on_examples(run, examples, loss, eval_prompts=prompts, output_dir=folder)
        records = run.metrics.records()
        entry = {
            "round": index,
            "reward_model": rm_metrics,
            "auc_vs_current": rm_metrics["auc_vs_current"],
            "auc_vs_base": rm_metrics["auc_vs_base"],
            "previous_auc_vs_current": rm_metrics.get("previous_auc_vs_current"),
            "selection_rewards": reward_distribution(scores),
            "eval_reward_start": records[0].get("eval_reward") if records else None,
            "eval_reward_end": records[-1].get("eval_reward") if records else None,
            "examples": len(examples),
            "dropped_pairs": examples.dropped_pairs,
        }
        if run.is_main:
            save_lora(run.denoiser, folder / "lora", pretrained_model=config.pretrained_model)
            save_tensors_atomic(folder / "lora_state.safetensors", lora_weights(run.denoiser))
            plot_metric_curves(records, CURVES[config.finetune], folder / "curves.png", title=f"round {index}")
            write_json_atomic(done, entry)
            summary_log.append(
                {
                    "step": index + 1,
                    **{key: value for key, value in entry.items() if isinstance(value, (int, float))},
                    "selection_reward_mean": entry["selection_rewards"]["mean"],
                }
            )
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
    (
        "discriminator held-out AUC",
        ("auc_vs_current", "auc_vs_base", "previous_auc_vs_current"),
    ),
)


def main(argv: list[str] | None = None) -> None:
    train(parse_config(RoundsConfig, argv))


if __name__ == "__main__":
    main()
