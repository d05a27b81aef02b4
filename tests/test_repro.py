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
  for arm, kind in (("fp32,seed=0", "none"), ("nf4,seed=0", "nf4")):  # a run per arm and seed
    assert json.load(open(os.path.join(root, arm, "config.json")))["quant"]["kind"] == kind
    assert json.load(open(os.path.join(root, arm, "sweep_status.json")))["status"] == "done"
  evals = {a: json.load(open(os.path.join(root, a, "eval.json")))
           for a in ("base", "fp32,seed=0", "nf4,seed=0")}
  assert evals["base"]["trainable_params"] == 0
  assert evals["fp32,seed=0"]["trainable_params"] == evals["nf4,seed=0"]["trainable_params"] > 0

  # The measured general-text loss of the base is transformers' loss on the same tokens.
  ctx_general = 16  # rows measured with smoke=True
  want = torch_text_loss(base_dir, os.path.join(work, "general_heldout_any.jsonl"), ctx_general,
                         128)
  np.testing.assert_allclose(evals["base"]["general_loss"], want, rtol=1e-4)

  # The committed artefacts: the CSV holds the measurements, the README the table and plots.
  table = {row["run"]: row for row in csv.DictReader(open(os.path.join(out, "report.csv")))}
  assert sorted(table) == ["base", "fp32,seed=0", "nf4,seed=0"]
  for arm, m in evals.items():
    assert float(table[arm]["measured/task_loss"]) == m["task_loss"]
  readme = open(os.path.join(out, "README.md")).read()
  # The per-arm table: one seed gives the value alone (no interval), the rates their counts.
  row = next(ln for ln in readme.splitlines() if ln.startswith("| nf4 |")).split(" | ")
  nf4 = evals["nf4,seed=0"]
  assert row[1] == "1" and row[3] == format(nf4["task_loss"], ".4g")  # arm | seeds | params | loss
  assert f"{nf4['voice_k']}/{nf4['voice_n']} (" in row[-1]
  assert "inconclusive" in readme  # one seed: no interval, no verdict
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


def test_verdict_rules_against_scipy():
  """Each part's interval is scipy's t interval of the per-seed contrast (arms paired by seed),
  and the rules decide on it as documented."""
  import scipy.stats

  from ftjax.recipes import repro_verdict as rv
  rng = np.random.default_rng(0)
  arms = {a: {s: {"task_score": float(v)} for s, v in enumerate(rng.normal(mu, 0.01, 4))}
          for a, mu in (("a", 0.9), ("b", 0.8), ("c", 0.9))}
  arms["base"] = {-1: {"task_score": 0.1}}
  part = rv.Part("a beats b", "task_score", (("a", 1), ("b", -1)))
  diffs = [arms["a"][s]["task_score"] - arms["b"][s]["task_score"] for s in range(4)]
  word, (r,) = rv.verdict(arms, [part])
  lo, hi = scipy.stats.t.interval(0.95, 3, loc=np.mean(diffs), scale=scipy.stats.sem(diffs))
  np.testing.assert_allclose([r["lo"], r["hi"]], [lo, hi], rtol=1e-9)
  assert word == r["word"] == "holds" and r["values"] == diffs
  assert rv.verdict(arms, [rv.Part("b beats a", "task_score", (("b", 1), ("a", -1)))])[0] == \
      "does not hold"
  eq = rv.Part("a matches c", "task_score", (("a", 1), ("c", -1)), "equivalent", 0.1)
  assert rv.verdict(arms, [eq])[0] == "holds"
  assert rv.decide(eq, -0.05, 0.15) == "inconclusive" and rv.decide(eq, 0.12, 0.2) == \
      "does not hold"
  ni = rv.Part("a no worse than b", "task_score", (("a", 1), ("b", -1)), "noninferior", 0.02)
  assert [rv.decide(ni, lo, hi) for lo, hi in ((-0.01, 0.3), (-0.05, 0.0), (-0.09, -0.03))] == \
      ["holds", "inconclusive", "does not hold"]
  # One seed: no interval; a claim is only as decided as its least decided part.
  one = {a: {0: v[0]} for a, v in arms.items() if a != "base"}
  assert rv.verdict(one, [part])[0] == "inconclusive"
  assert rv.verdict(arms, [part, eq, rv.Part("b beats a", "task_score",
                                              (("b", 1), ("a", -1)))])[0] == "does not hold"
  # Pooled rates: Wilson over the summed counts (scipy's binomtest gives the same interval).
  seeds = {s: {"voice_k": k, "voice_n": 120} for s, k in enumerate((118, 120, 119))}
  k, n = rv.pooled(seeds, "voice")
  ci = scipy.stats.binomtest(k, n).proportion_ci(method="wilson")
  assert (k, n) == (357, 360)
  assert rv.fmt_rate(k, n) == f"357/360 (99.2%, {100 * ci.low:.1f}-{100 * ci.high:.1f}%)"


def test_seeded_arms_and_replay_config(tmp_path):
  """Each arm runs once per seed with every seed key set (what report.py groups on), and the
  replay arm's config mixes the given text file back in; a bad arg is one UserError."""
  import pytest

  from ftjax import recipes, report
  from ftjax.errors import UserError
  arg = recipes.config_file("repro") + ":stage=sft,smoke"
  runs = repro.plan_arms(str(tmp_path), [("a", arg, {"optim.lr": "1e-3"}),
                                         ("b", arg, {"optim.lr": "1e-4"})], [], seeds=2)
  assert [r.name for r in runs] == ["a,seed=0", "a,seed=1", "b,seed=0", "b,seed=1"]
  for r in runs:
    seed = int(r.name[-1])
    assert all(r.overrides[k] == seed for k in report.SEED_KEYS)
    assert r.workdir == str(tmp_path / r.name)
  c = recipes.get_config("repro", "stage=sft,replay=3,replay_from=/data/base_docs.jsonl")
  assert [s["path"] for s in c.data.sources][1] == "/data/base_docs.jsonl"
  assert c.data.sources[1]["weight"] == 3.0 and c.data.sources[1]["add_bos"]
  with pytest.raises(UserError, match="replay_from= needs replay"):
    recipes.get_config("repro", "stage=sft,replay_from=/x.jsonl")


def test_forgetting_smoke(base_dir, tmp_path):
  """The forgetting study's replay arm at smoke size: its data mixes the tickets with the demo
  base's own pretraining documents, and the README's rise is the arm's perplexity minus the
  base's."""
  from ftjax.tasks import support
  work, out = str(tmp_path / "work"), str(tmp_path / "out")
  r = repro.run("forgetting", work, out, base=base_dir, smoke=True)
  run_dir = os.path.join(r["root"], "full_replay,seed=0")
  sources = json.load(open(os.path.join(run_dir, "config.json")))["data"]["sources"]
  replay = os.path.join(work, "replay_general.jsonl")
  assert [s["path"] for s in sources] == [os.path.join(support.DATA_DIR, "train.jsonl"), replay]
  with open(replay) as f:
    first = [json.loads(next(f)) for _ in range(3)]
  assert first == support.make_base_corpus(3, 0)  # the first documents of the base's corpus
  ev = {a: json.load(open(os.path.join(r["root"], a, "eval.json")))
        for a in ("base", "full_replay,seed=0")}
  row = next(ln for ln in open(os.path.join(out, "README.md")).read().splitlines()
             if ln.startswith("| full_replay |")).split(" | ")
  rise = ev["full_replay,seed=0"]["general_ppl"] - ev["base"]["general_ppl"]
  assert row[4] == format(rise, ".4g")  # arm | seeds | params | general_ppl | rise
  assert os.path.getsize(os.path.join(out, "forgetting.png")) > 1000


def test_lora_rank_smoke_bottleneck_row(base_dir, tmp_path):
  """The lora_rank study's bottleneck row (issue 21) at smoke size: a bottleneck run, its
  trainable parameters in the README's table as the partition counts them."""
  from ftjax import partition, workdir as wd
  from ftjax.train import setup
  work, out = str(tmp_path / "work"), str(tmp_path / "out")
  r = repro.run("lora_rank", work, out, base=base_dir, smoke=True)
  run_dir = os.path.join(r["root"], "bottleneck,seed=0")
  config = json.load(open(os.path.join(run_dir, "config.json")))
  assert config["adapter"]["kind"] == "bottleneck" and config["adapter"]["placement"] == "houlsby"
  _, params, _, cfg = wd.load_trained(run_dir)
  labels = partition.label_params(params, setup.rules(cfg))
  n = partition.summary(params, labels)["trainable"]
  assert 0 < n == json.load(open(os.path.join(run_dir, "eval.json")))["trainable_params"]
  row = next(ln for ln in open(os.path.join(out, "README.md")).read().splitlines()
             if ln.startswith("| bottleneck |")).split(" | ")
  assert row[2] == f"{n:,}"
