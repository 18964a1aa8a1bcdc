"""LoRA files that load everywhere: diffusers' loader, ComfyUI's own LoRA code on an SD1.5 UNet, and a refusal
for a LoRA made for another base model."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checks import assert_relative_close, relative_error, require_or_skip
from comfyui_support import find_comfyui_tree
from tiny_models import tiny_sd_pipeline, tiny_sd_unet, tiny_sdxl_pipeline, train_pretend

from ganrm_diffusers.generation.lora import (
    BASE_MODEL_METADATA_KEY,
    COMFYUI_WEIGHT_NAME,
    DIFFUSERS_WEIGHT_NAME,
    adapters_are_identity,
    adapters_disabled,
    adapters_skipped_while_identity,
    add_lora,
    check_lora_compatible,
    load_lora_into_pipeline,
    read_lora,
    save_lora,
)
from ganrm_diffusers.utils.errors import CheckpointError, LoraCompatibilityError

RANK, ALPHA = 4, 8.0  # alpha != rank: a file that loses alpha loads at the wrong strength and fails the tests


def unet_output(unet: torch.nn.Module) -> torch.Tensor:
    """The UNet's prediction on fixed random inputs (with SDXL's added conditioning where the UNet takes it)."""
    generator = torch.Generator().manual_seed(123)
    config = unet.config
    kwargs = {}
    if config.addition_embed_type == "text_time":
        text_width = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, text_width, generator=generator),
            "time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2),
        }
    sample = torch.randn(2, 4, 16, 16, generator=generator)
    text = torch.randn(2, 77, config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet(sample, torch.tensor([700, 300]), encoder_hidden_states=text, **kwargs).sample


@pytest.fixture(scope="module", params=[tiny_sd_pipeline, tiny_sdxl_pipeline], ids=["sd", "sdxl"])
def trained_lora(request, tmp_path_factory):
    """A 'trained' LoRA saved by save_lora, with the outputs of its UNet with and without the adapters."""
    build = request.param
    pipe = build()
    add_lora(pipe.unet, rank=RANK, alpha=ALPHA)
    train_pretend(pipe.unet)
    with adapters_disabled(pipe.unet):
        base = unet_output(pipe.unet)
    folder = tmp_path_factory.mktemp(f"lora_{build.__name__}")
    paths = save_lora(pipe.unet, folder, pretrained_model="tiny/test-model")
    return {"build": build, "folder": folder, "paths": paths, "lora": unet_output(pipe.unet), "base": base}


def test_an_untrained_lora_is_skipped_with_the_same_output_and_a_trained_one_is_not():
    """A fresh LoRA's up-projections are zero, so it adds exact zeros (x + 0.0 == x in IEEE arithmetic): the first
    round's candidates are sampled with the adapters switched off, and must be the very numbers of the adapted
    model. Once trained, the adapters stay on."""
    unet = tiny_sd_unet()
    add_lora(unet, rank=RANK, alpha=ALPHA)
    assert adapters_are_identity(unet)
    adapted = unet_output(unet)
    with adapters_skipped_while_identity(unet):
        assert not any(layer.merged or not layer.disable_adapters for layer in _lora_layers(unet))
        skipped = unet_output(unet)
    assert torch.equal(adapted, skipped)
    train_pretend(unet)
    assert not adapters_are_identity(unet)
    with adapters_skipped_while_identity(unet):
        assert not any(layer.disable_adapters for layer in _lora_layers(unet))
        trained = unet_output(unet)
    with adapters_disabled(unet):
        assert relative_error(trained, unet_output(unet)) > 1e-3  # the trained adapters did run
    assert not adapters_are_identity(tiny_sd_unet())  # no adapters at all: nothing to skip


def _lora_layers(model: torch.nn.Module) -> list:
    return [module for module in model.modules() if isinstance(getattr(module, "lora_B", None), torch.nn.ModuleDict)]


def test_save_writes_both_files_with_metadata_and_explicit_alpha(trained_lora):
    diffusers_path, comfyui_path = trained_lora["paths"]
    assert diffusers_path.name == DIFFUSERS_WEIGHT_NAME and comfyui_path.name == COMFYUI_WEIGHT_NAME
    assert sorted(p.name for p in trained_lora["folder"].iterdir()) == sorted(
        [DIFFUSERS_WEIGHT_NAME, COMFYUI_WEIGHT_NAME]
    )

    diffusers_state, diffusers_metadata = read_lora(diffusers_path)
    assert all(key.startswith("unet.") and ".lora." in key for key in diffusers_state)
    fingerprint = json.loads(diffusers_metadata[BASE_MODEL_METADATA_KEY])
    assert fingerprint["pretrained"] == "tiny/test-model" and fingerprint["class"] == "UNet2DConditionModel"

    kohya_state, kohya_metadata = read_lora(comfyui_path)
    modules = {key.split(".")[0] for key in kohya_state}
    assert all(name.startswith("lora_unet_") for name in modules)
    assert {key.split(".", 1)[1] for key in kohya_state} == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert all(kohya_state[f"{name}.alpha"].item() == ALPHA for name in modules)
    assert len(modules) == len(diffusers_state) // 2
    assert json.loads(kohya_metadata[BASE_MODEL_METADATA_KEY]) == fingerprint


@pytest.mark.parametrize("weight_name", [DIFFUSERS_WEIGHT_NAME, COMFYUI_WEIGHT_NAME])
def test_diffusers_loads_the_lora_and_reproduces_the_trained_output(trained_lora, weight_name):
    assert (trained_lora["lora"] - trained_lora["base"]).abs().max() > 0.05  # the LoRA does change the output
    fresh = trained_lora["build"]()
    # A UNet that never had a LoRA against one with its adapters switched off, and below the loaded file against
    # the trained adapters (another code path: diffusers' loader, kohya alpha): the same outputs up to float32
    # order, as a whole. A LoRA at the wrong strength or on the wrong module errs by 1e-1 (the check above).
    assert_relative_close(unet_output(fresh.unet), trained_lora["base"], 1e-5, "base output")
    if weight_name == DIFFUSERS_WEIGHT_NAME:  # the folder alone, as users write it
        fresh.load_lora_weights(str(trained_lora["folder"]))
    else:
        load_lora_into_pipeline(fresh, trained_lora["folder"], weight_name=weight_name)
    assert_relative_close(unet_output(fresh.unet), trained_lora["lora"], 1e-4, f"output with {weight_name}")


def test_lora_for_another_base_model_is_refused(trained_lora, tmp_path):
    """An SDXL-shaped LoRA into SD, or an SD one into SDXL: the metadata names both models; without metadata
    the shapes and keys refuse it; either way nothing is loaded."""
    other_build = tiny_sdxl_pipeline if trained_lora["build"] is tiny_sd_pipeline else tiny_sd_pipeline
    target = other_build()
    for weight_name in (DIFFUSERS_WEIGHT_NAME, COMFYUI_WEIGHT_NAME):
        with pytest.raises(LoraCompatibilityError, match=r"made for tiny/test-model .* but the UNet it is loaded"):
            load_lora_into_pipeline(target, trained_lora["folder"], weight_name=weight_name)
        state_dict, _ = read_lora(trained_lora["folder"] / weight_name)  # the same weights, no metadata
        with pytest.raises(LoraCompatibilityError, match="do not map onto it"):
            check_lora_compatible(state_dict, target.unet)
    assert not getattr(target.unet, "peft_config", None)


def test_lora_with_other_text_width_or_blocks_is_refused_by_shapes_and_keys(tmp_path):
    unet = tiny_sd_pipeline().unet
    other_text = tiny_sd_unet(cross_attention_dim=48)
    add_lora(other_text, rank=RANK)
    save_lora(other_text, tmp_path / "text48")
    with pytest.raises(LoraCompatibilityError, match=r"cross_attention_dim=48.*differ in cross_attention_dim"):
        check_lora_compatible(tmp_path / "text48", unet)
    state_dict, _ = read_lora(tmp_path / "text48")
    with pytest.raises(
        LoraCompatibilityError, match=r"attn2\.to_k: LoRA maps 48 -> 64 features, the UNet module 32 -> 64"
    ):
        check_lora_compatible(state_dict, unet)

    deeper = tiny_sd_unet(block_out_channels=(32, 64, 64))
    add_lora(deeper, rank=RANK)
    state_dict, _ = read_lora(save_lora(deeper, tmp_path / "deeper")[1])
    with pytest.raises(LoraCompatibilityError, match="no such linear or convolution module"):
        check_lora_compatible(state_dict, unet)

    add_lora(unet, rank=RANK)
    check_lora_compatible(save_lora(unet, tmp_path / "same")[0], tiny_sd_pipeline(seed=1).unet)  # fits: no error


def test_unreadable_or_ambiguous_lora_files_are_named(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors LoRA file"):
        read_lora(tmp_path / "a.safetensors")
    (tmp_path / "b.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="pass weight_name"):
        read_lora(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_lora(tmp_path / "missing")
    with pytest.raises(LoraCompatibilityError, match="holds no UNet LoRA weights"):
        check_lora_compatible({"text_encoder.x.lora_A.weight": torch.zeros(1, 1)}, tiny_sd_unet())


# -------------------------------------------------------------------------------------------------------------------
# ComfyUI: its own LoRA key mapping and patching, on the real SD1.5 UNet architecture with random weights
# -------------------------------------------------------------------------------------------------------------------


def fill_random(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights fast enough for 860 M parameters: windows of one shared random pool, scaled by 1/sqrt(fan_in)
    (norm weights around 1), so the activations of the deep random network stay of order 1."""
    generator = torch.Generator().manual_seed(seed)
    largest = max(parameter.numel() for parameter in model.parameters())
    pool = torch.randn(largest + 4096, generator=generator)
    offsets = torch.randint(0, 4096, (10_000,), generator=generator).tolist()
    with torch.no_grad():
        for index, module in enumerate(model.modules()):
            for name, parameter in module.named_parameters(recurse=False):
                window = pool[offsets[index % len(offsets)] :][: parameter.numel()].view_as(parameter)
                if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                    parameter.copy_((1.0 if name == "weight" else 0.0) + 0.1 * window)
                elif parameter.ndim >= 2:
                    parameter.copy_(window * parameter[0].numel() ** -0.5)
                else:
                    parameter.copy_(0.1 * window)


def comfyui_patch_matches_diffusers(comfyui_tree: str, workdir: str) -> dict:
    """Runs in a child process (ComfyUI's modules are imported once per process and hold 3.4 GB here).

    ComfyUI builds the SD1.5 UNet; diffusers' single-file converter turns its weights into a diffusers UNet (sharing
    the tensors); ganrm adds a random rank-4 LoRA and saves it; ComfyUI's stock path (`load_lora_for_models`, what
    LoraLoader runs) maps and patches it. Returns what the test checks."""
    sys.path.insert(0, comfyui_tree)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management is imported: no CUDA here
    import comfy.lora
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.sd
    import comfy.utils
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    torch.set_num_threads(2)
    # UNet2DConditionModel's defaults are SD1.x's UNet except for the text width.
    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    model_config = comfy.model_detection.model_config_from_diffusers_unet(unet.state_dict())
    comfy_model = model_config.get_model({})
    fill_random(comfy_model)
    ldm_checkpoint = {f"model.{key}": value for key, value in comfy_model.state_dict().items()}
    unet.load_state_dict(convert_ldm_unet_checkpoint(ldm_checkpoint, dict(unet.config)), strict=True, assign=True)

    add_lora(unet, rank=RANK, alpha=ALPHA)
    train_pretend(unet, scale=0.05)
    generator = torch.Generator().manual_seed(0)
    sample, text = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 8, 768, generator=generator)
    timestep = torch.tensor([500])
    with torch.no_grad():
        diffusers_lora = unet(sample, timestep, encoder_hidden_states=text).sample
        with adapters_disabled(unet):
            diffusers_base = unet(sample, timestep, encoder_hidden_states=text).sample
        comfy_base = comfy_model.diffusion_model(sample, timesteps=timestep, context=text)
    _, comfyui_file = save_lora(unet, workdir, pretrained_model="sd15-random")

    warnings: list[str] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger().addHandler(handler)
    lora = comfy.utils.load_torch_file(str(comfyui_file), safe_load=True)
    key_map = comfy.lora.model_lora_keys_unet(comfy_model, {})
    patches = comfy.lora.load_lora(lora, key_map, log_missing=False)
    patcher = comfy.model_patcher.ModelPatcher(comfy_model, torch.device("cpu"), torch.device("cpu"))
    patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0.0)
    patched.patch_model()
    with torch.no_grad():
        comfy_lora = comfy_model.diffusion_model(sample, timesteps=timestep, context=text)
    modules = sorted({key.split(".")[0] for key in lora})
    return {
        "modules": len(modules),
        "unmapped": [name for name in modules if name not in key_map],
        "patched": sorted({key_map[name] for name in modules if name in key_map} & set(patches)),
        "warnings": [message for message in warnings if "lora" in message.lower() or "NOT LOADED" in message],
        # Two implementations of the UNet: compared as whole outputs (relative to diffusers' output's norm).
        "base_error": relative_error(comfy_base, diffusers_base),
        "lora_effect": relative_error(diffusers_lora, diffusers_base),
        "lora_error": relative_error(comfy_lora, diffusers_lora),
    }


@pytest.mark.comfyui
@pytest.mark.slow
def test_comfyui_maps_every_key_and_patches_to_the_diffusers_output(tmp_path):
    tree = find_comfyui_tree()
    require_or_skip(tree is not None, "ComfyUI is not installed (make test installs it)")
    tests_dir = Path(__file__).parent
    program = (
        f"import json, sys; sys.path.insert(0, {str(tests_dir)!r}); from test_lora import comfyui_patch_matches_diffusers; "
        f"print('RESULT', json.dumps(comfyui_patch_matches_diffusers({str(tree)!r}, {str(tmp_path)!r})))"
    )
    child = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1")
    )
    lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
    assert child.returncode == 0 and lines, child.stderr[-4000:]
    result = json.loads(lines[-1][len("RESULT ") :])

    # SD1.5 has 16 transformer blocks x 2 attentions x (to_q, to_k, to_v, to_out.0) = 128 LoRA modules.
    assert result["modules"] == 128
    assert result["unmapped"] == [] and result["warnings"] == []
    assert len(result["patched"]) == 128
    # Same weights, same network in two implementations: the same output up to float32 order, so that the
    # comparison below is meaningful. A LoRA patched at the wrong strength, or not at all, errs by ~lora_effect.
    assert result["base_error"] < 1e-4, result
    assert result["lora_effect"] > 1e-2, result
    assert result["lora_error"] < 1e-4 and result["lora_effect"] > 100 * result["lora_error"], result
