"""Model cards (README.md) of exports: huggingface_hub parses them and its ModelCardData takes
their metadata; the metrics are the run's last eval in metrics.jsonl, the intervals scipy's
Wilson intervals of the logged counts, the datasets the files' sha256."""

import hashlib
import json
import os
import re
import shutil

import pytest
import scipy.stats
from huggingface_hub import ModelCard, ModelCardData

from configs import reward as reward_config
from configs import sft as sft_config
from ftjax import export, model_card
from ftjax.tasks import support
from ftjax.train import reward


@pytest.fixture(scope="module")
def sft_run(sft_lora_run):
  return sft_lora_run[0]  # conftest's session run (test_sft checks its exports' logits)


def _last_eval(workdir):
  """The last metrics.jsonl line with an eval_ key, read with json (not ftjax's reader)."""
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl")) if l.strip()]
  return [r for r in lines if any(k.startswith("eval_") for k in r)][-1]


def _card(out):
  path = os.path.join(out, "README.md")
  card = ModelCard.load(path)
  # The hub's own metadata class takes what the card holds (offline: no push, no network).
  ModelCardData(**card.data.to_dict())
  return card


def _sha(path):
  return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_merged_and_peft_cards(sft_run, chat_files, tmp_path):
  train, ev = chat_files
  want = _last_eval(sft_run)
  for fmt, library in (("merged", "ftjax"), ("peft", "peft")):
    out = export.export(sft_run, str(tmp_path / fmt), fmt)
    card = _card(out)
    d = card.data
    assert d.library_name == library and d.pipeline_tag == "text-generation"
    assert {"sft", "lora"} <= set(d.tags)
    assert d.datasets == [f"sha256:{_sha(train)}", f"sha256:{_sha(ev)}"]
    assert d.base_model is None and "local directory" in card.text  # no hub id for a path
    # Every eval metric of the last eval, exactly, and nothing else.
    got = {r.metric_type: r.metric_value for r in d.eval_results}
    assert got == {k: v for k, v in want.items() if k.startswith("eval_")}
    assert f"step {want['step']}" in card.text
    # Config diff against configs/sft.py's defaults (the run was started in-process).
    defaults = sft_config.get_config()
    assert f"| `train.steps` | `{defaults.train.steps}` | `4` |" in card.text
    assert "`model.hf_path`" in card.text and "`train.seed`" not in card.text
    # Data rows and tokens, provenance.
    assert re.search(rf"\| train \| file: `{re.escape(train)}` \| `{_sha(train)}` \| "
                     rf"{sum(1 for l in open(train) if l.strip())} \|", card.text)
    run = json.load(open(os.path.join(sft_run, "run.json")))["runs"][-1]
    stats = run["data_stats"]["train"]
    assert f"| train | {stats['examples']} | {stats['tokens']} |" in card.text
    assert run["git"]["commit"] is None or run["git"]["commit"] in card.text
    assert f"jax {run['versions']['jax']}" in card.text
    assert "## Known limitations" in card.text and "## Intended use" in card.text
  # The guards hold: an earlier export (with its card) is replaced, a user's folder is not.
  export.export(sft_run, str(tmp_path / "peft"), "peft")
  assert json.load(open(tmp_path / "peft" / "ftjax_export.json"))["format"] == "peft"
  user = tmp_path / "user"
  user.mkdir()
  (user / "README.md").write_text("mine")
  with pytest.raises(Exception, match="overwrite"):
    export.export(sft_run, str(user), "merged")
  assert (user / "README.md").read_text() == "mine"


def test_wilson_intervals_and_task_figures(sft_run, tmp_path):
  """A run whose last eval logged a rate's counts: the card's interval is scipy's Wilson
  interval, and the support task's invented-order figure comes from them."""
  w = str(tmp_path / "w")
  shutil.copytree(sft_run, w)
  with open(os.path.join(w, "metrics.jsonl"), "a") as f:
    f.write(json.dumps({"step": 99, "time": 0.0, "eval_loss": 1.5, "eval_support/invented": 3 / 40,
                        "eval_support/invented_k": 3.0, "eval_support/invented_n": 40.0}) + "\n")
  config = json.load(open(os.path.join(w, "config.json")))
  config["task"] = "support"
  text = model_card.build(w, 99, "merged", config)
  ci = scipy.stats.binomtest(3, 40).proportion_ci(0.95, method="wilson")
  assert f"3/40; Wilson [{100 * ci.low:.1f}%, {100 * ci.high:.1f}%]" in text
  assert "| eval_support/invented_k" not in text  # counts are the interval, not rows
  assert f"invented 3/40 (7.5%, 95% CI {100 * ci.low:.1f}-{100 * ci.high:.1f}%)" in text
  card = ModelCard(text)
  assert {r.metric_type: r.metric_value for r in card.data.eval_results} == {
      "eval_loss": 1.5, "eval_support/invented": 3 / 40}
  # The eval at or before an earlier exported step.
  assert "step 2," in model_card.build(w, 3, "merged", config)
  assert support.card_limitations({})[0].startswith("Invented order numbers: not measured")


def test_hub_base_and_quant_tags(sft_run):
  config = json.load(open(os.path.join(sft_run, "config.json")))
  config["model"]["hf_path"] = "Qwen/Qwen2.5-0.5B"
  config["quant"]["kind"] = "nf4"
  config["data"]["sources"] = [{"hub": "trl-lib/ultrafeedback_binarized", "split": "train"}]
  card = ModelCard(model_card.build(sft_run, 4, "peft", config))
  assert card.data.base_model == "Qwen/Qwen2.5-0.5B"
  assert {"qlora", "nf4", "lora"} <= set(card.data.tags)
  assert "trl-lib/ultrafeedback_binarized" in card.data.datasets


def test_reward_model_card(base_dir, pref_files, tmp_path):
  train, ev = pref_files
  cfg = reward_config.get_config("smoke")
  cfg.model.hf_path = base_dir
  cfg.data.path, cfg.data.eval_path = train, ev
  cfg.train.update(steps=2, batch_size=4, eval_every=2, save_every=2)
  w = str(tmp_path / "rm")
  reward.run(cfg, w)
  want = _last_eval(w)
  card = _card(export.export(w, str(tmp_path / "rm_hf"), "merged"))
  assert card.data.pipeline_tag == "text-classification" and "reward" in card.data.tags
  got = {r.metric_type: r.metric_value for r in card.data.eval_results}
  assert got == {k: v for k, v in want.items() if k.startswith("eval_")
                 and not k.endswith(("_k", "_n"))}
  k, n = int(want["eval_accuracy_k"]), int(want["eval_accuracy_n"])
  assert n == sum(1 for l in open(ev) if l.strip())  # every held-out pair counted
  ci = scipy.stats.binomtest(k, n).proportion_ci(0.95, method="wilson")
  assert f"{k}/{n}; Wilson [{100 * ci.low:.1f}%, {100 * ci.high:.1f}%]" in card.text
