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


def build(family: str, seed: int) -> tuple:
    """(MODEL, VAE, positive, negative) of a tiny random model of `family`."""
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
            inputs=[io.Combo.Input("family", options=["sd15", "flux"]), io.Int.Input("seed", default=0, min=0)],
            outputs=[
                io.Model.Output(),
                io.Vae.Output(),
                io.Conditioning.Output(display_name="positive"),
                io.Conditioning.Output(display_name="negative"),
            ],
        )

    @classmethod
    def execute(cls, family: str, seed: int) -> io.NodeOutput:
        return io.NodeOutput(*build(family, seed))


class TestPack(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [TinyModel]


async def comfy_entrypoint() -> TestPack:
    return TestPack()
