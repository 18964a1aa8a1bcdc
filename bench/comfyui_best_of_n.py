"""Best-of-N in ComfyUI: GAN-RM Best-of-N Sampler (pruning inside sampling) against the graph users build today,
KSampler on a batch of N -> VAE Decode -> GAN-RM Best-of-N, in the real ComfyUI (in this process), timed side by
side on the same checkpoint, prompts and seeds.

    python bench/comfyui_best_of_n.py                    # the SD1.5 architecture (random weights), 128 px, CPU
    python bench/comfyui_best_of_n.py --size 512 --backbone ViT-H-14   # the full-size setting, where a GPU is

Ratios (wall time of whole graph runs, medians over --repeats, the two graphs alternating):
- pruned_sampler_vs_ksampler_best_of_n: the node at its default schedule (8 -> 2 after 30 % of the steps) against
  KSampler(batch N) + VAE Decode + Best-of-N. Goal <= 0.55.
- unpruned_sampler_vs_ksampler_best_of_n: the node with pruning off against the same graph: the node's own
  overhead (both run the same model evaluations). Goal <= 1.03.
The rows that went through the UNet are counted by a forward hook, for each graph.

The checkpoint is the tests' random-weight SD1.5 (tests/comfyui_support.py builds it once, about 75 s); the reward
model has a random open_clip backbone of --backbone's architecture, so its scoring costs what a real one costs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import comfyui_support  # noqa: E402
from results import Comparison, Figure, add_out_argument, write_results  # noqa: E402

PROMPT = "a watercolor painting of a lighthouse on a cliff at dawn"


def graphs(args: argparse.Namespace, seed: int) -> dict[str, dict]:
    """The graphs compared, by name; each samples args.candidates candidates of one prompt and keeps the best."""
    base = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "7": {"class_type": "GANRMLoadRewardModel", "inputs": {"model_name": "bench"}},
    }
    sampling = {"seed": seed, "steps": args.steps, "cfg": args.cfg, "sampler_name": "euler", "scheduler": "normal"}
    sampling |= {"denoise": 1.0, "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0]}
    size = {"width": args.size, "height": args.size}
    full = base | {
        "4": {"class_type": "EmptyLatentImage", "inputs": size | {"batch_size": args.candidates}},
        "5": {"class_type": "KSampler", "inputs": sampling | {"latent_image": ["4", 0]}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "8": {
            "class_type": "GANRMBestOfN",
            "inputs": {
                "reward_model": ["7", 0],
                "images": ["6", 0],
                "latent": ["5", 0],
                "top_k": 1,
                "group_size": 0,
                "use_threshold": False,
                "threshold": 0.0,
            },
        },
    }

    def node(pruning: str) -> dict:
        settings = sampling | {"latent_image": ["4", 0], "vae": ["1", 2], "reward_model": ["7", 0]}
        settings |= {"num_candidates": args.candidates, "top_k": 1, "pruning": pruning, "checkpoints": "0.3"}
        settings |= {"keep": "2", "fk_lambda": 1.0, "fk_potential": "max"}
        return base | {
            "4": {"class_type": "EmptyLatentImage", "inputs": size | {"batch_size": 1}},
            "8": {"class_type": "GANRMBestOfNSampler", "inputs": settings},
        }

    return {"ksampler_best_of_n": full, "sampler_pruned": node("default"), "sampler_unpruned": node("off")}


def prepare(args: argparse.Namespace, workdir: Path) -> comfyui_support.InProcessComfyUI:
    import torch

    from ganrm_diffusers.reward.model import GANRewardModel

    source = comfyui_support.find_comfyui_tree()
    if source is None:
        raise SystemExit("ComfyUI is not installed: `make comfyui`")
    tree = comfyui_support.prepare_tree(
        source, workdir / "comfyui", {comfyui_support.PACK_NAME: comfyui_support.REPO_ROOT}
    )
    comfyui_support.link_model(
        tree, "checkpoints", args.checkpoint or comfyui_support.ensure_random_sd15_checkpoint(), "sd15.safetensors"
    )
    torch.manual_seed(0)
    reward = GANRewardModel(backbone=args.backbone, pretrained=None)
    reward.save_pretrained(tree / "models" / "reward_models" / "bench")
    comfyui = comfyui_support.InProcessComfyUI(tree).start()
    if not comfyui.load_pack(tree / "custom_nodes" / comfyui_support.PACK_NAME):
        raise SystemExit("the ganrm pack did not load")
    return comfyui


def count_unet_rows(comfyui: comfyui_support.InProcessComfyUI) -> list[int]:
    """A forward hook on every UNet ComfyUI builds from now on (the checkpoint loader builds one)."""
    import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel

    counter = [0]
    original = openaimodel.UNetModel.forward

    def counted(self, x, *args, **kwargs):
        counter[0] += int(x.shape[0])
        return original(self, x, *args, **kwargs)

    openaimodel.UNetModel.forward = counted
    return counter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="an SD1.5 checkpoint (default: the tests' random one)"
    )
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=7.0)
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backbone", default="ViT-B-32", help="the reward model's open_clip architecture")
    parser.add_argument(
        "--skip-unpruned", action="store_true", help="leave out the pruning-off run (and its overhead ratio)"
    )
    add_out_argument(parser, "comfyui_best_of_n")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ganrm-bench-comfyui-") as workdir:
        comfyui = prepare(args, Path(workdir))
        rows = count_unet_rows(comfyui)
        seconds: dict[str, list[float]] = {}
        unet_rows: dict[str, int] = {}
        # Load the checkpoint, the text encodings and the reward model once (ComfyUI keeps them for later prompts).
        warm_up = graphs(argparse.Namespace(**vars(args) | {"steps": 1, "candidates": 1}), seed=0)["sampler_unpruned"]
        if not comfyui.run(warm_up).success:
            raise SystemExit("the warm-up graph failed")
        for repeat in range(args.repeats):
            for name, graph in graphs(args, seed=repeat).items():
                if args.skip_unpruned and name == "sampler_unpruned":
                    continue
                before, start = rows[0], time.perf_counter()
                run = comfyui.run(graph)
                elapsed = time.perf_counter() - start
                if not run.success:
                    raise SystemExit(f"{name} failed: {run.error}")
                seconds.setdefault(name, []).append(elapsed)
                unet_rows[name] = rows[0] - before
                print(f"{name} (repeat {repeat}): {elapsed:.2f} s, {rows[0] - before} UNet rows", flush=True)

    median = {name: statistics.median(values) for name, values in seconds.items()}
    settings = {key: value for key, value in vars(args).items() if key != "out"}
    settings |= {"checkpoint": str(args.checkpoint or "random SD1.5"), "device": "cpu", "statistic": "median"}
    reference = "KSampler(batch N) -> VAE Decode -> GAN-RM Best-of-N"
    comparisons = [
        Comparison(
            "pruned_sampler_vs_ksampler_best_of_n",
            "GAN-RM Best-of-N Sampler, default pruning (8 -> 2 at 30 %)",
            reference,
            median["sampler_pruned"],
            median["ksampler_best_of_n"],
            0.55,
            settings,
        ),
    ]
    if not args.skip_unpruned:
        comparisons.append(
            Comparison(
                "unpruned_sampler_vs_ksampler_best_of_n",
                "GAN-RM Best-of-N Sampler, pruning off",
                reference,
                median["sampler_unpruned"],
                median["ksampler_best_of_n"],
                1.03,
                settings,
            )
        )
    figures = [
        Figure(f"unet_rows_{name}", count, "rows", f"latent rows through the UNet in one run of {name}")
        for name, count in unet_rows.items()
    ]
    for figure in figures:
        print(f"FIGURE {figure.name} {figure.value} {figure.unit}")
    write_results(args.out, "comfyui_best_of_n", settings, comparisons, figures)


if __name__ == "__main__":
    main()
