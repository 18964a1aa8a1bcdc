"""Generation with a reward: the reward-guided pipelines, the sampler with log-probabilities that every trainer
shares, pruning and FK resampling, top-k selection, candidate sampling to folders, and LoRA files."""
