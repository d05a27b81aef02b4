"""GRPO's tasks: the arithmetic SFT warm start and its pass@1 / pass@G eval, GSM8K's layout."""

import json
import os

import pytest

from configs import grpo as grpo_config
from ftjax import metrics as metrics_lib, rewards, tasks
from ftjax.errors import UserError
from ftjax.tasks import arithmetic, gsm8k
from ftjax.train import grpo as grpo_train

GSM8K = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as "
                 "many clips in May. How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = "
               "<<48+24=72>>72 clips altogether in April and May.\n#### 72"},
    {"question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of "
                 "babysitting. How much did she earn?",
     "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she "
               "earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10"},
    {"question": "James writes a 3-page letter to 2 different friends twice a week. How many "
                 "pages does he write a year?",
     "answer": "He writes each friend 3*2=<<3*2=6>>6 pages a week\nSo he writes 6*2=<<6*2=12>>12 "
               "pages every week\nThat means he writes 12*52=<<12*52=624>>624 pages a year\n"
               "#### 624"},
    {"question": "Albert buys 2 large pizzas and 2 small pizzas. A large pizza has 16 slices and "
                 "a small pizza has 8 slices. How many pieces does he eat that day?",
     "answer": "He eats 2*16=<<2*16=32>>32 large slices\nHe eats 2*8=<<2*8=16>>16 small "
               "slices\nSo he eats 32+16=<<32+16=48>>48 pieces\n#### 48"},
]


def _write(path, rows):
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return str(path)


def test_held_out_pairs_never_in_train():
  train = {r["prompt"] for r in arithmetic.rows("train", 3000, seed=3)}
  ev = {r["prompt"] for r in arithmetic.rows("eval", 300, seed=5)}
  assert train and ev and not train & ev
  for r in arithmetic.rows("eval", 50):
    a, b = (int(x) for x in r["prompt"].rstrip("=").split("+"))
    assert int(r["answer"]) == a + b


def _digitwise(a: int, b: int) -> str:
  """Column sums mod 10 of the right-aligned digit strings: addition with the carries dropped."""
  w = max(len(str(a)), len(str(b)))
  cols = [(int(x) + int(y)) % 10 for x, y in zip(str(a).zfill(w), str(b).zfill(w))]
  return str(int("".join(map(str, cols))))


def _operands(row):
  return tuple(int(x) for x in row["prompt"].rstrip("=").split("+"))


def test_sloppy_teacher_drops_carries_in_the_asked_fraction():
  assert [arithmetic.sum_without_carries(a, b) for a, b in ((37, 48), (99, 99), (5, 5))] == [
      75, 88, 0]
  for a in range(0, 100, 7):
    for b in range(0, 100, 3):
      assert str(arithmetic.sum_without_carries(a, b)) == _digitwise(a, b)
  clean = arithmetic.rows("train", 4000, seed=1)
  sloppy = arithmetic.rows("train", 4000, seed=1, carry_drop=0.75)
  assert [r["prompt"] for r in clean] == [r["prompt"] for r in sloppy]  # the same problems
  carry = [(c, s) for c, s in zip(clean, sloppy) if _digitwise(*_operands(c)) != c["answer"]]
  assert all(c["answer"] == s["answer"] for c, s in zip(clean, sloppy)
             if _digitwise(*_operands(c)) == c["answer"])  # nothing to drop: unchanged
  dropped = sum(s["answer"] == _digitwise(*_operands(s)) for _, s in carry)
  assert all(s["answer"] in (c["answer"], _digitwise(*_operands(s))) for c, s in carry)
  assert abs(dropped / len(carry) - 0.75) < 0.03, dropped / len(carry)


def test_gsm8k_config_and_rows(tmp_path):
  c = grpo_config.get_config("task=gsm8k")
  assert c.data.sources[0] == {"hub": "openai/gsm8k", "config": "main", "split": "train"}
  assert c.data.eval_sources[0]["split"] == "test"
  rows = gsm8k.rows(_write(tmp_path / "g.jsonl", GSM8K))
  assert rows[0]["prompt"][0]["role"] == "user" and "Natalia" in rows[0]["prompt"][0]["content"]
  # The gold solution and a completion ending in `#### 72` earn the answer reward; 27 does not.
  fn = rewards.from_spec(c.grpo.rewards[0])
  got = fn([r["prompt"] for r in rows[:1]] * 3,
           [GSM8K[0]["answer"], "48 + 24 = 72\n#### 72", "#### 27"], answer=[rows[0]["answer"]] * 3)
  assert got == [1.0, 1.0, 0.0]
  bad = _write(tmp_path / "bad.jsonl", GSM8K[:1] + [{"question": "2+2?"}])
  with pytest.raises(UserError, match=r"bad.jsonl: row 2: field 'answer' is missing") as e:
    gsm8k.rows(bad)
  assert "\n" not in str(e.value)


def test_gsm8k_run_on_local_rows(tmp_path, base_dir):
  """The gsm8k task end to end on a tiny random model: chat-templated prompts, the answer
  reward per function, eval pass@1 / pass@G before and after."""
  c = grpo_config.get_config("task=gsm8k")
  c.model.update(hf_path=base_dir, dtype="float32")
  c.data.update(sources=[{"path": _write(tmp_path / "train.jsonl", GSM8K)}],
                eval_sources=[{"path": _write(tmp_path / "test.jsonl", GSM8K[:2])}])
  c.grpo.update(num_generations=2, max_prompt_len=48, max_completion_length=4)
  c.train.update(steps=2, batch_size=4, eval_every=2, save_every=2, log_every=1)
  c.mesh.shape = "data=1"
  out = grpo_train.run(c, str(tmp_path / "run"))
  assert out["step"] == 2
  logged = metrics_lib.read_metrics(str(tmp_path / "run"))
  first = [r for r in logged if "reward" in r][0]
  assert "rewards/answer_match/mean" in first and "rewards/format_match/mean" in first
  for k in ("eval_pass_at_1", "eval_pass_at_2", "eval_pass_at_1_before",
            "eval_pass_at_2_before"):
    assert 0.0 <= out[k] <= 1.0, k


def test_arithmetic_warm_start(tmp_path):
  """task=arithmetic starts GRPO from an SFT model trained first (exported into the workdir);
  rerunning resumes without training it again."""
  c = grpo_config.get_config("task=arithmetic,model=tiny")
  assert c.grpo.warm_start_steps > 0
  c.grpo.update(warm_start_steps=6, num_generations=4)
  c.train.update(steps=1, batch_size=8, eval_every=1, save_every=1)
  c.mesh.shape = "data=1"
  c.data.eval_rows = 4
  wd = str(tmp_path / "run")
  out = grpo_train.run(c, wd)
  assert os.path.exists(os.path.join(wd, "sft_hf", "config.json"))
  # The warm start's solutions come from the sloppy teacher; GRPO's train and eval answers are
  # right.
  problems = [json.loads(x) for x in open(os.path.join(wd, "sft", "problems.jsonl"))]
  assert len(problems) == c.grpo.warm_start_rows and c.grpo.warm_start_carry_drop == 0.75
  wrong = [r for r in problems if int(r["completion"]) != sum(_operands(r))]
  assert 0.4 < len(wrong) / len(problems) < 0.65  # 0.75 of the ~70% of pairs that carry
  assert all(r["completion"] == _digitwise(*_operands(r)) for r in wrong)
  train, ev = tasks.prompt_rows(c)
  assert all(int(r["answer"]) == sum(_operands(r)) for r in train + ev)
  sft_rows = [r for r in metrics_lib.read_metrics(os.path.join(wd, "sft")) if "loss" in r]
  assert sft_rows and sft_rows[-1]["step"] == 6
  assert {"eval_pass_at_1_before", "eval_pass_at_4_before", "eval_pass_at_1",
          "eval_pass_at_4"} <= set(out)
  mtime = os.path.getmtime(os.path.join(wd, "sft_hf", "config.json"))
  c2 = grpo_config.get_config("task=arithmetic,model=tiny")
  c2.grpo.update(warm_start_steps=6, num_generations=4)
  c2.train.update(steps=2, batch_size=8, eval_every=1, save_every=1)
  c2.mesh.shape = "data=1"
  c2.data.eval_rows = 4
  assert grpo_train.run(c2, wd)["step"] == 2
  assert os.path.getmtime(os.path.join(wd, "sft_hf", "config.json")) == mtime


def test_warm_start_config_is_configs_sft():
  """The warm start's SFT config, written out in ftjax/tasks/arithmetic.py, is configs/sft.py's
  (as the warm start built it from there) with the warm start's updates."""
  from configs import sft as sft_config
  c = grpo_config.get_config("task=arithmetic,model=tiny")
  c.model.update(tokenizer="/w/tokenizer", seed=3)
  c.train.seed, c.parallel, c.mesh.shape = 5, "pmap", "data=2"
  want = sft_config.get_config("model=tiny,adapter=none,format=prompt_completion")
  want.model.update(tokenizer="/w/tokenizer", seed=3)
  want.data.update(path="/w/sft/problems.jsonl", cache_dir="none")
  want.train.update(steps=int(c.grpo.warm_start_steps), batch_size=32, seq_len=64, seed=5,
                    log_every=50, eval_every=10 ** 9, save_every=10 ** 9)
  want.optim.update(lr=float(c.grpo.warm_start_lr), warmup_steps=20, schedule="cosine")
  want.parallel, want.mesh.shape = "pmap", "data=2"
  got = arithmetic.warm_start_config(c, "/w/sft/problems.jsonl")
  assert got.to_dict() == want.to_dict()
  assert json.dumps(got.to_dict(), sort_keys=True) == json.dumps(want.to_dict(), sort_keys=True)


def test_tasks_by_name():
  assert tasks.get("") is None and tasks.get("gsm8k") is gsm8k
  c = grpo_config.get_config("task=arithmetic")
  assert tasks.of(c) is arithmetic and tasks.of(grpo_config.get_config()) is None
  with pytest.raises(UserError, match="config.task='nope': expected one of support"):
    tasks.get("nope")
  with pytest.raises(UserError, match=r"config.data.path .* is required, or a config.task"):
    tasks.prompt_rows(grpo_config.get_config())


@pytest.mark.parametrize("scale", ["group", "none", "batch"])
def test_equal_reward_groups_have_zero_advantages(scale):
  """0.2 eight times (1.0 * wrong answer + 0.2 * format): float32's mean of the group is not
  exactly 0.2, which gave every completion the same -1.5e-4 advantage and hid the group from
  frac_reward_zero_std; TRL (torch's exact mean and std) gives 0 and counts it."""
  import jax.numpy as jnp
  import numpy as np
  import torch
  from ftjax import losses
  r = np.array([0.2] * 8 + [1.2, 0.2] * 4, np.float32)
  adv, zero = (np.asarray(x) for x in losses.grpo_advantages(jnp.asarray(r), 8, scale))
  assert (adv[:8] == 0).all() and (adv[8:] != 0).all()
  t = torch.tensor(r).view(-1, 8)
  trl_zero = torch.isclose(t.std(1), torch.zeros(2)).repeat_interleave(8).numpy()
  assert trl_zero[:8].all()
  if scale != "batch":
    np.testing.assert_array_equal(zero, trl_zero)
