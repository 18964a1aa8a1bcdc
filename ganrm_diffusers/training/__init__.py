"""Fine-tuning with a reward: the shared config and run (accelerate, LoRA, checkpoints, examples), the losses, and
one module per method: sft, dpo, prdp and rounds (GAN-RM's loop). `training/train_*.py` at the repository root are
the `accelerate launch` entry points over these modules."""
