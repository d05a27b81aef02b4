"""Recipes: the end-to-end pipelines behind experiments/demo.py, beta_study.py, repro.py and
bench.py, as functions that tests and other recipes call in-process."""

from __future__ import annotations

import importlib
import os
import sys

# The checkout: recipes build their stages from its configs/ and launch its experiments/ scripts.
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def config_file(name: str) -> str:
  """Path of configs/<name>.py, as a sweep's `--config=` takes it."""
  return os.path.join(REPO, "configs", f"{name}.py")


def config_module(name: str):
  """configs/<name>.py, loaded by name as the scripts' --config loads it."""
  if REPO not in sys.path:  # config files import `configs.common`
    sys.path.insert(0, REPO)
  return importlib.import_module(f"configs.{name}")


def get_config(name: str, arg: str = ""):
  """configs/<name>.py's get_config(arg): what `--config=configs/<name>.py:<arg>` gives."""
  return config_module(name).get_config(arg)
