"""Rewards: TRL's signature and None semantics, the built-ins against TRL's, one-line errors."""

import os

import numpy as np
import pytest
import torch

from ftjax import rewards
from ftjax.errors import UserError


def test_weighted_sum_skips_none_like_trl():
  a = lambda prompts, completions, **kw: [1.0, None, 0.5, None]
  b = lambda prompts, completions, **kw: [2.0, 3.0, None, None]
  total, per_fn, names = rewards.score([a, b], [0.5, 2.0], ["p"] * 4, ["c"] * 4, {})
  # TRL: None -> NaN, (rewards_per_func * weights).nansum(1), all-NaN rows stay NaN.
  rpf = torch.tensor([[1.0, 2.0], [np.nan, 3.0], [0.5, np.nan], [np.nan, np.nan]])
  want = (rpf * torch.tensor([0.5, 2.0])).nansum(dim=1)
  want[torch.isnan(rpf).all(dim=1)] = torch.nan
  np.testing.assert_allclose(total, want.numpy(), equal_nan=True)
  assert np.isnan(per_fn[1, 0]) and names == ["<lambda>", "<lambda>"]


def test_bad_rewards_are_one_line_errors():
  def short(prompts, completions, **kw):
    return [1.0]

  def boom(prompts, completions, **kw):
    raise KeyError("answer")
  for fn, msg in ((short, "'short' returned 1 rewards for 3"), (boom, "'boom' raised KeyError")):
    with pytest.raises(UserError, match=msg) as e:
      rewards.score([fn], None, ["p"] * 3, ["c"] * 3, {})
    assert "\n" not in str(e.value)


def test_answer_match_and_columns():
  f = rewards.answer_match("answer")
  comps = ["so #### 1,234", r"it is \boxed{7} not 8", "3 then 5", "no number", "42"]
  answers = ["The sum... #### 1234", "7", 5, "8", None]
  assert f(["p"] * 5, comps, answer=answers) == [1.0, 1.0, 1.0, 0.0, None]
  chat = [[{"role": "assistant", "content": "#### 9"}]]
  assert f([[{"role": "user", "content": "q"}]], chat, answer=["9"]) == [1.0]
  with pytest.raises(UserError, match="no 'answer' column"):
    f(["p"], ["1"], other=[1])


def test_builtins_equal_trl():
  from trl.rewards import get_soft_overlong_punishment, think_format_reward
  ids = [[1] * n for n in (3, 10, 13, 16, 17, 25)]
  ours = rewards.soft_overlong_punishment(16, 6)(completion_ids=ids)
  np.testing.assert_allclose(ours, get_soft_overlong_punishment(16, 6)(completion_ids=ids))
  texts = ["<think>\nr\n</think>\nA", "<think>\nr\nA", "x<think>r</think>",
           "<think>a<think>b</think>"]
  want = think_format_reward([[{"content": t}] for t in texts])
  assert rewards.format_match()(None, texts) == want
  assert rewards.from_spec(r"format_match:^\d").__call__(None, ["12", "a1"]) == [1.0, 0.0]
  with pytest.raises(UserError, match="unknown reward"):
    rewards.from_spec("nope")


def test_support_scorer_is_the_demo_reward():
  from ftjax import tasks
  from ftjax.tasks import support
  pair = support.make_preference_pairs(4, 0)[0]
  f = rewards.from_spec("support_scorer", tasks.named_rewards())
  assert isinstance(f, support.support_scorer) and f.__name__ == "support_scorer"
  got = f([pair["prompt"]] * 2, [pair["chosen"], pair["rejected"]], meta=[pair["meta"]] * 2)
  assert got == [support.true_reward(pair["chosen"][-1]["content"] if isinstance(
      pair["chosen"], list) else pair["chosen"], pair), support.true_reward(
      rewards.text_of(pair["rejected"]), pair)]
  assert got[0] > got[1]


def test_hf_reward_model_scores_like_transformers(tmp_path, tiny_tokenizer_dir):
  import shutil
  import transformers as T
  torch.manual_seed(0)
  cfg = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=320,
                      num_labels=1, pad_token_id=0)
  hf = T.LlamaForSequenceClassification(cfg).eval()
  d = str(tmp_path / "rm")
  hf.save_pretrained(d)
  for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    src = f"{tiny_tokenizer_dir}/{f}"
    if os.path.exists(src):  # the tiny tokenizer may not write every one of them
      shutil.copy(src, d)
  rm = rewards.reward_model(d, batch_size=4)
  prompts, comps = ["Where is my order?", "hello"], [" It shipped.", " world, this is"]
  got = rm(prompts, comps)
  tok = T.AutoTokenizer.from_pretrained(d)
  for p, c, r in zip(prompts, comps, got):
    ids = torch.tensor([tok(p + c, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
      want = float(hf(ids).logits[0, 0])
    assert r == pytest.approx(want, abs=1e-4)
