"""ganrm: GAN-RM reward models and reward-guided generation for diffusers and ComfyUI.

Public names are imported lazily, so `import ganrm_diffusers` stays cheap (ComfyUI imports the pack at start-up).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "GANRewardModel": "ganrm_diffusers.reward.model",
    "ClipBackbone": "ganrm_diffusers.reward.backbone",
    "EmbeddingCache": "ganrm_diffusers.reward.embedding_cache",
    "RewardTrainingConfig": "ganrm_diffusers.reward.training",
    "fit_reward_model": "ganrm_diffusers.reward.training",
    "PromptedImages": "ganrm_diffusers.reward.training",
    "bootstrap_round": "ganrm_diffusers.reward.training",
    "Selection": "ganrm_diffusers.generation.selection",
    "select_top_k": "ganrm_diffusers.generation.selection",
    "GanrmError": "ganrm_diffusers.utils.errors",
    "RewardGuidedPipeline": "ganrm_diffusers.generation.pipeline",
    "RewardGuidedXLPipeline": "ganrm_diffusers.generation.pipeline",
    "RewardGuidedPipelineOutput": "ganrm_diffusers.generation.pipeline",
    "RewardGuidedSD3Pipeline": "ganrm_diffusers.generation.pipeline_flow",
    "RewardGuidedFluxPipeline": "ganrm_diffusers.generation.pipeline_flow",
    "RewardGuidedFlux2KleinPipeline": "ganrm_diffusers.generation.pipeline_flow",
    "RewardGuidedQwenImagePipeline": "ganrm_diffusers.generation.pipeline_flow",
    "UnsupportedPipelineError": "ganrm_diffusers.generation.pipeline",
    "load_reward_guided_pipeline": "ganrm_diffusers.generation.pipeline",
    "PruneSchedule": "ganrm_diffusers.generation.pruning",
    "FKResampling": "ganrm_diffusers.generation.pruning",
    "SampleSettings": "ganrm_diffusers.generation.candidates",
    "generate_candidates": "ganrm_diffusers.generation.candidates",
    "write_candidate_folder": "ganrm_diffusers.generation.candidates",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ganrm_diffusers' has no attribute {name!r}")
