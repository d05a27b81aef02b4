"""experiments/eval.py from the command line: what the loss was computed on, rates with their
counts and Wilson intervals, and an --out that cannot be written refused before the eval."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats

from ftjax import data as data_lib, heldout
from ftjax.errors import UserError
from ftjax.tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
       "JAX_PLATFORMS": "cpu"}


def _eval(*args):
  return subprocess.Popen([sys.executable, os.path.join(ROOT, "experiments", "eval.py"), *args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def test_eval_reports_counts_and_intervals_and_refuses_a_bad_out(base_dir, chat_files, tmp_path):
  _, ev = chat_files
  # Where each example's first completion token is, from the untruncated tokens: a --seq_len
  # below it leaves the example no target (dropped), one below its length cuts it (truncated).
  full, _ = data_lib.prepare_source({"path": ev, "format": "chat"}, load_tokenizer(base_dir),
                                    10_000)
  first = [int(np.argmax(e["loss_mask"][1:])) + 1 for e in full]
  seq_len = int(np.median(first))
  dropped = sum(f > seq_len for f in first)
  truncated = sum(f <= seq_len and len(e["tokens"]) > seq_len + 1 for f, e in zip(first, full))
  assert 0 < dropped < len(full) and truncated > 0, (first, seq_len)

  out = str(tmp_path / "eval.json")
  common = [f"--model={base_dir}", f"--data={ev}", f"--seq_len={seq_len}", "--batch_size=8",
            "--task=support", "--max_new_tokens=4", "--show=0"]
  good = _eval(*common, f"--out={out}")
  missing = str(tmp_path / "no" / "such" / "eval.json")
  bad = _eval(*common, f"--out={missing}")
  _, err = bad.communicate(timeout=300)
  assert bad.returncode == 1, err[-2000:]
  lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
  assert lines == [f"error: --out={missing}: directory {os.path.dirname(missing)} does not "
                   "exist"], err[-2000:]
  assert "Traceback" not in err and "examples of" not in err  # refused before the eval ran
  # An --out that is a directory: the same check, in process.
  with pytest.raises(UserError, match="is a directory"):
    heldout.check_out(str(tmp_path))

  stdout, err = good.communicate(timeout=600)
  assert good.returncode == 0, err[-3000:]
  m = json.load(open(out))
  assert (m["examples"], m["loss_examples"], m["truncated"], m["dropped"]) == (
      len(full), len(full) - dropped, truncated, dropped)
  warnings = [ln for ln in err.splitlines() if "left out of eval_loss" in ln]
  assert len(warnings) == 1 and f"{dropped} of {len(full)} examples" in warnings[0], err[-2000:]
  assert (f"loss over {len(full) - dropped} of {len(full)} examples ({truncated} truncated, "
          f"{dropped} dropped at --seq_len={seq_len})") in stdout
  # Each task rate with its counts and its Wilson interval, in the JSON and on stdout.
  for name in ("exact_match", "invented", "escalation_ok", "voice"):
    k, n = m[f"{name}_k"], m[f"{name}_n"]
    assert n == len(full) and m[name] == pytest.approx(k / n)
    ci = scipy.stats.binomtest(k, n).proportion_ci(method="wilson")
    np.testing.assert_allclose(m[f"{name}_ci95"], [ci.low, ci.high], rtol=1e-9, atol=1e-15)
    assert (f"{name} {k}/{n} ({100 * k / n:.1f}%, 95% CI {100 * ci.low:.1f}-"
            f"{100 * ci.high:.1f}%)") in stdout
