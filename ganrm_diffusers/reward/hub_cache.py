"""Reward models already in the local Hugging Face cache (the ComfyUI pack lists them), found without network."""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import constants, scan_cache_dir
from huggingface_hub.errors import CacheNotFound


def cached_reward_model_ids(cache_dir: str | Path | None = None) -> list[str]:
    """Hub repos in the local Hugging Face cache whose newest snapshot holds a GANRewardModel (no network)."""
    try:
        cache = scan_cache_dir(cache_dir or constants.HF_HUB_CACHE)  # read now: HF_HOME may change at run time
    except (CacheNotFound, OSError):
        return []
    found = []
    for repo in cache.repos:
        if repo.repo_type != "model" or not repo.revisions:
            continue
        newest = max(repo.revisions, key=lambda revision: revision.last_modified)
        try:
            config = json.loads((Path(newest.snapshot_path) / "config.json").read_text())
        except (OSError, ValueError):
            continue
        if config.get("_class_name") == "GANRewardModel":
            found.append(repo.repo_id)
    return sorted(found)
