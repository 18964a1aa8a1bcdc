"""Rewrite README.md's figures from the files that measured them (`make readme`).

    python scripts/readme_figures.py --report demo-out/report.json --bench bench-out --readme README.md

Two regions of the README are replaced, each between its markers (the text outside them is left as it is):

- `<!-- figures:results:start -->` ... `<!-- figures:results:end -->`: the results table of `make demo`'s report
  (one table per family when the report has families), the reward model's AUCs, the world's build time and the
  tuned hyperparameters;
- `<!-- figures:speed:start -->` ... `<!-- figures:speed:end -->`: one line per ratio of `make bench`'s JSON files
  (bench/results.py describes them).

Fails, writing nothing, when a file is missing or a marker is absent. Running it twice gives the same README.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

DASH = "–"
REGIONS = ("results", "speed")
BENCH_ORDER = ("scoring", "best_of_n", "train_step")


class FiguresError(Exception):
    """A missing or malformed input: the message says which and what to do."""


# --------------------------------------------------------------------------------------------------------------
# Numbers


def number(value: object) -> str:
    """A figure as the README shows it: '–' when missing or not a number, integers in full, 3 decimals otherwise
    (3 significant digits below 0.01)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return DASH
    if isinstance(value, int):
        return f"{value:,}".replace(",", " ")
    if not math.isfinite(value):
        return DASH
    if value != 0 and abs(value) < 0.01:
        return f"{value:.3g}"
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3f}"


def interval(bounds: object, format_one: Callable[[object], str] = number) -> str:
    """' [lo, hi]', or '' when there is no usable interval."""
    if not isinstance(bounds, list | tuple) or len(bounds) != 2 or DASH in map(format_one, bounds):
        return ""
    return f" [{format_one(bounds[0])}, {format_one(bounds[1])}]"


def ratio(value: object) -> str:
    return number(value) if number(value) == DASH else f"{value:.2f}x"


def setting(value: object) -> str:
    """A hyperparameter or setting: numbers as Python's `g` format, lists and dicts spelled out."""
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return ", ".join(f"{key} {setting(item)}" for key, item in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(setting(item) for item in value)
    return str(value)


# --------------------------------------------------------------------------------------------------------------
# Results


def _with_interval(key: str) -> Callable[[dict], str]:
    return lambda row: number(row.get(key)) + (interval(row.get(f"{key}_ci95")) if key in row else "")


def _style_ratio(row: dict) -> str:
    value, bounds = row.get("style_ratio"), row.get("style_ratio_ci95")
    if ratio(value) == DASH:
        return ratio(value)
    if isinstance(bounds, list | tuple) and bounds and not interval(bounds, _two_decimals):
        return ratio(value) + " [undefined]"  # the baseline drew no styled image in some bootstrap resamples
    return ratio(value) + interval(bounds, _two_decimals)


def _two_decimals(value: object) -> str:
    return number(value) if number(value) == DASH else f"{value:.2f}"


def _plain(key: str) -> Callable[[dict], str]:
    return lambda row: number(row.get(key))


COLUMNS: tuple[tuple[str, Callable[[dict], str]], ...] = (
    ("style_rate [95 % CI]", _with_interval("style_rate")),
    ("style_ratio to baseline [95 % CI]", _style_ratio),
    ("faint_rate", _plain("faint_rate")),
    ("blank_rate", _plain("blank_rate")),
    ("glyph_intensity", _plain("glyph_intensity")),
    ("class_accuracy", _plain("class_accuracy")),
    ("kid_to_target", _plain("kid_to_target")),
    ("diversity", _plain("diversity")),
    ("unet_evaluations", _plain("unet_evaluations")),
    ("style_gain_kept [95 % CI]", _with_interval("style_gain_kept")),
)


def _named(name: str, stem: str) -> bool:
    return name == stem or name.startswith(f"{stem}_")


def method_group(name: str) -> int:
    """Where a method's row goes: base, random_candidate, best_of_N, pruning, other sampler baselines (eta = 1), FK,
    sft, dpo, prdp, rounds, then anything else (in report order within each group)."""
    if name == "base":
        return 0
    if name == "random_candidate":
        return 1
    if re.fullmatch(r"best_of_\d+(_brightness_augmented_rm)?", name):
        return 2
    if name.startswith("fk"):
        return 5
    if "prun" in name:
        return 3
    if re.search(r"(^|_)eta", name):  # not "beta"
        return 4
    for group, stem in enumerate(("sft", "dpo", "prdp", "rounds"), start=6):
        if _named(name, stem):
            return group
    return 10


def methods_table(methods: dict[str, dict]) -> list[str]:
    lines = ["| method | " + " | ".join(header for header, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name in sorted(methods, key=method_group):
        row = methods[name] if isinstance(methods[name], dict) else {}
        lines.append(f"| `{name}` | " + " | ".join(cell(row) for _, cell in COLUMNS) + " |")
    return lines


def reward_model_sentence(reward_model: object, world: object) -> str:
    reward_model = reward_model if isinstance(reward_model, dict) else {}
    world = world if isinstance(world, dict) else {}
    seconds = world.get("build_seconds")
    built = f"{seconds:.0f} s" if number(seconds) != DASH else DASH
    spearman = reward_model.get("spearman_reward_vs_style")
    follows = (
        f"; its reward follows the style's pixel measure at Spearman {spearman:+.2f}"
        if number(spearman) != DASH
        else ""
    )
    sentence = (
        f"The reward model separates held-out target digits from base samples with AUC {number(reward_model.get('auc'))}"
        f" and target digits from other real digits (the style itself) with AUC "
        f"{number(reward_model.get('auc_style_among_real'))}{follows}."
    )
    return sentence + (f" The world was built in {built}." if world else "")


def dimming_sentence(report: dict) -> str:
    """How often merely dimming a real non-target digit raised its reward, per reward model ('' when not measured)."""
    parts = []
    for key, label in (("reward_model", "GAN-RM"), ("reward_model_brightness_augmented", "with brightness views")):
        model = report.get(key)
        dimmed = model.get("dimmed_scores_higher") if isinstance(model, dict) else None
        if isinstance(dimmed, dict) and number(dimmed.get("0.8")) != DASH:
            parts.append(f"{dimmed['0.8']:.0%} ({label}, `{key}`)")
    if not parts:
        return ""
    return (
        "Real non-target digits dimmed to 80 % scored higher than as they are for " + " and ".join(parts) + ": a "
        "reward that rises when an image is merely dimmed lets a method gain by drawing faint digits."
    )


def judge_audit_sentence(world: object) -> str:
    """The style judge's audit of the report's world (world.json `imitations`): which cheap imitations of held-out
    ordinary digits it refuses, which it does not, and how many held-out thin digits it keeps ('' when absent)."""
    audit = world.get("imitations") if isinstance(world, dict) else None
    keys = ("imitations_counted_as_style", "heldout_thin_counted_as_style", "imitation_bar", "thin_bar")
    if not isinstance(audit, dict) or not all(key in audit for key in keys):
        return ""
    bar, rates = audit["imitation_bar"], audit["imitations_counted_as_style"]

    def listed(names: Iterable[str]) -> str:
        return ", ".join(f"{name.replace('_', ' ')} {rates[name]:.0%}" for name in names) or "none"

    refused = [name for name in rates if rates[name] <= bar]
    missed = [name for name in rates if rates[name] > bar]
    kept = ", ".join(
        f"{name.replace('_', ' ')} {rate:.0%}" for name, rate in audit["heldout_thin_counted_as_style"].items()
    )
    return (
        f"The style judge against cheap imitations of {audit.get('ordinary_count', DASH)} held-out ordinary digits (share "
        f"counted as thin; bar {bar:.0%}): refused: {listed(refused)}; **not refused**: {listed(missed)}. Held-out "
        f"real thin digits counted as thin (bar {audit['thin_bar']:.0%}): {kept}. `glyph_intensity` in every row "
        "shows a method that dims its glyphs."
    )


def tuning_lines(settings: object) -> list[str]:
    """The tuned hyperparameters and the tuning seed range of `settings.tuning`, one bullet per entry."""
    tuning = settings.get("tuning") if isinstance(settings, dict) else None
    if not isinstance(tuning, dict) or not tuning:
        return []
    return ["", "Tuned (`settings.tuning`):", ""] + [f"- {key}: {tuned(key, value)}" for key, value in tuning.items()]


def tuned(key: str, value: object) -> str:
    """A tuning entry; a seed range given as [first, last] reads 'first to last'. A study (a dict with `chosen`)
    reads as what was chosen and by which rule; its swept rows stay in the report."""
    if "seed" in key and isinstance(value, list | tuple) and len(value) == 2:
        return f"{setting(value[0])} to {setting(value[1])}"
    if isinstance(value, dict) and "chosen" in value:
        chosen = value["chosen"]
        if isinstance(chosen, dict):  # one choice per method: its label
            chosen = ", ".join(f"{method} {entry.get('label', entry)}" for method, entry in chosen.items())
        rule = f" ({value['rule']})" if value.get("rule") else ""
        if set(value) <= {"rule", "chosen"}:  # chosen by an earlier tuning run: no candidate figures here
            return (
                f"chose {setting(chosen)}{rule} in an earlier tuning run on these seeds; this report holds no "
                "candidate figures (`ganrm demo --tune` measures them again)"
            )
        return f"chose {setting(chosen)}{rule}; every candidate's figures are in report.json"
    if isinstance(value, dict) and any(isinstance(item, dict) for item in value.values()):
        # a study that chose nothing (yet): its candidates' figures stay in the report
        rule = f"rule: {value['rule']}; " if value.get("rule") else ""
        return f"{rule}no choice recorded; the candidates' figures are in report.json (settings.tuning.{key})"
    return setting(value)


LEGEND = (
    "`style_rate` with its 95 % bootstrap interval; `style_ratio`: the row's style_rate over its baseline's, with its "
    "95 % interval ([undefined] where the baseline drew no styled image in some bootstrap resamples); "
    "`random_candidate`: one of the N candidates at random, the same cost as best-of-N without the reward, its rates "
    "the expectation over the draw (each prompt's N candidates averaged); `style_gain_kept`: the share of best-of-N's "
    "style gain over it that pruning keeps, with its paired 95 % interval; `glyph_intensity`: the mean over the row's "
    "images of the median brightness of the glyph's pixels (real thin digits are a little greyer than ordinary ones); "
    f"`unet_evaluations`: latents through the UNet (or transformer); {DASH}: not measured for that row."
)


def family_lines(family: dict) -> list[str]:
    lines = methods_table(family.get("methods") or {})
    if isinstance(family.get("rounds"), list) and family["rounds"]:
        lines += ["", "GAN-RM's adversarial loop, stage by stage (`families.<family>.rounds`):", ""]
        lines += stages_table(family["rounds"])
    if "reward_model" in family:
        lines += ["", reward_model_sentence(family["reward_model"], family.get("world"))]
    return lines + tuning_lines(family.get("settings"))


STAGE_COLUMNS: tuple[tuple[str, Callable[[dict], str]], ...] = (
    ("loop", lambda entry: f"`{entry.get('loop')}`"),
    ("stage", _plain("stage")),
    ("AUC vs current", _plain("auc_vs_current")),
    ("previous AUC vs current", _plain("previous_auc_vs_current")),
    ("style_rate [95 % CI]", _with_interval("style_rate")),
    ("faint_rate", _plain("faint_rate")),
    ("blank_rate", _plain("blank_rate")),
    ("glyph_intensity", _plain("glyph_intensity")),
    ("class_accuracy", _plain("class_accuracy")),
    ("kid_to_target", _plain("kid_to_target")),
)


def stages_table(stages: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(name for name, _ in STAGE_COLUMNS) + " |", "|---" * len(STAGE_COLUMNS) + "|"]
    for entry in stages:
        lines.append("| " + " | ".join(cell(entry) for _, cell in STAGE_COLUMNS) + " |")
    return lines


def goals_lines(report: dict) -> list[str]:
    """Every goal the report checked, with its verdict: the UNet generator's, then each family's (selection,
    fine-tuning and the adversarial loop's). Failures stay in the table, marked."""
    groups = [("UNet generator", report.get("goals"))]
    for name, family in (report.get("families") or {}).items():
        if isinstance(family, dict):
            groups += [(f"`{name}`", family.get("goals")), (f"`{name}` loop", family.get("loop_goals"))]
    lines = ["| generator | goal | value [95 % CI] | bar | met |", "|---|---|---|---|---|"]
    for label, checks in groups:
        for check in checks or []:
            value = number(check.get("value")) + interval(check.get("value_ci95"))
            verdict = "yes" if check.get("met") else "**no**"
            lines.append(f"| {label} | {check.get('goal')} | {value} | {check.get('bar')} | {verdict} |")
    return lines if len(lines) > 2 else []


def results_region(report: dict) -> list[str]:
    families = report.get("families")
    methods = report.get("methods")
    if not isinstance(families, dict) or not families:
        if not isinstance(methods, dict) or not methods:
            raise FiguresError("the demo report has no `methods` (nor `families`): rerun `make demo`")
        families = {}
    lines: list[str] = []
    shown = [family.get("methods") for family in families.values() if isinstance(family, dict)]
    if isinstance(methods, dict) and methods and methods not in shown:
        lines += methods_table(methods) + [""]
    for name, family in families.items():
        lines += [f"**Family `{name}`**", ""] + family_lines(family if isinstance(family, dict) else {}) + [""]
    lines += [LEGEND, "", reward_model_sentence(report.get("reward_model"), report.get("world"))]
    goal_table = goals_lines(report)
    if goal_table:
        lines += ["Every goal the report checks, with its verdict (failures included):", ""] + goal_table + [""]
    dimming = dimming_sentence(report)
    audit = judge_audit_sentence(report.get("world"))
    timing = timing_sentence(report.get("timing"))
    return (
        lines
        + (["", audit] if audit else [])
        + (["", dimming] if dimming else [])
        + (["", timing] if timing else [])
        + tuning_lines(report.get("settings"))
    )


def timing_sentence(timing: object) -> str:
    """Where the demo's wall time went (report.json `timing`, seconds), in minutes."""
    if not isinstance(timing, dict) or number(timing.get("total")) == DASH:
        return ""
    stages = ", ".join(
        f"{name.replace('_', ' ')} {value / 60:.1f}"
        for name, value in timing.items()
        if name != "total" and number(value) != DASH
    )
    return f"This report's demo run took {timing['total'] / 60:.1f} minutes ({stages})."


# --------------------------------------------------------------------------------------------------------------
# Speed


def figure_value(figure: dict) -> str:
    value, unit = figure.get("value"), figure.get("unit", "")
    if isinstance(value, bool):
        return "yes" if value else "no"
    if unit == "fraction" and number(value) != DASH:
        return f"{value:.1%}"
    if unit == "s" and number(value) != DASH:
        return f"{value:.2f} s"
    return f"{number(value)} {unit}".strip()


def comparison_line(comparison: dict) -> str:
    goal = comparison.get("goal")
    if goal is None:
        verdict = "no goal"
    else:
        verdict = f"goal {goal}, " + ("met" if comparison.get("goal_met") else "**not met**")
    times = f"{seconds(comparison.get('ours_seconds'))} / {seconds(comparison.get('reference_seconds'))}"
    return (
        f"  - `{comparison.get('name', '?')}` **{number(comparison.get('ratio'))}** ({verdict}; {times}): "
        f"{comparison.get('ours', '?')} / {comparison.get('reference', '?')}; {setting(comparison.get('settings') or {})}"
    )


def seconds(value: object) -> str:
    """A time in ms below 1 s, else in s."""
    if number(value) == DASH:
        return DASH
    return f"{value * 1000:.1f} ms" if abs(value) < 1 else f"{value:.2f} s"


def bench_lines(results: dict) -> list[str]:
    created = str(results.get("created", ""))[:10] or DASH
    lines = [f"- `bench/{results['bench']}.py` ({created}, torch {results.get('torch', DASH)}):"]
    lines += [comparison_line(comparison) for comparison in results["comparisons"]]
    for figure in results.get("figures") or []:
        lines.append(f"  - {figure.get('description', figure.get('name', '?'))}: {figure_value(figure)}")
    return lines


def speed_region(bench: Iterable[dict]) -> list[str]:
    lines = [
        "Speed (`make bench`; each ratio is ours / reference, the two timed side by side in one run, with its goal):",
        "",
    ]
    for results in bench:
        lines += bench_lines(results)
    return lines


# --------------------------------------------------------------------------------------------------------------
# Files


def load_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FiguresError(f"no {what} at {path}")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise FiguresError(f"cannot read the {what} {path}: {error}") from error
    if not isinstance(data, dict):
        raise FiguresError(f"the {what} {path} is not a JSON object")
    return data


def load_bench(folder: Path) -> list[dict]:
    """Every `<bench>.json` of `folder`, scoring, best_of_n and train_step first."""
    paths = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not paths:
        raise FiguresError(f"no bench results (*.json) in {folder}: run `make bench` first")
    loaded = []
    for path in paths:
        results = load_json(path, "bench results")
        if not isinstance(results.get("comparisons"), list) or "bench" not in results:
            raise FiguresError(
                f"{path} is not a bench results file (no `bench` or `comparisons`): see bench/results.py"
            )
        loaded.append(results)
    known = {name: index for index, name in enumerate(BENCH_ORDER)}
    return sorted(loaded, key=lambda results: (known.get(results["bench"], len(known)), results["bench"]))


def marker(region: str, side: str) -> str:
    return f"<!-- figures:{region}:{side} -->"


def replace_region(text: str, region: str, lines: Sequence[str], readme: Path) -> str:
    """`text` with the lines between the region's markers (the marker lines kept) replaced by `lines`."""
    start, end = marker(region, "start"), marker(region, "end")
    for name in (start, end):
        count = text.count(name)
        if count != 1:
            found = "no" if count == 0 else f"{count}"
            raise FiguresError(
                f"{readme} has {found} `{name}` marker(s); it needs exactly one `{start}` line and one `{end}` line "
                "around the figures to rewrite"
            )
    head, rest = text.split(start)
    if end not in rest:
        raise FiguresError(f"{readme}: `{end}` comes before `{start}`")
    _, tail = rest.split(end)
    return head + start + "\n\n" + "\n".join(lines) + "\n\n" + end + tail


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", type=Path, default=Path("demo-out/report.json"), help="make demo's report.json")
    parser.add_argument("--bench", type=Path, default=Path("bench-out"), help="folder of make bench's JSON files")
    parser.add_argument("--readme", type=Path, default=Path("README.md"), help="the README to rewrite")
    parser.add_argument(
        "--regions",
        default=",".join(REGIONS),
        help="comma-separated regions to rewrite (results: needs only --report; speed: needs only --bench)",
    )
    return parser.parse_args(argv)


def rewrite(readme: Path, report_path: Path, bench_folder: Path, regions: Sequence[str] = REGIONS) -> bool:
    """Rewrite `regions` of `readme` (both by default); True when its text changed."""
    unknown = sorted(set(regions) - set(REGIONS))
    if unknown or not regions:
        raise FiguresError(f"unknown regions {unknown}: choose from {', '.join(REGIONS)}")
    if not readme.is_file():
        raise FiguresError(f"no README at {readme}")
    text = readme.read_text()
    for region in REGIONS:  # the markers first: a README without them fails before anything is read
        replace_region(text, region, [], readme)
    written = {}
    if "results" in regions:
        if not report_path.is_file():
            raise FiguresError(f"no demo report at {report_path}: run `make demo` first")
        written["results"] = results_region(load_json(report_path, "demo report"))
    if "speed" in regions:
        written["speed"] = speed_region(load_bench(bench_folder))
    updated = text
    for region, lines in written.items():
        updated = replace_region(updated, region, lines, readme)
    if updated != text:
        readme.write_text(updated)
    return updated != text


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        regions = [region for region in args.regions.split(",") if region]
        changed = rewrite(args.readme, args.report, args.bench, regions)
    except FiguresError as error:
        raise SystemExit(f"readme_figures: {error}") from None
    print(f"{args.readme}: figures {'rewritten' if changed else 'already up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
