"""Diffusion-DPO on (best, worst) of N: the `accelerate launch` entry point of ganrm_diffusers.training.dpo (see its docstring).

accelerate launch training/train_dpo.py --help
"""

from ganrm_diffusers.training.dpo import main

if __name__ == "__main__":
    main()
