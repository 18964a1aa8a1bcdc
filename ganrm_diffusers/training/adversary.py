"""The discriminator side of GAN-RM's adversarial loop (online PRDP, `prdp.py --adversarial`): refresh the reward
model on the target images against what the generator draws *now*, so that an exploit the generator found becomes a
negative (Adv-GRPO's scheme, with PRDP's objective), and measure how well each discriminator still separates.

The backbone is frozen, so everything here works on its embeddings: the targets are embedded once, every epoch's
on-policy samples (which the trainer draws anyway) are embedded into the current *window*, and a refresh trains the
head on the targets against the newest window plus a replay of the `replay` windows before it (a GAN's replay
buffer: the generator cannot return to an old exploit unpunished), warm started from the current head by default
(a few epochs move it; a fresh head would forget what the last refresh learnt). Its monitors, all on images the
refreshed head never trained on (HELDOUT_SHARE of the newest window, and the head's own validation targets, which
also chose its best epoch, so `auc_vs_current` is a little optimistic):
- `auc_vs_current`: the refreshed head, held-out targets against held-out images of the newest window;
- `previous_auc_vs_current`: the head before the refresh on the same images. This is the hacking alarm: it falls
  when the generator has moved into what the old discriminator took for the target; a refreshed head that cannot
  raise it again means the generator now draws what the targets look like to the backbone, or exploits what the
  backbone cannot see.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ganrm_diffusers.reward.model import GANRewardModel
from ganrm_diffusers.reward.training import (
    RewardDataset,
    RewardTrainingConfig,
    embeddings_auc,
    reset_head,
    split_validation,
    train_head,
)
from ganrm_diffusers.training.state import read_tensors
from ganrm_diffusers.utils.atomic import save_tensors_atomic

# The share of the newest window held out of every refresh: the images its AUCs are measured on.
HELDOUT_SHARE = 0.2


def split_window(embeddings: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training part, held-out part) of a window of generated images' embeddings, HELDOUT_SHARE held out."""
    order = torch.randperm(len(embeddings), generator=torch.Generator().manual_seed(seed))
    held = max(1, round(len(embeddings) * HELDOUT_SHARE))
    return embeddings[order[held:]], embeddings[order[:held]]


def refresh_discriminator(
    model: GANRewardModel,
    targets: torch.Tensor,
    windows: list[torch.Tensor],
    config: RewardTrainingConfig,
    *,
    replay: int,
    warm_start: bool = True,
) -> tuple[GANRewardModel, dict]:
    """A refreshed copy of `model` (the original is untouched), trained on the `targets` embeddings against the
    newest of `windows` (embeddings of generated images, oldest first) and the `replay` windows before it. Returns
    it with its monitors (see the module docstring) and its validation metrics."""
    if not windows:
        raise ValueError("a refresh needs at least one window of generated images")
    newest_train, newest_heldout = split_window(windows[-1], config.seed + len(windows))
    earlier = windows[max(0, len(windows) - 1 - replay) : -1]
    negatives = torch.cat([*earlier, newest_train])
    dataset = RewardDataset.from_sides(targets.to(model.device), negatives.to(model.device))
    split = split_validation(dataset, config.val_fraction, config.seed)
    refreshed = model.copy()
    if not warm_start:
        reset_head(refreshed, config.seed)
    result = train_head(refreshed, dataset, config, split)
    validation = split[1]
    heldout_targets = dataset.features[validation][dataset.labels[validation].cpu() == 1]
    metrics = {
        "auc_vs_current": embeddings_auc(refreshed, heldout_targets, newest_heldout),
        "previous_auc_vs_current": embeddings_auc(model, heldout_targets, newest_heldout),
        "negatives": len(negatives),
        "replayed_windows": len(earlier),
        **{key: value for key, value in result.metrics.items() if isinstance(value, (int, float))},
    }
    return refreshed, metrics


@dataclass
class OnlineDiscriminator:
    """The reward model of an adversarial run and what it is refreshed from: the target embeddings, the windows of
    generated embeddings (the newest last; older ones beyond the replay are dropped), and the monitors of every
    refresh so far. Saved and restored with the trainer's checkpoints, so a resumed run refreshes as an unbroken one."""

    model: GANRewardModel
    targets: torch.Tensor
    config: RewardTrainingConfig
    replay: int
    warm_start: bool = True
    windows: list[torch.Tensor] = field(default_factory=list)
    current: list[torch.Tensor] = field(default_factory=list)  # this window's embeddings so far
    refreshes: list[dict] = field(default_factory=list)

    def observe(self, images: torch.Tensor) -> None:
        """Add on-policy samples (images in [0, 1]) to the current window."""
        self.current.append(self.model.encoder.encode_images(images).float().cpu())

    def refresh(self, **record: object) -> dict:
        """Close the current window and refresh the model on it (and the replay); returns the refresh's monitors
        with `record` (e.g. the epoch) added, also kept in `refreshes`. The monitors measure the window's newest
        samples, which a trainer draws at the start of an epoch: the generator before that epoch's updates."""
        if not self.current:
            raise ValueError("no samples observed since the last refresh")
        self.windows = [*self.windows, torch.cat(self.current)][-(self.replay + 1) :]
        self.current = []
        self.model, metrics = refresh_discriminator(
            self.model, self.targets, self.windows, self.config, replay=self.replay, warm_start=self.warm_start
        )
        entry = {"refresh": len(self.refreshes) + 1, **record, **metrics}
        self.refreshes.append(entry)
        return entry

    # Checkpoints ------------------------------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        tensors = {f"head.{key}": value.detach().cpu() for key, value in self.model.head.state_dict().items()}
        tensors.update({f"window.{index}": window for index, window in enumerate(self.windows)})
        if self.current:
            tensors["current"] = torch.cat(self.current)
        metadata = {"refreshes": json.dumps(self.refreshes)}
        save_tensors_atomic(path, {key: value.contiguous() for key, value in tensors.items()}, metadata)

    def adopt(self, folder: Path, entry: dict) -> None:
        """Take the head a main process refreshed and saved in `folder` (a GANRewardModel folder), with its monitors
        `entry`: other processes score with the very same discriminator, without training their own."""
        self.windows = [*self.windows, torch.cat(self.current)][-(self.replay + 1) :]
        self.current = []
        model = self.model.copy()
        model.head.load_state_dict(GANRewardModel.from_pretrained(folder).head.state_dict())
        self.model = model
        self.refreshes.append(entry)

    def load(self, path: Path) -> None:
        tensors, metadata = read_tensors(path)
        self.model.head.load_state_dict(
            {key.removeprefix("head."): value for key, value in tensors.items() if key.startswith("head.")}
        )
        count = sum(key.startswith("window.") for key in tensors)
        self.windows = [tensors[f"window.{index}"] for index in range(count)]
        self.current = [tensors["current"]] if "current" in tensors else []
        self.refreshes = json.loads(metadata.get("refreshes", "[]"))
