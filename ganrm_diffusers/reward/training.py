"""Training a GAN-RM head: target images are positives, generations are negatives, binary cross-entropy.

The encoder is frozen, so training works on embeddings (cached on disk for files) and takes seconds.
Rank-based bootstrapping (GAN-RM, Sec. 3) adds the top-M of a fresh pool of generations as soft positives with
label exp(-alpha * rank) (rank 0 = best) and the bottom-M as negatives, then retrains the head from scratch.
Validation always uses a fixed held-out split of the original, hard-labelled images.

Optional brightness augmentation (`augment_copies`), as GAN discriminators use with little data (ADA, DiffAugment):
each training image of both sides is also embedded with its pixels scaled by a random gain. Brightness then tells
the sides apart no better than chance, so the head cannot prefer dimmer (or brighter) images for that alone; the
price is that a style which *is* a brightness (a darker look) is harder to learn. Off by default.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from tqdm.auto import tqdm

from ganrm_diffusers.reward.backbone import DEFAULT_BACKBONE, DEFAULT_PRETRAINED
from ganrm_diffusers.reward.embedding_cache import EmbeddingCache, embed_files
from ganrm_diffusers.reward.model import GANRewardModel
from ganrm_diffusers.utils.errors import GanrmError, ImageInputError
from ganrm_diffusers.utils.images import load_image, to_pixels
from ganrm_diffusers.utils.options import option
from ganrm_diffusers.utils.plots import plot_training_curves

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


class TrainingDivergedError(GanrmError, ValueError):
    """Head training whose loss became NaN or infinite before any epoch gave a usable head."""


@dataclass
class RewardTrainingConfig:
    """Head training and bootstrapping settings (defaults work for a few hundred images per side). The same names
    are `ganrm train-rm`'s options, the ComfyUI training node's inputs and `ganrm train rounds`' `--rm_*` options."""

    max_epochs: int = option(100, "maximum epochs (early stopping on the validation loss)", aliases=("--epochs",))
    batch_size: int = option(256, "embeddings per head training step")
    learning_rate: float = option(3e-3, "AdamW learning rate of the head", aliases=("--lr",))
    weight_decay: float = option(1e-2, "AdamW weight decay of the head")
    val_fraction: float = option(0.2, "share of each side held out for validation (original images only)")
    patience: int = option(15, "epochs without a better validation loss before stopping")
    min_improvement: float = option(1e-3, "relative drop of the validation loss that counts as progress")
    seed: int = option(0, "seed of the split, the head's initialisation and the data order")
    min_images_per_class: int = option(8, "fewest readable images a side may have", aliases=("--min-images",))
    bootstrap_rounds: int = option(0, "rank-based bootstrapping rounds (each needs a pool)", aliases=("--rounds",))
    bootstrap_m: int = option(32, "top-M / bottom-M of the pool added per bootstrapping round")
    bootstrap_alpha: float = option(0.1, "soft label of the pool's rank-r image: exp(-alpha * r)")
    augment_copies: int = option(
        0,
        "brightness-scaled views of each training image, both sides (0: none). The head then cannot prefer images "
        "for being dimmer or brighter alone; leave it off when the target style is a brightness",
    )
    brightness_jitter: float = option(0.4, "each view's gain is uniform in [1 - jitter, 1 + jitter], clipped to [0, 1]")


@dataclass
class RewardDataset:
    """Embeddings with (soft) labels. `hard` marks the original target/generated images: only they validate."""

    features: torch.Tensor
    labels: torch.Tensor
    hard: torch.Tensor
    text: torch.Tensor | None = None

    @classmethod
    def from_sides(
        cls,
        positives: torch.Tensor,
        negatives: torch.Tensor,
        positive_text: torch.Tensor | None = None,
        negative_text: torch.Tensor | None = None,
    ) -> RewardDataset:
        text = None if positive_text is None else torch.cat([positive_text, negative_text])
        return cls(
            features=torch.cat([positives, negatives]),
            labels=torch.cat([torch.ones(len(positives)), torch.zeros(len(negatives))]).to(positives.device),
            hard=torch.ones(len(positives) + len(negatives), dtype=torch.bool, device=positives.device),
            text=text,
        )

    def __len__(self) -> int:
        return len(self.labels)

    def extend(self, features: torch.Tensor, labels: torch.Tensor, text: torch.Tensor | None = None) -> RewardDataset:
        """A new dataset with soft-labelled (pseudo) examples appended; they never enter validation."""
        return RewardDataset(
            features=torch.cat([self.features, features]),
            labels=torch.cat([self.labels, labels.to(self.labels)]),
            hard=torch.cat([self.hard, torch.zeros(len(labels), dtype=torch.bool, device=self.hard.device)]),
            text=None if self.text is None else torch.cat([self.text, text]),
        )


@dataclass
class TrainingResult:
    """Held-out metrics of the best epoch and the per-epoch history (for curves)."""

    metrics: dict
    history: list[dict] = field(default_factory=list)


def split_validation(dataset: RewardDataset, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified (train, validation) indices; validation holds only hard-labelled examples."""
    generator = torch.Generator().manual_seed(seed)
    validation = []
    for label in (1.0, 0.0):
        candidates = torch.nonzero(dataset.hard.cpu() & (dataset.labels.cpu() == label)).flatten()
        count = max(1, round(len(candidates) * val_fraction)) if val_fraction > 0 else 0
        validation.append(candidates[torch.randperm(len(candidates), generator=generator)[:count]])
    val = torch.cat(validation).sort().values
    train_mask = torch.ones(len(dataset), dtype=torch.bool)
    train_mask[val] = False
    return torch.nonzero(train_mask).flatten(), val


def _balanced_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BCE where positive and negative mass weigh the same, whatever the class sizes."""
    positive_mass = labels.sum().clamp_min(1e-6)
    negative_mass = (1 - labels).sum().clamp_min(1e-6)
    return F.binary_cross_entropy_with_logits(logits, labels, pos_weight=negative_mass / positive_mass)


def _evaluate(model: GANRewardModel, dataset: RewardDataset, indices: torch.Tensor) -> dict:
    with torch.no_grad():
        text = None if dataset.text is None else dataset.text[indices]
        logits = model.score_embeddings(dataset.features[indices], text)
        labels = dataset.labels[indices].float()
        loss = _balanced_bce(logits, labels).item()
    hard = labels.cpu().round().numpy()
    scores = logits.cpu().numpy()
    accuracy = float(((scores > 0) == (hard == 1)).mean())
    return {"val_loss": loss, "val_auc": roc_auc(scores, hard), "val_accuracy": accuracy}


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic (ties count half); NaN when one class is missing.

    Equal to sklearn's roc_auc_score, but cheap enough to run after every epoch.
    """
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def embeddings_auc(model: GANRewardModel, targets: torch.Tensor, generated: torch.Tensor) -> float:
    """Held-out AUC of `model`'s head on embeddings: target images (label 1) against generated ones (label 0),
    wherever the embeddings lie (both are moved to the model's device)."""
    with torch.no_grad():
        embeddings = torch.cat([targets.to(model.device), generated.to(model.device)])
        scores = model.score_embeddings(embeddings).float().cpu().numpy()
    labels = np.concatenate([np.ones(len(targets)), np.zeros(len(generated))])
    return roc_auc(scores, labels)


def reset_head(model: GANRewardModel, seed: int) -> None:
    """Fresh head weights from `seed` (retraining starts from scratch, reproducibly)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in model.head.modules():
            if isinstance(module, torch.nn.Linear):
                module.reset_parameters()


def train_head(
    model: GANRewardModel,
    dataset: RewardDataset,
    config: RewardTrainingConfig,
    split: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    round_index: int = 0,
) -> TrainingResult:
    """Train the head in place with AdamW and early stopping on validation loss; the best epoch is kept."""
    train_idx, val_idx = split or split_validation(dataset, config.val_fraction, config.seed)
    if len(val_idx) == 0:
        raise ImageInputError("training needs a validation split: set val_fraction > 0")
    device = model.head.net[0].weight.device
    generator = torch.Generator().manual_seed(config.seed + 1000 * round_index)
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    best_loss, best_state, best_epoch, history = float("inf"), None, -1, []
    started = time.perf_counter()
    epochs = tqdm(range(config.max_epochs), desc=f"training head (round {round_index})", leave=False, unit="epoch")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + round_index)  # dropout masks
        for epoch in epochs:
            model.head.train()
            order = train_idx[torch.randperm(len(train_idx), generator=generator)].to(device)
            losses = []
            for start in range(0, len(order), config.batch_size):
                batch = order[start : start + config.batch_size]
                text = None if dataset.text is None else dataset.text[batch]
                loss = _balanced_bce(model.score_embeddings(dataset.features[batch], text), dataset.labels[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            model.head.eval()
            record = {"round": round_index, "epoch": epoch, "train_loss": sum(losses) / len(losses)}
            record.update(_evaluate(model, dataset, val_idx.to(device)))
            history.append(record)
            epochs.set_postfix(val_loss=f"{record['val_loss']:.3f}", val_auc=f"{record['val_auc']:.3f}", refresh=False)
            if not _finite_losses(record, best_state is not None, round_index):
                break  # later epochs cannot recover from NaN weights: keep the best finite epoch
            if record["val_loss"] < best_loss * (1 - config.min_improvement):
                best_loss, best_epoch = record["val_loss"], epoch
                best_state = copy.deepcopy(model.head.state_dict())
            if progress is not None:
                progress(epoch + 1, config.max_epochs)
            if epoch - best_epoch >= config.patience or (should_stop is not None and should_stop()):
                break
    model.head.load_state_dict(best_state)
    model.head.eval()
    metrics = {key: value for key, value in history[best_epoch].items() if key.startswith("val_")}
    metrics.update(
        best_epoch=best_epoch,
        epochs=len(history),
        train_seconds=time.perf_counter() - started,
        train_size=len(train_idx),
        val_size=len(val_idx),
    )
    return TrainingResult(metrics=metrics, history=history)


def _finite_losses(record: dict, have_best: bool, round_index: int) -> bool:
    """Whether an epoch's losses are finite. A non-finite one stops training: with a finite earlier epoch to fall
    back on, with a warning; in the first epoch, with an error (there is no head to keep)."""
    if np.isfinite(record["train_loss"]) and np.isfinite(record["val_loss"]):
        return True
    problem = (
        f"reward-model training gave a NaN or infinite loss in epoch {record['epoch']} of round {round_index} "
        f"(train loss {record['train_loss']}, validation loss {record['val_loss']})"
    )
    if not have_best:
        raise TrainingDivergedError(
            f"{problem}, before any finite epoch: check the inputs (NaN/infinite images or embeddings, labels "
            "outside [0, 1]) and lower the learning rate"
        )
    logger.warning("%s: stopping and keeping the best finite epoch; consider a lower learning rate", problem)
    return False


def bootstrap_round(
    model: GANRewardModel,
    dataset: RewardDataset,
    pool_features: torch.Tensor,
    config: RewardTrainingConfig,
    split: tuple[torch.Tensor, torch.Tensor],
    *,
    pool_text: torch.Tensor | None = None,
    round_index: int = 1,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[RewardDataset, TrainingResult]:
    """One rank-based bootstrapping round: rank the pool, add top-M (soft) and bottom-M, retrain from scratch."""
    m = config.bootstrap_m
    if 2 * m > len(pool_features):
        raise ImageInputError(f"bootstrapping with M={m} needs at least {2 * m} pool images, got {len(pool_features)}")
    with torch.no_grad():
        order = model.score_embeddings(pool_features, pool_text).argsort(descending=True, stable=True)
    top, bottom = order[:m], order[-m:]
    soft_labels = torch.exp(-config.bootstrap_alpha * torch.arange(m, dtype=torch.float32))
    chosen = torch.cat([top, bottom])
    labels = torch.cat([soft_labels, torch.zeros(m)]).to(dataset.labels.device)
    extended = dataset.extend(pool_features[chosen], labels, None if pool_text is None else pool_text[chosen])
    train_idx, val_idx = split
    new_train = torch.cat([train_idx, torch.arange(len(dataset), len(extended))])
    reset_head(model, config.seed + round_index)
    result = train_head(
        model,
        extended,
        config,
        (new_train, val_idx),
        progress=progress,
        should_stop=should_stop,
        round_index=round_index,
    )
    return extended, result


def brightness_gains(count: int, jitter: float, generator: torch.Generator) -> torch.Tensor:
    """Per-image gains uniform in [1 - jitter, 1 + jitter]."""
    if not 0 < jitter < 1:
        raise ValueError(f"brightness_jitter must be in (0, 1), got {jitter}")
    return 1 - jitter + 2 * jitter * torch.rand(count, generator=generator)


def add_brightness_views(
    model: GANRewardModel,
    dataset: RewardDataset,
    split: tuple[torch.Tensor, torch.Tensor],
    sides: Sequence[EmbeddedSide],
    config: RewardTrainingConfig,
) -> tuple[RewardDataset, tuple[torch.Tensor, torch.Tensor]]:
    """`config.augment_copies` brightness-scaled views of every *training* image of `sides` (dataset rows in side
    order), appended with their image's label and text. Validation images get none: they stay unseen."""
    train_idx, val_idx = split
    owners = [(side, row) for side in sides for row in range(len(side.embeddings))]
    originals = [owners[index][0].pixels(owners[index][1]) for index in train_idx.tolist()]  # read once
    generator = torch.Generator().manual_seed(config.seed + 7919)
    features, labels, texts = [], [], []
    for _ in tqdm(range(config.augment_copies), desc="brightness views", leave=False):
        gains = brightness_gains(len(train_idx), config.brightness_jitter, generator)
        views = [(pixels * gain).clamp(0, 1) for pixels, gain in zip(originals, gains.tolist(), strict=True)]
        features.append(model.encoder.encode_images(views).to(dataset.features))
        labels.append(dataset.labels[train_idx])
        texts.append(None if dataset.text is None else dataset.text[train_idx])
    added = sum(len(block) for block in labels)
    extended = RewardDataset(
        features=torch.cat([dataset.features, *features]),
        labels=torch.cat([dataset.labels, *labels]),
        hard=torch.cat([dataset.hard, torch.zeros(added, dtype=torch.bool, device=dataset.hard.device)]),
        text=None if dataset.text is None else torch.cat([dataset.text, *texts]),
    )
    return extended, (torch.cat([train_idx, torch.arange(len(dataset), len(extended))]), val_idx)


# --------------------------------------------------------------------------------------------------------------
# From images to a trained reward model


@dataclass
class PromptedImages:
    """Images in memory (a PIL list or an image tensor batch) with the prompt of each: a side of a prompt-aware
    reward model's training data, or a bootstrapping pool. Files carry their prompts in metadata.jsonl instead."""

    images: object
    prompts: Sequence[str]


@dataclass
class EmbeddedSide:
    embeddings: torch.Tensor
    prompts: list[str | None] | None
    source: str
    images: Sequence[object] | torch.Tensor  # row i of `embeddings` came from images[i] (a file path or an image)

    def pixels(self, index: int) -> torch.Tensor:
        """Image `index` as a 1x3xHxW batch in [0, 1] (files are read again: only embeddings are cached)."""
        item = self.images[index]
        return to_pixels(load_image(item) if isinstance(item, (str, Path)) else item)


def embed_source(
    model: GANRewardModel,
    source: object,
    *,
    cache: EmbeddingCache | None,
    strict: bool,
    min_images: int,
    name: str,
) -> EmbeddedSide:
    """Embeddings of a folder or file list (cached on disk), or of images in memory (PIL list, tensor batch, or
    `PromptedImages`), with the prompts that come with them (None where there are none)."""
    prompts = None
    if isinstance(source, PromptedImages):
        source, prompts = source.images, list(source.prompts)
    if isinstance(source, (str, Path)) or (
        isinstance(source, Sequence) and len(source) > 0 and isinstance(source[0], (str, Path))
    ):
        files = embed_files(
            model.encoder, source, cache=cache, strict=strict, min_images=min_images, description=f"embedding {name}"
        )
        label = str(source) if isinstance(source, (str, Path)) else f"{len(files.paths)} files"
        return EmbeddedSide(files.embeddings, files.prompts, label, files.paths)
    embeddings = model.encoder.encode_images(source)
    if len(embeddings) < min_images:
        raise ImageInputError(f"the {name} batch has {len(embeddings)} image(s); at least {min_images} are needed")
    if prompts is not None and len(prompts) != len(embeddings):
        raise ImageInputError(f"the {name} batch has {len(embeddings)} image(s) but {len(prompts)} prompts")
    images = source if isinstance(source, (Sequence, torch.Tensor, np.ndarray)) else [source]
    return EmbeddedSide(embeddings, prompts, f"{len(embeddings)} images in memory", images)


def _text(model: GANRewardModel, side: EmbeddedSide, name: str) -> torch.Tensor | None:
    """The prompt embeddings of a side for a prompt-aware model. Every image needs its real prompt: were one side
    captioned and the other not (or blank), the head could tell the sides apart by the text alone."""
    if not model.config.prompt_aware:
        return None
    missing = len(side.embeddings) if side.prompts is None else sum(prompt is None for prompt in side.prompts)
    if missing:
        raise ImageInputError(
            f"this reward model is prompt-aware, but {missing} of the {len(side.embeddings)} {name} images "
            f"({side.source}) have no prompt: give every image its prompt, in a metadata.jsonl beside the files "
            "(one JSON line per image: file_name and prompt or text, as `ganrm sample` writes) or as "
            "PromptedImages(images, prompts) for images in memory. Without them the head could tell the sides "
            "apart by their missing text instead of by the images"
        )
    return model.embed_prompts(side.prompts, len(side.embeddings))


@dataclass
class FitReport:
    """What fit_reward_model did: final held-out metrics, every epoch, and one entry per round."""

    metrics: dict
    history: list[dict]
    rounds: list[dict]
    dataset: RewardDataset
    split: tuple[torch.Tensor, torch.Tensor]


def fit_reward_model(
    positives: object,
    negatives: object,
    *,
    model: GANRewardModel | None = None,
    backbone: str = DEFAULT_BACKBONE,
    pretrained: str | None = DEFAULT_PRETRAINED,
    hidden_sizes: Sequence[int] = (512, 128),
    dropout: float = 0.1,
    prompt_aware: bool = False,
    config: RewardTrainingConfig | None = None,
    pools: Sequence[object] | Callable[[int, GANRewardModel], object] | None = None,
    cache: EmbeddingCache | None = None,
    strict: bool = False,
    description: str | None = None,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[GANRewardModel, FitReport]:
    """Train a GAN-RM from target images (`positives`) and generated images (`negatives`).

    Each side is a folder, a list of files, a list of PIL images or an image tensor batch. With
    `config.bootstrap_rounds > 0`, `pools` gives the fresh generations of each round: a list (one image source per
    round) or a callable `(round, model) -> images` that samples them from the current generator. A prompt-aware
    model needs the prompt of every image on both sides and in every pool: files take theirs from the nearest
    metadata.jsonl (file_name + prompt or text), images in memory come as `PromptedImages(images, prompts)`;
    any image without one is an error naming its side.
    `progress(step, total)` and `should_stop()` let a host (ComfyUI, a GUI) follow and interrupt training.
    """
    config = config or RewardTrainingConfig()
    if model is None:
        model = GANRewardModel(
            backbone=backbone,
            pretrained=pretrained,
            hidden_sizes=hidden_sizes,
            dropout=dropout,
            prompt_aware=prompt_aware,
        )
    need = config.min_images_per_class
    positive = embed_source(model, positives, cache=cache, strict=strict, min_images=need, name="positives")
    positive_text = _text(model, positive, "positives")  # before embedding the negatives: fail early
    negative = embed_source(model, negatives, cache=cache, strict=strict, min_images=need, name="negatives")
    negative_text = _text(model, negative, "negatives")
    dataset = RewardDataset.from_sides(positive.embeddings, negative.embeddings, positive_text, negative_text)
    split = split_validation(dataset, config.val_fraction, config.seed)
    if config.augment_copies > 0:
        dataset, split = add_brightness_views(model, dataset, split, [positive, negative], config)
    total_steps = config.max_epochs * (1 + config.bootstrap_rounds)

    def round_progress(round_index: int) -> Progress | None:
        if progress is None:
            return None
        return lambda step, _total: progress(round_index * config.max_epochs + step, total_steps)

    reset_head(model, config.seed)
    result = train_head(model, dataset, config, split, progress=round_progress(0), should_stop=should_stop)
    history, rounds = list(result.history), [{"round": 0, "added": 0, **result.metrics}]
    for round_index in range(1, config.bootstrap_rounds + 1):
        if should_stop is not None and should_stop():
            break
        if pools is None:
            raise ImageInputError("bootstrapping rounds need a pool of fresh generations (pools=...)")
        pool_source = pools(round_index, model) if callable(pools) else pools[round_index - 1]
        pool = embed_source(
            model, pool_source, cache=cache, strict=strict, min_images=2 * config.bootstrap_m, name="pool"
        )
        dataset, result = bootstrap_round(
            model,
            dataset,
            pool.embeddings,
            config,
            split,
            pool_text=_text(model, pool, "pool"),
            round_index=round_index,
            progress=round_progress(round_index),
            should_stop=should_stop,
        )
        history += result.history
        rounds.append({"round": round_index, "added": 2 * config.bootstrap_m, **result.metrics})

    summary = {
        "description": description,
        "positives": {"count": len(positive.embeddings), "source": positive.source},
        "negatives": {"count": len(negative.embeddings), "source": negative.source},
        "rounds": len(rounds) - 1,
        "metrics": {key: value for key, value in result.metrics.items() if isinstance(value, (int, float))},
        "config": asdict(config),
    }
    model.register_to_config(training=summary)
    return model, FitReport(metrics=result.metrics, history=history, rounds=rounds, dataset=dataset, split=split)


def save_training_outputs(model: GANRewardModel, report: FitReport, folder: str | Path) -> Path:
    """Write a training run's checkpoint, `metrics.json` and `training_curves.png` into `folder`; returns the PNG."""
    folder = Path(folder)
    model.save_pretrained(folder)
    metrics = {"metrics": report.metrics, "rounds": report.rounds}
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return plot_training_curves(report.history, folder / "training_curves.png")
