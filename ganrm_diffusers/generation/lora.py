"""The one LoRA set-up and LoRA file I/O of ganrm: peft adapters on the UNet's attention projections, saved in
diffusers' format and in kohya's format for ComfyUI, with a check that refuses a LoRA made for another base model.

Files of a run (both safetensors, both written atomically, both carrying the base model's fingerprint):
- `pytorch_lora_weights.safetensors`: diffusers' format (`unet.<module>.lora.down.weight`, the LoRA config in
  diffusers' `lora_adapter_metadata`), loaded by `pipe.load_lora_weights(folder)`;
- `pytorch_lora_weights_comfyui.safetensors`: kohya keys with diffusers block names
  (`lora_unet_<module with _>.lora_down.weight`, `.lora_up.weight`, `.alpha`) that ComfyUI's stock LoraLoader maps
  for SD 1.x/2.x and SDXL UNets (it skips diffusers' PEFT-era keys); `alpha` is written explicitly so that
  alpha / rank is the trained scale (diffusers' converter writes alpha = rank).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY, LORA_WEIGHT_NAME_SAFE
from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers
from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
from diffusers.utils.torch_utils import unwrap_module

from ganrm_diffusers.utils.atomic import save_tensors_atomic
from ganrm_diffusers.utils.errors import CheckpointError, LoraCompatibilityError

DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
DIFFUSERS_WEIGHT_NAME = LORA_WEIGHT_NAME_SAFE  # "pytorch_lora_weights.safetensors"
COMFYUI_WEIGHT_NAME = "pytorch_lora_weights_comfyui.safetensors"
BASE_MODEL_METADATA_KEY = "ganrm_base_model"

# UNet config entries that decide whether a LoRA's modules and shapes fit. Not the pretrained id (a LoRA for SD 1.5
# fits its fine-tunes), nor sample_size (SD 2 at 512 and 768 px share one architecture), nor the in/out channels
# (inpainting UNets take the same attention LoRAs).
ARCHITECTURE_KEYS = (
    "down_block_types",
    "up_block_types",
    "block_out_channels",
    "layers_per_block",
    "transformer_layers_per_block",
    "cross_attention_dim",
    "attention_head_dim",
    "num_attention_heads",
    "use_linear_projection",
    "addition_embed_type",
)

_UNET_KEY = re.compile(
    r"^(?:unet\.)?(?P<module>.+?)\.(?P<part>lora\.down|lora\.up|lora_A|lora_B)(?:\.default)?\.weight$"
)
_KOHYA_KEY = re.compile(r"^lora_unet_(?P<module>[^.]+)\.(?P<part>lora_down|lora_up)\.weight$")
_HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_IGNORED_KEY = re.compile(r"^(text_encoder|text_encoder_2|lora_te\d?)[._]|\.alpha$|\.dora_scale$|lora_magnitude_vector")


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel (or similar `.module`) wrapper and torch.compile."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return unwrap_module(model)


def add_lora(
    unet: torch.nn.Module,
    rank: int = 4,
    alpha: float | None = None,
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
    dropout: float = 0.0,
):
    """Freeze `unet` and add a trainable peft LoRA (adapter "default") to `target_modules`; alpha defaults to rank.
    Returns the `LoraConfig`. lora_B starts at zero, so the UNet's output is unchanged until training moves it."""
    from peft import LoraConfig

    config = LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        target_modules=list(target_modules),
        lora_dropout=dropout,
        init_lora_weights="gaussian",
    )
    unet.requires_grad_(False)
    unet.add_adapter(config)
    return config


@contextmanager
def adapters_disabled(unet: torch.nn.Module) -> Iterator[None]:
    """Run the base model: the UNet with its LoRA adapters switched off (the reference of DPO and PRDP)."""
    model = unwrap_model(unet)
    model.disable_adapters()
    try:
        yield
    finally:
        model.enable_adapters()


def base_model_fingerprint(unet: torch.nn.Module, pretrained_model: str | None = None) -> dict:
    """What a LoRA file records about the UNet it was trained on: class, architecture, sample size, pretrained id."""
    model = unwrap_model(unet)
    config = model.config
    fingerprint = {
        "class": type(model).__name__,
        **{key: config.get(key) for key in ARCHITECTURE_KEYS},
        "sample_size": config.get("sample_size"),
        "pretrained": pretrained_model or config.get("_name_or_path") or None,
    }
    return json.loads(json.dumps(fingerprint))  # tuples become lists, as they come back from a file


def describe_base_model(fingerprint: Mapping) -> str:
    name = fingerprint.get("pretrained") or "an unnamed model"
    return (
        f"{name} ({fingerprint.get('class')}, cross_attention_dim={fingerprint.get('cross_attention_dim')}, "
        f"block_out_channels={fingerprint.get('block_out_channels')}, "
        f"addition_embed_type={fingerprint.get('addition_embed_type')})"
    )


def lora_state_dicts(
    unet: torch.nn.Module, adapter_name: str = "default"
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The adapter's weights as (diffusers-format, kohya-format) state dicts, float32 on the CPU."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict

    model = unwrap_model(unet)
    peft_state = {
        f"unet.{key}": value.detach().to("cpu", torch.float32).contiguous()
        for key, value in get_peft_model_state_dict(model, adapter_name=adapter_name).items()
    }
    kohya = convert_state_dict_to_kohya(peft_state)
    # The converter writes alpha = rank; the trained scale is peft's `scaling` (alpha / rank, or alpha / sqrt(rank)
    # with rsLoRA), which kohya readers apply as alpha / rank.
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.scaling:
            alpha_key = f"lora_unet_{name.replace('.', '_')}.alpha"
            if alpha_key not in kohya:
                raise RuntimeError(f"kohya conversion lost the LoRA module {name}")
            kohya[alpha_key] = torch.tensor(float(module.scaling[adapter_name] * module.r[adapter_name]))
    return convert_state_dict_to_diffusers(peft_state), kohya


def save_lora(
    unet: torch.nn.Module,
    output_dir: str | Path,
    pretrained_model: str | None = None,
    adapter_name: str = "default",
) -> tuple[Path, Path]:
    """Write the UNet's LoRA as `DIFFUSERS_WEIGHT_NAME` and `COMFYUI_WEIGHT_NAME` in `output_dir`, atomically.
    Returns the two paths. `pretrained_model` (a Hub id or folder) is recorded; default: the UNet's own."""
    model = unwrap_model(unet)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    diffusers_state, kohya_state = lora_state_dicts(model, adapter_name)
    fingerprint = json.dumps(base_model_fingerprint(model, pretrained_model), sort_keys=True)
    lora_config = {f"unet.{key}": value for key, value in model.peft_config[adapter_name].to_dict().items()}
    lora_config = json.dumps(lora_config, sort_keys=True, default=list)  # target_modules is a set
    diffusers_path, comfyui_path = output_dir / DIFFUSERS_WEIGHT_NAME, output_dir / COMFYUI_WEIGHT_NAME
    save_tensors_atomic(
        diffusers_path,
        diffusers_state,
        {"format": "pt", BASE_MODEL_METADATA_KEY: fingerprint, LORA_ADAPTER_METADATA_KEY: lora_config},
    )
    save_tensors_atomic(comfyui_path, kohya_state, {"format": "pt", BASE_MODEL_METADATA_KEY: fingerprint})
    return diffusers_path, comfyui_path


def resolve_lora_file(lora: str | Path, weight_name: str | None = None) -> Path:
    """The safetensors file a LoRA reference points at: a file, or the file in a folder that diffusers would load
    (`weight_name`, else `pytorch_lora_weights.safetensors`, else the folder's only .safetensors file), or that file
    in a Hub repo."""
    path = Path(lora)
    if path.is_file():
        return path
    if path.is_dir():
        if weight_name:
            candidates = [path / weight_name]
        elif (path / DIFFUSERS_WEIGHT_NAME).is_file():
            candidates = [path / DIFFUSERS_WEIGHT_NAME]
        else:
            candidates = sorted(path.glob("*.safetensors"))
        if len(candidates) != 1 or not candidates[0].is_file():
            found = ", ".join(p.name for p in candidates) or "no .safetensors file"
            raise CheckpointError(f"cannot tell which LoRA file to load in {path} ({found}): pass weight_name")
        return candidates[0]
    if not _HUB_REPO_ID.match(str(lora)):
        raise CheckpointError(f"LoRA file or folder {lora} does not exist")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(str(lora), weight_name or DIFFUSERS_WEIGHT_NAME))
    except Exception as error:  # offline, unknown repo, missing file: all mean "no such LoRA" to the user
        raise CheckpointError(
            f"LoRA {lora} is no local file or folder, nor a Hub repo with that file: {error}"
        ) from error


def read_lora(
    lora: str | Path | Mapping[str, torch.Tensor], weight_name: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A LoRA's state dict and safetensors metadata (empty for an in-memory state dict). Only safetensors files
    are read: a LoRA from outside is never unpickled."""
    if isinstance(lora, Mapping):
        return dict(lora), {}
    path = resolve_lora_file(lora, weight_name)
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        return safetensors.torch.load_file(str(path)), metadata
    except (safetensors.SafetensorError, OSError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors LoRA file: {error}") from error


def check_lora_compatible(
    lora: str | Path | Mapping[str, torch.Tensor], unet: torch.nn.Module, weight_name: str | None = None
) -> None:
    """Raise `LoraCompatibilityError` unless the LoRA fits `unet`: its recorded base model (when the file has our
    metadata) has the UNet's architecture, and every UNet LoRA weight maps onto a UNet module with matching shapes.

    Reads diffusers/PEFT keys, kohya keys with diffusers or SGM block names; text encoder keys are not checked."""
    state_dict, metadata = read_lora(lora, weight_name)
    name = "the LoRA state dict" if isinstance(lora, Mapping) else f"LoRA {lora}"
    model = unwrap_model(unet)
    expected = base_model_fingerprint(model)
    if BASE_MODEL_METADATA_KEY in metadata:
        try:
            made_for = json.loads(metadata[BASE_MODEL_METADATA_KEY])
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{name} has a corrupt {BASE_MODEL_METADATA_KEY} metadata entry: {error}") from error
        differing = [key for key in ("class", *ARCHITECTURE_KEYS) if made_for.get(key) != expected.get(key)]
        if differing:
            raise LoraCompatibilityError(
                f"{name} was made for {describe_base_model(made_for)}, but the UNet it is loaded into is "
                f"{describe_base_model(expected)}; they differ in {', '.join(differing)}"
            )

    modules = dict(model.named_modules())
    layers, unknown = _unet_lora_layers(state_dict, model)
    if not layers and not unknown:
        raise LoraCompatibilityError(f"{name} holds no UNet LoRA weights")
    problems = [f"{key}: not a UNet LoRA key of a known format" for key in unknown]
    for module_name, shapes in sorted(layers.items()):
        module = modules.get(module_name)
        module = getattr(module, "base_layer", module)  # a module that already carries a peft LoRA
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            problems.append(f"{module_name}: no such linear or convolution module in the UNet")
            continue
        fan_in, fan_out = (
            (module.in_features, module.out_features)
            if isinstance(module, torch.nn.Linear)
            else (module.in_channels, module.out_channels)
        )
        down, up = shapes.get("down"), shapes.get("up")
        if down is None or up is None:
            problems.append(f"{module_name}: has only one of the down/up LoRA weights")
        elif down[1] != fan_in or up[0] != fan_out:
            problems.append(
                f"{module_name}: LoRA maps {down[1]} -> {up[0]} features, the UNet module {fan_in} -> {fan_out}"
            )
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise LoraCompatibilityError(
            f"{name} does not fit the UNet of {describe_base_model(expected)}: {len(problems)} of its "
            f"{len(layers) + len(unknown)} LoRA modules do not map onto it ({shown}). Was it made for another base model?"
        )


def _unet_lora_layers(
    state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module
) -> tuple[dict[str, dict[str, torch.Size]], list[str]]:
    """{UNet module name: {"down": shape, "up": shape}} of a LoRA state dict, and the keys of no known LoRA format."""
    # Kohya files of SDXL name blocks as SGM does (input_blocks...): diffusers' own converter renames them.
    state_dict = _maybe_map_sgm_blocks_to_diffusers(dict(state_dict), model.config)
    flat_names = {name.replace(".", "_"): name for name, _ in model.named_modules()}
    layers: dict[str, dict[str, torch.Size]] = {}
    unknown = []
    for key, tensor in state_dict.items():
        if kohya := _KOHYA_KEY.match(key):
            module_name = flat_names.get(kohya["module"], kohya["module"])  # unmapped: reported as no such module
            part = "down" if kohya["part"] == "lora_down" else "up"
        elif _IGNORED_KEY.search(key):
            continue
        elif unet_key := _UNET_KEY.match(key):
            module_name = unet_key["module"]
            part = "down" if unet_key["part"] in ("lora.down", "lora_A") else "up"
        else:
            unknown.append(key)
            continue
        layers.setdefault(module_name, {})[part] = tensor.shape
    return layers, unknown


def load_lora_into_pipeline(
    pipe, lora: str | Path | Mapping[str, torch.Tensor], weight_name: str | None = None, **kwargs
) -> None:
    """`check_lora_compatible`, then diffusers' `pipe.load_lora_weights` (kwargs such as adapter_name go to it).
    A pipeline class that overrides `load_lora_weights` calls `check_lora_compatible` and then super()'s instead."""
    check_lora_compatible(lora, pipe.unet, weight_name)
    if not isinstance(lora, Mapping):
        lora = str(resolve_lora_file(lora, weight_name))  # the very file that was checked
    pipe.load_lora_weights(lora, **kwargs)
