"""Best-of-N overhead: RewardGuidedPipeline with N candidates against the base pipeline with num_images_per_prompt=N
and the same seeds, side by side in one run (interleaved, medians over repeats, warm-up dropped).

    python bench/best_of_n.py                      # SD-shaped random pipeline, small (CPU), tiny CLIP reward model
    python bench/best_of_n.py --pipeline DIR       # any saved SD pipeline, e.g. the embedded world's
    python bench/best_of_n.py --sd15 --fp16        # full SD1.5 architecture, random weights, 512 px, ViT-H-14 (GPU)
    python bench/best_of_n.py --family sd3|flux    # a small SD3- / FLUX.1-shaped flow-matching pipeline (CPU)
    python bench/best_of_n.py --family flux --full --bf16  # FLUX.1-dev's transformer and VAE at 1024 px (GPU)

With --full the denoiser and VAE have the real architecture (SD3-medium's MMDiT, FLUX.1-dev's 19 + 38 blocks) at
1024 px with random weights; the text encoders stay small (both runs encode the prompt once, so they cancel out).

Both runs denoise the same N latents from the same seeds; the reward-guided run also scores the N decoded images
on the device and keeps the best. Runs alternate (base, guided, base, ...); each time is the fastest of the timed
rounds (as timeit does: other processes only ever add time), with the median beside it. Prints both times, the
scoring time alone (the reward model on the N decoded images), and `RATIO best_of_n_overhead <guided time / base
time> (goal <= 1.03: ...)`; writes bench-out/best_of_n.json (`--out`; the format is in bench/results.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from results import Comparison, Figure, add_out_argument, device_name, write_results  # noqa: E402
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

from ganrm_diffusers.generation.pipeline import reward_guided_class_for  # noqa: E402
from ganrm_diffusers.reward.model import GANRewardModel  # noqa: E402
from ganrm_diffusers.world.tokenizer import build_clip_tokenizer  # noqa: E402

# Stable Diffusion 1.5's architecture, and the same shape scaled down for a CPU.
SD15 = {"unet": (320, 640, 1280, 1280), "vae": (128, 256, 512, 512), "text": (768, 12, 12, 3072), "size": 512}
SMALL = {"unet": (32, 64), "vae": (32, 64), "text": (32, 2, 4, 37), "size": 32}
# A small open_clip architecture for the CPU reward model (ViT-H-14 is the GPU one).
SMALL_CLIP = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 128, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def random_sd_pipeline(shape: dict) -> StableDiffusionPipeline:
    """An SD-1.x-shaped pipeline with random weights (speed does not depend on the weights' values)."""
    tokenizer = build_clip_tokenizer()
    width, layers, heads, intermediate = shape["text"]
    depth = len(shape["unet"])
    unet = UNet2DConditionModel(
        sample_size=shape["size"] // 2 ** (len(shape["vae"]) - 1),
        block_out_channels=shape["unet"],
        layers_per_block=2 if depth == 4 else 1,
        down_block_types=("CrossAttnDownBlock2D",) * (depth - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (depth - 1),
        cross_attention_dim=width,
        attention_head_dim=8,
    )
    vae_depth = len(shape["vae"])
    vae = AutoencoderKL(
        block_out_channels=shape["vae"],
        down_block_types=("DownEncoderBlock2D",) * vae_depth,
        up_block_types=("UpDecoderBlock2D",) * vae_depth,
        layers_per_block=2 if vae_depth == 4 else 1,
        latent_channels=4,
        sample_size=shape["size"],
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=intermediate,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# Flow-matching transformers: the real architectures (--full) and small ones of the same shape for a CPU.
SD3_FULL = {"layers": 24, "heads": 24, "head_dim": 64, "patch": 2, "channels": 16, "caption": 1536, "size": 1024}
SD3_SMALL = {"layers": 2, "heads": 4, "head_dim": 16, "patch": 1, "channels": 4, "caption": 64, "size": 32}
FLUX_FULL = {
    "double": 19,
    "single": 38,
    "heads": 24,
    "head_dim": 128,
    "channels": 16,
    "rope": (16, 56, 56),
    "size": 1024,
}
FLUX_SMALL = {"double": 1, "single": 2, "heads": 2, "head_dim": 16, "channels": 1, "rope": (4, 4, 8), "size": 32}
TEXT_WIDTH = 64  # the small text encoders' width (also T5's d_model here)


def _flow_vae(channels: int, full: bool) -> AutoencoderKL:
    blocks = (128, 256, 512, 512) if full else (32, 64)
    return AutoencoderKL(
        block_out_channels=blocks,
        down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks),
        layers_per_block=2 if full else 1,
        latent_channels=channels,
        shift_factor=0.0609,
        scaling_factor=1.5035,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _clip_text(projection: bool) -> CLIPTextModel:
    config = CLIPTextConfig(
        hidden_size=TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=49408,
        max_position_embeddings=77,
        projection_dim=TEXT_WIDTH,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def random_sd3_pipeline(shape: dict) -> StableDiffusion3Pipeline:
    """An SD3-shaped pipeline (MMDiT, no T5) with random weights."""
    latent = shape["size"] // (8 if shape["size"] > 64 else 2)
    transformer = SD3Transformer2DModel(
        sample_size=latent,
        patch_size=shape["patch"],
        in_channels=shape["channels"],
        out_channels=shape["channels"],
        num_layers=shape["layers"],
        attention_head_dim=shape["head_dim"],
        num_attention_heads=shape["heads"],
        joint_attention_dim=2 * TEXT_WIDTH,
        caption_projection_dim=shape["caption"],
        pooled_projection_dim=2 * TEXT_WIDTH,
        pos_embed_max_size=max(96, latent),
    )
    tokenizer = build_clip_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_flow_vae(shape["channels"], full=shape["size"] > 64),
        text_encoder=_clip_text(True),
        tokenizer=tokenizer,
        text_encoder_2=_clip_text(True),
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )


def random_flux_pipeline(shape: dict) -> FluxPipeline:
    """A FLUX.1-dev-shaped pipeline (double and single stream blocks, distilled guidance) with random weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "</s>", "<unk>", "a", "photo", "of", "cat"]
    t5_tokens = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    t5_tokens.pre_tokenizer = pre_tokenizers.Whitespace()
    t5_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=t5_tokens, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=64
    )
    t5 = T5EncoderModel(
        T5Config(vocab_size=len(words), d_model=TEXT_WIDTH, d_ff=128, d_kv=16, num_layers=2, num_heads=4)
    ).eval()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * shape["channels"],
        num_layers=shape["double"],
        num_single_layers=shape["single"],
        attention_head_dim=shape["head_dim"],
        num_attention_heads=shape["heads"],
        joint_attention_dim=TEXT_WIDTH,
        pooled_projection_dim=TEXT_WIDTH,
        guidance_embeds=True,
        axes_dims_rope=shape["rope"],
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_flow_vae(shape["channels"], full=shape["size"] > 64),
        text_encoder=_clip_text(False),
        tokenizer=build_clip_tokenizer(),
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )


def small_reward_model(folder: Path) -> GANRewardModel:
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": SMALL_CLIP, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}})
    )
    return GANRewardModel(backbone=f"local-dir:{folder}", pretrained=None, hidden_sizes=(128,))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(device: torch.device, function) -> tuple[float, object]:
    _sync(device)
    start = time.perf_counter()
    result = function()
    _sync(device)
    return time.perf_counter() - start, result


GOAL = 1.03  # reward-guided pipeline / base pipeline


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", help="a saved SD 1.x/2.x pipeline folder (default: a random SD-shaped one)")
    parser.add_argument("--clip", help="open_clip local-dir of the reward model's backbone (default: a small one)")
    parser.add_argument("--sd15", action="store_true", help="full SD1.5 architecture at 512 px and ViT-H-14")
    parser.add_argument("--family", choices=("sd", "sd3", "flux"), default="sd", help="the model family")
    parser.add_argument("--full", action="store_true", help="with --family sd3|flux: the real architecture, 1024 px")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 (GPU)")
    parser.add_argument("--num-candidates", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance-scale", type=float, help="default: the family's (7.5 SD, 7.0 SD3, 3.5 FLUX)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (after one warm-up round)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--fp16", action="store_true", help="half precision (GPU)")
    parser.add_argument("--threads", type=int, default=2)
    add_out_argument(parser, "best_of_n")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.family != "sd" and args.out == parser.get_default("out"):
        args.out = args.out.with_name(f"best_of_n_{args.family}.json")
    if args.guidance_scale is None:
        args.guidance_scale = {"sd": 7.5, "sd3": 7.0, "flux": 3.5}[args.family]
    return args


def build_models(args: argparse.Namespace, scratch: Path) -> tuple[DiffusionPipeline, GANRewardModel, str]:
    """The base pipeline, the reward model and a label saying what they are."""
    if args.family != "sd":
        full = args.full
        build, shape = {
            "sd3": (random_sd3_pipeline, SD3_FULL if full else SD3_SMALL),
            "flux": (random_flux_pipeline, FLUX_FULL if full else FLUX_SMALL),
        }[args.family]
        label = f"{args.family} {'full architecture' if full else 'small'} {shape['size']} px"
        reward_model = GANRewardModel(backbone="ViT-H-14", pretrained=None) if full else small_reward_model(scratch)
        return build(shape), reward_model, label
    if args.sd15:
        return random_sd_pipeline(SD15), GANRewardModel(backbone="ViT-H-14", pretrained=None), "SD1.5 512 px + ViT-H-14"
    base = StableDiffusionPipeline.from_pretrained(args.pipeline) if args.pipeline else random_sd_pipeline(SMALL)
    reward_model = (
        GANRewardModel(backbone=f"local-dir:{args.clip}", pretrained=None) if args.clip else small_reward_model(scratch)
    )
    return base, reward_model, args.pipeline or "small SD-shaped pipeline 32 px + small CLIP"


def run_settings(args: argparse.Namespace, label: str, dtype: torch.dtype) -> dict:
    return {
        "models": label,
        "num_candidates": args.num_candidates,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "device": device_name(args.device),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": args.threads,
        "repeats": args.repeats,
    }


@dataclass
class Timings:
    base: list[float]  # seconds of each timed round
    guided: list[float]
    scoring: list[float]
    same_image: bool  # the selected image equals the base pipeline's image of its seed


def time_rounds(base, guided, reward_model: GANRewardModel, args: argparse.Namespace) -> Timings:
    """Base and reward-guided runs alternating (`--repeats` timed rounds after a dropped warm-up round), then the
    reward model alone on the base run's images."""
    device, count = torch.device(args.device), args.num_candidates
    prompt, seeds = "a photo of a cat", list(range(1000, 1000 + count))
    settings = {"num_inference_steps": args.steps, "guidance_scale": args.guidance_scale, "output_type": "pt"}
    if args.family != "sd":
        size = (SD3_FULL if args.family == "sd3" else FLUX_FULL)["size"] if args.full else 32
        settings.update(height=size, width=size)

    def run_base():
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        return base(prompt, num_images_per_prompt=count, generator=generators, **settings).images

    def run_guided():
        return guided(prompt, num_candidates=count, seeds=seeds, **settings)

    base_times, guided_times = [], []
    for _ in range(args.repeats + 1):
        base_time, base_images = _timed(device, run_base)
        guided_time, output = _timed(device, run_guided)
        base_times.append(base_time)
        guided_times.append(guided_time)
    best = seeds.index(output.seeds[0])
    same = torch.allclose(
        output.images[0].float(), base_images[best].float(), atol=1e-2 if args.fp16 or args.bf16 else 1e-4
    )
    score_times = [
        _timed(device, lambda: reward_model.score(base_images, batch_size=count))[0] for _ in range(args.repeats + 1)
    ]
    return Timings(base_times[1:], guided_times[1:], score_times[1:], bool(same))


def report(timings: Timings, args: argparse.Namespace, label: str, dtype: torch.dtype) -> None:
    """Print the times and write the results file."""
    count = args.num_candidates
    base_time, guided_time, score_time = min(timings.base), min(timings.guided), min(timings.scoring)
    print(f"{label}: {count} candidates, {args.steps} steps, guidance {args.guidance_scale}, {args.device} {dtype}")
    print(
        f"base pipeline, num_images_per_prompt={count}: {base_time:.3f} s "
        f"(median {statistics.median(timings.base):.3f} s)"
    )
    print(
        f"{args.family} reward-guided pipeline, num_candidates={count}:  {guided_time:.3f} s "
        f"(median {statistics.median(timings.guided):.3f} s)"
    )
    print(f"selected image equals the base pipeline's image of its seed: {timings.same_image}")
    print(f"scoring alone ({count} images): {score_time * 1000:.1f} ms ({score_time / base_time:.2%} of the base run)")
    run = run_settings(args, label, dtype)
    comparison = Comparison(
        name="best_of_n_overhead" if args.family == "sd" else f"best_of_n_overhead_{args.family}",
        ours=f"{args.family} reward-guided pipeline, num_candidates={count} (scoring and selection included)",
        reference=f"the base pipeline, num_images_per_prompt={count}, same seeds",
        ours_seconds=guided_time,
        reference_seconds=base_time,
        goal_max=GOAL,
        settings={**run, "statistic": f"fastest of {args.repeats} interleaved rounds (1 warm-up round dropped)"},
    )
    figures = [
        Figure("scoring_share", score_time / base_time, "fraction", f"scoring alone ({count} images) / the base run"),
        Figure(
            "selected_equals_base", timings.same_image, "", "the selected image equals the base pipeline's of its seed"
        ),
    ]
    bench = "best_of_n" if args.family == "sd" else f"best_of_n_{args.family}"
    write_results(args.out, bench, run, [comparison], figures)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else torch.float32

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as scratch:
        base, reward_model, label = build_models(args, Path(scratch))
    base.to(device, dtype)
    base.set_progress_bar_config(disable=True)
    family = reward_guided_class_for({"_class_name": type(base).__name__})
    guided = family.from_pipe(base, reward_model=reward_model.to(device, dtype))
    guided.set_progress_bar_config(disable=True)
    report(time_rounds(base, guided, reward_model, args), args, label, dtype)


if __name__ == "__main__":
    main()
