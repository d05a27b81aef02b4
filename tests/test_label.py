"""RLAIF labelling (ftjax/labeling.py, experiments/label.py): judges scored against their
references, TRL preference rows that TRL's DPOTrainer prepares and experiments/dpo.py trains on,
and bad judge output refused in one line naming the row, with nothing written."""

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from ftjax import labeling
from ftjax.errors import UserError
from ftjax.tasks import support

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUBRIC = "1. Quote the order's details.\n2. Never invent an order number.\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("label")
  rows = [json.loads(x) for x in open(os.path.join(support.DATA_DIR, "eval.jsonl"))][:3]
  data = d / "tickets.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in rows))
  rubric = d / "constitution.txt"
  rubric.write_text(RUBRIC)
  return str(data), str(rubric), rows


def test_rule_judge_rows_are_trl_rows_dpo_trains_on(base_dir, files, tmp_path):
  """A rule judge (a task reward; the random tiny policy's replies differ in whether they start
  with a space, so `format_match` tells them apart where the support scorer could not)."""
  from ftjax import rewards
  data, _, rows = files
  out = str(tmp_path / "pairs.jsonl")
  judge = r"format_match:^\S"
  prov = labeling.label(base_dir, data, out, judge, k=4, max_new_tokens=12, seed=1)
  pairs = [json.loads(x) for x in open(out)]
  assert prov["pairs"] == len(pairs) > 0 and prov["pairs"] + prov["ties"] == len(rows)
  assert json.load(open(out + ".provenance.json")) == prov
  assert prov["seed"] == 1 and prov["judge"] == judge
  rule = rewards.format_match(r"^\S")
  for p in pairs:
    assert any(r["messages"][:-1] == p["prompt"] for r in rows)
    # The scores are the rule's own on the replies.
    assert [p["chosen_score"], p["rejected_score"]] == rule([p["prompt"]] * 2,
                                                            [p["chosen"], p["rejected"]])
    assert p["chosen_score"] > p["rejected_score"]
  # TRL's DPOTrainer prepares the rows as they are.
  from datasets import Dataset
  from trl import DPOConfig, DPOTrainer
  from ftjax.tokenizer import load_tokenizer
  tok = load_tokenizer(base_dir)
  args = DPOConfig(output_dir=str(tmp_path / "trl"), dataset_num_proc=None, report_to=[],
                   use_cpu=True, bf16=False)
  trl_rows = [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs]
  prepared = DPOTrainer._prepare_dataset(types.SimpleNamespace(_tokenizer=tok),
                                         Dataset.from_list(trl_rows), tok, args, "ai")
  assert len(prepared) == len(pairs)
  # ... and experiments/dpo.py trains on them.
  from configs import dpo as dpo_config
  from ftjax.train import dpo
  c = dpo_config.get_config("smoke")
  c.model.update(hf_path=base_dir, dtype="float32")
  c.data.update(path=out)
  c.train.update(steps=1, batch_size=1, eval_every=100, save_every=1)
  res = dpo.run(c, str(tmp_path / "dpo"))
  assert res["step"] == 1 and np.isfinite(res["loss"])


def test_llm_judge_reads_its_logprobs_as_transformers(base_dir, files):
  """The expected 1..10 verdict from the judge's next-token log-probs, against transformers'
  log-probs of the same verdict tokens after the same prompt."""
  import torch
  import transformers
  _, rubric, rows = files
  judge, _ = labeling.make_judge(f"llm:{base_dir}", rubric, "10", min_score_mass=0.0)
  prompt = rows[0]["messages"][:-1]
  ids = judge.prompt_ids(prompt, "Hello! Your order shipped.")
  got = judge.scores([prompt], ["Hello! Your order shipped."], ["r"])
  model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
  lps = []
  for v in judge.verdict_ids:
    with torch.no_grad():
      logits = model(torch.tensor([ids + v])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    lps.append(sum(float(lp[len(ids) - 1 + j, t]) for j, t in enumerate(v)))
  p = np.exp(np.asarray(lps) - max(lps))
  want = float((p / p.sum()) @ np.arange(1, 11))
  np.testing.assert_allclose(got, [want], rtol=1e-4)
  # "10" is "1" "0" here: its path also yields "1".."9", so fewer forwards than verdicts ran.
  assert len(judge.paths) < len(judge.verdicts)
  yes, _ = labeling.make_judge(f"llm:{base_dir}", rubric, "yesno", min_score_mass=0.0)
  assert 0.0 < yes.scores([prompt], ["Hi."], ["r"])[0] < 1.0


def test_bad_judge_output_is_one_line_naming_the_row(base_dir, files, tmp_path):
  """A judge that puts (almost) no probability on its verdict tokens gave no verdict: one
  line naming the file, row and reply; nothing written. One subprocess for the CLI."""
  data, rubric, _ = files
  out = tmp_path / "pairs.jsonl"
  with pytest.raises(UserError, match="needs --rubric"):
    labeling.make_judge(f"llm:{base_dir}")
  with pytest.raises(UserError, match="--k=1"):
    labeling.label(base_dir, data, str(out), "support_scorer", k=1)
  res = subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", "label.py"), f"--policy={base_dir}",
       f"--data={data}", f"--out={out}", f"--judge=llm:{base_dir}", f"--rubric={rubric}",
       "--k=2", "--max_new_tokens=4", "--min_score_mass=0.99"],
      capture_output=True, text=True, timeout=300)
  lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
  assert res.returncode != 0 and len(lines) == 1, res.stderr
  assert "tickets.jsonl: row 1 reply 0: the judge gave no verdict" in lines[0], lines[0]
  assert "min_score_mass=0.99" in lines[0]
  assert not out.exists() and not os.path.exists(str(out) + ".provenance.json")


def test_prompt_rows_in_a_wrong_layout_are_one_line_naming_file_and_row(tmp_path):
  """Rows label.py cannot take a prompt from: the error names the file and the row."""
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"prompt": "Where is my order?"}) + "\n"
                 + json.dumps({"question": "no prompt and no messages"}) + "\n")
  with pytest.raises(UserError) as e:
    labeling.load_prompt_rows(str(bad))
  msg = str(e.value)
  assert "\n" not in msg and str(bad) in msg and "2" in msg and "prompt" in msg, msg
