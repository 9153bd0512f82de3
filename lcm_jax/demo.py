"""`make demo`: the quick-start job.

Not built yet (issue 6): it will distil the toy text-to-image teacher shipped in this
repository with `python -m lcm_jax.train --config=configs/toy.py`, then write a grid that
compares the teacher's 50-step DDIM samples with the LCM's 1-, 2- and 4-step samples.
"""

import sys

PLAN = """lcm-jax demo (not built yet)
It will:
  1. distil the toy text-to-image teacher shipped in toy/teacher with
     python -m lcm_jax.train --config=configs/toy.py --workdir=workdirs/toy
  2. sample the same prompts with the teacher (DDIM, 50 steps) and the LCM (1, 2, 4 steps)
  3. write workdirs/toy/demo_grid.png and print where it is.
Today the parts that work are loading and exporting diffusers pipelines (see README.md)."""


def main() -> int:
  print(PLAN)
  return 0


if __name__ == "__main__":
  sys.exit(main())
