"""GANRewardModel.score against open_clip's raw encode_image on the same batch, side by side in one run.

    python bench/scoring.py [--backbone ViT-B-32] [--batch 16] [--size 224] [--device cpu] [--repeats 10]

Weights are random (throughput does not depend on their values). `score` gets the images as a float tensor in
[0, 1] (what diffusers and ComfyUI hand over) and does everything itself: preprocessing on the device, the encoder
and the head; `encode_image` gets an already normalised tensor. Also times head training on 500 + 500 cached
embeddings. Prints `RATIO score_vs_encode_image <score time / encode time> (goal <= 1.05: ...)` and writes
bench-out/scoring.json (`--out`; the format is in bench/results.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from results import Comparison, Figure, add_out_argument, device_name, write_results  # noqa: E402

from ganrm_diffusers.reward.model import GANRewardModel  # noqa: E402
from ganrm_diffusers.reward.training import RewardDataset, RewardTrainingConfig, reset_head, train_head  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_pair(model: GANRewardModel, images: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Median seconds of score(images) and of encode_image(normalised images), interleaved run by run."""
    device = images.device
    normalised = model.encoder.preprocess(images)
    score_times, encode_times = [], []
    for _ in range(repeats + 2):  # two warm-up rounds are dropped
        _sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            model.encoder.clip.encode_image(normalised)
        _sync(device)
        encode_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        model.score(images, batch_size=len(images))
        _sync(device)
        score_times.append(time.perf_counter() - start)
    return statistics.median(score_times[2:]), statistics.median(encode_times[2:])


def time_head_training(model: GANRewardModel, count: int = 500, seed: int = 0) -> tuple[float, dict]:
    """Seconds to train the model's head on `count` + `count` cached embeddings (two overlapping clouds)."""
    embed_dim = model.config.embed_dim
    generator = torch.Generator().manual_seed(seed)
    shift = torch.randn(embed_dim, generator=generator) * 0.05
    positives = torch.nn.functional.normalize(torch.randn(count, embed_dim, generator=generator) + shift, dim=-1)
    negatives = torch.nn.functional.normalize(torch.randn(count, embed_dim, generator=generator) - shift, dim=-1)
    dataset = RewardDataset.from_sides(positives, negatives)
    dataset.features = dataset.features.to(model.device)
    dataset.labels, dataset.hard = dataset.labels.to(model.device), dataset.hard.to(model.device)
    reset_head(model, seed)
    start = time.perf_counter()
    result = train_head(model, dataset, RewardTrainingConfig())
    return time.perf_counter() - start, result.metrics


GOAL = 1.05  # score / encode_image


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="ViT-B-32")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--fp16", action="store_true", help="half precision (GPU)")
    parser.add_argument("--threads", type=int, default=2)
    add_out_argument(parser, "scoring")
    return parser.parse_args()


def run_settings(args: argparse.Namespace) -> dict:
    return {
        "backbone": f"{args.backbone} (random weights)",
        "batch": args.batch,
        "size": args.size,
        "device": device_name(args.device),
        "dtype": "fp16" if args.fp16 else "fp32",
        "threads": args.threads,
        "repeats": args.repeats,
    }


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    settings = run_settings(args)

    model = GANRewardModel(backbone=args.backbone, pretrained=None).to(device)
    if args.fp16:
        model.to(torch.float16)
    images = torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)).to(device)
    print(", ".join(f"{key} {value}" for key, value in settings.items()))

    seconds, metrics = time_head_training(model)
    head = f"head training on 500 + 500 cached embeddings of size {model.config.embed_dim}"
    print(f"{head}: {seconds:.2f} s ({metrics['epochs']} epochs, held-out AUC {metrics['val_auc']:.3f})")

    score_seconds, encode_seconds = time_pair(model, images, args.repeats)
    print(f"encode_image (preprocessed input): {encode_seconds * 1000:.1f} ms")
    print(f"GANRewardModel.score (float input, preprocessing + head included): {score_seconds * 1000:.1f} ms")
    comparison = Comparison(
        name="score_vs_encode_image",
        ours=f"GANRewardModel.score on float images in [0, 1] ({args.backbone}, preprocessing and head included)",
        reference="open_clip encode_image on preprocessed images",
        ours_seconds=score_seconds,
        reference_seconds=encode_seconds,
        goal_max=GOAL,
        settings={**settings, "statistic": f"median of {args.repeats} interleaved runs (2 warm-up runs dropped)"},
    )
    figure = Figure("head_training_seconds", seconds, "s", f"{head} ({metrics['epochs']} epochs)")
    write_results(args.out, "scoring", settings, [comparison], [figure])


if __name__ == "__main__":
    main()
