"""The GAN-RM reward model: the frozen CLIP backbone, the model and its checkpoints, the embedding cache, head
training with rank-based bootstrapping, the model card and the Hub-cache lookup."""
