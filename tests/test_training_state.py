"""The trainers' checkpoint path: optimizer, scheduler and random states round-trip exactly through safetensors and
JSON, a write interrupted at any point leaves only complete checkpoints, and nothing is pickled."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from tiny_models import tiny_sd_unet

from ganrm_diffusers.generation.lora import add_lora
from ganrm_diffusers.training.state import (
    CHECKPOINTS_DIR,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from ganrm_diffusers.utils.errors import CheckpointError


def make_training(lora_seed: int = 0):
    torch.manual_seed(0)  # the base model: the same in every run, as a pretrained model is
    unet = tiny_sd_unet()
    torch.manual_seed(lora_seed)
    add_lora(unet, rank=2)
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-2, weight_decay=1e-2)
    scheduler = get_scheduler("linear", optimizer=optimizer, num_warmup_steps=2, num_training_steps=10)
    return unet, optimizer, scheduler


def train_steps(unet, optimizer, scheduler, steps: int) -> None:
    for _ in range(steps):
        sample = torch.randn(1, 4, 16, 16)  # from the global RNG: a resumed run must draw the same
        text = torch.randn(1, 3, 32)
        loss = unet(sample, torch.tensor([500]), encoder_hidden_states=text).sample.pow(2).mean()
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        random.random(), np.random.rand()  # python and numpy draws too


def lora_tensors(unet) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in unet.named_parameters() if p.requires_grad}


def test_resume_continues_exactly_where_the_run_stopped(tmp_path: Path):
    accelerator = Accelerator(cpu=True)
    unet, optimizer, scheduler = make_training()
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    train_steps(unet, optimizer, scheduler, 3)
    folder = save_checkpoint(accelerator, tmp_path, 3, unet, optimizer, scheduler, {"epoch": 0, "position": 3})
    learning_rate_at_checkpoint = scheduler.get_last_lr()
    train_steps(unet, optimizer, scheduler, 3)
    expected = lora_tensors(unet)
    expected_draws = (torch.rand(1), random.random(), np.random.rand())

    fresh, fresh_optimizer, fresh_scheduler = make_training(
        lora_seed=7
    )  # another initial LoRA: the checkpoint's must replace it
    state = load_checkpoint(accelerator, folder, fresh, fresh_optimizer, fresh_scheduler)
    assert state["step"] == 3 and state["position"] == 3
    assert fresh_scheduler.get_last_lr() == learning_rate_at_checkpoint
    train_steps(fresh, fresh_optimizer, fresh_scheduler, 3)
    assert all(torch.equal(expected[name], value) for name, value in lora_tensors(fresh).items())
    assert fresh_scheduler.state_dict() == scheduler.state_dict()
    assert (torch.rand(1), random.random(), np.random.rand()) == expected_draws
    # Only safetensors and JSON: nothing that would need unpickling.
    assert {path.suffix for path in folder.iterdir()} == {".safetensors", ".json"}


def test_only_complete_checkpoints_count(tmp_path: Path):
    accelerator = Accelerator(cpu=True)
    unet, optimizer, scheduler = make_training()
    for step in (2, 4, 6):
        save_checkpoint(accelerator, tmp_path, step, unet, optimizer, scheduler, {}, total_limit=2)
    assert [path.name for path in list_checkpoints(tmp_path)] == ["checkpoint-000004", "checkpoint-000006"]
    # A write killed half-way leaves a hidden staging folder, and a folder without state.json is not complete.
    (tmp_path / CHECKPOINTS_DIR / ".checkpoint-000008.tmp").mkdir()
    (tmp_path / CHECKPOINTS_DIR / "checkpoint-000010").mkdir()
    assert resolve_resume(tmp_path, "latest").name == "checkpoint-000006"
    assert resolve_resume(tmp_path / "nothing-here", "latest") is None
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        resolve_resume(tmp_path, str(tmp_path / CHECKPOINTS_DIR / "checkpoint-000010"))


def test_a_lora_of_another_shape_is_refused(tmp_path: Path):
    accelerator = Accelerator(cpu=True)
    unet, optimizer, scheduler = make_training()
    folder = save_checkpoint(accelerator, tmp_path, 1, unet, optimizer, scheduler, {})
    torch.manual_seed(0)
    other = tiny_sd_unet()
    add_lora(other, rank=8)
    other_optimizer = torch.optim.AdamW([p for p in other.parameters() if p.requires_grad])
    with pytest.raises(CheckpointError, match="does not fit this run's LoRA"):
        load_checkpoint(accelerator, folder, other, other_optimizer, get_scheduler("constant", other_optimizer))
