"""Errors that name a user's mistake. The CLI prints them as one line; ComfyUI shows them as node errors."""

from __future__ import annotations


class GanrmError(Exception):
    """Base class: a problem with the user's input, files or settings (not a bug in ganrm)."""


class ImageInputError(GanrmError, ValueError):
    """An image, image folder or image tensor that cannot be used (empty, corrupt, NaN, wrong shape)."""


class CheckpointError(GanrmError, ValueError):
    """A checkpoint that is missing, corrupt, or made for another backbone or base model."""


class LoraCompatibilityError(CheckpointError):
    """A LoRA file made for another base model than the one it is loaded into."""
