"""`python -m ganrm_diffusers.cli`."""

import sys

from ganrm_diffusers.cli.main import main

sys.exit(main())
