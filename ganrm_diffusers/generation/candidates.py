"""Sampling scored candidates for many prompts: the data source of best-of-N selection, SFT and DPO.

`generate_candidates` runs a reward-guided pipeline over prompts and yields, per prompt, every candidate with its
seed and reward. `write_candidate_folder` writes them as a Hugging Face imagefolder dataset:

    DIR/000012_03.png ...                      candidate 3 of prompt 12
    DIR/metadata.jsonl                         one record per image: file_name, prompt, prompt_index, candidate,
                                               seed, score, rank (0 = the prompt's best)
    DIR/.ganrm-sample.json                     the settings of the run (a resumed run must use the same)
    DIR/.parts/process-<i>.jsonl               records as each process finishes a prompt (merged at the end)

It is resumable (prompts with records are skipped) and runs unchanged under `accelerate launch`: the prompts are
split across processes, each process appends its own part file, and the main process merges them at the end.
Candidate seeds depend only on the prompt's index and the run's seed, so the split does not change any image.
`load_dataset("imagefolder", data_dir=DIR)` reads the folder (hidden files are ignored).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import PIL.Image
import torch
from tqdm.auto import tqdm

from ganrm_diffusers.utils.atomic import save_png_atomic, write_text_atomic
from ganrm_diffusers.utils.errors import GanrmError
from ganrm_diffusers.utils.options import option

logger = logging.getLogger(__name__)

METADATA_NAME = "metadata.jsonl"
SETTINGS_NAME = ".ganrm-sample.json"
PARTS_DIR = ".parts"


class SampleFolderError(GanrmError, ValueError):
    """An output folder that holds another run (other settings or other prompts), or unreadable records."""


@dataclass(frozen=True)
class SampleSettings:
    """What decides the candidates of a run: the same settings and prompts give the same images."""

    num_candidates: int = option(8, "candidates per prompt")
    num_inference_steps: int = option(50, "denoising steps", aliases=("--steps",))
    guidance_scale: float | None = option(None, "classifier-free guidance (default: the pipeline's)")
    height: int | None = option(None, "image height (default: the pipeline's)")
    width: int | None = option(None, "image width (default: the pipeline's)")
    negative_prompt: str | None = option(None, "negative prompt of every candidate")
    eta: float = option(
        0.0, "DDIM eta, or the flow step's noise level in [0, 1) for SD3 / FLUX (0: deterministic steps)"
    )
    seed: int = option(0, "candidate j of prompt i gets seed + i * num_candidates + j")
    # Where the images come from (recorded so that a resumed run cannot mix models; not pipeline arguments).
    pipeline: str | None = option(
        None,
        "diffusers pipeline of a supported family (SD 1.x/2.x, SDXL, SD3.x, FLUX.1, FLUX.2 klein, Qwen-Image): folder or Hub id",
    )
    reward_model: str | None = option(None, "reward model folder or Hub id (default: the one saved with the pipeline)")
    lora: str | None = option(None, "a LoRA (file, folder or Hub id) to load into the pipeline first")

    def seeds(self, prompt_index: int) -> list[int]:
        """The candidates' seeds of prompt number `prompt_index` (independent of how prompts are split)."""
        first = self.seed + prompt_index * self.num_candidates
        return list(range(first, first + self.num_candidates))

    def pipeline_kwargs(self) -> dict:
        kwargs = {
            "num_candidates": self.num_candidates,
            "num_inference_steps": self.num_inference_steps,
            "height": self.height,
            "width": self.width,
            "negative_prompt": self.negative_prompt,
            "eta": self.eta,
        }
        if self.guidance_scale is not None:
            kwargs["guidance_scale"] = self.guidance_scale
        return kwargs


@dataclass
class PromptCandidates:
    """Every candidate of one prompt, in seed order, with its reward (images: PIL, or an NCHW tensor in [0, 1])."""

    prompt: str
    prompt_index: int
    seeds: list[int]
    images: list[PIL.Image.Image] | torch.Tensor
    scores: list[float]

    def ranks(self) -> list[int]:
        """0 for the best-scoring candidate (ties: the lower seed first), 1 for the next, ..."""
        order = sorted(range(len(self.scores)), key=lambda index: (-self.scores[index], index))
        ranks = [0] * len(order)
        for rank, index in enumerate(order):
            ranks[index] = rank
        return ranks


def generate_candidates(
    pipe: object,
    prompts: Sequence[str],
    settings: SampleSettings,
    prompt_indices: Sequence[int] | None = None,
    *,
    prompts_per_call: int = 1,
    candidate_batch_size: int | None = None,
    output_type: str = "pil",
    progress: bool = True,
) -> Iterator[PromptCandidates]:
    """Yield the scored candidates of each prompt (`prompts[i]` is prompt number `prompt_indices[i]`, which fixes
    its seeds). `prompts_per_call` prompts share one pipeline call; candidates go through the UNet
    `candidate_batch_size` at a time. `output_type="pt"` keeps the images as tensors (for training in memory)."""
    prompts = list(prompts)
    prompt_indices = list(range(len(prompts))) if prompt_indices is None else list(prompt_indices)
    if len(prompt_indices) != len(prompts):
        raise ValueError(f"{len(prompt_indices)} prompt indices for {len(prompts)} prompts")
    bar = tqdm(total=len(prompts), desc="sampling candidates", unit="prompt", disable=not progress)
    for start in range(0, len(prompts), prompts_per_call):
        texts = prompts[start : start + prompts_per_call]
        indices = prompt_indices[start : start + prompts_per_call]
        seeds = [seed for index in indices for seed in settings.seeds(index)]
        output = pipe(
            texts,
            seeds=seeds,
            top_k=1,
            output_type=output_type,
            return_candidates=True,
            candidate_batch_size=candidate_batch_size,
            **settings.pipeline_kwargs(),
        )
        count = settings.num_candidates
        for position, (text, index) in enumerate(zip(texts, indices, strict=True)):
            part = slice(position * count, (position + 1) * count)
            yield PromptCandidates(
                prompt=text,
                prompt_index=index,
                seeds=output.candidate_seeds[part],
                images=output.candidates[part] if output_type == "pt" else list(output.candidates[part]),
                scores=[float(score) for score in output.candidate_scores[part]],
            )
        bar.update(len(texts))
    bar.close()


# --------------------------------------------------------------------------------------------------------------
# The output folder


def image_file_name(prompt_index: int, candidate: int) -> str:
    return f"{prompt_index:06d}_{candidate:02d}.png"


def candidate_records(candidates: PromptCandidates) -> list[dict]:
    """The metadata.jsonl records of one prompt's candidates."""
    return [
        {
            "file_name": image_file_name(candidates.prompt_index, candidate),
            "prompt": candidates.prompt,
            "prompt_index": candidates.prompt_index,
            "candidate": candidate,
            "seed": seed,
            "score": score,
            "rank": rank,
        }
        for candidate, (seed, score, rank) in enumerate(
            zip(candidates.seeds, candidates.scores, candidates.ranks(), strict=True)
        )
    ]


def read_records(folder: str | Path) -> list[dict]:
    """All records of a candidate folder: metadata.jsonl and the part files of unfinished runs, one per image,
    sorted by prompt and candidate. A torn last line (a process killed while writing) is skipped."""
    folder = Path(folder)
    files = [folder / METADATA_NAME, *sorted((folder / PARTS_DIR).glob("*.jsonl"))]
    records: dict[str, dict] = {}
    for path in files:
        if not path.is_file():
            continue
        lines = path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                if number == len(lines):
                    logger.warning("ignoring the torn last line of %s", path)
                    continue
                raise SampleFolderError(f"{path} line {number} is not valid JSON: {error}") from error
            records[record["file_name"]] = record
    return sorted(records.values(), key=lambda record: (record["prompt_index"], record["candidate"]))


@dataclass
class SampleReport:
    folder: Path
    written_prompts: list[int] = field(default_factory=list)
    skipped_prompts: int = 0
    total_records: int = 0  # set on the main process, after the merge
    process_index: int = 0
    num_processes: int = 1


def finished_prompts(out_dir: str | Path, prompts: Sequence[str], settings: SampleSettings) -> set[int]:
    """The prompts of `prompts` whose candidates `out_dir` already holds (none if it does not exist). Raises
    `SampleFolderError` if the folder was sampled with other settings or from other prompts, so a caller can check
    before loading a pipeline."""
    folder = Path(out_dir)
    if (folder / SETTINGS_NAME).is_file():
        _check_or_write_settings(folder, settings, write=False)
    return _finished_prompts(read_records(folder), list(prompts), settings.num_candidates)


def write_candidate_folder(
    pipe: object,
    prompts: Sequence[str],
    out_dir: str | Path,
    settings: SampleSettings,
    *,
    prompts_per_call: int = 1,
    candidate_batch_size: int | None = None,
    progress: bool = True,
) -> SampleReport:
    """Sample every prompt's candidates into `out_dir` (see the module docstring), skipping finished prompts.

    Under `accelerate launch` each process takes its share of the unfinished prompts; the pipeline must already
    be on the process's device (`accelerate.PartialState().device`).
    """
    state = process_state()
    folder = Path(out_dir)
    prompts = list(prompts)
    if not prompts:
        raise SampleFolderError("no prompts to sample")
    if state.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / PARTS_DIR).mkdir(exist_ok=True)
        _check_or_write_settings(folder, settings)
    state.wait_for_everyone()
    _check_or_write_settings(folder, settings)  # every process fails alike on a mismatch

    done = finished_prompts(folder, prompts, settings)
    pending = [index for index in range(len(prompts)) if index not in done]
    state.wait_for_everyone()  # nobody writes before every process has read what is done
    report = SampleReport(
        folder=folder, skipped_prompts=len(done), process_index=state.process_index, num_processes=state.num_processes
    )
    with state.split_between_processes(pending) as mine:
        part_file = folder / PARTS_DIR / f"process-{state.process_index}.jsonl"
        batches = generate_candidates(
            pipe,
            [prompts[index] for index in mine],
            settings,
            mine,
            prompts_per_call=prompts_per_call,
            candidate_batch_size=candidate_batch_size,
            progress=progress and state.is_local_main_process,
        )
        for candidates in batches:
            for candidate, image in enumerate(candidates.images):
                save_png_atomic(image, folder / image_file_name(candidates.prompt_index, candidate))
            _append_records(part_file, candidate_records(candidates))
            report.written_prompts.append(candidates.prompt_index)
    state.wait_for_everyone()
    if state.is_main_process:
        report.total_records = _merge_records(folder)
    state.wait_for_everyone()
    return report


def _check_or_write_settings(folder: Path, settings: SampleSettings, write: bool = True) -> None:
    path = folder / SETTINGS_NAME
    wanted = asdict(settings)
    if path.is_file():
        recorded = json.loads(path.read_text(encoding="utf-8"))
        differing = sorted(key for key in wanted if recorded.get(key) != wanted[key])
        if differing:
            shown = ", ".join(f"{key}: {recorded.get(key)!r} there, {wanted[key]!r} now" for key in differing)
            raise SampleFolderError(
                f"{folder} holds candidates sampled with other settings ({shown}); resume with the same settings "
                "or choose another output folder"
            )
        return
    if write:
        write_text_atomic(path, json.dumps(wanted, indent=2))


def _finished_prompts(records: list[dict], prompts: list[str], num_candidates: int) -> set[int]:
    """Prompts whose every candidate has a record; records made from other prompts are an error."""
    counts: dict[int, int] = {}
    for record in records:
        index = record["prompt_index"]
        if index >= len(prompts) or prompts[index] != record["prompt"]:
            raise SampleFolderError(
                f"the output folder's prompt {index} is {record['prompt']!r}, but the prompt file's is "
                f"{prompts[index] if index < len(prompts) else 'missing'!r}: it was sampled from other prompts"
            )
        counts[index] = counts.get(index, 0) + 1
    return {index for index, count in counts.items() if count == num_candidates}


def _append_records(path: Path, records: list[dict]) -> None:
    """Append a prompt's records in one write, flushed to disk: a prompt counts as done only once they are."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(record) + "\n" for record in records))
        handle.flush()
        os.fsync(handle.fileno())


def _merge_records(folder: Path) -> int:
    """Rewrite metadata.jsonl from every record, then drop the part files that it now holds."""
    records = read_records(folder)
    write_text_atomic(folder / METADATA_NAME, "".join(json.dumps(record) + "\n" for record in records))
    for part in (folder / PARTS_DIR).glob("*.jsonl"):
        part.unlink()
    return len(records)


def read_prompts_file(path: str | Path) -> list[str]:
    """One prompt per non-empty line (surrounding whitespace removed)."""
    path = Path(path)
    if not path.is_file():
        raise SampleFolderError(f"prompt file {path} does not exist")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise SampleFolderError(f"prompt file {path} holds no prompts")
    return prompts


def process_state() -> object:
    """accelerate's `PartialState` of this process. Without a GPU (or with `accelerate launch --cpu`) the
    processes that a launcher started (torchrun, `accelerate launch --multi_gpu`, mpirun) join as CPU workers."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())


def default_device() -> torch.device:
    """This process's device under accelerate (its GPU, or the CPU)."""
    return process_state().device
