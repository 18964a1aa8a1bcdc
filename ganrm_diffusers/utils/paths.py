"""Where ganrm keeps files of its own: $GANRM_HOME, else $XDG_CACHE_HOME/ganrm, else ~/.cache/ganrm."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The root folder of ganrm's caches (embeddings, the embedded world, open_clip configs)."""
    if os.environ.get("GANRM_HOME"):
        return Path(os.environ["GANRM_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "ganrm"
