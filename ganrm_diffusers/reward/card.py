"""The model card written beside every reward checkpoint (and uploaded with it by push_to_hub)."""

from __future__ import annotations

import json
from collections.abc import Mapping

from huggingface_hub import ModelCard, ModelCardData

PAPER = "https://arxiv.org/abs/2506.13846"


def _metrics_table(metrics: dict) -> str:
    rows = [f"| {name} | {value:.4g} |" for name, value in metrics.items() if isinstance(value, (int, float))]
    return "\n".join(["| metric | value |", "| --- | --- |", *rows]) if rows else "No metrics were recorded."


def make_model_card(config: Mapping, repo_id: str | None = None) -> ModelCard:
    """A Hub model card: what the reward prefers, its backbone and metrics, and how to use it."""
    training = dict(config.training or {})
    metrics = dict(training.get("metrics") or {})
    name = repo_id or "path/to/this/folder"
    card_data = ModelCardData(
        library_name="ganrm",
        license="apache-2.0",
        tags=["ganrm", "reward-model", "gan-rm", "diffusers", "comfyui", "open_clip", "image-scoring"],
        pipeline_tag="image-classification",
    )
    target = training.get("description") or "a folder of target images"
    positives = training.get("positives", {})
    negatives = training.get("negatives", {})
    backbone_note = (
        "The backbone weights are stored in `model.safetensors` with the head, so the checkpoint loads offline."
        if config.backbone_in_checkpoint
        else f"The backbone weights are fetched by open_clip from their name (`{config.backbone}`, "
        f"`{config.pretrained}`) and are not stored here."
    )
    body = f"""
# GAN-RM reward model

A [GAN-RM]({PAPER}) reward model: a frozen open_clip image encoder with a small MLP head trained as a
discriminator between **target images** ({target}) and ordinary generations of the base model. Its reward is
the head's logit: higher means more like the target set. No preference labels were used.

## Model
- Backbone: `{config.backbone}` (pretrained: `{config.pretrained}`), embedding size {config.embed_dim}. {backbone_note}
- Head: MLP with hidden sizes {list(config.hidden_sizes)}, dropout {config.dropout}; prompt-aware: {config.prompt_aware}.
- Trained on {positives.get("count", "?")} target images and {negatives.get("count", "?")} generated images,
  {training.get("rounds", 0)} bootstrapping round(s).

## Metrics (held-out split)
{_metrics_table(metrics)}

## Use it from Python (diffusers)
```python
from ganrm_diffusers import GANRewardModel, RewardGuidedPipeline

reward_model = GANRewardModel.from_pretrained("{name}")
scores = reward_model.score(images)            # PIL images or tensors; one logit per image
pipe = RewardGuidedPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5", reward_model=reward_model)
best = pipe("a photo of a cat", num_candidates=8, top_k=1).images[0]
```

## Use it from ComfyUI
Put this folder in `ComfyUI/models/reward_models/` (or give its Hub id), load it with **GAN-RM Loader**, and
wire KSampler (batch N) -> VAE Decode -> **GAN-RM Best-of-N** -> Save Image.

## Training summary
```json
{json.dumps(training, indent=2, sort_keys=True, default=str)}
```
"""
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")
