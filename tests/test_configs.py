"""Every shipped config is one `lcm_jax.config.check_config` accepts, as written and shrunk with
`:runlocal`, and the paper's configs split their batch over a v4-8 (4 chips) and a v5e-8
(8 chips), microbatches included (the memory plan in the README compiles them there)."""

from __future__ import annotations

import glob
import importlib
import os

import pytest

from lcm_jax import config as config_lib
from tests.helpers import REPO

NAMES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
               if not p.endswith("__init__.py"))


def _filled(config):
  """What a user passes on the command line for a config that leaves it empty."""
  with config.unlocked():
    config.teacher = config.teacher or "teacher-folder"
    if config.student == "full":  # a LoRA student starts from the teacher, never from init_from
      config.init_from = config.init_from or "lcm-folder"
    config.data.path = config.data.path or "data-folder"
  return config


@pytest.mark.parametrize("name", NAMES)
def test_config_passes_the_checks(name):
  config_lib.check_config(_filled(importlib.import_module(f"configs.{name}").get_config()))


@pytest.mark.parametrize("name", ["lcf", "sd15_lcm", "sd15_lcm_lora", "sd21_768", "sd21_base_512"])
def test_runlocal_shrinks_to_a_valid_cpu_run(name):
  local = _filled(importlib.import_module(f"configs.{name}").get_config("runlocal"))
  config_lib.check_config(local)
  assert (local.resolution, local.batch_size, local.grad_accum_steps) == (64, 2, 1)
  assert (local.mesh.data, local.mesh.fsdp) == (-1, 1)


@pytest.mark.parametrize("name", ["sd21_768", "sd21_base_512"])
@pytest.mark.parametrize("chips", [4, 8])
def test_paper_configs_divide_over_v4_8_and_v5e_8(name, chips):
  """The paper's batch (16 at 768, 72 at 512), FSDP over every chip, and microbatches that put
  the same number of images on each chip."""
  config = importlib.import_module(f"configs.{name}").get_config()
  assert config.batch_size == {"sd21_768": 16, "sd21_base_512": 72}[name]
  assert (config.mesh.data, config.mesh.fsdp) == (1, -1)
  microbatch, rest = divmod(config.batch_size, config.grad_accum_steps)
  assert rest == 0 and microbatch % chips == 0, (name, chips, microbatch)
