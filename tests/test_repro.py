"""A reproduction (ftjax/recipes/repro.py) end to end at smoke scale: the QLoRA one, two arms."""

import csv
import json
import os

import numpy as np

from ftjax.recipes import repro


def torch_text_loss(base_dir: str, path: str, n: int, seq_len: int) -> float:
  """Mean next-token loss of transformers' model on the first `n` rows of a text file,
  tokenized by ftjax's data pipeline (the same token ids the measurement saw)."""
  import torch
  import transformers

  from ftjax import data as data_lib
  from ftjax.tokenizer import load_tokenizer
  tok = load_tokenizer(base_dir)
  source = {"path": path, "format": "text", "limit": n, "add_bos": True}  # as repro.measure
  data = data_lib.build_dataset({"sources": [source], "packing": False}, tok, seq_len, 4)
  model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
  loss_sum = count = 0.0
  for batch in data_lib.eval_batches(data.train.examples, 4, seq_len, pad_id=data.pad_id):
    for r in range(len(batch["inputs"])):
      t = int(batch["segment_ids"][r].astype(bool).sum())
      if not t:
        continue
      with torch.no_grad():
        logits = model(torch.tensor(batch["inputs"][r:r + 1, :t], dtype=torch.long)).logits[0]
      lp = torch.log_softmax(logits.double(), -1)
      nll = -lp[torch.arange(t), torch.tensor(batch["targets"][r, :t], dtype=torch.long)]
      w = torch.tensor(batch["weights"][r, :t], dtype=torch.float64)
      loss_sum += float((nll * w).sum())
      count += float(w.sum())
  return loss_sum / count


def test_qlora_smoke(base_dir, tmp_path):
  work, out = str(tmp_path / "work"), str(tmp_path / "out")
  r = repro.run("qlora", work, out, base=base_dir, smoke=True)
  root = r["root"]
  for arm, kind in (("fp32", "none"), ("nf4", "nf4")):  # one sweep run per arm, as named
    assert json.load(open(os.path.join(root, arm, "config.json")))["quant"]["kind"] == kind
    assert json.load(open(os.path.join(root, arm, "sweep_status.json")))["status"] == "done"
  evals = {a: json.load(open(os.path.join(root, a, "eval.json"))) for a in ("base", "fp32", "nf4")}
  assert evals["base"]["trainable_params"] == 0
  assert evals["fp32"]["trainable_params"] == evals["nf4"]["trainable_params"] > 0

  # The measured general-text loss of the base is transformers' loss on the same tokens.
  ctx_general = 16  # rows measured with smoke=True
  want = torch_text_loss(base_dir, os.path.join(work, "general_eval.jsonl"), ctx_general, 128)
  np.testing.assert_allclose(evals["base"]["general_loss"], want, rtol=1e-4)

  # The committed artefacts: the CSV holds the measurements, the README the table and plots.
  table = {row["run"]: row for row in csv.DictReader(open(os.path.join(out, "report.csv")))}
  assert sorted(table) == ["base", "fp32", "nf4"]
  for arm, m in evals.items():
    assert float(table[arm]["measured/task_loss"]) == m["task_loss"]
  readme = open(os.path.join(out, "README.md")).read()
  gap = evals["nf4"]["task_loss"] - evals["fp32"]["task_loss"]
  row = next(ln for ln in readme.splitlines() if ln.startswith("| nf4 |"))
  assert row.split(" | ")[3] == repro._fmt(gap)  # run | trainable | task_loss | gap
  assert "python experiments/repro.py --name=qlora --smoke" in readme
  for png in ("qlora.png", "curves.png"):
    assert f"({png})" in readme and os.path.getsize(os.path.join(out, png)) > 1000

  # Rerunning the same command trains and measures nothing again.
  mtimes = {a: os.path.getmtime(os.path.join(root, a, "eval.json")) for a in evals}
  repro.run("qlora", work, out, base=base_dir, smoke=True)
  assert mtimes == {a: os.path.getmtime(os.path.join(root, a, "eval.json")) for a in evals}


def test_grpo_steps_smoke(base_dir, tmp_path):
  """experiments/repro.py --name=grpo_steps --smoke in-process from a given start (--base: the
  task's warm start is test_grpo_tasks'), one GRPO seed evaluated at every step, the README's
  verdict; the curve is the run's own logged eval."""
  from ftjax import metrics as metrics_lib
  work, out = str(tmp_path / "work"), str(tmp_path / "out")
  r = repro.run("grpo_steps", work, out, base=base_dir, smoke=True)
  (run,) = r["runs"]
  assert sorted(run["curve"]) == [0, 1]
  logged = metrics_lib.read_metrics(os.path.join(work, "grpo_steps", "seed0"))
  assert run["curve"][0]["pass_at_1"] == next(x["eval_pass_at_1_before"] for x in logged
                                              if "eval_pass_at_1_before" in x)
  assert run["curve"][1]["pass_at_G"] == [x for x in logged if "eval_pass_at_4" in x][-1][
      "eval_pass_at_4"]
  cfg = json.load(open(os.path.join(work, "grpo_steps", "seed0", "config.json")))
  assert cfg["model"]["hf_path"] == r["sft"] == base_dir
  readme = open(os.path.join(out, "README.md")).read()
  assert f"**Verdict at this scale: {r['verdict']['word']}.**" in readme
  assert "python experiments/repro.py --name=grpo_steps --smoke" in readme
  assert os.path.getsize(os.path.join(out, "grpo_steps.png")) > 1000
