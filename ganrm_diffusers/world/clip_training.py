"""The world's CLIP: a tiny open_clip model trained contrastively on captions that name the digit and shape attributes
of its glyph (slant, height, horizontal position), never its stroke weight: like a real CLIP it sees images broadly,
and like a real CLIP it was never told the user's target style, which GAN-RM must find from the target images.

It is saved in open_clip's own local-dir format (`open_clip_config.json` + `open_clip_model.safetensors`), so
`open_clip.create_model_and_transforms("local-dir:<world>/clip")` loads it offline, as a user's ViT-H-14 loads.
Its images go through `ClipBackbone.preprocess`, the very transform the reward model applies at scoring time.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ganrm_diffusers.reward.backbone import ClipBackbone

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"

# Attribute words by tertile of real digits (the build picks the bin edges). None of them is about ink or stroke
# weight: the style is the one thing the captions must not carry.
SLANT_WORDS = ("slanted left", "upright", "slanted right")
HEIGHT_WORDS = ("short", "medium height", "tall")
POSITION_WORDS = ("left of centre", "centred", "right of centre")
CAPTION_TEMPLATE = "a handwritten digit {digit}, {slant}, {height}, {position}"


def caption(digit: int, slant_bin: int, height_bin: int, position_bin: int) -> str:
    return CAPTION_TEMPLATE.format(
        digit=digit,
        slant=SLANT_WORDS[slant_bin],
        height=HEIGHT_WORDS[height_bin],
        position=POSITION_WORDS[position_bin],
    )


def clip_config(image_size: int, embed_dim: int, vision_width: int, vision_layers: int, patch_size: int) -> dict:
    """open_clip's JSON for the world's CLIP: a small ViT and a small text transformer over the real BPE vocabulary."""
    return {
        "model_cfg": {
            "embed_dim": embed_dim,
            "vision_cfg": {
                "image_size": image_size,
                "layers": vision_layers,
                "width": vision_width,
                "patch_size": patch_size,
                "head_width": 32,
            },
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
        },
        "preprocess_cfg": {
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }


@contextmanager
def _quiet_open_clip() -> Iterator[None]:
    root = logging.getLogger()
    previous = root.level
    root.setLevel(logging.ERROR)  # open_clip logs to the root logger
    try:
        yield
    finally:
        root.setLevel(previous)


def contrastive_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, caption_ids: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """CLIP's symmetric loss over the distinct captions of the world: many images share a caption, so the
    text-to-image side treats every image with that caption as a positive (soft targets)."""
    logits = logit_scale * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T
    image_to_text = F.cross_entropy(logits, caption_ids)
    present = torch.unique(caption_ids)
    targets = (caption_ids[None, :] == present[:, None]).float()
    targets = targets / targets.sum(dim=1, keepdim=True)
    text_to_image = -(targets * logits.T[present].log_softmax(dim=1)).sum(dim=1).mean()
    return (image_to_text + text_to_image) / 2


def train_clip(
    folder: str | Path,
    config: dict,
    pixels: torch.Tensor,
    captions: Sequence[str],
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    generator: torch.Generator,
) -> torch.nn.Module:
    """Train the CLIP on `pixels` (NCHW in [0, 1]) and their `captions`; write it into `folder` (open_clip local-dir)
    and return it, frozen."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    # A fresh model has no weights yet: open_clip's factory warns about exactly that, which is no news here.
    with _quiet_open_clip():
        model = open_clip.create_model(f"local-dir:{folder}", load_weights=False)
    # ClipBackbone freezes the model it wraps; here it only lends its preprocessing, so unfreeze for training.
    preprocess = ClipBackbone(model, "world-clip", None, config["model_cfg"], keep_text=True).preprocess
    model.train().requires_grad_(True)

    distinct = sorted(set(captions))
    caption_ids = torch.tensor([distinct.index(text) for text in captions])
    tokens = open_clip.get_tokenizer(f"local-dir:{folder}")(distinct)

    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps, pct_start=0.1)
    progress = tqdm(range(steps), desc="world: CLIP", leave=False)
    for _ in progress:
        batch = torch.randint(0, len(pixels), (batch_size,), generator=generator)
        loss = contrastive_loss(
            model.encode_image(preprocess(pixels[batch])),
            model.encode_text(tokens),
            caption_ids[batch],
            model.logit_scale.exp(),
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)  # CLIP's cap: a temperature of at least 1/100
        progress.set_postfix(loss=f"{loss.item():.3f}")

    weights = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(weights, folder / WEIGHTS_FILE)
    return model.eval().requires_grad_(False)


def load_clip(folder: str | Path) -> torch.nn.Module:
    """The CLIP `train_clip` wrote into `folder`, frozen: the same weights it returned."""
    with _quiet_open_clip():
        model = open_clip.create_model(f"local-dir:{folder}")
    return model.eval().requires_grad_(False)


def text_encoder_from_clip(clip: torch.nn.Module, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """The CLIP's text tower as a transformers `CLIPTextModel`, the form Stable Diffusion's text encoder takes (SD 1.x
    uses OpenAI CLIP's text tower, SD 2.x OpenCLIP's). Same weights, same hidden states."""
    text_encoder = CLIPTextModel(_text_config(clip, tokenizer))
    text_encoder.load_state_dict(_text_tower_state(clip), strict=True)
    return text_encoder.eval().requires_grad_(False)


def text_encoder_with_projection_from_clip(
    clip: torch.nn.Module, tokenizer: CLIPTokenizer
) -> CLIPTextModelWithProjection:
    """The CLIP's text tower with its text projection, as a transformers `CLIPTextModelWithProjection`: the form of
    Stable Diffusion 3's two CLIP encoders, whose projected embedding (`text_embeds`, open_clip's `encode_text`)
    conditions the transformer beside the hidden states."""
    state = {f"text_model.{name}": tensor for name, tensor in _text_tower_state(clip).items()}
    # open_clip multiplies by a (width, embed_dim) matrix; transformers keeps a bias-free Linear, its transpose.
    state["text_projection.weight"] = clip.state_dict()["text_projection"].T.clone()
    text_encoder = CLIPTextModelWithProjection(_text_config(clip, tokenizer))
    text_encoder.load_state_dict(state, strict=True)
    return text_encoder.eval().requires_grad_(False)


def _text_config(clip: torch.nn.Module, tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    blocks = clip.transformer.resblocks
    return CLIPTextConfig(
        hidden_size=clip.transformer.width,
        intermediate_size=blocks[0].mlp.c_fc.out_features,
        num_hidden_layers=len(blocks),
        num_attention_heads=blocks[0].attn.num_heads,
        vocab_size=len(tokenizer),
        max_position_embeddings=clip.positional_embedding.shape[0],
        hidden_act="gelu",  # open_clip's default activation (not quick_gelu)
        projection_dim=clip.text_projection.shape[1],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _text_tower_state(clip: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The text tower's weights under transformers' CLIPTextModel names (copies: the CLIP stays untouched)."""
    state = clip.state_dict()
    renamed = {
        "embeddings.token_embedding.weight": state["token_embedding.weight"],
        "embeddings.position_embedding.weight": state["positional_embedding"],
        "final_layer_norm.weight": state["ln_final.weight"],
        "final_layer_norm.bias": state["ln_final.bias"],
    }
    for index in range(len(clip.transformer.resblocks)):
        block, layer = f"transformer.resblocks.{index}.", f"encoder.layers.{index}."
        # open_clip keeps q, k and v in one packed projection; transformers keeps three.
        for kind in ("weight", "bias"):
            for name, part in zip("qkv", state[f"{block}attn.in_proj_{kind}"].chunk(3), strict=True):
                renamed[f"{layer}self_attn.{name}_proj.{kind}"] = part
        for ours, theirs in (
            ("attn.out_proj", "self_attn.out_proj"),
            ("ln_1", "layer_norm1"),
            ("ln_2", "layer_norm2"),
            ("mlp.c_fc", "mlp.fc1"),
            ("mlp.c_proj", "mlp.fc2"),
        ):
            for kind in ("weight", "bias"):
                renamed[f"{layer}{theirs}.{kind}"] = state[f"{block}{ours}.{kind}"]
    return {name: tensor.clone() for name, tensor in renamed.items()}
