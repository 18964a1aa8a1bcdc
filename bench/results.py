"""What every bench script records: ratios of two things timed side by side in one run, each against its goal.

Each script writes one JSON file (default `bench-out/<bench>.json`, `--out` to change) and prints one line per
ratio. `scripts/readme_figures.py` turns the files into README's speed lines. The file:

    {
      "schema": 1,
      "bench": "scoring",                        # the script's name
      "command": "bench/scoring.py --batch 16",  # how it was run
      "created": "2025-01-31T12:00:00+00:00",    # UTC, seconds
      "torch": "2.9.1",
      "settings": {...},                         # the run's sizes, threads, device, dtype, ...
      "comparisons": [
        {
          "name": "score_vs_encode_image",
          "ours": "GANRewardModel.score on float images",           # what was timed
          "reference": "open_clip encode_image on preprocessed images",
          "ours_seconds": 0.0512,
          "reference_seconds": 0.0508,
          "ratio": 1.0079,                       # ours_seconds / reference_seconds
          "goal": "<= 1.05",                     # null: measured, no goal
          "goal_met": true,                      # null when there is no goal
          "settings": {...}                      # the run's settings and this comparison's own (statistic, ...)
        }
      ],
      "figures": [                               # other measurements of the run (not ratios)
        {"name": "head_training_seconds", "value": 0.33, "unit": "s", "description": "..."}
      ]
    }
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCHEMA = 1


@dataclass
class Comparison:
    """One ratio: `ours_seconds / reference_seconds`, with at most `goal_max` as its goal (None: no goal)."""

    name: str
    ours: str
    reference: str
    ours_seconds: float
    reference_seconds: float
    goal_max: float | None
    settings: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.ours_seconds / self.reference_seconds

    @property
    def goal(self) -> str | None:
        return None if self.goal_max is None else f"<= {self.goal_max:g}"

    @property
    def goal_met(self) -> bool | None:
        return None if self.goal_max is None else self.ratio <= self.goal_max

    def record(self) -> dict:
        return {
            "name": self.name,
            "ours": self.ours,
            "reference": self.reference,
            "ours_seconds": self.ours_seconds,
            "reference_seconds": self.reference_seconds,
            "ratio": self.ratio,
            "goal": self.goal,
            "goal_met": self.goal_met,
            "settings": self.settings,
        }

    def line(self) -> str:
        """`RATIO <name> <ratio> (goal <= x: met | NOT MET | no goal): <ours> / <reference>`."""
        verdict = "no goal" if self.goal is None else f"goal {self.goal}: {'met' if self.goal_met else 'NOT MET'}"
        return f"RATIO {self.name} {self.ratio:.3f} ({verdict}): {self.ours} / {self.reference}"


@dataclass
class Figure:
    """A measurement of the run that is not a ratio (printed where it is measured, kept in the JSON file)."""

    name: str
    value: float | int | bool
    unit: str
    description: str


def add_out_argument(parser: argparse.ArgumentParser, bench: str) -> None:
    default = REPO / "bench-out" / f"{bench}.json"
    parser.add_argument("--out", type=Path, default=default, help=f"JSON file of the results (default: {default})")


def device_name(device: object) -> str:
    """`cpu`, or `cuda (<GPU name>)`."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def command_line() -> str:
    """How this script was run, its path relative to the repository where it lies inside it."""
    script = Path(sys.argv[0]).resolve()
    if script.is_relative_to(REPO):
        script = script.relative_to(REPO)
    return " ".join([script.as_posix(), *sys.argv[1:]])


def write_results(
    path: Path, bench: str, settings: dict, comparisons: Sequence[Comparison], figures: Sequence[Figure] = ()
) -> dict:
    """Print one line per ratio and write the results file; returns what was written."""
    import torch

    for comparison in comparisons:
        print(comparison.line())
    results = {
        "schema": SCHEMA,
        "bench": bench,
        "command": command_line(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "settings": settings,
        "comparisons": [comparison.record() for comparison in comparisons],
        "figures": [asdict(figure) for figure in figures],
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {path}")
    return results
