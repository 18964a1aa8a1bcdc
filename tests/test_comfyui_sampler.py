"""GAN-RM Best-of-N Sampler inside the real ComfyUI (0.3.75), in this process, on tiny random models built with
ComfyUI's own SD1.5 and FLUX classes (tests/comfyui_test_pack): graphs of core nodes and ours, validated and run
by ComfyUI's executor."""

from __future__ import annotations

import sys

import pytest
import torch

pytestmark = pytest.mark.comfyui

STEPS = 10
SIZE = 64  # pixels: an 8 x 8 latent


def tiny_model(family: str = "sd15", seed: int = 0) -> dict:
    return {"1": {"class_type": "GANRMTestTinyModel", "inputs": {"family": family, "seed": seed}}}


def empty_latent(batch: int) -> dict:
    return {"2": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": batch}}}


def reward_loader() -> dict:
    return {"10": {"class_type": "GANRMLoadRewardModel", "inputs": {"model_name": "tiny"}}}


def sampler_node(**inputs) -> dict:
    settings = {
        "model": ["1", 0],
        "vae": ["1", 1],
        "positive": ["1", 2],
        "negative": ["1", 3],
        "latent_image": ["2", 0],
        "reward_model": ["10", 0],
        "seed": 7,
        "steps": STEPS,
        "cfg": 4.0,
        "sampler_name": "euler",
        "scheduler": "normal",
        "denoise": 1.0,
        "num_candidates": 8,
        "top_k": 2,
        "pruning": "default",
        "checkpoints": "0.3",
        "keep": "2",
        "fk_lambda": 1.0,
        "fk_potential": "max",
    }
    return {"20": {"class_type": "GANRMBestOfNSampler", "inputs": settings | inputs}}


def sampler_graph(family: str = "sd15", latents: int = 1, **inputs) -> dict:
    return tiny_model(family) | empty_latent(latents) | reward_loader() | sampler_node(**inputs)


def ksampler(latent: list, **inputs) -> dict:
    settings = {
        "model": ["1", 0],
        "positive": ["1", 2],
        "negative": ["1", 3],
        "latent_image": latent,
        "seed": 7,
        "steps": STEPS,
        "cfg": 4.0,
        "sampler_name": "euler",
        "scheduler": "normal",
        "denoise": 1.0,
    }
    return {"30": {"class_type": "KSampler", "inputs": settings | inputs}}


def tiny_pack():
    """The tests' tiny-model pack, as ComfyUI's loader imported it."""
    return next(
        module
        for module in list(sys.modules.values())
        if hasattr(module, "__file__") and "ganrm_test_models" in str(module.__file__)
    )


def rows_seen() -> dict[str, int]:
    """The test pack's count of latent rows through each tiny model."""
    return tiny_pack().ROWS_SEEN


def run_ok(comfyui, graph: dict):
    run = comfyui.run(graph)
    assert run.success, run.error
    return run


def kept(run, node: str = "20") -> tuple[dict, torch.Tensor, list[float], str]:
    latent, images, scores, summary = run.outputs[node]
    return latent[0], images[0], scores, summary[0]


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_pruning_off_keeps_what_ksampler_batch_n_then_best_of_n_keeps(comfyui, family):
    """Full best-of-N through the node equals the graph users build today: KSampler on a batch of N, VAE Decode,
    GAN-RM Best-of-N, on the same seed."""
    graph = sampler_graph(family, pruning="off", num_candidates=6, top_k=2)
    graph |= {"3": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 6}}}
    graph |= ksampler(["3", 0])
    graph |= {
        "31": {"class_type": "VAEDecode", "inputs": {"samples": ["30", 0], "vae": ["1", 1]}},
        "32": {
            "class_type": "GANRMBestOfN",
            "inputs": {
                "reward_model": ["10", 0],
                "images": ["31", 0],
                "latent": ["30", 0],
                "top_k": 2,
                "group_size": 0,
                "use_threshold": False,
                "threshold": 0.0,
            },
        },
    }
    run = run_ok(comfyui, graph)
    latent, images, scores, summary = kept(run)
    reference_images, reference_latent, reference_scores, _ = run.outputs["32"]
    assert torch.equal(latent["samples"], reference_latent[0]["samples"])
    assert torch.equal(images, reference_images[0])
    assert scores == reference_scores
    assert "1.000x full best-of-N" in summary


@pytest.mark.parametrize(
    ("family", "sampler_name"),
    [("sd15", "euler"), ("sd15", "dpmpp_2m"), ("sd15", "euler_ancestral"), ("sd15", "dpmpp_2m_sde"), ("flux", "euler")],
)
def test_pruned_survivors_are_the_unpruned_candidates(comfyui, family, sampler_name):
    full = kept(run_ok(comfyui, sampler_graph(family, pruning="off", top_k=8, sampler_name=sampler_name)))
    pruned = kept(run_ok(comfyui, sampler_graph(family, pruning="default", top_k=2, sampler_name=sampler_name)))
    assert len(pruned[0]["batch_index"]) == 2
    assert_survivors_match(full[0], pruned[0])


def assert_survivors_match(full: dict, pruned: dict) -> None:
    """Each survivor is the unpruned run's candidate of its row: the same noise, steps, sampler history and noise
    stream. Bit for bit on the machines we ran; the model sees 2 rows where the unpruned run gave it 8, and another
    CPU's kernels may round a batch of another size differently, so the claim is stated at 1e-5 of the norm (a
    wrong noise, step or history differs by the norm's order)."""
    rows = dict(zip(full["batch_index"], full["samples"], strict=True))
    for row, samples in zip(pruned["batch_index"], pruned["samples"], strict=True):
        difference = (samples - rows[row]).norm()
        assert difference <= 1e-5 * rows[row].norm(), f"candidate {row} differs from the unpruned run"


def test_model_rows_follow_the_schedule(comfyui):
    """8 -> 2 after 30 % of 20 steps: 6 steps of 8 candidates, 14 of 2 = 76 of 160 evaluations, two rows each with
    classifier-free guidance, one with cfg 1 (ComfyUI then skips the unconditional pass)."""
    for cfg, rows_per_evaluation in ((4.0, 2), (1.0, 1)):
        for pruning, evaluations in (("off", 160), ("default", 76)):
            before = rows_seen().get("sd15", 0)
            run = run_ok(comfyui, sampler_graph(pruning=pruning, steps=20, cfg=cfg))
            counted = rows_seen()["sd15"] - before
            assert counted == rows_per_evaluation * evaluations, (cfg, pruning)
            assert f"{counted} rows through the model" in kept(run)[3]


def test_custom_cascade_and_its_cost(comfyui):
    before = rows_seen().get("sd15", 0)
    run = run_ok(comfyui, sampler_graph(pruning="custom", checkpoints="0.2, 0.5", keep="4, 2", cfg=1.0, top_k=1))
    # 10 steps: 2 of 8, 3 of 4, 5 of 2 = 38 evaluations.
    assert rows_seen()["sd15"] - before == 38
    latent, images, scores, _ = kept(run)
    assert len(scores) == 1 and images.shape == (1, SIZE, SIZE, 3) and latent["samples"].shape == (1, 4, 8, 8)


def test_a_kept_candidate_regenerates_alone_with_ksampler_and_latent_from_batch(comfyui):
    latent, *_ = kept(run_ok(comfyui, sampler_graph(pruning="default", top_k=1)))
    (row,) = latent["batch_index"]
    graph = tiny_model() | {
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 8}},
        "4": {"class_type": "LatentFromBatch", "inputs": {"samples": ["3", 0], "batch_index": row, "length": 1}},
    }
    graph |= ksampler(["4", 0])
    graph |= {"31": {"class_type": "SaveLatent", "inputs": {"samples": ["30", 0], "filename_prefix": "alone"}}}
    alone = run_ok(comfyui, graph).outputs["30"][0][0]
    # The same noise and steps; a batch of one rounds differently in the model's float32 arithmetic.
    assert (alone["samples"] - latent["samples"]).norm() <= 1e-4 * latent["samples"].norm()


def test_each_latent_of_a_batch_gets_its_own_candidates_and_top_k(comfyui):
    everything = kept(run_ok(comfyui, sampler_graph(latents=2, pruning="off", top_k=4, num_candidates=4)))
    score_of = dict(zip(everything[0]["batch_index"], everything[2], strict=True))
    assert sorted(score_of) == list(range(8))
    latent, images, scores, _ = kept(
        run_ok(comfyui, sampler_graph(latents=2, pruning="off", top_k=1, num_candidates=4))
    )
    # Rows are laid out as RepeatLatentBatch lays them out: row r is candidate r // 2 of latent r % 2.
    for group, row in enumerate(latent["batch_index"]):
        assert row == max((r for r in score_of if r % 2 == group), key=score_of.get)
    assert images.shape[0] == 2 and len(scores) == 2


def test_a_prompt_batch_gives_each_prompt_its_own_candidates_and_prompt(comfyui, comfyui_reward_models):
    """Two prompts (a CONDITIONING batch of 2) and a LATENT batch of 2: candidate j of prompt b is row j * 2 + b,
    sampled with prompt b (the rows equal KSampler's on RepeatLatentBatch), scored with prompt b's text by a
    prompt-aware reward model, and each prompt keeps its own top-k."""
    from ganrm_diffusers.reward.model import GANRewardModel

    prompts = {
        "5": {
            "class_type": "GANRMTestConditioning",
            "inputs": {"context_dim": 32, "pooled_dim": 0, "guidance": 0.0, "seed": 4, "batch": 2},
        }
    }
    graph = sampler_graph(latents=2, pruning="off", top_k=4, num_candidates=4, prompt="a red one\na blue one")
    graph |= prompts | {"10": {"class_type": "GANRMLoadRewardModel", "inputs": {"model_name": "tiny-prompt-aware"}}}
    graph["20"]["inputs"] |= {"positive": ["5", 0], "negative": ["5", 1]}
    graph |= {
        "6": {"class_type": "RepeatLatentBatch", "inputs": {"samples": ["2", 0], "amount": 4}},
        "31": {"class_type": "SaveLatent", "inputs": {"samples": ["30", 0], "filename_prefix": "prompts"}},
    }
    graph |= ksampler(["6", 0], positive=["5", 0], negative=["5", 1])
    run = run_ok(comfyui, graph)
    latent, images, scores, _ = kept(run)
    reference = run.outputs["30"][0][0]["samples"]
    for row, samples in zip(latent["batch_index"], latent["samples"], strict=True):
        assert torch.equal(samples, reference[row])
    assert [row % 2 for row in latent["batch_index"]] == [0] * 4 + [1] * 4  # prompt by prompt, best first

    model = GANRewardModel.from_pretrained(comfyui_reward_models["tiny-prompt-aware"])
    texts = ["a red one" if row % 2 == 0 else "a blue one" for row in latent["batch_index"]]
    expected = model.score(images.movedim(-1, 1), texts)
    assert (torch.tensor(scores) - expected).norm() <= 1e-4 * expected.norm()
    for group in (slice(0, 4), slice(4, 8)):
        assert scores[group] == sorted(scores[group], reverse=True)


def test_fk_resampling_runs_on_a_noisy_sampler_and_is_refused_on_a_deterministic_one(comfyui):
    run = run_ok(
        comfyui,
        sampler_graph(pruning="fk", checkpoints="0.2, 0.5", keep="", sampler_name="euler_ancestral", top_k=2),
    )
    latent, images, scores, _ = kept(run)
    assert len(scores) == 2 and torch.isfinite(latent["samples"]).all()
    again = kept(
        run_ok(
            comfyui,
            sampler_graph(pruning="fk", checkpoints="0.2, 0.5", keep="", sampler_name="euler_ancestral", top_k=2),
        )
    )
    assert torch.equal(again[0]["samples"], latent["samples"])  # the same call gives the same particles

    valid, _error, _outputs, node_errors = comfyui.validate(sampler_graph(pruning="fk", sampler_name="euler"))
    assert not valid
    assert "needs a sampler that adds noise" in node_errors["20"]["errors"][0]["details"]


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"top_k": 9}, "top_k 9 must be between 1 and num_candidates 8"),
        ({"pruning": "custom", "checkpoints": "0.97", "keep": "2"}, "falls on the last of the 10 steps"),
        ({"pruning": "custom", "checkpoints": "1.5", "keep": "2"}, "fractions of the steps in (0, 1)"),
        ({"pruning": "custom", "checkpoints": "0.3, 0.6", "keep": "2"}, "one keep count per checkpoint"),
        ({"pruning": "custom", "checkpoints": "0.3", "keep": "1"}, "stay >= top_k 2"),
        ({"pruning": "custom", "checkpoints": "a", "keep": "2"}, "comma-separated float values"),
        ({"sampler_name": "dpm_adaptive"}, "chooses its own steps"),
        ({"sampler_name": "no_such_sampler"}, "is not one of"),
        ({"num_candidates": 0}, "smaller than the minimum 1"),
    ],
)
def test_bad_settings_are_node_errors_before_sampling(comfyui, inputs, message):
    before = rows_seen().get("sd15", 0)
    valid, _error, _outputs, node_errors = comfyui.validate(sampler_graph(**inputs))
    assert not valid
    details = " ".join(error["details"] for error in node_errors["20"]["errors"])
    assert message in details
    assert rows_seen().get("sd15", 0) == before


def test_a_missing_reward_model_is_comfyuis_missing_input_error(comfyui):
    graph = sampler_graph()
    del graph["20"]["inputs"]["reward_model"]
    valid, _error, _outputs, node_errors = comfyui.validate(graph)
    assert not valid
    assert node_errors["20"]["errors"][0]["type"] == "required_input_missing"
    assert node_errors["20"]["errors"][0]["details"] == "reward_model"


@pytest.mark.parametrize("node", ["10", "20"])
def test_every_widget_left_out_of_an_api_graph_is_a_missing_input_error(comfyui, node):
    """Not a TypeError from validate_inputs: the error ComfyUI gives for its core nodes."""
    graph = sampler_graph()
    widget = {"10": "model_name", "20": "steps"}[node]
    del graph[node]["inputs"][widget]
    valid, _error, _outputs, node_errors = comfyui.validate(graph)
    assert not valid
    assert [error["type"] for error in node_errors[node]["errors"]] == ["required_input_missing"]
    assert node_errors[node]["errors"][0]["details"] == widget


@pytest.mark.parametrize(
    ("node", "widget", "value", "error_type"),
    [
        ("20", "steps", "many", "invalid_input_type"),
        ("20", "top_k", "two", "invalid_input_type"),
        ("20", "cfg", "high", "invalid_input_type"),
        ("10", "model_name", 5, "custom_validation_failed"),
    ],
)
def test_a_mistyped_widget_is_a_validation_error_not_a_traceback(comfyui, node, widget, value, error_type):
    graph = sampler_graph()
    graph[node]["inputs"][widget] = value
    valid, _error, _outputs, node_errors = comfyui.validate(graph)
    assert not valid
    assert [error["type"] for error in node_errors[node]["errors"]] == [error_type]
    assert widget in node_errors[node]["errors"][0]["details"]


def test_an_empty_latent_is_an_error_naming_it(comfyui):
    from ganrm_nodes.nodes import BestOfNSampler

    model, vae, positive, negative = tiny_pack().build("sd15", 0)
    from ganrm_nodes import models

    with pytest.raises(Exception, match="the LATENT batch is empty"):
        BestOfNSampler.execute(
            model,
            positive,
            negative,
            {"samples": torch.zeros(0, 4, 8, 8)},
            vae,
            models.load("tiny"),
            0,
            STEPS,
            4.0,
            "euler",
            "normal",
            1.0,
            8,
            2,
            "default",
            "0.3",
            "2",
            1.0,
            "max",
        )


def test_interrupt_stops_sampling(comfyui):
    import comfy.utils

    previous = comfy.utils.PROGRESS_BAR_HOOK
    calls = []

    def interrupt_at_step_3(value, total, preview, node_id=None):
        calls.append((value, total))
        if len(calls) == 3:
            comfyui.nodes.interrupt_processing(True)

    comfy.utils.set_progress_bar_global_hook(interrupt_at_step_3)
    try:
        run = comfyui.run(sampler_graph())
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
    assert not run.success
    assert any(event == "execution_interrupted" for event, _ in run.messages)
    assert calls[0] == (8, 8 * 3 + 2 * 7)  # candidate-steps: the pruned run's own total


def test_candidates_split_when_memory_is_short_give_the_same_images(comfyui, monkeypatch):
    """One candidate per model call when ComfyUI reports no free memory: the same candidates, up to the float
    rounding of another batch size."""
    import comfy.model_management as model_management

    whole = kept(run_ok(comfyui, sampler_graph(pruning="off", top_k=8)))[0]
    real = model_management.get_free_memory
    room = 1.5 * tiny_pack().build("sd15", 0)[0].model.memory_required([2, 4, 8, 8]) + 1  # two rows at a time

    def no_room_for_two_candidates(device=None, torch_free_too=False):
        if torch_free_too:  # attention's own chunking asks this way: leave it alone
            return real(device, torch_free_too)
        return room

    before, calls_before = rows_seen()["sd15"], len(tiny_pack().CALLS_SEEN["sd15"])
    monkeypatch.setattr(model_management, "get_free_memory", no_room_for_two_candidates)
    # (" " is an empty prompt that keeps ComfyUI from answering from its cache of the run above)
    split = kept(run_ok(comfyui, sampler_graph(pruning="off", top_k=8, prompt=" ")))[0]
    assert rows_seen()["sd15"] - before == 2 * 8 * STEPS
    assert tiny_pack().CALLS_SEEN["sd15"][calls_before:] == [2] * (8 * STEPS)
    whole_rows = dict(zip(whole["batch_index"], whole["samples"], strict=True))
    for row, samples in zip(split["batch_index"], split["samples"], strict=True):
        assert (samples - whole_rows[row]).norm() <= 1e-4 * whole_rows[row].norm()


# ------------------------------------------------------------------------------------------------------------
# Graphs that change what the sampler sees: inpainting masks, img2img, batch indices, area conditionings


def masked_latent() -> dict:
    """An encoded picture with a noise mask (SetLatentNoiseMask), as inpainting graphs give the sampler."""
    return {
        "40": {
            "class_type": "EmptyImage",
            "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1, "color": 0x7F3F1F},
        },
        "41": {"class_type": "VAEEncode", "inputs": {"pixels": ["40", 0], "vae": ["1", 1]}},
        "42": {"class_type": "SolidMask", "inputs": {"value": 0.5, "width": SIZE, "height": SIZE}},
        "43": {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["41", 0], "mask": ["42", 0]}},
    }


def test_inpainting_survivors_are_the_unpruned_candidates_and_fk_is_refused(comfyui):
    def graph(**inputs) -> dict:
        built = sampler_graph(**inputs) | masked_latent()
        built["20"]["inputs"]["latent_image"] = ["43", 0]
        return built

    full = kept(run_ok(comfyui, graph(pruning="off", top_k=8)))[0]
    pruned = kept(run_ok(comfyui, graph(pruning="default", top_k=2)))[0]
    assert_survivors_match(full, pruned)
    assert pruned["noise_mask"].shape[-2:] == (SIZE, SIZE)
    run = comfyui.run(graph(pruning="fk", checkpoints="0.3", keep="", sampler_name="euler_ancestral"))
    assert not run.success and "FK resampling cannot inpaint" in run.error["exception_message"]


def test_img2img_from_a_picked_latent_keeps_its_noise_indices(comfyui):
    """denoise < 1 on an encoded picture taken by LatentFromBatch (batch_index [1]): survivors are the unpruned
    candidates, and a kept one regenerates with RepeatLatentBatch -> LatentFromBatch -> KSampler."""
    source = {
        "40": {
            "class_type": "EmptyImage",
            "inputs": {"width": SIZE, "height": SIZE, "batch_size": 2, "color": 0x3F7F1F},
        },
        "41": {"class_type": "VAEEncode", "inputs": {"pixels": ["40", 0], "vae": ["1", 1]}},
        "44": {"class_type": "LatentFromBatch", "inputs": {"samples": ["41", 0], "batch_index": 1, "length": 1}},
    }

    def graph(**inputs) -> dict:
        built = sampler_graph(denoise=0.6, **inputs) | source
        built["20"]["inputs"]["latent_image"] = ["44", 0]
        return built

    full = kept(run_ok(comfyui, graph(pruning="off", top_k=8)))[0]
    assert sorted(full["batch_index"]) == list(range(1, 9))  # RepeatLatentBatch's indices for [1]
    pruned = kept(run_ok(comfyui, graph(pruning="default", top_k=1)))[0]
    assert_survivors_match(full, pruned)
    (index,) = pruned["batch_index"]
    again = (
        source
        | tiny_model()
        | {
            "45": {"class_type": "RepeatLatentBatch", "inputs": {"samples": ["44", 0], "amount": 8}},
            "46": {
                "class_type": "LatentFromBatch",
                "inputs": {"samples": ["45", 0], "batch_index": index - 1, "length": 1},
            },
            "31": {"class_type": "SaveLatent", "inputs": {"samples": ["30", 0], "filename_prefix": "img2img"}},
        }
    )
    again |= ksampler(["46", 0], denoise=0.6)
    alone = run_ok(comfyui, again).outputs["30"][0][0]["samples"]
    assert (alone - pruned["samples"]).norm() <= 1e-4 * pruned["samples"].norm()


def test_area_conditionings_three_chunks_a_call(comfyui):
    """Two positive conditionings (one with an area) and the negative: calc_cond_batch stacks three chunks of rows
    into each model call, and each is cut to the live candidates."""
    area = {
        "50": {
            "class_type": "ConditioningSetArea",
            "inputs": {"conditioning": ["1", 2], "width": 64, "height": 64, "x": 0, "y": 0, "strength": 0.5},
        },
        "51": {
            "class_type": "ConditioningCombine",
            "inputs": {"conditioning_1": ["1", 2], "conditioning_2": ["50", 0]},
        },
    }

    def graph(**inputs) -> dict:
        built = sampler_graph(**inputs) | area
        built["20"]["inputs"]["positive"] = ["51", 0]
        return built

    before = len(tiny_pack().CALLS_SEEN.get("sd15", []))
    full = kept(run_ok(comfyui, graph(pruning="off", top_k=8)))[0]
    calls = tiny_pack().CALLS_SEEN["sd15"][before:]
    chunks = calls[0] // 8
    assert chunks >= 3 and calls == [chunks * 8] * STEPS
    pruned_run = run_ok(comfyui, graph(pruning="default", top_k=2))
    assert_survivors_match(full, kept(pruned_run)[0])
    # 3 steps of 8 candidates, 7 of 2: 38 of 80 candidate-steps, `chunks` rows each.
    assert f"{38 * chunks} rows through the model, 0.475x full best-of-N ({80 * chunks})" in kept(pruned_run)[3]


# ------------------------------------------------------------------------------------------------------------
# FK segments, and a model pushed out of memory while candidates are judged


def test_fk_segments_equal_one_sampler_call_when_nothing_is_resampled(comfyui, monkeypatch):
    """FK samples between checkpoints in separate calls (KSamplerAdvanced's start and end steps). With resampling
    made the identity and a deterministic sampler, the segments must give what one call gives, for an SD1.5
    (eps) and a FLUX (flow) model: the latent round trips between segments are right."""
    from ganrm_diffusers.generation import pruning
    from ganrm_nodes import sampling

    def nobody_moves(self, step: int, scores: torch.Tensor) -> pruning.Survivors:
        prompts, live = scores.shape
        return pruning.Survivors(parents=torch.arange(live).repeat(prompts, 1), inherit_identity=False)

    monkeypatch.setattr(pruning._FKRun, "survivors", nobody_moves)
    monkeypatch.setattr(sampling, "adds_noise", lambda name: True)  # let FK run on euler
    for family in ("sd15", "flux"):
        one_call = kept(run_ok(comfyui, sampler_graph(family, pruning="off", top_k=8)))[0]
        segments = kept(run_ok(comfyui, sampler_graph(family, pruning="fk", checkpoints="0.2, 0.5", keep="", top_k=8)))[
            0
        ]
        # FK's LATENT has no batch_index (particles, not seeds); with nobody resampled, particle r is candidate r.
        ordered = dict(zip(one_call["batch_index"], one_call["samples"], strict=True))
        reference = torch.stack([ordered[row] for row in sorted(ordered)])
        got = segments["samples"]
        # The same candidates, in the order of their final scores (the same scores: the same images).
        matched = [min(range(8), key=lambda row: (reference[row] - sample).norm().item()) for sample in got]
        assert sorted(matched) == list(range(8)), family
        for row, sample in zip(matched, got, strict=True):
            # Between segments the latent goes out of the model's space and back (scaling, flow's 1 - sigma).
            assert (sample - reference[row]).norm() <= 1e-4 * reference[row].norm(), family


def test_fk_with_a_shrinking_population_costs_what_its_schedule_says(comfyui):
    run = run_ok(
        comfyui,
        sampler_graph(pruning="fk", checkpoints="0.3", keep="4", sampler_name="euler_ancestral", cfg=1.0, top_k=2),
    )
    latent, images, scores, summary = kept(run)
    # 10 steps: 3 with 8 particles, 7 with 4.
    assert "52 rows through the model, 0.650x full best-of-N (80)" in summary
    assert "batch_index" not in latent and len(scores) == 2 and "kept particle" in summary


def test_a_model_pushed_out_of_memory_while_judging_comes_back_with_its_patches(comfyui, monkeypatch):
    """Decoding and scoring at a checkpoint may make ComfyUI unload the sampled model (which also takes its LoRA
    patches off); it must be loaded back, patched, before the next step."""
    import comfy.model_management as model_management
    import comfy.sd

    def graph(**inputs) -> dict:
        built = sampler_graph(**inputs)
        built["1"]["inputs"]["patch_strength"] = 1.0
        return built

    full = kept(run_ok(comfyui, graph(pruning="off", top_k=8)))[0]
    decode = comfy.sd.VAE.decode

    def decode_after_unloading_everything(self, *args, **kwargs):
        model_management.unload_all_models()
        return decode(self, *args, **kwargs)

    monkeypatch.setattr(comfy.sd.VAE, "decode", decode_after_unloading_everything)
    pruned = kept(run_ok(comfyui, graph(pruning="default", top_k=2)))[0]
    assert_survivors_match(full, pruned)


def test_a_model_that_needs_every_row_is_sampled_whole_and_says_so(comfyui):
    """A patch holding per-row tensors (GLIGEN, regional masks) fails on a reduced batch: the node then puts every
    row through the model, which gives the unpruned candidates again, and reports that nothing was saved."""

    def graph(**inputs) -> dict:
        built = sampler_graph(**inputs)
        built["1"]["inputs"]["rows_per_call"] = 16
        return built

    full = kept(run_ok(comfyui, graph(pruning="off", top_k=8)))[0]
    latent, _images, _scores, summary = kept(run_ok(comfyui, graph(pruning="default", top_k=2)))
    assert_survivors_match(full, latent)
    assert "no saving: The size of tensor a (4) must match" in summary
    assert "1.000x full best-of-N" in summary
