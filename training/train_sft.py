"""SFT on the best of N: the `accelerate launch` entry point of ganrm_diffusers.training.sft (see its docstring).

accelerate launch training/train_sft.py --help
"""

from ganrm_diffusers.training.sft import main

if __name__ == "__main__":
    main()
