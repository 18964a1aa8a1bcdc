"""Tiny random Stable Diffusion 1.x, SDXL, SD3, FLUX.1, FLUX.2-klein and Qwen-Image pipelines built from configs,
offline, for tests.

Same seed, same weights: building twice gives two independent pipelines with identical parameters, which is how
tests get a "fresh pipeline" to load a saved LoRA into. The real CLIP tokenizer comes from open_clip's bundled
vocabulary; the Qwen tokenizer is a small byte-level BPE built in code. Images are 32x32 by default (16x16 latents),
a few UNet calls a second on a CPU.
"""

from __future__ import annotations

import functools
import itertools

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    AutoencoderKLQwenImage,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    FluxPipeline,
    FluxTransformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3ForCausalLM,
    T5Config,
    T5EncoderModel,
)

from ganrm_diffusers.world.tokenizer import build_clip_tokenizer

TEXT_HIDDEN_SIZE = 32
IMAGE_SIZE = 32  # pixels; the two-block VAE halves it


@functools.lru_cache(maxsize=1)
def _tokenizer() -> CLIPTokenizer:
    return build_clip_tokenizer()


def tiny_tokenizer() -> CLIPTokenizer:
    """The real 49408-token CLIP tokenizer (shared, read-only)."""
    return _tokenizer()


def tiny_scheduler() -> DDIMScheduler:
    """DDIM with Stable Diffusion's own schedule settings."""
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def tiny_vae(**overrides: object) -> AutoencoderKL:
    """The two-block autoencoder (images twice the latent size); `overrides` change its config."""
    config = {
        "block_out_channels": (32, 64),
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
        "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
        "latent_channels": 4,
        "sample_size": IMAGE_SIZE,
    }
    return AutoencoderKL(**{**config, **overrides})


def _text_config(hidden_size: int = TEXT_HIDDEN_SIZE) -> CLIPTextConfig:
    tokenizer = tiny_tokenizer()
    return CLIPTextConfig(
        hidden_size=hidden_size,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=TEXT_HIDDEN_SIZE,
        hidden_act="gelu",
    )


def tiny_sd_unet(cross_attention_dim: int = TEXT_HIDDEN_SIZE, block_out_channels: tuple[int, ...] = (32, 64)):
    """An SD-1.x-shaped UNet (cross-attention on the text encoder's hidden states), about 1 M parameters."""
    depth = len(block_out_channels)
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=block_out_channels,
        layers_per_block=1,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (depth - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (depth - 1) + ("UpBlock2D",),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
    )


def tiny_sd_pipeline(seed: int = 0, cross_attention_dim: int = TEXT_HIDDEN_SIZE) -> StableDiffusionPipeline:
    """A random SD-1.x-shaped pipeline with a DDIM scheduler. Another `cross_attention_dim` makes another "base
    model" (as SD 2.x differs from SD 1.x): its text encoder's width follows."""
    torch.manual_seed(seed)
    unet = tiny_sd_unet(cross_attention_dim)
    vae = tiny_vae()
    text_encoder = CLIPTextModel(_text_config(hidden_size=cross_attention_dim))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_tokenizer(),
        unet=unet,
        scheduler=tiny_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """A random SDXL-shaped pipeline: two text encoders (hidden states concatenated to 64), pooled text embeddings
    and size/crop time ids as added conditioning, linear attention projections, a DDIM scheduler."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + TEXT_HIDDEN_SIZE,
        cross_attention_dim=2 * TEXT_HIDDEN_SIZE,
    )
    vae = tiny_vae()
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(_text_config()),
        text_encoder_2=CLIPTextModelWithProjection(_text_config()),
        tokenizer=tiny_tokenizer(),
        tokenizer_2=tiny_tokenizer(),
        unet=unet,
        scheduler=tiny_scheduler(),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """A random SD3-shaped pipeline without T5 (as SD3 runs with text_encoder_3=None): two CLIP encoders with
    projections (hidden states concatenated to 64, pooled to 64), a one-layer MMDiT, a flow-matching scheduler."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 2,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=2 * TEXT_HIDDEN_SIZE,
        caption_projection_dim=32,
        pooled_projection_dim=2 * TEXT_HIDDEN_SIZE,
        pos_embed_max_size=IMAGE_SIZE // 2,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_flow_vae(latent_channels=4),
        text_encoder=CLIPTextModelWithProjection(_text_config()),
        tokenizer=tiny_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(_text_config()),
        tokenizer_2=tiny_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True) -> FluxPipeline:
    """A random FLUX.1-shaped pipeline: CLIP (pooled) and a tiny T5 (hidden states) with a word-level tokenizer
    built in code, one double and one single stream block, a one-channel VAE (FLUX packs 2x2 latents into 4
    channels), the distilled guidance embedding of FLUX.1-dev (or none, as FLUX.1-schnell)."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=TEXT_HIDDEN_SIZE,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(_t5_tokenizer()),
            d_model=32,
            d_ff=37,
            d_kv=8,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            dropout_rate=0.0,  # a model built from a config starts in training mode: no dropout at inference
        )
    ).eval()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_flow_vae(latent_channels=1),
        text_encoder=CLIPTextModel(_text_config()),
        tokenizer=tiny_tokenizer(),
        text_encoder_2=t5,
        tokenizer_2=_t5_tokenizer(),
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _flow_vae(latent_channels: int) -> AutoencoderKL:
    """The tiny VAE with SD3 / FLUX's latent shift (latents = (z - shift) * scale)."""
    return tiny_vae(
        latent_channels=latent_channels,
        shift_factor=0.0609,
        scaling_factor=1.5035,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


@functools.lru_cache(maxsize=1)
def _t5_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level stand-in for T5's tokenizer (no T5 vocabulary can be downloaded): pad 0, eos 1, unk 2."""
    words = ["<pad>", "</s>", "<unk>", "a", "an", "the", "handwritten", "digit", "cat", "dog", "photo", "of"]
    words += [str(digit) for digit in range(10)]
    tokenizer = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=16
    )


# The real checkpoints' positions are 40960 (Qwen3) and 128000 (Qwen2.5-VL); this covers FLUX.2-klein's default
# max_sequence_length (512) and Qwen-Image's 1024 tokens plus its 34-token template prefix.
QWEN_MAX_LENGTH = 2048

# Words the Qwen tokenizer keeps whole: Qwen-Image's template (so its system prefix is 34 tokens, as with the real
# tokenizer), the chat roles, and a few prompt words. Anything else falls back to single bytes, never to <unk>.
_QWEN_WORDS = (
    "system user assistant think Describe the image by detailing color shape size texture quantity text spatial "
    "relationships of objects and background a an handwritten digit cat dog photo"
).split()
_QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Qwen3's chat template cut down to what FLUX.2-klein uses: user turns, the generation prompt, and the empty
# <think> block that enable_thinking=False adds.
_QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one pre-tokenized word: apply the best-ranked merge until none applies."""
    while len(pieces) > 1:
        candidates = [(ranks[pair], i) for i, pair in enumerate(itertools.pairwise(pieces)) if pair in ranks]
        if not candidates:
            break
        i = min(candidates)[1]
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2 :]
    return pieces


@functools.lru_cache(maxsize=1)
def _qwen_tokenizer() -> Qwen2Tokenizer:
    """A stand-in for the Qwen2.5 / Qwen3 tokenizer (none can be downloaded): transformers' own Qwen2Tokenizer
    class (Qwen2TokenizerFast is the same class in transformers 5) over the 256 byte-level symbols, merges that
    spell `_QWEN_WORDS` whole (each new merge joins the first two pieces the earlier merges leave, so no later word
    breaks an earlier one), Qwen's special tokens, <think> / </think> as added tokens, and a Qwen3-style chat
    template. About 400 tokens; pads on the right with <|endoftext|>, like the real one."""
    ranks: dict[tuple[str, str], int] = {}
    for word in _QWEN_WORDS:
        for form in (word, "\u0120" + word):  # bare, and after a space ("Ġ" in byte-level symbols)
            pieces = _bpe(list(form), ranks)
            while len(pieces) > 1:
                ranks[(pieces[0], pieces[1])] = len(ranks)
                pieces = _bpe(pieces, ranks)
    merges = sorted(ranks, key=ranks.__getitem__)
    vocab = {symbol: index for index, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    for token in _QWEN_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(_QWEN_SPECIAL_TOKENS[1:]),
        model_max_length=QWEN_MAX_LENGTH,
        chat_template=_QWEN3_CHAT_TEMPLATE,
    )
    tokenizer.add_tokens(["<think>", "</think>"])
    return tokenizer


def _flow_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Flow matching with resolution-dependent shifting, as FLUX.2 and Qwen-Image ship it (their pipelines always
    compute and pass `mu` from the image's token count)."""
    return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")


def tiny_flux2_klein_pipeline(seed: int = 0, is_distilled: bool = False) -> Flux2KleinPipeline:
    """A random FLUX.2-klein-shaped pipeline: a 28-layer Qwen3 text encoder (hidden size 16) whose hidden states
    after layers 9, 18 and 27 (the pipeline's default `text_encoder_out_layers`) are concatenated into 48-wide text
    tokens, one double and one single stream block without a guidance embedding, and the two-block FLUX.2 VAE
    (32 px images, 16x16x4 latents, patchified to 8x8 tokens of 16 channels, normalized by the VAE's batch-norm
    statistics). `is_distilled` is the step-distilled klein flag: it turns classifier-free guidance off.

    Pass the prompt by keyword: the pipeline's first positional parameter is `image`. The pipeline pads every prompt
    to `max_sequence_length` (default 512) tokens and runs the denoiser on all of them; the defaults work (0.1-0.2 s
    for two steps on an idle 2-core CPU), and `max_sequence_length=32` (the chat-templated prompt is 19 tokens)
    about halves that."""
    torch.manual_seed(seed)
    tokenizer = _qwen_tokenizer()
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=28,  # the default text_encoder_out_layers (9, 18, 27) need 28 layers
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=QWEN_MAX_LENGTH,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            eos_token_id=tokenizer.eos_token_id,
        )
    ).eval()  # a model built from a config starts in training mode
    latent_channels = 4
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,  # 2x2 patches of latents
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * text_encoder.config.hidden_size,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,
    ).eval()
    vae = AutoencoderKLFlux2(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=latent_channels,
        sample_size=IMAGE_SIZE,
    ).eval()
    # Fresh batch-norm statistics (mean 0, variance 1) would make the latent normalization a no-op and hide code
    # that skips it.
    vae.bn.running_mean.uniform_(-0.5, 0.5)
    vae.bn.running_var.uniform_(0.5, 2.0)
    pipe = Flux2KleinPipeline(
        scheduler=_flow_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=is_distilled,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_qwenimage_pipeline(seed: int = 0) -> QwenImagePipeline:
    """A random Qwen-Image-shaped pipeline: a two-layer Qwen2.5-VL text encoder (hidden size 32, multimodal rotary
    sections 2/3/3, a one-block vision tower that text prompts never reach) whose last hidden states, minus the
    34-token system prefix of the pipeline's template, are the text tokens; a one-block MMDiT; and the two-stage
    causal 3-D Qwen-Image VAE (32 px images, 16x16x4 latents with Qwen-Image's first four latent means and standard
    deviations, packed to 8x8 tokens of 16 channels).

    Classifier-free guidance runs only with a `negative_prompt` (true_cfg_scale defaults to 4.0). Prompts are not
    padded; `max_sequence_length` (default 512) only truncates and needs no override."""
    torch.manual_seed(seed)
    tokenizer = _qwen_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    text_encoder = Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(
            text_config={
                "vocab_size": len(tokenizer),
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "max_position_embeddings": QWEN_MAX_LENGTH,
                "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1000000.0},
                "bos_token_id": ids("<|endoftext|>"),
                "eos_token_id": tokenizer.eos_token_id,
            },
            vision_config={
                "depth": 1,
                "hidden_size": 16,
                "intermediate_size": 16,
                "num_heads": 2,
                "out_hidden_size": 32,
                "fullatt_block_indexes": [0],
            },
            image_token_id=ids("<|image_pad|>"),
            video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"),
            vision_end_token_id=ids("<|vision_end|>"),
        )
    ).eval()
    z_dim = 4
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * z_dim,  # 2x2 patches of latents
        out_channels=z_dim,
        num_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=text_encoder.config.text_config.hidden_size,
        axes_dims_rope=(8, 4, 4),
    ).eval()
    vae = AutoencoderKLQwenImage(
        base_dim=16,
        z_dim=z_dim,
        dim_mult=[1, 2],
        num_res_blocks=1,
        temperal_downsample=[False],
        latents_mean=[-0.7571, -0.7089, -0.9113, 0.1075],
        latents_std=[2.8184, 1.4541, 2.3275, 2.6558],
    ).eval()
    pipe = QwenImagePipeline(
        scheduler=_flow_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def train_pretend(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Move every lora_B of a model carrying a fresh LoRA away from peft's zero start, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))
