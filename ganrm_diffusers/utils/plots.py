"""Pictures people look at: image grids with scores printed on them, and training curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from ganrm_diffusers.utils.images import pixel_batches, to_pil

CAPTION_HEIGHT = 18


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size default font
        return ImageFont.load_default()


def _thumbnails(images: object, cell: int) -> list[Image.Image]:
    pil = [image for batch in pixel_batches(images, device="cpu") for image in to_pil(batch)]
    resized = []
    for image in pil:
        scale = cell / max(image.size)
        # Nearest keeps tiny images (16 px digits) crisp; larger ones are downsampled smoothly.
        resample = Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.LANCZOS
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        resized.append(image.resize(size, resample))
    return resized


def score_grid(
    images: object,
    scores: Sequence[float] | torch.Tensor | None = None,
    captions: Sequence[str] | None = None,
    *,
    columns: int = 8,
    cell: int = 128,
    sort: bool = False,
) -> Image.Image:
    """A grid of images with a caption under each (its score, or the given text); best first if `sort`."""
    thumbs = _thumbnails(images, cell)
    values = None if scores is None else [float(value) for value in torch.as_tensor(scores).flatten()]
    if values is not None and len(values) != len(thumbs):
        raise ValueError(f"{len(values)} scores for {len(thumbs)} images")
    labels = list(captions) if captions is not None else [f"{value:+.3f}" for value in values or []]
    order = list(range(len(thumbs)))
    if sort and values is not None:
        order.sort(key=lambda index: -values[index])
    columns = max(1, min(columns, len(thumbs)))
    rows = (len(thumbs) + columns - 1) // columns
    grid = Image.new("RGB", (columns * cell, rows * (cell + CAPTION_HEIGHT)), "white")
    draw = ImageDraw.Draw(grid)
    font = _font(13)
    for position, index in enumerate(order):
        x, y = (position % columns) * cell, (position // columns) * (cell + CAPTION_HEIGHT)
        thumb = thumbs[index]
        grid.paste(thumb, (x + (cell - thumb.width) // 2, y + (cell - thumb.height) // 2))
        if index < len(labels):
            draw.text(
                (x + cell // 2, y + cell + CAPTION_HEIGHT // 2), labels[index], fill="black", font=font, anchor="mm"
            )
    return grid


def _pyplot():
    """matplotlib's pyplot on the headless Agg backend (imported late: only plotting needs it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(figure: object, path: str | Path, title: str) -> Path:
    """Title, lay out and write `figure` as PNG (creating the folder), then free it."""
    figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    _pyplot().close(figure)
    return path


def plot_training_curves(history: Sequence[dict], path: str | Path, title: str = "GAN-RM head training") -> Path:
    """Train/validation loss and validation AUC per epoch, with a line where each bootstrapping round starts."""
    plt = _pyplot()
    steps = list(range(len(history)))
    figure, (loss_axis, auc_axis) = plt.subplots(1, 2, figsize=(10, 3.8))
    loss_axis.plot(steps, [row["train_loss"] for row in history], label="train loss")
    loss_axis.plot(steps, [row["val_loss"] for row in history], label="validation loss")
    auc_axis.plot(steps, [row["val_auc"] for row in history], color="tab:green", label="validation AUC")
    for step in range(1, len(history)):
        if history[step]["round"] != history[step - 1]["round"]:
            for axis in (loss_axis, auc_axis):
                axis.axvline(step, color="gray", linestyle=":", linewidth=1)
            auc_axis.text(step, auc_axis.get_ylim()[0], f" round {history[step]['round']}", fontsize=8, color="gray")
    loss_axis.set(xlabel="epoch (all rounds)", ylabel="balanced BCE", title="loss")
    auc_axis.set(xlabel="epoch (all rounds)", ylabel="AUC", title="held-out AUC")
    loss_axis.legend()
    auc_axis.legend(loc="lower right")
    return _save_figure(figure, path, title)


def plot_metric_curves(
    records: Sequence[dict],
    panels: Sequence[tuple[str, Sequence[str]]],
    path: str | Path,
    title: str = "fine-tuning",
    x_key: str = "step",
) -> Path:
    """One panel per (title, metric keys) of a trainer's metrics records, against `x_key`; missing values skipped."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for axis, (panel_title, keys) in zip(axes[0], panels, strict=True):
        for key in keys:
            points = [(row[x_key], row[key]) for row in records if row.get(key) is not None and x_key in row]
            if points:
                xs, ys = zip(*points, strict=True)
                axis.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3, label=key)
        values = [y for line in axis.lines for y in line.get_ydata()]
        if values and min(values) > 0 and max(values) > 100 * min(values):
            axis.set_yscale("log")  # e.g. PRDP's loss, which falls by orders of magnitude
        axis.set(xlabel=x_key, title=panel_title)
        if axis.lines:
            axis.legend(fontsize=8)
    return _save_figure(figure, path, title)
