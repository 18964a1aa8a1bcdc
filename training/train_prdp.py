"""online PRDP: the `accelerate launch` entry point of ganrm_diffusers.training.prdp (see its docstring).

accelerate launch training/train_prdp.py --help
"""

from ganrm_diffusers.training.prdp import main

if __name__ == "__main__":
    main()
