"""LoRA files of flow-matching transformers (SD3.x, FLUX.1): diffusers' own loader reproduces the trained
transformer, ComfyUI's own LoRA code adds the same weight deltas as diffusers' loader, and a LoRA made for another
base model (another transformer, or a UNet) is refused, as for UNets in test_lora.py."""

from __future__ import annotations

import json
import re

import pytest
import torch
from checks import assert_relative_close
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from peft.utils import get_peft_model_state_dict
from tiny_models import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sd_unet, train_pretend

from ganrm_diffusers.generation.lora import (
    BASE_MODEL_METADATA_KEY,
    COMFYUI_WEIGHT_NAME,
    DIFFUSERS_WEIGHT_NAME,
    FLOW_TARGET_MODULES,
    adapters_disabled,
    add_lora,
    check_lora_compatible,
    load_lora_into_pipeline,
    read_lora,
    save_lora,
)
from ganrm_diffusers.utils.errors import LoraCompatibilityError

RANK, ALPHA = 4, 8.0  # alpha != rank: a file that loses alpha loads at half or double strength and fails the tests
# Every projection of the blocks that ComfyUI maps (attention q/k/v of both streams, outputs, MLPs, FLUX's
# single-block MLP and output): more than trainers target (they leave out proj_out), so that every key spelling is
# exercised.
JOINT_TARGETS = tuple(name for name in FLOW_TARGET_MODULES if name != "proj_mlp")  # SD3 has no single blocks
TARGETS = {"sd3": JOINT_TARGETS, "flux": (*JOINT_TARGETS, "proj_mlp", "proj_out")}
BUILDS = {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}
_LORA_KEY = re.compile(r"^transformer\.(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|alpha)$")


def transformer_output(transformer: torch.nn.Module) -> torch.Tensor:
    """The transformer's velocity on fixed random inputs: SD3 takes a latent image, FLUX a sequence of packed latent
    tokens with their rope ids (and the distilled guidance where the model embeds it)."""
    generator = torch.Generator().manual_seed(123)
    config = transformer.config
    text = torch.randn(2, 8, config.joint_attention_dim, generator=generator)
    pooled = torch.randn(2, config.pooled_projection_dim, generator=generator)
    with torch.no_grad():
        if isinstance(transformer, SD3Transformer2DModel):
            sample = torch.randn(2, config.in_channels, 16, 16, generator=generator)
            return transformer(sample, text, pooled, torch.tensor([700.0, 300.0])).sample
        side = 4
        rows, columns = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        image_ids = torch.stack([torch.zeros(side * side), rows.flatten(), columns.flatten()], dim=1).float()
        kwargs = {"guidance": torch.tensor([3.5, 3.5])} if config.guidance_embeds else {}
        return transformer(
            hidden_states=torch.randn(2, side * side, config.in_channels, generator=generator),
            encoder_hidden_states=text,
            pooled_projections=pooled,
            timestep=torch.tensor([0.7, 0.3]),
            img_ids=image_ids,
            txt_ids=torch.zeros(text.shape[1], 3),
            **kwargs,
        ).sample


@pytest.fixture(scope="module", params=sorted(BUILDS))
def trained_lora(request, tmp_path_factory):
    """A 'trained' transformer LoRA saved by save_lora, with the transformer's outputs with and without it."""
    family = request.param
    pipe = BUILDS[family]()
    add_lora(pipe.transformer, rank=RANK, alpha=ALPHA, target_modules=TARGETS[family])
    train_pretend(pipe.transformer)
    with adapters_disabled(pipe.transformer):
        base = transformer_output(pipe.transformer)
    folder = tmp_path_factory.mktemp(f"lora_{family}")
    paths = save_lora(pipe.transformer, folder, pretrained_model=f"tiny/{family}")
    return {
        "family": family,
        "pipe": pipe,
        "folder": folder,
        "paths": paths,
        "lora": transformer_output(pipe.transformer),
        "base": base,
    }


def test_save_writes_diffusers_training_script_keys_and_comfyui_keys_with_alpha(trained_lora, tmp_path):
    diffusers_path, comfyui_path = trained_lora["paths"]
    assert (diffusers_path.name, comfyui_path.name) == (DIFFUSERS_WEIGHT_NAME, COMFYUI_WEIGHT_NAME)
    pipe = trained_lora["pipe"]

    # What diffusers' SD3 / FLUX DreamBooth LoRA scripts save: the pipeline class's save_lora_weights with peft's
    # state dict and LoRA config. Our file holds the same tensors under the same keys, and the same LoRA config.
    type(pipe).save_lora_weights(
        tmp_path,
        transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
        transformer_lora_adapter_metadata=pipe.transformer.peft_config["default"].to_dict(),
    )
    reference, reference_metadata = read_lora(tmp_path / DIFFUSERS_WEIGHT_NAME)
    ours, metadata = read_lora(diffusers_path)
    assert sorted(ours) == sorted(reference) and all(torch.equal(ours[key], reference[key]) for key in reference)
    assert json.loads(metadata["lora_adapter_metadata"]) == json.loads(reference_metadata["lora_adapter_metadata"])
    lora_config = json.loads(metadata["lora_adapter_metadata"])
    assert (lora_config["transformer.r"], lora_config["transformer.lora_alpha"]) == (RANK, ALPHA)

    fingerprint = json.loads(metadata[BASE_MODEL_METADATA_KEY])
    config = pipe.transformer.config
    expected_keys = ["num_layers", "attention_head_dim", "num_attention_heads", "joint_attention_dim", "patch_size"]
    expected_keys += ["num_single_layers"] if trained_lora["family"] == "flux" else ["dual_attention_layers"]
    assert fingerprint["class"] == type(pipe.transformer).__name__
    assert fingerprint["pretrained"] == f"tiny/{trained_lora['family']}"
    assert all(fingerprint[key] == json.loads(json.dumps(config[key])) for key in expected_keys)

    # ComfyUI's file: the same tensors under the same keys, and each module's alpha.
    comfyui, comfyui_metadata = read_lora(comfyui_path)
    modules = {_LORA_KEY.match(key)["module"] for key in comfyui}
    assert {key: value for key, value in comfyui.items() if not key.endswith(".alpha")}.keys() == ours.keys()
    assert all(torch.equal(comfyui[key], ours[key]) for key in ours)
    assert all(comfyui[f"transformer.{module}.alpha"].item() == ALPHA for module in modules)
    assert len(modules) == len(ours) // 2
    assert json.loads(comfyui_metadata[BASE_MODEL_METADATA_KEY]) == fingerprint


@pytest.mark.parametrize("loader", ["diffusers", "ganrm"])
def test_loading_the_folder_reproduces_the_trained_transformer(trained_lora, loader):
    """diffusers' own `load_lora_weights(folder)`, or ours after the compatibility check, into a fresh pipeline."""
    assert (trained_lora["lora"] - trained_lora["base"]).abs().max() > 0.05  # the LoRA does change the output
    fresh = BUILDS[trained_lora["family"]]()
    # A transformer that never had a LoRA against one with its adapters switched off, then the loaded file against
    # the trained adapters (another code path): equal up to float32 order, as a whole. A LoRA loaded at scale 1
    # (alpha lost) or on the wrong module errs by about the LoRA's effect, far above 1e-4.
    assert_relative_close(transformer_output(fresh.transformer), trained_lora["base"], 1e-5, "base output")
    if loader == "diffusers":
        fresh.load_lora_weights(str(trained_lora["folder"]))
    else:
        load_lora_into_pipeline(fresh, trained_lora["folder"])
    assert_relative_close(transformer_output(fresh.transformer), trained_lora["lora"], 1e-4, "output with the LoRA")


def _other_architecture(family: str, wider: bool) -> torch.nn.Module:
    """The family's tiny transformer with one more block (same module shapes), or twice as wide heads."""
    transformer = BUILDS[family]().transformer
    config = dict(transformer.config)
    if not wider:
        config["num_single_layers" if family == "flux" else "num_layers"] += 1
    elif family == "flux":
        config.update(attention_head_dim=32, axes_dims_rope=(8, 8, 16))
    else:  # SD3's joint blocks run the text stream at the image stream's width
        config.update(attention_head_dim=16, caption_projection_dim=64)
    return type(transformer).from_config(config)


def test_lora_for_another_transformer_architecture_is_refused(trained_lora):
    family, folder = trained_lora["family"], trained_lora["folder"]
    deeper, wider = _other_architecture(family, wider=False), _other_architecture(family, wider=True)
    differing = "num_single_layers" if family == "flux" else "num_layers"
    for weight_name in (DIFFUSERS_WEIGHT_NAME, COMFYUI_WEIGHT_NAME):
        # One block more: every module of the LoRA exists with its shape, only the recorded base model tells.
        with pytest.raises(
            LoraCompatibilityError,
            match=rf"made for tiny/{family} \(.*\), but the transformer it is loaded into is .*differ in {differing}$",
        ):
            check_lora_compatible(folder, deeper, weight_name=weight_name)
        # Wider: refused by the metadata, and by the shapes alone for the same weights without it.
        with pytest.raises(LoraCompatibilityError, match="differ in attention_head_dim"):
            check_lora_compatible(folder, wider, weight_name=weight_name)
        state_dict, _ = read_lora(folder / weight_name)
        with pytest.raises(LoraCompatibilityError, match=r"do not map onto it .*the transformer module"):
            check_lora_compatible(state_dict, wider)
    check_lora_compatible(folder, BUILDS[family](seed=1).transformer)  # its own architecture: fits


def test_transformer_and_unet_loras_are_refused_by_each_other(trained_lora, tmp_path):
    family, folder = trained_lora["family"], trained_lora["folder"]
    unet = tiny_sd_unet()
    with pytest.raises(LoraCompatibilityError, match=r"but the UNet it is loaded into is .*differ in class"):
        check_lora_compatible(folder, unet)
    state_dict, _ = read_lora(folder / COMFYUI_WEIGHT_NAME)
    with pytest.raises(LoraCompatibilityError, match="no such linear or convolution module in the UNet"):
        check_lora_compatible(state_dict, unet)

    add_lora(unet, rank=RANK, alpha=ALPHA)
    train_pretend(unet)
    save_lora(unet, tmp_path / "unet", pretrained_model="tiny/sd")
    target = BUILDS[family]()
    for weight_name in (DIFFUSERS_WEIGHT_NAME, COMFYUI_WEIGHT_NAME):
        with pytest.raises(
            LoraCompatibilityError, match=r"made for tiny/sd \(UNet2DConditionModel.*the transformer .*differ in class"
        ):
            load_lora_into_pipeline(target, tmp_path / "unet", weight_name=weight_name)
        state_dict, _ = read_lora(tmp_path / "unet" / weight_name)
        with pytest.raises(LoraCompatibilityError, match="no such linear or convolution module in the transformer"):
            check_lora_compatible(state_dict, target.transformer)
    assert not getattr(target.transformer, "peft_config", None)  # nothing was loaded

    other = BUILDS["flux" if family == "sd3" else "sd3"]().transformer
    with pytest.raises(LoraCompatibilityError, match="differ in class"):
        check_lora_compatible(folder, other)


# -------------------------------------------------------------------------------------------------------------------
# ComfyUI (0.3.75, in this process): its own model, LoRA key map, LoRA loader and patcher against diffusers' loader
# -------------------------------------------------------------------------------------------------------------------


def comfyui_shaped_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """A reduced SD3.5-medium-like transformer (two blocks, dual attention in the first, RMS q/k norms) in a
    pipeline without encoders or VAE (only its LoRA loader is used). ComfyUI's MMDiT fixes the head width at 64
    (hidden size 64 x depth, one head per block) and its model detection recognises SD3 by 16 latent channels, so
    these are the smallest shapes it builds from a diffusers SD3 state dict."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=64,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=128,
        pooled_projection_dim=32,
        pos_embed_max_size=8,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    encoders = dict.fromkeys(
        ["vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3"]
    )
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), **encoders)


def comfyui_model(family: str, transformer: torch.nn.Module):
    """ComfyUI's own model (a ModelPatcher around comfy.model_base.SD3 / Flux) holding the diffusers weights."""
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.sd

    state_dict = {key: value.detach().clone() for key, value in transformer.state_dict().items()}
    if family == "sd3":
        # UNETLoader's own path: detect the diffusers MMDiT, convert its keys, build and load the model.
        patcher = comfy.sd.load_diffusion_model_state_dict(state_dict, model_options={"dtype": torch.float32})
        assert type(patcher.model).__name__ == "SD3"
        return patcher
    # The same path by hand, because ComfyUI's FLUX detection fixes FLUX.1's head count (24), rope axes (16, 56, 56)
    # and output channels (16), which no reduced-width model has: those three entries are set to the tiny
    # model's, everything else (depths, width, text / pooled widths, guidance, patch size) is ComfyUI's detection.
    converted = comfy.model_detection.convert_diffusers_mmdit(state_dict, "")
    unet_config = comfy.model_detection.detect_unet_config(converted, "")
    config = transformer.config
    unet_config.update(
        num_heads=config.num_attention_heads,
        axes_dim=list(config.axes_dims_rope),
        out_channels=config.in_channels // unet_config["patch_size"] ** 2,
    )
    model_config = comfy.model_detection.model_config_from_unet_config(unet_config, converted)
    assert type(model_config).__name__ == "Flux"
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model(converted, "")
    model.load_model_weights(converted, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def _linear_weight(module: torch.nn.Module) -> torch.Tensor:
    """A linear module's weight, or the base weight of one that carries a peft LoRA (where fuse_lora merges it)."""
    return getattr(module, "base_layer", module).weight.detach().clone()


def _region(tensor: torch.Tensor, offset: tuple[int, int, int] | None) -> torch.Tensor:
    """The part of a ComfyUI weight a LoRA key maps to: (dim, start, length) of a fused weight, or all of it."""
    return tensor.narrow(*offset) if offset else tensor


@pytest.mark.comfyui
@pytest.mark.usefixtures("comfyui")  # ComfyUI imported into this process (--cpu), once per session
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_comfyui_patches_the_same_weight_deltas_as_diffusers_loads(family, tmp_path):
    """ComfyUI's own key map, LoRA loader and patcher (what LoraLoaderModelOnly runs) on ComfyUI's own SD3 / FLUX
    model, against diffusers' `load_lora_weights` + `fuse_lora` on the same base weights: every LoRA module adds
    the same delta to its weight, which for q/k/v (and FLUX's single-block MLP input) is a slice of ComfyUI's fused
    qkv / linear1 weight, and nothing else of ComfyUI's model changes."""
    import comfy.lora
    import comfy.sd
    import comfy.utils

    build = comfyui_shaped_sd3_pipeline if family == "sd3" else tiny_flux_pipeline
    trained = build().transformer
    add_lora(trained, rank=RANK, alpha=ALPHA, target_modules=TARGETS[family])
    train_pretend(trained)
    _, comfyui_file = save_lora(trained, tmp_path, pretrained_model=f"tiny/{family}")

    # diffusers: a fresh pipeline of the same weights, the folder loaded and fused into the weights.
    fresh = build()
    patcher = comfyui_model(family, fresh.transformer)
    lora = comfy.utils.load_torch_file(str(comfyui_file), safe_load=True)
    names = sorted({_LORA_KEY.match(key)["module"] for key in lora})
    before = {name: _linear_weight(fresh.transformer.get_submodule(name)) for name in names}
    fresh.load_lora_weights(str(tmp_path))
    fresh.fuse_lora()
    diffusers_delta = {name: _linear_weight(fresh.transformer.get_submodule(name)) - before[name] for name in names}

    # ComfyUI: every module of the file is mapped and loaded as a LoRA with our alpha, then patched.
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    assert [name for name in names if f"transformer.{name}" not in key_map] == []
    targets = {name: key_map[f"transformer.{name}"] for name in names}  # a key, or (key, (dim, start, length))
    patches = comfy.lora.load_lora(lora, key_map)
    assert set(patches) == set(targets.values())
    assert all(patch.name == "lora" and patch.weights[2] == ALPHA for patch in patches.values())
    patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0.0)
    comfy_before = {key: value.detach().clone() for key, value in patcher.model.state_dict().items()}
    patched.patch_model()
    comfy_after = {key: value.detach().clone() for key, value in patched.model.state_dict().items()}
    patched.unpatch_model()

    expected = {key: torch.zeros_like(value) for key, value in comfy_before.items()}
    for name, target in targets.items():
        key, offset = (target, None) if isinstance(target, str) else target[:2]
        # The slice the key map names holds this module's base weight (ComfyUI's converter put it there) ...
        assert torch.equal(_region(comfy_before[key], offset), before[name]), name
        _region(expected[key], offset).copy_(diffusers_delta[name])
        # ... and gets the delta diffusers adds: the same B @ A * alpha / rank in float32, summed in another order.
        delta = _region(comfy_after[key], offset) - _region(comfy_before[key], offset)
        assert_relative_close(delta, diffusers_delta[name], 1e-5, f"{family} {name} -> {key} {offset}")
    actual = {key: comfy_after[key] - comfy_before[key] for key in comfy_before}
    assert_relative_close(actual, expected, 1e-5, f"{family}: every weight of ComfyUI's model")
