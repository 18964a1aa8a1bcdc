"""The one LoRA set-up and LoRA file I/O of ganrm: peft adapters on the denoiser (a UNet, or a flow-matching
transformer: SD3.x, FLUX.1), saved in diffusers' format and in a format ComfyUI's stock LoRA loader maps, with a
check that refuses a LoRA made for another base model.

Files of a run (both safetensors, both written atomically, both carrying the base model's fingerprint):
- `pytorch_lora_weights.safetensors`: diffusers' format, the LoRA config in diffusers' `lora_adapter_metadata`
  (prefixed with the pipeline's component name, so alpha != rank loads at the trained scale), loaded by
  `pipe.load_lora_weights(folder)`. UNets: `unet.<module>.lora.down.weight` / `.lora.up.weight`. Transformers:
  `transformer.<module>.lora_A.weight` / `.lora_B.weight`, as diffusers' SD3 / FLUX training scripts save them.
- `pytorch_lora_weights_comfyui.safetensors`, with `alpha` written explicitly so that alpha / rank is the trained
  scale (ComfyUI applies scale 1 to a module without `.alpha`; diffusers' kohya converter writes alpha = rank).
  UNets: kohya keys with diffusers block names (`lora_unet_<module with _>.lora_down.weight`, `.lora_up.weight`,
  `.alpha`), which ComfyUI maps for SD 1.x/2.x and SDXL UNets (it skips diffusers' PEFT-era UNet keys).
  Transformers: the diffusers file's keys plus `transformer.<module>.alpha`. ComfyUI 0.3.75's
  `comfy.lora.model_lora_keys_unet` maps `transformer.<diffusers module>` for `comfy.model_base.SD3` (through
  `comfy.utils.mmdit_to_diffusers`) and for `comfy.model_base.Flux` (through `comfy.utils.flux_to_diffusers`),
  q/k/v onto their slices of its fused qkv (and FLUX's single-block linear1) weights, and its LoRA weight adapter
  reads `<key>.lora_B.weight` / `.lora_A.weight` / `.alpha`: the most standard spelling both tools read.
  (For diffusers, load the diffusers file: FluxPipeline reads the `.alpha` keys too, StableDiffusion3Pipeline
  refuses them.)
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import safetensors
import safetensors.torch
import torch
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY, LORA_WEIGHT_NAME_SAFE
from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers
from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
from diffusers.utils.torch_utils import unwrap_module

from ganrm_diffusers.utils.atomic import save_tensors_atomic
from ganrm_diffusers.utils.errors import CheckpointError, LoraCompatibilityError

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline
    from peft import LoraConfig

DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
# LoRA targets of flow-matching transformers (SD3.x, FLUX.1): the attention projections of both streams and the
# MLPs (not the final `proj_out`, which the name would also catch).
FLOW_TARGET_MODULES = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "proj_mlp",
)
DIFFUSERS_WEIGHT_NAME = LORA_WEIGHT_NAME_SAFE  # "pytorch_lora_weights.safetensors"
COMFYUI_WEIGHT_NAME = "pytorch_lora_weights_comfyui.safetensors"
BASE_MODEL_METADATA_KEY = "ganrm_base_model"
UNET_PREFIX, TRANSFORMER_PREFIX = "unet", "transformer"  # diffusers' component names, the LoRA files' key prefixes

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
# The same for flow-matching transformers (each class records those it has): depth, width, text and pooled widths,
# patch size and SD3.5's dual-attention blocks decide which modules exist and their shapes. Not in_channels /
# out_channels (FLUX.1 Fill / Depth / Canny are FLUX.1 [dev] fine-tunes with wider inputs that take its LoRAs, as
# inpainting UNets take SD's), nor guidance_embeds (FLUX.1 [dev] LoRAs are run on [schnell]), nor sample_size,
# qk_norm or the rope axes (no LoRA weight's shape depends on them). The module-by-module shape check still refuses
# a LoRA on a module that does not fit.
TRANSFORMER_ARCHITECTURE_KEYS = (
    "num_layers",
    "num_single_layers",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
    "caption_projection_dim",
    "pooled_projection_dim",
    "patch_size",
    "dual_attention_layers",
)
_DESCRIBED_TRANSFORMER_KEYS = (
    "num_layers",
    "num_single_layers",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
)

# Either prefix is read for either model: a UNet LoRA's modules do not exist in a transformer, nor the reverse, so
# such a LoRA is refused by the module check with the module named.
_DIFFUSERS_KEY = re.compile(
    r"^(?:unet\.|transformer\.)?(?P<module>.+?)\.(?P<part>lora\.down|lora\.up|lora_A|lora_B)(?:\.default)?\.weight$"
)
_KOHYA_KEY = re.compile(r"^lora_(?:unet|transformer)_(?P<module>[^.]+)\.(?P<part>lora_down|lora_up)\.weight$")
_HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_IGNORED_KEY = re.compile(r"^(text_encoder|text_encoder_2|lora_te\d?)[._]|\.alpha$|\.dora_scale$|lora_magnitude_vector")


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel (or similar `.module`) wrapper and torch.compile."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return unwrap_module(model)


def add_lora(
    model: torch.nn.Module,
    rank: int = 4,
    alpha: float | None = None,
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
    dropout: float = 0.0,
) -> LoraConfig:
    """Freeze `model` (a UNet or a transformer) and add a trainable peft LoRA (adapter "default") to
    `target_modules`; alpha defaults to rank. Returns the `LoraConfig`. lora_B starts at zero, so the model's output
    is unchanged until training moves it."""
    from peft import LoraConfig

    config = LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        target_modules=list(target_modules),
        lora_dropout=dropout,
        init_lora_weights="gaussian",
    )
    model.requires_grad_(False)
    model.add_adapter(config)
    return config


@contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Run the base model: the denoiser with its LoRA adapters switched off (the reference of DPO and PRDP)."""
    model = unwrap_model(model)
    model.disable_adapters()
    try:
        yield
    finally:
        model.enable_adapters()


def adapters_are_identity(model: torch.nn.Module) -> bool:
    """True while every LoRA up-projection (lora_B) is exactly zero, as `add_lora` leaves it: the adapters then add
    exact zeros, so running with them switched off gives the same numbers at less cost."""
    ups = [
        parameter
        for module in unwrap_model(model).modules()
        if isinstance(getattr(module, "lora_B", None), torch.nn.ModuleDict)
        for up in module.lora_B.values()
        for parameter in up.parameters()
        if parameter.numel()
    ]
    if not ups:
        return False
    # One device sync for all layers (a per-layer test would sync once per LoRA layer on a GPU); the layers of a
    # split or offloaded model may sit on several devices.
    device = ups[0].device
    largest = torch.stack([parameter.detach().abs().amax().float().to(device) for parameter in ups]).amax()
    return not bool(largest)


@contextmanager
def adapters_skipped_while_identity(model: torch.nn.Module) -> Iterator[None]:
    """Switch the adapters off while they are the identity (an untrained LoRA: the first round's samples); else run
    the model as it is."""
    with adapters_disabled(model) if adapters_are_identity(model) else nullcontext():
        yield


def denoiser_prefix(model: torch.nn.Module) -> str:
    """diffusers' component name of the denoiser, the prefix of its LoRA keys: "transformer" for a diffusion
    transformer (SD3Transformer2DModel, FluxTransformer2DModel, ...), else "unet". Told by the class name, which
    every diffusers DiT class carries, so that a model class ganrm does not know keeps the UNet behaviour."""
    return TRANSFORMER_PREFIX if "Transformer" in type(unwrap_model(model)).__name__ else UNET_PREFIX


def _architecture_keys(model: torch.nn.Module) -> tuple[str, ...]:
    if denoiser_prefix(model) == UNET_PREFIX:
        return ARCHITECTURE_KEYS
    return tuple(key for key in TRANSFORMER_ARCHITECTURE_KEYS if key in model.config)


def _model_word(model: torch.nn.Module) -> str:
    return "UNet" if denoiser_prefix(model) == UNET_PREFIX else "transformer"


def base_model_fingerprint(model: torch.nn.Module, pretrained_model: str | None = None) -> dict:
    """What a LoRA file records about the denoiser it was trained on: class, architecture, sample size, pretrained
    id. A UNet records every ARCHITECTURE_KEYS entry; a transformer the TRANSFORMER_ARCHITECTURE_KEYS its class has."""
    model = unwrap_model(model)
    config = model.config
    fingerprint = {
        "class": type(model).__name__,
        **{key: config.get(key) for key in _architecture_keys(model)},
        "sample_size": config.get("sample_size"),
        "pretrained": pretrained_model or config.get("_name_or_path") or None,
    }
    return json.loads(json.dumps(fingerprint))  # tuples become lists, as they come back from a file


def describe_base_model(fingerprint: Mapping) -> str:
    """The recorded base model in words: its name, class and the entries that tell its architectures apart."""
    name = fingerprint.get("pretrained") or "an unnamed model"
    if "block_out_channels" in fingerprint:  # a UNet's fingerprint
        return (
            f"{name} ({fingerprint.get('class')}, cross_attention_dim={fingerprint.get('cross_attention_dim')}, "
            f"block_out_channels={fingerprint.get('block_out_channels')}, "
            f"addition_embed_type={fingerprint.get('addition_embed_type')})"
        )
    details = ", ".join(f"{key}={fingerprint[key]}" for key in _DESCRIBED_TRANSFORMER_KEYS if key in fingerprint)
    return f"{name} ({', '.join(filter(None, [str(fingerprint.get('class')), details]))})"


def lora_state_dicts(
    model: torch.nn.Module, adapter_name: str = "default"
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The adapter's weights as (diffusers-format, ComfyUI-format) state dicts, float32 on the CPU (see the module
    docstring for the two formats of UNets and of transformers)."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict

    model = unwrap_model(model)
    prefix = denoiser_prefix(model)
    peft_state = {
        f"{prefix}.{key}": value.detach().to("cpu", torch.float32).contiguous()
        for key, value in get_peft_model_state_dict(model, adapter_name=adapter_name).items()
    }
    # The trained scale is peft's `scaling` (alpha / rank, or alpha / sqrt(rank) with rsLoRA); ComfyUI applies
    # alpha / rank, so the alpha to write is scaling * rank, per module (peft's rank_pattern / alpha_pattern).
    alphas = {
        name: float(module.scaling[adapter_name] * module.r[adapter_name])
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in module.scaling
    }
    if prefix == UNET_PREFIX:
        comfyui, diffusers = convert_state_dict_to_kohya(peft_state), convert_state_dict_to_diffusers(peft_state)
        alpha_keys = {name: f"lora_unet_{name.replace('.', '_')}.alpha" for name in alphas}
        converted = set(comfyui)  # the converter writes an alpha (= rank) for each module it converted
    else:
        # diffusers' SD3 / FLUX training scripts save the PEFT keys as they are (`save_lora_weights` only adds the
        # component prefix), and ComfyUI reads those same keys: only the alphas are added for ComfyUI.
        diffusers, comfyui = peft_state, dict(peft_state)
        alpha_keys = {name: f"{prefix}.{name}.alpha" for name in alphas}
        converted = {key.removesuffix(".lora_A.weight") + ".alpha" for key in comfyui if key.endswith(".lora_A.weight")}
    for name, key in alpha_keys.items():
        if key not in converted:
            raise RuntimeError(f"the LoRA module {name} is missing from the ComfyUI state dict")
        comfyui[key] = torch.tensor(alphas[name])
    return diffusers, comfyui


def save_lora(
    model: torch.nn.Module,
    output_dir: str | Path,
    pretrained_model: str | None = None,
    adapter_name: str = "default",
) -> tuple[Path, Path]:
    """Write the denoiser's LoRA as `DIFFUSERS_WEIGHT_NAME` and `COMFYUI_WEIGHT_NAME` in `output_dir`, atomically.
    Returns the two paths. `pretrained_model` (a Hub id or folder) is recorded; default: the model's own."""
    model = unwrap_model(model)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    diffusers_state, comfyui_state = lora_state_dicts(model, adapter_name)
    fingerprint = json.dumps(base_model_fingerprint(model, pretrained_model), sort_keys=True)
    # diffusers' loaders keep the metadata entries under their component's prefix and build the LoraConfig from
    # them (lora_alpha included), as the pipelines' save_lora_weights write them.
    prefix = denoiser_prefix(model)
    lora_config = {f"{prefix}.{key}": value for key, value in model.peft_config[adapter_name].to_dict().items()}
    lora_config = json.dumps(lora_config, sort_keys=True, default=list)  # target_modules is a set
    diffusers_path, comfyui_path = output_dir / DIFFUSERS_WEIGHT_NAME, output_dir / COMFYUI_WEIGHT_NAME
    save_tensors_atomic(
        diffusers_path,
        diffusers_state,
        {"format": "pt", BASE_MODEL_METADATA_KEY: fingerprint, LORA_ADAPTER_METADATA_KEY: lora_config},
    )
    save_tensors_atomic(comfyui_path, comfyui_state, {"format": "pt", BASE_MODEL_METADATA_KEY: fingerprint})
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
    lora: str | Path | Mapping[str, torch.Tensor], model: torch.nn.Module, weight_name: str | None = None
) -> None:
    """Raise `LoraCompatibilityError` unless the LoRA fits `model` (a UNet or a transformer): its recorded base model
    (when the file has our metadata) has the model's class and architecture, and every LoRA weight of the denoiser
    maps onto one of its modules with matching shapes.

    Reads diffusers/PEFT keys (`unet.` or `transformer.` prefixed, or bare) and kohya keys with diffusers module
    names (and for UNets SGM block names); text encoder keys are not checked. Other formats (e.g. FLUX LoRAs keyed
    by BFL's block names) are refused as of no known format."""
    state_dict, metadata = read_lora(lora, weight_name)
    name = "the LoRA state dict" if isinstance(lora, Mapping) else f"LoRA {lora}"
    model = unwrap_model(model)
    word = _model_word(model)
    expected = base_model_fingerprint(model)
    if BASE_MODEL_METADATA_KEY in metadata:
        try:
            made_for = json.loads(metadata[BASE_MODEL_METADATA_KEY])
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{name} has a corrupt {BASE_MODEL_METADATA_KEY} metadata entry: {error}") from error
        if made_for.get("class") != expected["class"]:
            differing = ["class"]  # entries of the same name mean other things in other classes
        else:
            # An entry the file does not record is not compared: a file written before the entry was added still
            # loads (every file ganrm wrote records all of a UNet's entries, so UNets compare them all as before).
            differing = [key for key in _architecture_keys(model) if key in made_for and made_for[key] != expected[key]]
        if differing:
            raise LoraCompatibilityError(
                f"{name} was made for {describe_base_model(made_for)}, but the {word} it is loaded into is "
                f"{describe_base_model(expected)}; they differ in {', '.join(differing)}"
            )

    modules = dict(model.named_modules())
    layers, unknown = _lora_layers(state_dict, model)
    if not layers and not unknown:
        raise LoraCompatibilityError(f"{name} holds no {word} LoRA weights")
    problems = [f"{key}: not a {word} LoRA key of a known format" for key in unknown]
    for module_name, shapes in sorted(layers.items()):
        module = modules.get(module_name)
        module = getattr(module, "base_layer", module)  # a module that already carries a peft LoRA
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            problems.append(f"{module_name}: no such linear or convolution module in the {word}")
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
                f"{module_name}: LoRA maps {down[1]} -> {up[0]} features, the {word} module {fan_in} -> {fan_out}"
            )
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise LoraCompatibilityError(
            f"{name} does not fit the {word} of {describe_base_model(expected)}: {len(problems)} of its "
            f"{len(layers) + len(unknown)} LoRA modules do not map onto it ({shown}). Was it made for another base model?"
        )


def _lora_layers(
    state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module
) -> tuple[dict[str, dict[str, torch.Size]], list[str]]:
    """{module name: {"down": shape, "up": shape}} of a LoRA state dict, and the keys of no known LoRA format."""
    if denoiser_prefix(model) == UNET_PREFIX:
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
        elif diffusers_key := _DIFFUSERS_KEY.match(key):
            module_name = diffusers_key["module"]
            part = "down" if diffusers_key["part"] in ("lora.down", "lora_A") else "up"
        else:
            unknown.append(key)
            continue
        layers.setdefault(module_name, {})[part] = tensor.shape
    return layers, unknown


def pipeline_denoiser(pipe: DiffusionPipeline) -> torch.nn.Module:
    """The model a pipeline's LoRA goes into: ganrm's `denoiser`, else diffusers' `transformer` or `unet`."""
    for attribute in ("denoiser", "transformer", "unet"):
        model = getattr(pipe, attribute, None)
        if isinstance(model, torch.nn.Module):
            return model
    raise TypeError(f"{type(pipe).__name__} has no UNet or transformer to load a LoRA into")


def load_lora_into_pipeline(
    pipe: DiffusionPipeline, lora: str | Path | Mapping[str, torch.Tensor], weight_name: str | None = None, **kwargs
) -> None:
    """`check_lora_compatible`, then diffusers' `pipe.load_lora_weights` (kwargs such as adapter_name go to it).
    A pipeline class that overrides `load_lora_weights` calls `check_lora_compatible` and then super()'s instead."""
    check_lora_compatible(lora, pipeline_denoiser(pipe), weight_name)
    if not isinstance(lora, Mapping):
        lora = str(resolve_lora_file(lora, weight_name))  # the very file that was checked
    pipe.load_lora_weights(lora, **kwargs)
