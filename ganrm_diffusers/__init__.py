"""ganrm: GAN-RM reward models and reward-guided generation for diffusers and ComfyUI.

Public names are imported lazily, so `import ganrm_diffusers` stays cheap (ComfyUI imports the pack at start-up).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "GANRewardModel": "ganrm_diffusers.reward_model",
    "ClipBackbone": "ganrm_diffusers.backbone",
    "EmbeddingCache": "ganrm_diffusers.embedding_cache",
    "RewardTrainingConfig": "ganrm_diffusers.rm_training",
    "fit_reward_model": "ganrm_diffusers.rm_training",
    "PromptedImages": "ganrm_diffusers.rm_training",
    "bootstrap_round": "ganrm_diffusers.rm_training",
    "Selection": "ganrm_diffusers.selection",
    "select_top_k": "ganrm_diffusers.selection",
    "GanrmError": "ganrm_diffusers.errors",
    "RewardGuidedPipeline": "ganrm_diffusers.pipeline",
    "RewardGuidedXLPipeline": "ganrm_diffusers.pipeline",
    "RewardGuidedPipelineOutput": "ganrm_diffusers.pipeline",
    "load_reward_guided_pipeline": "ganrm_diffusers.pipeline",
    "PruneSchedule": "ganrm_diffusers.pruning",
    "FKResampling": "ganrm_diffusers.pruning",
    "SampleSettings": "ganrm_diffusers.candidates",
    "generate_candidates": "ganrm_diffusers.candidates",
    "write_candidate_folder": "ganrm_diffusers.candidates",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ganrm_diffusers' has no attribute {name!r}")
