"""Process reward models: TRL's PRM rows (labels on the separator tokens only), a step classifier
that learns planted arithmetic errors, its AutoModelForTokenClassification export (equal logits
in transformers), its use as a GRPO reward and a best-of-N reranker, and bad rows refused in one
line. One in-process training run (module fixture) feeds the learning, export and use tests."""

import json
import os
import subprocess

import numpy as np
import pytest

from tests.conftest import xla_defaults
from tests.test_cli import ENV, ROOT, _error_lines, _script

ROW = {"prompt": "Which number is larger, 9.8 or 9.11?",
       "completions": ["11 is greater than 8.", "Hence, 9.11 > 9.8.", "So the answer is 9.11"],
       "labels": [True, False, False]}


def _trl_tokenize_row():
  """TRL's own PRMTrainer.tokenize_row where the installed TRL still has it (v0.19 .. 0.28)."""
  import warnings
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # trl.experimental warns on import
    for module in ("trl.experimental.prm", "trl.trainer.prm_trainer"):
      try:
        return __import__(module, fromlist=["PRMTrainer"]).PRMTrainer.tokenize_row
      except (ImportError, AttributeError):
        pass
  return None


@pytest.mark.parametrize("separator", ["\n", " ; "])
def test_labels_sit_on_separator_tokens_only(tiny_tokenizer_dir, separator):
  from transformers import AutoTokenizer
  from ftjax.data import prm as prm_data
  tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
  ex = prm_data.tokenize_prm(ROW, tok, separator)
  ids, labels = ex["input_ids"].tolist(), ex["labels"].tolist()
  at = [i for i, v in enumerate(labels) if v != prm_data.IGNORE]
  assert [labels[i] for i in at] == [int(v) for v in ROW["labels"]]
  sep = tok.encode(separator, add_special_tokens=False)
  # Each labelled position closes a separator, and the text up to it is the prompt and the
  # first k steps, each followed by the separator (decoded by transformers, not re-encoded).
  for k, i in enumerate(at):
    assert ids[i - len(sep) + 1:i + 1] == sep
    text = tok.decode(ids[:i + 1], skip_special_tokens=True)
    assert text == ROW["prompt"] + "".join(s + separator for s in ROW["completions"][:k + 1])
  assert ids[0] == tok.bos_token_id and at[-1] == len(ids) - 1
  trl_tokenize = _trl_tokenize_row()
  if trl_tokenize is not None:  # the reference itself, where this TRL has it
    ref = trl_tokenize(ROW, tok, separator, None, None, None, False, False)
    assert ids == ref["input_ids"] and labels == ref["labels"]


@pytest.mark.parametrize("row,names", [
    ({**ROW, "labels": [True, False]}, ["labels", "2 labels for 3 completions"]),
    ({**ROW, "labels": [1, 0, 0]}, ["labels", "true/false"]),
    ({**ROW, "completions": "one step"}, ["completions", "list of strings"]),
    ({"prompt": "x", "completions": ["a"]}, ["labels", "missing"]),
])
def test_malformed_rows_name_file_row_and_field(tiny_tokenizer_dir, tmp_path, row, names):
  from transformers import AutoTokenizer
  from ftjax.data import prm as prm_data
  from ftjax.data.sources import DataError
  path = tmp_path / "steps.jsonl"
  path.write_text(json.dumps(ROW) + "\n" + json.dumps(row) + "\n")
  tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
  with pytest.raises(DataError) as e:
    prm_data.build_prm_dataset({"sources": [{"path": str(path)}]}, tok, 64, 2)
  msg = str(e.value)
  assert "\n" not in msg and f"{path}: row 2" in msg and all(n in msg for n in names), msg


def test_bad_row_is_one_line_from_the_cli(tiny_tokenizer_dir, tmp_path):
  bad = tmp_path / "steps.jsonl"
  bad.write_text(json.dumps(ROW) + "\n" + json.dumps({**ROW, "labels": [True]}) + "\n")
  w = str(tmp_path / "w")
  res = subprocess.run(_script("prm.py", f"--config={ROOT}/configs/prm.py:smoke",
                               f"--workdir={w}", f"--config.model.tokenizer={tiny_tokenizer_dir}",
                               f"--config.data.path={bad}"),
                       capture_output=True, text=True, timeout=600, env=ENV)
  lines = _error_lines(res.stderr)
  assert res.returncode != 0 and len(lines) == 1, res.stderr[-2000:]
  assert f"{bad}: row 2" in lines[0] and "1 labels for 3 completions" in lines[0], lines
  assert not os.path.exists(w)


# ---------------------------------------------------------------------------- a trained PRM


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny llama (the `tiny` preset, from scratch) trained 100 steps on column-addition
  solutions, a dropped carry planted in 80% of the problems that carry (seeded)."""
  from configs import prm as prm_config
  from ftjax.train import prm
  w = str(tmp_path_factory.mktemp("prm") / "w")
  c = prm_config.get_config("task=arithmetic")
  c.prm.update(train_rows=1000, eval_rows=200, max_operand=99, error_kinds="carry",
               error_fraction=0.8)
  c.train.update(steps=100, batch_size=32, log_every=20, eval_every=100, save_every=100,
                 async_save=False)
  c.optim.update(lr=3e-3, warmup_steps=5)
  with xla_defaults():  # 100 steps of B=32: -O3 pays for its compile (35 CPU-s at -O0, ~23)
    return w, prm.run(c, w)


def test_prm_learns_planted_errors(trained):
  w, out = trained
  with open(os.path.join(w, "prm_data", "eval.jsonl")) as f:
    labels = [v for line in f for v in json.loads(line)["labels"]]
  bad = 1.0 - float(np.mean(labels))
  assert 0.2 < bad < 0.8  # both classes held out
  # Baselines that read nothing: flag every step bad (its F1), or always say the majority class.
  f1_all_bad, majority = 2 * bad / (1 + bad), max(bad, 1 - bad)
  assert out["eval_bad_f1"] > f1_all_bad + 0.15, (out, f1_all_bad)
  assert out["eval_accuracy"] > majority + 0.15, (out, majority)
  assert out["eval_accuracy_n"] == len(labels)


def _eval_batch(w, n=8):
  from ftjax.data import prm as prm_data
  from ftjax.tokenizer import load_tokenizer
  tok = load_tokenizer(os.path.join(w, "tokenizer"))
  with open(os.path.join(w, "prm_data", "eval.jsonl")) as f:
    rows = [json.loads(line) for line in f][:n]
  return rows, [prm_data.tokenize_prm(r, tok) for r in rows]


def test_export_reloads_in_transformers_with_equal_logits(trained, tmp_path):
  import torch
  import transformers
  from ftjax import export, workdir as wd
  from ftjax.train import prm
  w, _ = trained
  out = export.export(w, str(tmp_path / "hf"))
  hf_model = transformers.AutoModelForTokenClassification.from_pretrained(out).eval()
  assert type(hf_model).__name__ == "LlamaForTokenClassification"
  assert hf_model.config.num_labels == 2
  model, params, _, _ = wd.load_trained(w)
  rows, examples = _eval_batch(w)
  for ex in examples[:3]:
    ids = ex["input_ids"][None]
    ours = np.asarray(model.apply({"params": params}, ids))
    with torch.no_grad():
      ref = hf_model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=1e-5)
  with open(os.path.join(out, "README.md")) as f:
    card = f.read()
  assert "pipeline_tag: token-classification" in card and "process reward model" in card
  # The step scores the reranker and the GRPO reward read: transformers' own softmax at the
  # separator tokens, from the export and from the workdir alike.
  want = []
  for ex in examples:
    with torch.no_grad():
      p = torch.softmax(hf_model(torch.tensor(ex["input_ids"][None], dtype=torch.long)).logits,
                        -1)[0, :, 1].numpy()
    want.append(p[ex["labels"] != -100])
  for source in (w, out):
    got = prm.StepScorer(source, batch_size=4)([r["prompt"] for r in rows],
                                               [r["completions"] for r in rows])
    for g, ref in zip(got, want):
      np.testing.assert_allclose(g, ref, atol=1e-5)


def test_prm_as_grpo_reward_and_reranker(trained):
  from ftjax import rewards
  from ftjax.tasks import arithmetic
  from ftjax.train import prm
  w, _ = trained
  rows, _ = _eval_batch(w)
  scorer = prm.StepScorer(w)
  steps = scorer([r["prompt"] for r in rows], [r["completions"] for r in rows])
  for how, pick in (("min", min), ("last", lambda s: s[-1])):
    fn = rewards.from_spec(f"process_reward:{w}:{how}")
    got = fn(prompts=[r["prompt"] for r in rows] + ["1+1="],
             completions=["\n".join(r["completions"]) + "\n" for r in rows] + ["\n"])
    assert got[-1] is None  # no step, no score
    np.testing.assert_allclose(got[:-1], [pick(s) for s in steps], atol=1e-6)
  # Best of N: among a correct solution and its copies with a dropped carry, the PRM picks
  # the correct one for most problems (it learned the carries above).
  wins = 0
  for a, b in ((37, 48), (56, 77), (19, 83), (68, 45), (29, 92)):
    cands = [arithmetic.solve(a, b, c, "carry")[0] for c in arithmetic.carry_columns(a, b)]
    cands.insert(len(cands) // 2, arithmetic.solve(a, b)[0])
    best, scores = prm.rerank(scorer, arithmetic.prompt(a, b), cands, "min")
    assert len(scores) == len(cands)
    wins += arithmetic.step_answer(cands[best]) == a + b
  assert wins >= 4


def test_prm_vs_orm_recipe_smoke(tmp_path):
  """The reproduction's pipeline end to end at smoke size (both reward models, sampling,
  selection, table, verdict); its numbers mean nothing at 2 steps."""
  from collections import Counter
  from ftjax.recipes import prm_vs_orm
  from ftjax.tasks import arithmetic
  out = str(tmp_path / "out")
  r = prm_vs_orm.run(str(tmp_path / "w"), out, seeds=1, smoke=True)
  (seed,) = r["results"]
  assert sorted(seed["curve"]) == [1, 2, 4]
  assert set(seed["prm_eval"]) == set(seed["orm_eval"]) == {"eval_accuracy", "eval_bad_f1"}
  # With one sample per draw every method picks the same solution.
  assert len({seed["curve"][1][m] for m in prm_vs_orm.METHODS}) == 1
  with open(r["readme"]) as f:
    readme = f.read()
  assert "**Claim.**" in readme and "## Verdict" in readme and "| 4 |" in readme
  assert os.path.exists(os.path.join(out, "results.json"))
  # Majority vote against collections.Counter on sampled answers (first seen wins a tie).
  rng = np.random.default_rng(0)
  for a, b in ((37, 48), (999, 1), (505, 505)):
    answers = [arithmetic.step_answer(s) for s, _ in
               arithmetic.sample_solutions(a, b, 9, rng, 0.5)]
    counts = Counter(answers)
    top = max(counts.values())
    assert answers[prm_vs_orm.majority(answers)] == next(x for x in answers if counts[x] == top)
