"""The world's two generators as the demo samples, selects and fine-tunes them.

The one place that knows, for each generator, which pipeline to load, its sampling settings, the report family its
rows go in, and its stochastic sampler: the selection rows, the fine-tuning rows and their tuning runs all take a
`Generator` instead of asking "UNet or flow?" themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from diffusers import DiffusionPipeline

from ganrm_diffusers.generation.lora import load_lora_into_pipeline
from ganrm_diffusers.world.samples import EvaluationPlan, SampleSet, sample_digits

FLOW_FAMILY = "sd3_flow"  # the report key of the flow-matching generator's rows: families.<FLOW_FAMILY>
FLOW_STOCHASTIC_ETA = 0.7  # the flow SDE's noise level for its FK group (Flow-GRPO's a; it must stay below 1)


@dataclass(frozen=True)
class Generator:
    """One of the world's generators: its folder, sampling settings and the sampler noise its stochastic (FK) group
    uses, with the suffix of that group's rows."""

    world: object = field(repr=False)
    kind: str  # "unet" or "flow": the key of its recorded choices (TUNED_PRUNING)
    family: str  # its report family and output sub-folder; "" for the UNet one (the report's top-level rows)
    pipeline_dir: Path
    sampling: dict
    stochastic_eta: float  # DDIM's eta for the UNet; the flow step's noise level for flow matching
    stochastic_suffix: str

    @classmethod
    def unet(cls, world: object) -> Generator:
        return cls(world, "unet", "", world.pipeline_dir, world.sampling_kwargs, 1.0, "_eta1")

    @classmethod
    def flow(cls, world: object) -> Generator:
        # Flow-GRPO's noise level a = 0.7 (eta must stay below 1 for the flow SDE).
        return cls(
            world, "flow", FLOW_FAMILY, world.flow_pipeline_dir, world.flow_sampling_kwargs, FLOW_STOCHASTIC_ETA, "_sde"
        )

    def load(self) -> DiffusionPipeline:
        """The plain diffusers pipeline, progress bar off (the demo shows its own)."""
        pipe = self.world.load_flow_pipeline() if self.kind == "flow" else self.world.load_pipeline()
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def sample_with_lora(self, lora: Path, plan: EvaluationPlan, batch_size: int, desc: str) -> SampleSet:
        """One sample per prompt of `plan` from this generator with the LoRA in `lora` fused into its weights, as
        users deploy a LoRA: sampled faster, the same images within 1e-6 (measured: 9.8e-7 at most over 64 images
        of the world's DPO LoRA)."""
        pipe = self.load()
        load_lora_into_pipeline(pipe, lora)
        pipe.fuse_lora()
        return sample_digits(pipe, self.world, plan, batch_size, self.label(desc), self.sampling)

    def label(self, text: str) -> str:
        """A progress or folder label prefixed with the family: "sd3_flow dpo evaluation", "dpo evaluation"."""
        return f"{self.family} {text}".strip()
