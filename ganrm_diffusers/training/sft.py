"""SFT on the best of N: fine-tune a LoRA with the plain denoising loss on the reward model's favourite candidates.

    accelerate launch training/train_sft.py --pretrained_model PIPELINE --reward_model RM --prompts prompts.txt \
        --output_dir out/sft            # samples N candidates per prompt now and keeps the top_k
    accelerate launch training/train_sft.py --pretrained_model PIPELINE --candidates DIR --output_dir out/sft
                                        # DIR from `ganrm sample` (its recorded scores rank the candidates)

Writes out/sft/pytorch_lora_weights.safetensors (diffusers: pipe.load_lora_weights("out/sft")), the same LoRA as
pytorch_lora_weights_comfyui.safetensors (kohya keys for ComfyUI's LoraLoader), metrics.jsonl/json, curves.png.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from ganrm_diffusers.training.config import FinetuneConfig, option, parse_config
from ganrm_diffusers.training.examples import build_examples, config_prompts
from ganrm_diffusers.training.loop import Batch, train_on_examples
from ganrm_diffusers.training.run import FinetuneRun, finish_run, setup_run


@dataclass
class SFTConfig(FinetuneConfig):
    """Supervised fine-tuning on the best of N candidates per prompt under the GAN-RM."""

    candidates: str | None = option(None, "a `ganrm sample` folder to train on (default: sample from --prompts now)")
    num_candidates: int = option(8, "candidates sampled per prompt when sampling now")
    top_k: int = option(1, "best candidates per prompt kept as training examples")

    @property
    def method(self) -> str:
        return "sft"


def sft_loss(run: FinetuneRun, batch: Batch):
    """The denoising loss on the chosen images: MSE between the model's prediction and its target (the noise or
    velocity of a UNet's scheduler; flow matching's velocity)."""
    noisy, target = run.objective.noisy_and_target(batch.winners, batch.noise, batch.timesteps)
    prediction = run.objective.predict(run.denoiser, noisy, batch.timesteps, batch.texts)
    return F.mse_loss(prediction, target.float()), {}


CURVES = (("denoising loss", ("loss",)), ("reward of fixed samples", ("eval_reward",)))


def train(config: SFTConfig, run: FinetuneRun | None = None) -> dict:
    """Run SFT; returns the run's summary (also in output_dir/metrics.json)."""
    run = run or setup_run(config)
    examples = build_examples(
        run, candidates=config.candidates, num_candidates=config.num_candidates, top_k=config.top_k, pairs=False
    )
    eval_prompts = config_prompts(config) if config.prompts and run.reward_model is not None else None
    train_on_examples(run, examples, sft_loss, eval_prompts=eval_prompts)
    return finish_run(
        run, CURVES, {"examples": len(examples), "mean_chosen_score": float(examples.winner_scores.mean())}
    )


def main(argv: list[str] | None = None) -> None:
    train(parse_config(SFTConfig, argv))


if __name__ == "__main__":
    main()
