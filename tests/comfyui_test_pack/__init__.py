"""A ComfyUI node pack for tests only: tiny random-weight models built with ComfyUI's own model classes.

ComfyUI's loaders recognise checkpoints by the real architectures' sizes, so a model small enough for a CPU test
cannot come through CheckpointLoaderSimple. This node builds one in memory instead: an SD1.5-shaped UNet
(comfy.supported_models.SD15 with 32 channels) or a FLUX-shaped transformer (comfy.supported_models.Flux, hidden
size 64, one double and one single block, distilled guidance), each with a random TAESD as its VAE and fixed random
conditionings, so graphs of core nodes (KSampler, VAE Decode, LatentFromBatch) and ours run on them unchanged.

`ROWS_SEEN[family]` counts the latent rows that went through each family's diffusion model (a forward hook),
`CALLS_SEEN[family]` lists the rows of each call.
"""

from __future__ import annotations

import comfy.model_management as model_management
import comfy.model_patcher
import comfy.sd
import comfy.supported_models
import comfy.taesd.taesd
import torch
from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

ROWS_SEEN: dict[str, int] = {}
CALLS_SEEN: dict[str, list[int]] = {}  # the rows of each call

SD15_UNET = {
    "use_checkpoint": False,
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 2],
    "transformer_depth": [1, 1],
    "transformer_depth_middle": 1,
    "transformer_depth_output": [1, 1, 1, 1],
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "use_linear_in_transformer": False,
    "context_dim": 32,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
FLUX_DIT = {
    "image_model": "flux",
    "in_channels": 16,
    "out_channels": 16,
    "patch_size": 2,
    "vec_in_dim": 32,
    "context_in_dim": 32,
    "hidden_size": 64,
    "mlp_ratio": 4.0,
    "num_heads": 2,
    "depth": 1,
    "depth_single_blocks": 1,
    "axes_dim": [8, 12, 12],
    "theta": 10000,
    "qkv_bias": True,
    "guidance_embed": True,
}


def _initialise(module: torch.nn.Module, seed: int) -> None:
    """ComfyUI's layers skip weight initialisation (weights come from files): give them random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if parameter.ndim >= 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / parameter[0].numel() ** 0.5)
            elif name.endswith("weight") or name.endswith("scale"):
                parameter.fill_(1.0)
            else:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))


def build(family: str, seed: int, patch_strength: float = 0.0) -> tuple:
    """(MODEL, VAE, positive, negative) of a tiny random model of `family`; with `patch_strength`, the MODEL
    carries a weight patch (a LoRA-like "diff" on one layer), which ComfyUI applies when it loads the model."""
    if family == "sd15":
        config = comfy.supported_models.SD15(dict(SD15_UNET))
        config.unet_config.update({"num_heads": 2, "num_head_channels": -1})
        latent_channels, context, extras = 4, 32, {}
    else:
        config = comfy.supported_models.Flux(dict(FLUX_DIT))
        latent_channels, context = 16, 32
        extras = {
            "pooled_output": torch.randn(1, 32, generator=torch.Generator().manual_seed(seed + 7)),
            "guidance": 3.5,
        }
    base = config.get_model({})
    _initialise(base, seed)
    base.diffusion_model.register_forward_pre_hook(_row_counter(family))
    model = comfy.model_patcher.ModelPatcher(
        base, load_device=model_management.get_torch_device(), offload_device=model_management.unet_offload_device()
    )
    if patch_strength:
        key, weight = next(
            (k, v) for k, v in base.state_dict().items() if k.startswith("diffusion_model.") and v.ndim == 2
        )
        delta = torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed + 3)) * weight.std()
        model.add_patches({key: ("diff", (delta,))}, patch_strength)
    taesd = comfy.taesd.taesd.TAESD(latent_channels=latent_channels)
    _initialise(taesd, seed + 1)
    vae = comfy.sd.VAE(sd=taesd.state_dict())
    generator = torch.Generator().manual_seed(seed + 2)
    positive = [[torch.randn(1, 6, context, generator=generator), dict(extras)]]
    negative = [[torch.zeros(1, 6, context), dict(extras)]]
    return model, vae, positive, negative


def _row_counter(family: str):
    def hook(module: torch.nn.Module, args: tuple) -> None:
        ROWS_SEEN[family] = ROWS_SEEN.get(family, 0) + int(args[0].shape[0])
        CALLS_SEEN.setdefault(family, []).append(int(args[0].shape[0]))

    return hook


class TinyModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GANRMTestTinyModel",
            category="ganrm/tests",
            inputs=[
                io.Combo.Input("family", options=["sd15", "flux"]),
                io.Int.Input("seed", default=0, min=0),
                io.Float.Input("patch_strength", default=0.0, optional=True),
                io.Int.Input(
                    "rows_per_call",
                    default=0,
                    min=0,
                    optional=True,
                    tooltip="> 0: an attention patch fails unless every call has a multiple of this many rows, as "
                    "patches holding per-row tensors (GLIGEN) fail on a reduced batch",
                ),
            ],
            outputs=[
                io.Model.Output(),
                io.Vae.Output(),
                io.Conditioning.Output(display_name="positive"),
                io.Conditioning.Output(display_name="negative"),
            ],
        )

    @classmethod
    def execute(cls, family: str, seed: int, patch_strength: float = 0.0, rows_per_call: int = 0) -> io.NodeOutput:
        model, *rest = build(family, seed, patch_strength)
        if rows_per_call:
            model.set_model_attn1_patch(_whole_batch_patch(rows_per_call))
        return io.NodeOutput(model, *rest)


def _whole_batch_patch(rows: int):
    def patch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> tuple:
        if q.shape[0] % rows:
            raise RuntimeError(f"The size of tensor a ({q.shape[0]}) must match the size of tensor b ({rows})")
        return q, k, v

    return patch


class Conditioning(io.ComfyNode):
    """Random text conditionings of a given width, for a diffusion model loaded by ComfyUI's own loaders whose
    text encoders are too large for a test (FLUX's T5)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GANRMTestConditioning",
            category="ganrm/tests",
            inputs=[
                io.Int.Input("context_dim", default=64, min=1),
                io.Int.Input("pooled_dim", default=64, min=0),
                io.Float.Input("guidance", default=3.5, min=0.0),
                io.Int.Input("seed", default=0, min=0),
                io.Int.Input(
                    "batch", default=1, min=1, optional=True, tooltip="prompts in the batch (each its own embedding)"
                ),
            ],
            outputs=[io.Conditioning.Output(display_name="positive"), io.Conditioning.Output(display_name="negative")],
        )

    @classmethod
    def execute(cls, context_dim: int, pooled_dim: int, guidance: float, seed: int, batch: int = 1) -> io.NodeOutput:
        generator = torch.Generator().manual_seed(seed)
        extras = {"guidance": guidance}
        if pooled_dim:
            extras["pooled_output"] = torch.randn(batch, pooled_dim, generator=generator)
        positive = [[torch.randn(batch, 8, context_dim, generator=generator), dict(extras)]]
        negative = [[torch.zeros(batch, 8, context_dim), dict(extras)]]
        return io.NodeOutput(positive, negative)


class TinyVae(io.ComfyNode):
    """A random TAESD (ComfyUI's own class) for latents of `latent_channels`."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GANRMTestTinyVAE",
            category="ganrm/tests",
            inputs=[io.Int.Input("latent_channels", default=16, min=1), io.Int.Input("seed", default=0, min=0)],
            outputs=[io.Vae.Output()],
        )

    @classmethod
    def execute(cls, latent_channels: int, seed: int) -> io.NodeOutput:
        taesd = comfy.taesd.taesd.TAESD(latent_channels=latent_channels)
        _initialise(taesd, seed)
        return io.NodeOutput(comfy.sd.VAE(sd=taesd.state_dict()))


def write_reduced_flux(path: str, seed: int = 0) -> None:
    """A FLUX.1 [dev] checkpoint of the real width (3072, 24 heads) with one double and one single block and small
    text inputs (64 wide), random bf16 weights, in the layout ComfyUI's UNETLoader detects as FLUX (~1 GB)."""
    import comfy.ldm.flux.model
    import comfy.ops
    from safetensors.torch import save_file

    config = dict(FLUX_DIT, hidden_size=3072, num_heads=24, axes_dim=[16, 56, 56], vec_in_dim=64, context_in_dim=64)
    with torch.device("meta"):
        model = comfy.ldm.flux.model.Flux(**config, operations=comfy.ops.disable_weight_init)
        shapes = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        if len(shape) >= 2:
            fan_in = 1
            for size in shape[1:]:
                fan_in *= size
            tensors[name] = (torch.randn(shape, generator=generator) / fan_in**0.5).to(torch.bfloat16)
        elif name.endswith("scale") or name.endswith("weight"):
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensors[name] = torch.zeros(shape, dtype=torch.bfloat16)
    save_file(tensors, path)


class TestPack(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [TinyModel, Conditioning, TinyVae]


async def comfy_entrypoint() -> TestPack:
    return TestPack()
