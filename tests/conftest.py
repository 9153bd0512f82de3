"""Shared fixtures: tiny diffusers pipeline folders built once per test session."""

from __future__ import annotations

import os

import pytest

# Tests never reach the network; the hub client must fail fast rather than retry.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
  """A function flavour -> path of a tiny diffusers pipeline folder (built on first use)."""
  from tests.helpers.tiny_models import save_tiny_pipeline
  root = tmp_path_factory.mktemp("pipelines")
  built: dict[str, str] = {}

  def get(flavour: str) -> str:
    if flavour not in built:
      built[flavour] = save_tiny_pipeline(str(root), flavour)
    return built[flavour]

  return get
