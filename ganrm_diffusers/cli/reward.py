"""`ganrm train-rm`, `ganrm score` and `ganrm push`: the reward model from the command line."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ganrm_diffusers.reward.backbone import DEFAULT_BACKBONE, DEFAULT_PRETRAINED
from ganrm_diffusers.reward.embedding_cache import EmbeddingCache
from ganrm_diffusers.reward.model import GANRewardModel
from ganrm_diffusers.reward.training import RewardTrainingConfig, fit_reward_model, save_training_outputs
from ganrm_diffusers.utils.atomic import save_png_atomic, write_text_atomic
from ganrm_diffusers.utils.errors import GanrmError
from ganrm_diffusers.utils.images import list_image_files, load_image_folder
from ganrm_diffusers.utils.options import add_config_arguments, add_option, config_from_args, int_list
from ganrm_diffusers.utils.plots import score_grid


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train-rm",
        help="train a GAN-RM reward model from target images and generated images",
        description="Train a GAN-RM: a frozen open_clip encoder + MLP head that tells target images (positives) "
        "from your model's generations (negatives). Writes the checkpoint, metrics.json and training_curves.png.",
    )
    add_option(train, "positives", required=True, type=Path, help="folder of target images (a few hundred)")
    add_option(train, "negatives", type=Path, help="folder of images your model generates today")
    sample = train.add_argument_group(
        "negatives sampled here (instead of --negatives)",
        "Sample the negatives from your diffusers pipeline: they are written to OUT/negatives (with metadata.jsonl) "
        "and kept, so a second run reuses them.",
    )
    add_option(sample, "pipeline", help="diffusers pipeline folder or Hub id to sample the negatives from")
    add_option(sample, "prompts", type=Path, help="text file, one prompt per line")
    add_option(sample, "negatives_per_prompt", type=int, default=4)
    add_option(sample, "num_inference_steps", type=int, default=30)
    add_option(sample, "guidance_scale", type=float, help="default: the pipeline's")
    add_option(
        train, "pool", type=Path, help="folder of further generations for bootstrapping rounds (split across rounds)"
    )
    add_option(train, "out", required=True, type=Path, help="output folder for the reward model")
    model = train.add_argument_group("the reward model")
    add_option(model, "backbone", default=DEFAULT_BACKBONE, help="open_clip model name, or local-dir:/hf-hub: path")
    add_option(
        model,
        "pretrained",
        default=DEFAULT_PRETRAINED,
        help="open_clip pretrained tag, a weights file, or 'none' for random weights (tests, offline trials)",
    )
    add_option(model, "hidden_sizes", type=int_list, default=(512, 128), help="head hidden sizes, e.g. 512,128")
    add_option(model, "dropout", type=float, default=0.1)
    add_option(
        model,
        "prompt_aware",
        flag=True,
        help="the head also sees the prompt: every image of --positives, --negatives and --pool needs its real "
        "prompt in a metadata.jsonl (file_name + prompt or text, as `ganrm sample` writes; sampled negatives get "
        "one); an image without one is an error, or the head could separate the sides by their text alone",
    )
    add_config_arguments(train.add_argument_group("head training (RewardTrainingConfig)"), RewardTrainingConfig)
    add_option(train, "description", help="what the target set is (goes into the model card)")
    add_option(train, "strict", flag=True, help="fail on unreadable images instead of skipping them")
    add_option(train, "device", default=default_device())
    add_option(train, "cache_dir", type=Path, help="embedding cache folder (default: ~/.cache/ganrm/embeddings)")
    train.set_defaults(func=train_command)

    score = subparsers.add_parser(
        "score",
        help="score a folder of images with a reward model",
        description="Score every image of a folder; writes scores.json (file, score, probability; best first) and "
        "a PNG grid of the images sorted by score.",
    )
    score.add_argument("images", type=Path, help="folder of images to score")
    add_option(score, "model", required=True, help="reward model folder or Hugging Face Hub id")
    add_option(score, "out", type=Path, default=Path("scores.json"), help="output JSON file")
    add_option(score, "grid", type=Path, help="output PNG grid (default: beside --out, *_grid.png)")
    add_option(score, "prompt", help="prompt for prompt-aware models (else metadata.jsonl prompts)")
    add_option(score, "batch_size", type=int, default=32)
    add_option(score, "strict", flag=True, help="fail on unreadable images instead of skipping them")
    add_option(score, "device", default=default_device())
    score.set_defaults(func=score_command)

    push = subparsers.add_parser(
        "push",
        help="upload a reward model to the Hugging Face Hub",
        description="Upload a reward model folder (config, weights and a regenerated model card) to the Hub.",
    )
    add_option(push, "model", required=True, type=Path, help="reward model folder")
    add_option(push, "repo_id", required=True, help="Hub repository id, e.g. you/ganrm-my-style")
    add_option(push, "private", flag=True)
    add_option(push, "token", help="Hub token (default: the saved login)")
    push.set_defaults(func=push_command)


def _pools(pool: Path | None, rounds: int, seed: int) -> list[list[Path]] | None:
    """Split the pool folder into one disjoint part per round (shuffled with the seed)."""
    if rounds == 0:
        return None
    if pool is None:
        raise GanrmError("--bootstrap_rounds needs --pool: a folder of further generations to rank in each round")
    files = list_image_files(pool)
    random.Random(seed).shuffle(files)
    return [files[index::rounds] for index in range(rounds)]


def _sample_negatives(args: argparse.Namespace) -> Path:
    """Sample `--negatives_per_prompt` images per prompt from `--pipeline` into OUT/negatives (resumable: images
    already there are kept), with a metadata.jsonl that gives each file's prompt and seed."""
    if not args.pipeline or not args.prompts:
        raise GanrmError("train-rm needs negatives: --negatives DIR, or --pipeline and --prompts to sample them")
    from diffusers import DiffusionPipeline

    from ganrm_diffusers.generation.candidates import SampleSettings, image_file_name, read_prompts_file

    prompts = read_prompts_file(args.prompts)
    settings = SampleSettings(num_candidates=args.negatives_per_prompt, seed=args.seed)
    folder = args.out / "negatives"
    folder.mkdir(parents=True, exist_ok=True)
    pipe = DiffusionPipeline.from_pretrained(args.pipeline).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    extra = {} if args.guidance_scale is None else {"guidance_scale": args.guidance_scale}
    records = []
    for index, prompt in enumerate(tqdm(prompts, desc="sampling negatives", unit="prompt")):
        seeds = settings.seeds(index)
        names = [image_file_name(index, number) for number in range(len(seeds))]
        records += [
            {"file_name": name, "prompt": prompt, "seed": seed} for name, seed in zip(names, seeds, strict=True)
        ]
        if all((folder / name).is_file() for name in names):
            continue
        images = pipe(
            prompt,
            num_images_per_prompt=len(seeds),
            generator=[torch.Generator().manual_seed(seed) for seed in seeds],
            num_inference_steps=args.num_inference_steps,
            **extra,
        ).images
        for name, image in zip(names, images, strict=True):
            save_png_atomic(image, folder / name)
    write_text_atomic(folder / "metadata.jsonl", "".join(json.dumps(record) + "\n" for record in records))
    return folder


def train_command(args: argparse.Namespace) -> int:
    config = config_from_args(RewardTrainingConfig, args)
    pools = _pools(args.pool, config.bootstrap_rounds, config.seed)
    negatives = args.negatives or _sample_negatives(args)
    model = GANRewardModel(
        backbone=args.backbone,
        pretrained=args.pretrained,
        hidden_sizes=args.hidden_sizes,
        dropout=args.dropout,
        prompt_aware=args.prompt_aware,
    ).to(args.device)
    model, report = fit_reward_model(
        args.positives,
        negatives,
        model=model,
        config=config,
        pools=pools,
        cache=EmbeddingCache(args.cache_dir) if args.cache_dir else None,
        strict=args.strict,
        description=args.description or f"images from {args.positives.name}",
    )
    save_training_outputs(model, report, args.out)
    print(f"reward model written to {args.out}")
    for row in report.rounds:
        print(
            f"  round {row['round']}: held-out AUC {row['val_auc']:.3f}, accuracy {row['val_accuracy']:.3f}, "
            f"{row['epochs']} epochs in {row['train_seconds']:.2f} s"
        )
    return 0


def score_command(args: argparse.Namespace) -> int:
    model = GANRewardModel.from_pretrained(args.model, device=args.device)
    folder = load_image_folder(args.images, strict=args.strict)
    prompts = args.prompt if args.prompt is not None else folder.prompts
    scores = model.score(folder.images, prompts, batch_size=args.batch_size).cpu()
    order = scores.argsort(descending=True, stable=True).tolist()
    records = [
        {
            "rank": rank,
            "file": folder.paths[index].relative_to(args.images).as_posix(),
            "score": float(scores[index]),
            "probability": float(torch.sigmoid(scores[index])),
        }
        for rank, index in enumerate(order)
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(records, indent=2))
    grid_path = args.grid or args.out.with_name(f"{args.out.stem}_grid.png")
    score_grid(folder.images, scores, sort=True).save(grid_path)
    print(f"scored {len(records)} images -> {args.out} and {grid_path}")
    if folder.skipped:
        print(f"skipped {len(folder.skipped)} unreadable file(s): {', '.join(str(path) for path, _ in folder.skipped)}")
    return 0


def push_command(args: argparse.Namespace) -> int:
    model = GANRewardModel.from_pretrained(args.model)
    url = model.push_to_hub(args.repo_id, private=args.private or None, token=args.token)
    print(f"pushed {args.model} to {url}")
    return 0
