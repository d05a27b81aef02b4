"""Configs reject unknown keys (arg and --config.*) naming the known ones; run.json records
where a run came from; a resume with a drifted config is refused unless allow_drift."""

import glob
import importlib
import json
import os
import subprocess
import sys

import jax
import pytest
import transformers
from absl import flags
from ml_collections import config_flags

from ftjax import cli
from ftjax.errors import UserError
from ftjax.train import sft
from tests.test_sft import _args, _cmd, make_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
       "JAX_PLATFORMS": "cpu"}
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if os.path.basename(p) not in ("__init__.py", "common.py"))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_rejects_unknown_arg_keys_listing_the_known_ones(name):
  mod = importlib.import_module(f"configs.{name}")
  with pytest.raises(UserError, match="unknown arg key 'bogus'") as e:
    mod.get_config("smoke,bogus=1")
  assert str(e.value).count("\n") == 0
  for k in mod.ARG_KEYS:
    assert k in str(e.value).split("known keys:")[1], (name, k)
  c = mod.get_config("smoke")
  assert c.allow_drift is False
  if name != "ppo":  # PPO reads prompt-only rows, which are not tokenized through the cache
    assert "cache_dir" in c.data


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("override,listed", [("train.stpes", "config.train has: "),
                                             ("trian.steps", "config has: ")])
def test_every_config_names_the_fields_on_an_override_typo(name, override, listed, monkeypatch,
                                                           capsys):
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True)
  monkeypatch.setattr(cli, "FLAGS", fv)
  argv = ["prog", f"--config={ROOT}/configs/{name}.py:smoke", f"--config.{override}=3"]
  monkeypatch.setattr(sys, "argv", argv)  # config_flags reads its overrides from sys.argv
  with pytest.raises(SystemExit) as e:
    cli.parse_flags(argv)
  assert e.value.code == 1
  (line,) = capsys.readouterr().err.splitlines()
  assert line.startswith(f"error: --config.{override}: no such config field"), line
  fields = line.split(listed)[1].split(", ")
  section = importlib.import_module(f"configs.{name}").get_config("smoke")
  if override.startswith("train."):
    section = section.train
  assert fields == list(section.keys()), line


def _run_json(w):
  with open(os.path.join(w, "run.json")) as f:
    return json.load(f)["runs"]


def test_run_json_and_drift_refused_then_allowed(base_dir, chat_files, tmp_path):
  train, ev = chat_files
  w = str(tmp_path / "run")
  # The same config as _args(base_dir, train, ev, 2, 1) gives on the command line.
  config = make_config(base_dir, train, ev, steps=2, save_every=1, eval_every=1000, log_every=1)
  sft.run(config, w)

  (first,) = _run_json(w)
  head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True,
                        text=True).stdout.strip()
  assert first["git"]["commit"] == head and isinstance(first["git"]["dirty"], bool)
  assert first["versions"]["jax"] == jax.__version__
  assert first["versions"]["transformers"] == transformers.__version__
  assert first["versions"]["ftjax"] and first["versions"]["flax"] and first["versions"]["optax"]
  assert first["jax"]["device_count"] == jax.device_count()
  assert first["jax"]["process_count"] == 1 and first["jax"]["backend"] == "cpu"
  assert first["argv"] == sys.argv and first["resumed"] is False
  assert first["config"]["optim"]["lr"] == config.optim.lr and first["config_diff"] == {}
  assert os.listdir(os.path.join(w, "data_cache"))  # the resume below reads its data here

  # A changed learning rate is refused, one line, before anything is written.
  saved = {n: open(os.path.join(w, n), "rb").read() for n in ("config.json", "run.json")}
  listing = sorted(os.listdir(w))
  res = subprocess.run(_cmd(_args(base_dir, train, ev, 4, 1) + ["--config.optim.lr=0.01"], w),
                       capture_output=True, text=True, timeout=300, env=ENV)
  assert res.returncode == 1, res.stderr[-3000:]
  errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
  assert "optim.lr: 0.0002 -> 0.01" in errors[0] and "allow_drift" in errors[0], errors[0]
  assert "train.steps" not in errors[0]  # a longer run is allowed drift
  assert {n: open(os.path.join(w, n), "rb").read() for n in saved} == saved
  assert sorted(os.listdir(w)) == listing

  # With allow_drift it resumes, and run.json keeps both configs.
  res = subprocess.run(_cmd(_args(base_dir, train, ev, 3, 1) + ["--config.optim.lr=0.01",
                                                                "--config.allow_drift=True"], w),
                       capture_output=True, text=True, timeout=300, env=ENV)
  assert res.returncode == 0, res.stderr[-3000:]
  runs = _run_json(w)
  assert len(runs) == 2 and runs[1]["resumed"] is True
  assert runs[0]["config"]["optim"]["lr"] == 0.0002 and runs[1]["config"]["optim"]["lr"] == 0.01
  assert runs[1]["config_diff"]["optim.lr"] == [0.0002, 0.01]
  assert runs[1]["config_diff"]["train.steps"] == [2, 3]
  assert "--config.allow_drift=True" in runs[1]["argv"]
  with open(os.path.join(w, "config.json")) as f:
    assert json.load(f)["optim"]["lr"] == 0.01
  assert max(int(n) for n in os.listdir(os.path.join(w, "checkpoints")) if n.isdigit()) == 3


def test_keys_added_since_a_run_was_saved_resume_at_their_old_meaning(tmp_path):
  """A DPO workdir saved before `dpo.loss_weights`, `adapter.placement` etc. existed resumes
  when they hold the value their absence meant; the same key at another value is still drift."""
  from configs import dpo as dpo_config
  from ftjax import provenance
  config = dpo_config.get_config()
  saved = provenance.config_dict(config)
  for key in provenance.ADDED_KEYS:
    section, name = key.split(".")
    if section in saved:
      saved[section].pop(name, None)
  (tmp_path / "config.json").write_text(json.dumps(saved))
  (tmp_path / "checkpoints" / "4").mkdir(parents=True)
  assert provenance.check_resume(config, str(tmp_path)) == {}
  config.dpo.f_divergence_type = "js_divergence"
  with pytest.raises(UserError, match="dpo.f_divergence_type"):
    provenance.check_resume(config, str(tmp_path))
