"""A real CLIP tokenizer (the one Stable Diffusion uses), built offline from the BPE vocabulary open_clip ships."""

from __future__ import annotations

from open_clip.tokenizer import SimpleTokenizer
from transformers import CLIPTokenizer

# open_clip and transformers name the two special tokens differently; their ids (49406, 49407) are the same.
_SPECIAL_TOKEN_NAMES = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}


def build_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """The 49408-token CLIP BPE tokenizer as a transformers `CLIPTokenizer`, with open_clip's ids."""
    reference = SimpleTokenizer()
    vocab = {_SPECIAL_TOKEN_NAMES.get(token, token): index for token, index in reference.encoder.items()}
    merges = [pair for pair, _ in sorted(reference.bpe_ranks.items(), key=lambda item: item[1])]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
