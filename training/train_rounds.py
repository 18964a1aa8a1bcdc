"""GAN-RM rounds: the `accelerate launch` entry point of ganrm_diffusers.training.rounds (see its docstring).

accelerate launch training/train_rounds.py --help
"""

from ganrm_diffusers.training.rounds import main

if __name__ == "__main__":
    main()
