"""`python -m vlm_jax.plan ...`: the command line (vlm_jax.plan.cli), also how the child process runs."""

import sys

from vlm_jax.plan.cli import main

sys.exit(main())
