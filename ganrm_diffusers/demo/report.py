"""The demo's report: the goals checked from the rows, and report.md written from report.json."""

from __future__ import annotations

import json
from pathlib import Path

# --------------------------------------------------------------------------------------------------------------
# Goals: each claim the README makes, checked from the rows


def goals(methods: dict[str, dict], num_candidates: int = 8) -> list[dict]:
    """The issue's goals, each with the figure, the bar and whether it is met (missing rows are skipped)."""
    checks = []
    full, random = methods.get(f"best_of_{num_candidates}"), methods.get("random_candidate")
    base = methods.get("base")

    def check(name: str, value: float, bar: str, met: bool, interval: list[float] | None = None) -> None:
        checks.append({"goal": name, "value": value, "bar": bar, "met": bool(met)})
        if interval is not None:
            checks[-1]["value_ci95"] = interval

    def ratio_check(name: str, row: dict, bar: float) -> None:
        ratio = row["style_ratio"]
        check(name, ratio, f">= {bar:g}", ratio >= bar, row.get("style_ratio_ci95"))

    if full and random:
        ratio_check("best-of-8 style rate / random pick", full, 3)
    pruned = methods.get(f"best_of_{num_candidates}_pruned")
    if pruned and full:
        check(
            "pruned best-of-8 UNet evaluations / best-of-8", pruned["unet_cost"], "<= 0.5", pruned["unet_cost"] <= 0.5
        )
        for gain in ("style", "reward"):
            kept = pruned[f"{gain}_gain_kept"]
            interval = pruned.get(f"{gain}_gain_kept_ci95")
            check(f"pruned best-of-8 share of the {gain} gain kept", kept, ">= 0.9", kept >= 0.9, interval)
    for name in ("dpo", "prdp"):
        if name in methods:
            ratio_check(f"{name} style rate / base", methods[name], 2)
    if base:
        for name, row in methods.items():
            if (
                name == "base"
                or name.startswith("random_candidate")
                or name.endswith(("_eta1", "_sde"))
                or name.startswith("fk_")
            ):
                continue  # stochastic rows sample another distribution than base; their baseline is their own
            for key, points in (("faint_rate", 0.02), ("blank_rate", 0.02), ("class_accuracy", 0.03)):
                delta = row[key] - base[key]
                bad = delta > points if key != "class_accuracy" else delta < -points
                check(f"{name} {key} - base", delta, f"within {points * 100:.0f} points", not bad)
            check(
                f"{name} kid_to_target / base",
                row["kid_to_target"] / base["kid_to_target"],
                "< 1",
                row["kid_to_target"] < base["kid_to_target"],
            )
            check(
                f"{name} diversity / base",
                row["diversity"] / base["diversity"],
                ">= 0.8",
                row["diversity"] >= 0.8 * base["diversity"],
            )
    return checks


def bars_held(row: dict, base: dict) -> bool:
    """Whether a row keeps the bars every method is held to: faint and blank rates within 2 points of `base`,
    class accuracy within 3 points."""
    return (
        row["faint_rate"] - base["faint_rate"] <= 0.02
        and row["blank_rate"] - base["blank_rate"] <= 0.02
        and base["class_accuracy"] - row["class_accuracy"] <= 0.03
    )


# The adversarial loops' rows and the fixed-reward rows they are measured against (the same training budget).
LOOP_BASELINES = {"rounds": "dpo", "prdp_adversarial": "prdp"}


def loop_goals(methods: dict[str, dict], stages: list[dict]) -> list[dict]:
    """The adversarial loops' goals on one generator: stable style from stage to stage, faint and blank within 2
    points of base at every stage, the loop's row beating its fixed-reward row at the same budget (more style at
    equal or lower faint), and online PRDP at 4x base's style with every bar held."""
    base, checks = methods["base"], []

    def check(name: str, value: float, bar: str, met: bool, interval: list[float] | None = None) -> None:
        checks.append({"goal": name, "value": value, "bar": bar, "met": bool(met)})
        if interval is not None:
            checks[-1]["value_ci95"] = interval

    for loop, fixed in LOOP_BASELINES.items():
        entries = [entry for entry in stages if entry["loop"] == loop]
        if not entries or loop not in methods:
            continue
        # "never falls by more than its 95 % interval": the drop from one stage to the next, after stage 1, against
        # the half-width of the earlier stage's interval. With fewer than 3 stages there is no such drop: not met.
        drops = [
            (
                earlier["style_rate"] - later["style_rate"],
                (earlier["style_rate_ci95"][1] - earlier["style_rate_ci95"][0]) / 2,
            )
            for earlier, later in zip(entries[:-1], entries[1:], strict=True)
        ][1:]
        worst = max((drop - width for drop, width in drops), default=None)
        check(
            f"{loop}: largest style drop between stages after stage 1, beyond its 95 % half-width",
            worst,
            "<= 0 (needs 3 stages)",
            worst is not None and worst <= 0,
        )
        for key in ("faint_rate", "blank_rate"):
            excess = max(entry[key] - base[key] for entry in entries)
            check(f"{loop}: largest {key} - base over its stages", excess, "within 2 points", excess <= 0.02)
        row = methods[loop]
        if fixed in methods:
            other = methods[fixed]
            gain = row["style_rate"] - other["style_rate"]
            met = gain > 0 and row["faint_rate"] <= other["faint_rate"]
            check(f"{loop} style rate - {fixed} (same budget), at equal or lower faint", gain, "> 0", met)
    if "prdp_adversarial" in methods:
        row = methods["prdp_adversarial"]
        check(
            "prdp_adversarial style rate / base, with faint, blank and class bars held",
            row["style_ratio"],
            ">= 4",
            row["style_ratio"] >= 4 and bars_held(row, base),
            row.get("style_ratio_ci95"),
        )
    return checks


# --------------------------------------------------------------------------------------------------------------
# Report


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return "" if value is None else str(value)


def _with_interval(row: dict, key: str) -> str:
    value, interval = row.get(key), row.get(f"{key}_ci95")
    if value is None:
        return ""
    if not interval:
        return _cell(value)
    return f"{_cell(value)} [{_cell(interval[0])}, {_cell(interval[1])}]"


def methods_table(methods: dict[str, dict]) -> str:
    columns = ["style_rate", "style_ratio", "faint_rate", "blank_rate", "glyph_intensity", "class_accuracy"]
    columns += ["kid_to_target", "diversity"]
    plain = ["mean_reward", "unet_evaluations", "seconds"]
    optional = ("unet_cost", "reward_gain_kept", "style_gain_kept", "train_seconds", "peak_rss_mib")
    plain += [key for key in optional if any(key in row for row in methods.values())]
    header = ["method", "baseline", *columns, *plain]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for name, row in methods.items():
        cells = [name, row.get("baseline", "")]
        cells += [_with_interval(row, column) for column in [*columns, *plain]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goals_table(checks: list[dict]) -> str:
    lines = ["| goal | value [95 % CI] | bar | met |", "|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c['goal']} | {_with_interval(c, 'value')} | {c['bar']} | {'yes' if c['met'] else '**no**'} |")
    return "\n".join(lines)


def _rounds_section(rounds: list[dict] | None) -> str:
    if not rounds:
        return ""
    lines = [
        "## GAN-RM rounds (row `rounds`)",
        "Round t trains a fresh discriminator R_t on the target digits against G_t's samples, then DPO on R_t's best"
        " and worst of 8 candidates gives G_{t+1} (round 0's are G_0's candidates of the `dpo` row, later rounds' are"
        " fresh); the same total DPO steps as the `dpo` row. AUCs are held"
        " out: R_t against the G_t it was trained on, R_{t-1} against G_t (how far the generator moved past the last"
        " discriminator), and R_t against G_0. Judges: G_{t+1} on the evaluation set. Curves: `rounds_curves.png`.",
        "",
        "| round | AUC R_t vs G_t | AUC R_{t-1} vs G_t | AUC R_t vs G_0 | style_rate of G_{t+1} | kid_to_target |"
        " class_accuracy | faint_rate |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in rounds:
        cells = [
            str(entry["round"]),
            _cell(entry["auc_vs_current"]),
            _cell(entry.get("previous_auc_vs_current")),
            _cell(entry["auc_vs_base"]),
            _with_interval(entry, "style_rate"),
            _with_interval(entry, "kid_to_target"),
            _with_interval(entry, "class_accuracy"),
            _cell(entry["faint_rate"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def imitations_table(audit: dict | None) -> str:
    """The style judge's audit (world.json `imitations`): each cheap imitation of held-out ordinary digits and the
    share counted as the style, then the held-out thin digits; a bar missed is marked."""
    if not audit:
        return "(this world has no audit of its style judge: rebuild it with this ganrm)"
    lines = ["| images | counted as the style | bar | met |", "|---|---|---|---|"]
    for name, rate in audit["imitations_counted_as_style"].items():
        met = rate <= audit["imitation_bar"]
        lines.append(f"| ordinary, {name} | {rate:.3f} | <= {audit['imitation_bar']} | {'yes' if met else '**no**'} |")
    for name, rate in audit["heldout_thin_counted_as_style"].items():
        met = rate >= audit["thin_bar"]
        lines.append(f"| real thin, {name} | {rate:.3f} | >= {audit['thin_bar']} | {'yes' if met else '**no**'} |")
    return "\n".join(lines)


def loop_stages_table(stages: list[dict]) -> str:
    """One line per stage of each adversarial loop: the discriminator's held-out AUCs and the judges' figures."""
    lines = [
        "| loop | stage | AUC vs current | previous AUC vs current | style_rate | faint_rate | blank_rate |"
        " glyph_intensity | class_accuracy | kid_to_target | diversity |",
        "|---" * 11 + "|",
    ]
    for entry in stages:
        cells = [entry["loop"], str(entry["stage"]), _cell(entry["auc_vs_current"])]
        cells += [_cell(entry.get("previous_auc_vs_current")), _with_interval(entry, "style_rate")]
        cells += [_cell(entry[key]) for key in ("faint_rate", "blank_rate", "glyph_intensity", "class_accuracy")]
        cells += [_cell(entry["kid_to_target"]), _cell(entry["diversity"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _reward_models_table(report: dict) -> str:
    models = [name for name in ("reward_model", "reward_model_brightness_augmented") if name in report]
    figures = [
        ("AUC, held-out target digits vs base samples", lambda rm: rm["auc"]),
        ("AUC, held-out target digits vs other real digits (the style itself)", lambda rm: rm["auc_style_among_real"]),
        ("Spearman, reward vs the style's pixel measure (base samples)", lambda rm: rm["spearman_reward_vs_style"]),
        ("share of other real digits scoring higher dimmed to 90 %", lambda rm: rm["dimmed_scores_higher"]["0.9"]),
        ("share of other real digits scoring higher dimmed to 80 %", lambda rm: rm["dimmed_scores_higher"]["0.8"]),
    ]
    lines = ["| figure | " + " | ".join(f"`{name}`" for name in models) + " |", "|---" * (len(models) + 1) + "|"]
    for label, value in figures:
        lines.append(f"| {label} | " + " | ".join(f"{value(report[name]):.3f}" for name in models) + " |")
    return "\n".join(lines) + f"\n\nTraining `reward_model` took {report['reward_model']['train_seconds']:.1f} s."


def _families_section(families: dict | None) -> str:
    """One section per further generator family (the flow-matching one): its generator, its reward model, its
    rows and goals, and its pictures."""
    sections = []
    for name, family in (families or {}).items():
        generator, model = family["generator"], family["reward_model"]
        figures = generator.get("figures") or {}
        tuning = family["settings"]["tuning"]
        pruning = tuning.get("pruning", {})
        pictures = "\n".join(
            f"### {name}: {row_name}\n![{row_name}]({row['grid']})\n"
            for row_name, row in family["methods"].items()
            if row.get("grid")
        )
        sections.append(
            f"""## Family `{name}`: {generator["pipeline_class"]} ({generator["path"]})
A flow-matching generator trained on the same digits with the same rule (it never saw thin strokes): base class
accuracy {_cell(figures.get("class_accuracy"))}, style rate {_cell(figures.get("style_rate"))} (world.json). Sampling
{generator["sampling"]}; its stochastic rows (suffix `_sde`, FK) use the flow SDE at noise level
{generator["stochastic_eta"]}, with their own random pick. Its own GAN-RM (the same target digits against this
generator's samples): AUC target vs base {_cell(model.get("auc"))}, target vs other real digits
{_cell(model.get("auc_style_among_real"))}. Rows on {family["evaluation"]["prompts"]} evaluation prompts, seeds
{family["evaluation"]["seed_range"]}; pruning schedule `{pruning.get("chosen")}` chosen on tuning seeds
{tuning["seed_range"]} ({_pruning_source(pruning)}).{_pruned_reading(family["methods"])}{_finetune_choice(tuning)}

{methods_table(family["methods"])}

{goals_table(family.get("goals", []))}
{_loops_section(name, family)}
{pictures}
"""
        )
    return "\n".join(sections)


def _loops_section(name: str, family: dict) -> str:
    """GAN-RM's adversarial loops on this generator, stage by stage, and their goals ('' when they did not run)."""
    stages = family.get("rounds")
    if not stages:
        return ""
    pictures = "\n".join(
        f"![{loop} monitors]({name}_{loop}_monitors.png)" for loop in dict.fromkeys(e["loop"] for e in stages)
    )
    return f"""
### GAN-RM's adversarial loop (rows `rounds`, `prdp_adversarial`)
`rounds`: round t trains a discriminator on the target digits against G_t's samples, then DPO on its best and worst
of 8 candidates gives G_{{t+1}}, the DPO row's steps split over the rounds. `prdp_adversarial`: the PRDP row's run
with its discriminator refreshed (warm, with a replay of the two windows before) on the samples of every epoch.
AUCs are held out: the refreshed discriminator against the generator of that stage, and the previous one on the
same images (the hacking alarm). The judges' figures are the stage's generator on the evaluation set.

{loop_stages_table(stages)}

{goals_table(family.get("loop_goals", []))}

{pictures}
"""


def _finetune_choice(tuning: dict) -> str:
    """Which fine-tuning candidate each trainer runs, and whether this run swept them."""
    finetune = tuning.get("finetune")
    if not finetune or "chosen" not in finetune:
        return ""
    chosen = ", ".join(f"{method} `{entry['label']}`" for method, entry in finetune["chosen"].items())
    source = (
        "every candidate's figures are in report.json (`settings.tuning.finetune`)"
        if "base" in finetune
        else "the choice of an earlier `ganrm demo --tune` run on these seeds"
    )
    return (
        f" Fine-tuning settings {chosen}, chosen on the same tuning seeds by the rule: {finetune['rule']} ({source})."
    )


def _pruning_source(pruning: dict) -> str:
    if "swept" in pruning:
        return "every swept schedule is in report.json (`settings.tuning.pruning.swept`)"
    return "the choice of an earlier `ganrm demo --tune` run on these seeds; `--tune` sweeps them again"


def _pruned_reading(methods: dict) -> str:
    """How the deterministic pruned row was measured, when it was read off the full run (selection_study)."""
    row = next((row for name, row in methods.items() if name.endswith("_pruned") and "simulation_check" in row), None)
    if row is None:
        return ""
    check = row["simulation_check"]
    return (
        f" The pruned row is read off the full best-of-N run (a survivor is exactly a full-run candidate with this "
        f"sampler; that run scored every candidate's x0 at the checkpoints, and the schedule's own code selected): "
        f"a real pruned run on the first {check['prompts']} evaluation prompts picked the same candidate for "
        f"{check['agreeing']} of them."
    )


def write_report(report: dict, out: Path) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    world, methods = report["world"], report["methods"]
    tuning = report["settings"]["tuning"]
    pruning = tuning.get("pruning", {})
    evaluation = report["evaluation"]
    augmented = report.get("reward_model_brightness_augmented", {}).get("augmentation", {})
    augmentation = ", ".join(f"{key} {value}" for key, value in augmented.items())
    pictures = "\n".join(f"### {name}\n![{name}]({row['grid']})\n" for name, row in methods.items() if row.get("grid"))
    text = f"""# GAN-RM on the embedded digits world

The world ({world["path"]}) was built in {_cell(world["build_seconds"])} s. Its CLIP was trained on captions
"{world.get("clip_captions")}" (never the style). The style judge: {(world.get("style") or {}).get("description")}.
Base samples: style {world["base"]["style_rate"]:.1%}, class {world["base"]["class_accuracy"]:.1%}; held-out real
target digits: style {world["target"]["style_rate"]:.1%}; other real digits {world["real_other"]["style_rate"]:.1%}, the
same dimmed to 80 % / 70 %: {world.get("real_other_dimmed_0.8", {}).get("style_rate", float("nan")):.1%} /
{world.get("real_other_dimmed_0.7", {}).get("style_rate", float("nan")):.1%} (less ink is not thinner strokes).

## The style judge against cheap imitations
Held-out real digits ({(world.get("imitations") or {}).get("ordinary_count")} ordinary,
{(world.get("imitations") or {}).get("thin_count")} thin) changed in the cheap ways a generator could learn instead
of thin strokes (`ganrm_diffusers/world/imitations.py`; measured at the world build). In scikit-learn's 8x8 digits a
thin stroke is a partly covered cell, so an ordinary digit dimmed to 85-90 % looks like a real thin one: the judge
cannot refuse that, and every row reports `glyph_intensity` (the mean over its images of the median brightness of
the glyph's pixels) beside its style rate so that a method that dims shows it.

{imitations_table(world.get("imitations"))}

## The reward models
`reward_model` is GAN-RM as the paper trains it; every row uses it unless it says otherwise.
`reward_model_brightness_augmented` adds brightness views of every training image ({augmentation}), so that dimming
an image cannot raise its reward; row `best_of_8_brightness_augmented_rm` ranks best-of-8's candidates with it.

{_reward_models_table(report)}

## Methods
Every row is judged on the same {evaluation["prompts"]} evaluation prompts and seeds {evaluation["seed_range"]}
(candidate j of prompt i has seed first + 8i + j; one-sample rows draw candidate 0's seed). Brackets: 95 % bootstrap
intervals over the samples. `style_ratio`: style rate over the row's `baseline` on the same prompts (paired
bootstrap): `random_candidate` (one of the N candidates at random, the same cost as best-of-N, no reward; its rates
and reward are the expectation over that draw, each prompt's N candidates averaged, its KID, diversity and picture
one draw's) for the selection rows, `base` for the fine-tuned rows; `reward_gain_kept` / `style_gain_kept`: the share
of best-of-N's gain over it that a cheaper selection keeps (paired bootstrap over the prompts). `faint_rate` /
`blank_rate`: the cheap ways to use less ink; `glyph_intensity`: mean median brightness of a glyph's pixels (held-out
real thin digits: {_cell((world.get("imitations") or {}).get("median_glyph_intensity", {}).get("heldout_thin"))});
`kid_to_target`: kernel inception distance to the held-out target
digits in a digit classifier's feature space (`kid_pixels_to_target` in report.json: the same on pixels);
`diversity`: mean pairwise distance within each digit.

{methods_table(methods)}

{_rounds_section(report.get("rounds"))}
{_families_section(report.get("families"))}
## Goals
{goals_table(report.get("goals", []))}

## Settings chosen on the tuning seeds
Tuning prompts: {tuning["prompts"]}, seeds {tuning["seed_range"]} (disjoint from the evaluation seeds).
Pruning schedule: `{pruning.get("chosen")}` ({pruning.get("rule")}); {_pruning_source(pruning)}.{_pruned_reading(methods)} Fine-tuning settings: `settings` of each fine-tuned row; how they were chosen is in
`settings.tuning.finetune` where a `ganrm demo --tune` run is recorded.

## What each row draws
A digit per line, the same prompts and seeds in every picture; captions: reward, `T` = has the style, `f` = faint,
`b` = blank.

{pictures}
"""
    (out / "report.md").write_text(text)
