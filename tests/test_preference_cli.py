"""The preference trainers from the command line on the tiny model: TRL's other DPO loss types
(a weighted list with ld_alpha), ORPO, CPO/SimPO and KTO each train a few steps and log their
metrics; a bad loss type or data layout is one error line that names the key, file or row, and
writes nothing."""

import json
import os
import subprocess

import numpy as np
import pytest

from tests.test_cli import ENV, ROOT, _error_lines, _script
from tests.conftest import BASE_SEQ


def _pref(script, config, base_dir, train, ev, w, *extra, steps=2):
  return _script(script, f"--config={os.path.join(ROOT, 'configs', config)}",
                 f"--workdir={w}", f"--config.model.hf_path={base_dir}",
                 f"--config.data.path={train}", f"--config.data.eval_path={ev}",
                 f"--config.train.seq_len={BASE_SEQ}", "--config.train.batch_size=4",
                 f"--config.train.steps={steps}", "--config.train.log_every=1",
                 f"--config.train.eval_every={steps}", f"--config.train.save_every={steps}",
                 *extra)


def _run(cmd):
  return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)


def _metrics(w):
  with open(os.path.join(w, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  out = {}
  for r in rows:
    out.update(r)
  return out


def test_dpo_loss_type_list_trains_from_the_cli(base_dir, pref_files, tmp_path):
  w = str(tmp_path / "mpo")
  res = _run(_pref("dpo.py", "dpo.py:loss=sigmoid+bco_pair+sft,smoke", base_dir, *pref_files, w,
                   "--config.dpo.loss_weights=0.8,0.2,1.0", "--config.dpo.ld_alpha=0.5"))
  assert res.returncode == 0, res.stderr[-3000:]
  m = _metrics(w)
  for k in ("loss", "rewards/margins", "logps/chosen", "eval_loss", "eval_rewards/accuracies"):
    assert k in m and m[k] == m[k], (k, m)  # present and not nan
  with open(os.path.join(w, "config.json")) as f:
    d = json.load(f)["dpo"]
  assert (d["loss_type"], d["loss_weights"], d["ld_alpha"]) == ("sigmoid,bco_pair,sft",
                                                               "0.8,0.2,1.0", 0.5)


@pytest.mark.parametrize("extra,names", [
    (["--config.dpo.loss_type=sigmoid,kto"], ["config.dpo.loss_type", "'kto'"]),
    (["--config.dpo.loss_type=sigmoid,sft", "--config.dpo.loss_weights=1"],
     ["config.dpo.loss_weights"]),
])
def test_bad_dpo_loss_is_one_line(base_dir, pref_files, tmp_path, extra, names):
  w = str(tmp_path / "bad")
  res = _run(_pref("dpo.py", "dpo.py:smoke", base_dir, *pref_files, w, *extra))
  assert res.returncode != 0
  lines = _error_lines(res.stderr)
  assert len(lines) == 1 and all(n in lines[0] for n in names), res.stderr[-2000:]
  assert not os.path.exists(w)


def test_orpo_builds_no_reference_and_trains(base_dir, pref_files, tmp_path, monkeypatch):
  """Full fine-tuning ORPO: a DPO run would keep a frozen copy of every param; ORPO must never
  ask for a reference at all. Runs in-process, with the reference builder booby-trapped."""
  from configs import orpo as orpo_config
  from ftjax.train import orpo, reference

  def trap(*a, **kw):
    raise AssertionError("ORPO built a reference")
  monkeypatch.setattr(reference, "policy", trap)
  cfg = orpo_config.get_config("adapter=none,smoke")
  cfg.model.hf_path = base_dir
  cfg.data.path, cfg.data.eval_path = pref_files
  cfg.train.update(seq_len=BASE_SEQ, steps=2, batch_size=4, eval_every=2, save_every=2, log_every=1)
  out = orpo.run(cfg, str(tmp_path / "orpo"))
  for k in ("loss", "nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/margins",
            "eval_loss", "eval_log_odds_ratio"):
    assert k in out and out[k] == out[k], (k, out)
  # loss = nll - beta * log_odds_ratio per pair, averaged: the logged parts add up.
  assert abs(out["loss"] - (out["nll_loss"] - 0.1 * out["log_odds_ratio"])) < 1e-4


def test_simpo_trains_from_the_cli(base_dir, pref_files, tmp_path):
  w = str(tmp_path / "simpo")
  res = _run(_pref("cpo.py", "cpo.py:loss=simpo,smoke", base_dir, *pref_files, w,
                   "--config.cpo.beta=2.0"))
  assert res.returncode == 0, res.stderr[-3000:]
  m = _metrics(w)
  for k in ("loss", "rewards/margins", "logps/chosen", "eval_loss", "nll_loss"):
    assert k in m and m[k] == m[k], (k, m)
  assert m["nll_loss"] == 0.0  # SimPO: cpo_alpha = 0, no NLL term


def test_bad_cpo_loss_is_one_line(base_dir, pref_files, tmp_path):
  w = str(tmp_path / "bad")
  res = _run(_pref("cpo.py", "cpo.py:loss=sipmo,smoke", base_dir, *pref_files, w))
  lines = _error_lines(res.stderr)
  assert res.returncode != 0 and len(lines) == 1, res.stderr[-2000:]
  assert "config.cpo.loss_type" in lines[0] and "'sipmo'" in lines[0]
  assert not os.path.exists(w)


# ---- KTO data and CLI ----------------------------------------------------------------------


def _write(path, rows):
  with open(path, "w") as f:
    f.write("\n".join(json.dumps(r) for r in rows) + "\n")
  return str(path)


def test_kto_unpairs_paired_rows_as_trl(base_dir):
  """Paired rows become TRL's `unpair_preference_dataset` rows, in its order, and each one
  tokenizes as the same row given unpaired."""
  datasets = pytest.importorskip("datasets")
  from trl.data_utils import unpair_preference_dataset

  import ftjax
  from ftjax.data import kto
  tok = ftjax.tokenizer.load_tokenizer(base_dir)
  paired = [{"prompt": f"order {i} is", "chosen": f" on its way {i}", "rejected": f" lost {i}"}
            for i in range(5)]
  want = unpair_preference_dataset(datasets.Dataset.from_list(paired)).to_list()
  got, _ = kto.tokenize_kto_records(paired, tok, "auto", 64)
  unpaired, _ = kto.tokenize_kto_records(want, tok, "auto", 64)
  assert [g["label"] for g in got] == [int(w["label"]) for w in want]
  for g, u in zip(got, unpaired):
    for key in ("prompt", "completion", "completion_mask"):
      np.testing.assert_array_equal(g[key], u[key])
  # KL rows: within each block of the batch size, row i pairs prompt i with completion i - 1.
  pairs = kto.kl_pairs(unpaired, 4, 64)
  for start in (0, 4):
    block = unpaired[start:start + 4]
    for i, ex in enumerate(block):
      p = pairs[start + i]
      np.testing.assert_array_equal(p["rejected"],
                                    np.concatenate([ex["prompt"], block[i - 1]["completion"]]))


@pytest.mark.parametrize("row,names", [
    ({"prompt": "hi", "completion": " there", "label": "yes"}, ["row 2", "'label'"]),
    ({"prompt": "hi", "completion": " there"}, ["row 2", "'label'"]),
    ({"prompt": "hi", "answer": " there", "label": True}, ["row 2", "'completion'"]),
    ({"prompt": "hi", "completion": 3, "label": True}, ["row 2", "'completion'"]),
])
def test_bad_kto_rows_are_one_line(base_dir, tmp_path, row, names):
  path = _write(tmp_path / "kto.jsonl", [{"prompt": "a", "completion": " b", "label": True},
                                         row, {"prompt": "c", "completion": " d", "label": False}])
  w = str(tmp_path / "w")
  res = _run(_script("kto.py", f"--config={os.path.join(ROOT, 'configs', 'kto.py')}:smoke",
                     f"--workdir={w}", f"--config.model.hf_path={base_dir}",
                     f"--config.data.path={path}"))
  lines = _error_lines(res.stderr)
  assert res.returncode != 0 and len(lines) == 1, res.stderr[-2000:]
  assert "kto.jsonl" in lines[0] and all(n in lines[0] for n in names), lines[0]
  assert not os.path.exists(w)


def test_kto_trains_from_the_cli_on_unpaired_rows(base_dir, pref_files, tmp_path):
  """The support pairs, unpaired with TRL's own function, as a KTO file."""
  datasets = pytest.importorskip("datasets")
  from trl.data_utils import unpair_preference_dataset
  rows = [json.loads(line) for line in open(pref_files[0])]
  rows = unpair_preference_dataset(datasets.Dataset.from_list(rows)).to_list()
  train = _write(tmp_path / "kto.jsonl", rows)
  w = str(tmp_path / "kto")
  res = _run(_pref("kto.py", "kto.py:smoke", base_dir, train, pref_files[1], w,
                   "--config.kto.undesirable_weight=1.2"))
  assert res.returncode == 0, res.stderr[-3000:]
  m = _metrics(w)
  for k in ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins",
            "logps/chosen", "eval_loss", "eval_rewards/margins", "eval_kl"):
    assert k in m and m[k] == m[k], (k, m)
  assert "count/chosen" not in m
