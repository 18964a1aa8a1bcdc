"""Training examples of SFT and DPO: prompts, candidates sampled and scored, the best (and worst) of N per prompt
as latents, from fresh samples or from a folder."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ganrm_diffusers.generation.candidates import SampleSettings, read_prompts_file, read_records
from ganrm_diffusers.generation.lora import adapters_are_identity, adapters_skipped_while_identity
from ganrm_diffusers.generation.selection import select_top_k
from ganrm_diffusers.training.config import FinetuneConfig, TrainingConfigError
from ganrm_diffusers.training.run import DATA_DIR, FinetuneRun
from ganrm_diffusers.training.state import lora_weights, read_tensors
from ganrm_diffusers.utils.atomic import save_tensors_atomic

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------------
# Sampling and scoring


def config_prompts(config: FinetuneConfig) -> list[str]:
    """The prompts of `--prompts` (read as `ganrm sample` reads them)."""
    if not config.prompts:
        raise TrainingConfigError("--prompts is required (a text file, one prompt per line)")
    return read_prompts_file(config.prompts)


def score_images(run: FinetuneRun, images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
    if run.reward_model is None:
        raise TrainingConfigError("this step scores images: pass --reward_model")
    prompts = list(prompts) if prompts is not None and run.reward_model.config.prompt_aware else None
    return run.reward_model.score(images, prompts).float()


@torch.no_grad()
def evaluate_reward(run: FinetuneRun, prompts: Sequence[str]) -> dict:
    """Mean reward of fixed samples (the same seeds every time) of the first `eval_prompts` prompts, all processes
    sampling the same set. The sampler draws with the run's eta and guidance; the UNet is in eval mode."""
    config = run.config
    if run.reward_model is None or config.eval_prompts < 1:
        return {}
    chosen = list(prompts)[: config.eval_prompts]
    per_prompt = config.eval_samples_per_prompt
    seeds = [10**9 + config.seed + index for index in range(len(chosen) * per_prompt)]
    was_training = run.model.training
    run.model.eval()
    trajectory = run.sampler.sample(chosen, seeds, height=config.resolution, width=config.resolution)
    run.model.train(was_training)
    rewards = score_images(run, trajectory.images, trajectory.prompts)
    return {"eval_reward": float(rewards.mean()), "eval_reward_std": float(rewards.std())}


# --------------------------------------------------------------------------------------------------------------
# Examples for SFT and DPO: the best (and worst) of N candidates per prompt, as latents


@dataclass
class PreferenceExamples:
    """Training examples as latents: `winners[i]` (and for DPO `losers[i]`) of prompt `prompts[prompt_ids[i]]`."""

    prompts: list[str]
    prompt_ids: torch.Tensor
    winners: torch.Tensor
    losers: torch.Tensor | None = None
    winner_scores: torch.Tensor | None = None
    loser_scores: torch.Tensor | None = None
    dropped_pairs: int = 0  # DPO: (best, worst) pairs left out as the same image or tied rewards

    def __len__(self) -> int:
        return len(self.winners)

    def texts(self, ids: torch.Tensor) -> list[str]:
        return [self.prompts[int(self.prompt_ids[i])] for i in ids]

    def save(self, path: Path) -> None:
        tensors = {"prompt_ids": self.prompt_ids, "winners": self.winners}
        for name in ("losers", "winner_scores", "loser_scores"):
            if getattr(self, name) is not None:
                tensors[name] = getattr(self, name)
        metadata = {"prompts": json.dumps(self.prompts), "dropped_pairs": str(self.dropped_pairs)}
        save_tensors_atomic(path, tensors, metadata)

    @classmethod
    def load(cls, path: Path) -> PreferenceExamples:
        tensors, metadata = read_tensors(path)
        dropped = int(metadata.get("dropped_pairs", 0))
        return cls(prompts=json.loads(metadata["prompts"]), **tensors, dropped_pairs=dropped)

    @classmethod
    def concatenate(cls, parts: Sequence[PreferenceExamples]) -> PreferenceExamples:
        prompts, ids = [], []
        for part in parts:
            ids.append(part.prompt_ids + len(prompts))
            prompts += part.prompts

        def joined(name: str) -> torch.Tensor | None:
            values = [getattr(part, name) for part in parts]
            return None if any(value is None for value in values) else torch.cat(values)

        return cls(
            prompts=prompts,
            prompt_ids=torch.cat(ids),
            winners=joined("winners"),
            losers=joined("losers"),
            winner_scores=joined("winner_scores"),
            loser_scores=joined("loser_scores"),
            dropped_pairs=sum(part.dropped_pairs for part in parts),
        )


def choose_candidates(scores: torch.Tensor, group_size: int, top_k: int, pairs: bool):
    """Indices of the `top_k` best candidates of each group of `group_size` (prompt-major), their groups, and for
    DPO (`pairs`) the group's worst candidate for each of them. The rule is `select_top_k`'s, as in best-of-N.

    A pair whose winner is its loser, or whose rewards tie, teaches nothing (and a tie makes both the same index:
    ties go to the earlier candidate either way), so it is left out: returns (winners, groups, losers, how many
    pairs were left out)."""
    best = select_top_k(scores, top_k, group_size)
    if not pairs:
        return best.selected, best.groups, None, 0
    winners, groups = best.selected, best.groups
    losers = select_top_k(-scores.float(), 1, group_size).selected.repeat_interleave(top_k)
    scores = scores.float().cpu()
    keep = (winners != losers) & (scores[winners] > scores[losers])
    return winners[keep], groups[keep], losers[keep], int((~keep).sum())


def examples_from_candidates(
    prompts: Sequence[str], latents: torch.Tensor, scores: torch.Tensor, group_size: int, top_k: int, pairs: bool
) -> PreferenceExamples:
    """Examples from `group_size` scored candidate latents per prompt (prompt-major)."""
    scores = scores.float().cpu()
    winners, groups, losers, dropped = choose_candidates(scores, group_size, top_k, pairs)
    return PreferenceExamples(
        prompts=list(prompts),
        prompt_ids=groups.clone(),
        winners=latents[winners].float().cpu(),
        losers=None if losers is None else latents[losers].float().cpu(),
        winner_scores=scores[winners],
        loser_scores=None if losers is None else scores[losers],
        dropped_pairs=dropped,
    )


def candidates_key(
    run: FinetuneRun, prompts: Sequence[str], prompt_indices: Sequence[int], num_candidates: int, seed: int
) -> str:
    """What decides a set of sampled candidates: the pipeline, the LoRA's current weights, the sampler's settings,
    the prompts with their indices (which fix the seeds) and the candidate count. Two runs with the same key sample
    the same images, so `--candidate_cache` lets the second reuse the first's (SFT, DPO and the first of the rounds on
    one pool)."""
    config = run.config
    digest = hashlib.sha256()
    if adapters_are_identity(run.denoiser):  # an untrained LoRA: the base model, whatever its down-projections
        digest.update(b"identity")
    else:
        for name, value in sorted(lora_weights(run.model).items()):
            digest.update(name.encode())
            digest.update(value.float().numpy().tobytes())
    settings = {
        "pretrained_model": str(Path(config.pretrained_model).resolve())
        if Path(config.pretrained_model).exists()
        else config.pretrained_model,
        "lora": digest.hexdigest(),
        "sampler": [type(run.sampler).__name__, config.num_inference_steps, config.guidance_scale, run.sampler.eta],
        "resolution": config.resolution,
        "max_sequence_length": config.max_sequence_length,
        "sample_batch_size": config.sample_batch_size,
        "dtype": str(run.weight_dtype),
        "prompts": [[int(index), text] for index, text in zip(prompt_indices, prompts, strict=True)],
        "num_candidates": num_candidates,
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]


@torch.no_grad()
def sample_candidates(
    run: FinetuneRun, prompts: Sequence[str], prompt_indices: Sequence[int], num_candidates: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`num_candidates` samples of each prompt from the current model with `ganrm sample`'s seeds (prompt number
    `prompt_indices[i]` gets the same candidates whichever process samples it): (final latents, images in [0, 1]),
    prompt-major, on the CPU. Prompts share a sampler call up to `sample_batch_size` samples (default: one prompt
    per call, so that a prompt's candidates never depend on which prompts it was batched with). With
    `--candidate_cache DIR`, candidates sampled before under the same `candidates_key` are read back instead."""
    cached = None
    if run.config.candidate_cache:
        key = candidates_key(run, prompts, prompt_indices, num_candidates, seed)
        cached = Path(run.config.candidate_cache) / f"candidates-{key}.safetensors"
        if cached.is_file():
            tensors, _ = read_tensors(cached)
            run.print(f"candidates read from {cached}")
            return tensors["latents"], tensors["images"]
    latents, images = _sample_candidates(run, prompts, prompt_indices, num_candidates, seed)
    if cached is not None:
        save_tensors_atomic(cached, {"latents": latents, "images": images})
    return latents, images


def _sample_candidates(
    run: FinetuneRun, prompts: Sequence[str], prompt_indices: Sequence[int], num_candidates: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    per_call = max(1, (run.config.sample_batch_size or num_candidates) // num_candidates)
    pairs = list(zip(prompts, prompt_indices, strict=True))
    latents, images = [], []
    run.model.eval()
    with adapters_skipped_while_identity(run.denoiser):
        for start in tqdm(
            range(0, len(pairs), per_call),
            desc="sampling candidates",
            disable=not run.accelerator.is_local_main_process,
        ):
            part = pairs[start : start + per_call]
            # the seeds rule of `ganrm sample`, so both give the same images
            rule = SampleSettings(num_candidates=num_candidates, seed=seed)
            seeds = [s for _, index in part for s in rule.seeds(index)]
            trajectory = run.sampler.sample(
                [text for text, _ in part], seeds, height=run.config.resolution, width=run.config.resolution
            )
            latents.append(trajectory.latents[:, -1].float().cpu())
            images.append(trajectory.images.cpu())
    run.model.train()
    return torch.cat(latents), torch.cat(images)


def sample_examples(
    run: FinetuneRun,
    prompts: Sequence[str],
    prompt_indices: Sequence[int],
    num_candidates: int,
    top_k: int,
    pairs: bool,
) -> PreferenceExamples:
    """Sample candidates, score them with the reward model, keep the best (and worst) as final latents (no VAE
    round trip)."""
    latents, images = sample_candidates(run, prompts, prompt_indices, num_candidates, run.config.seed)
    texts = [text for text in prompts for _ in range(num_candidates)]
    scores = score_images(run, images.to(run.device), texts)
    return examples_from_candidates(prompts, latents, scores, num_candidates, top_k, pairs)


def folder_examples(
    run: FinetuneRun, folder: Path, records: Sequence[dict], top_k: int, pairs: bool
) -> PreferenceExamples:
    """Examples from a `ganrm sample` folder: its recorded scores rank each prompt's candidates, and the chosen
    images are encoded with the pipeline's VAE."""
    from ganrm_diffusers.utils.images import load_image, to_pixels

    by_prompt: dict[int, list[dict]] = {}
    for record in records:
        by_prompt.setdefault(record["prompt_index"], []).append(record)
    parts = []
    for index in tqdm(sorted(by_prompt), desc="encoding candidates", disable=not run.accelerator.is_local_main_process):
        group = sorted(by_prompt[index], key=lambda record: record["candidate"])
        scores = torch.tensor([record["score"] for record in group], dtype=torch.float32)
        winners, _, losers, dropped = choose_candidates(scores, len(group), top_k, pairs)
        chosen = winners.tolist() + ([] if losers is None else losers.tolist())
        # Every pair of a prompt may be left out: encode one image anyway, for the latents' shape.
        pixels = to_pixels([load_image(folder / group[i]["file_name"]) for i in chosen or [0]], device=run.device)
        latents = run.sampler.encode_images(pixels).cpu()[: len(chosen)]
        parts.append(
            PreferenceExamples(
                prompts=[group[0]["prompt"]],
                prompt_ids=torch.zeros(len(winners), dtype=torch.long),
                winners=latents[: len(winners)],
                losers=None if losers is None else latents[len(winners) :],
                winner_scores=scores[winners],
                loser_scores=None if losers is None else scores[losers],
                dropped_pairs=dropped,
            )
        )
    return PreferenceExamples.concatenate(parts)


def computed_in_parts(
    run: FinetuneRun,
    items: Sequence,
    part_path: Callable[[int, int], Path],
    compute: Callable[[list], object],
    save: Callable[[object, Path], None],
    load: Callable[[Path], object],
) -> list:
    """Split `items` across processes, `compute` each share and `save` it to `part_path(rank, processes)` unless
    that file exists (a resumed run reuses it), then every process `load`s every part: results in item order."""
    accelerator = run.accelerator
    path = part_path(accelerator.process_index, accelerator.num_processes)
    if not path.is_file():
        with accelerator.split_between_processes(list(items)) as mine:
            save(compute(list(mine)), path)
    accelerator.wait_for_everyone()
    return [load(part_path(rank, accelerator.num_processes)) for rank in range(accelerator.num_processes)]


def build_examples(
    run: FinetuneRun,
    *,
    candidates: str | None,
    num_candidates: int,
    top_k: int,
    pairs: bool,
) -> PreferenceExamples:
    """The training examples of SFT (`pairs=False`) or DPO (`pairs=True`): from a `ganrm sample` folder
    (`candidates`), else sampled now from the prompts file. Prepared in parts by all processes and kept in
    `<output_dir>/data/` (safetensors), so a resumed run trains on the very same examples."""
    kind = "pairs" if pairs else f"top{top_k}"

    def part_path(rank: int, processes: int) -> Path:
        return run.output_dir / DATA_DIR / f"{kind}-{rank}-of-{processes}.safetensors"

    if candidates:
        records = read_records(candidates)
        if not records:
            raise TrainingConfigError(f"{candidates} holds no candidates (no metadata.jsonl records)")
        groups = sorted({record["prompt_index"] for record in records})

        def compute(mine: list) -> PreferenceExamples:
            chosen = set(mine)
            subset = [record for record in records if record["prompt_index"] in chosen]
            return folder_examples(run, Path(candidates), subset, top_k, pairs)
    else:
        prompts = config_prompts(run.config)
        groups = list(range(len(prompts)))

        def compute(mine: list) -> PreferenceExamples:
            return sample_examples(run, [prompts[i] for i in mine], mine, num_candidates, top_k, pairs)

    if len(groups) < run.accelerator.num_processes:
        raise TrainingConfigError(
            f"{len(groups)} prompts cannot be shared by {run.accelerator.num_processes} processes"
        )
    parts = computed_in_parts(run, groups, part_path, compute, PreferenceExamples.save, PreferenceExamples.load)
    return PreferenceExamples.concatenate(parts)
