"""The demo's second adapter (experiments/demo.py --second_adapter) at smoke size: another
brand's tickets, a second LoRA on the same base, both served in one batch."""

import os

import jax
import numpy as np

from ftjax import rollout, stats, workdir as wd
from ftjax.data import prompts as prompt_data
from ftjax.evaluation import split_chat
from ftjax.recipes import demo, second_adapter as second
from ftjax.tasks import support, support_brands as sb
from ftjax.train import sft


def test_rebrand_keeps_the_ticket_and_changes_the_voice():
  for t in support.make_tickets(30, 0):
    r = sb.rebrand(t, sb.NORTHWIND)
    gold, new = t["messages"][-1]["content"], r["messages"][-1]["content"]
    name = t["meta"]["name"]
    assert r["messages"][1] == t["messages"][1] and r["meta"]["required"] == t["meta"]["required"]
    assert sb.NORTHWIND.name in r["messages"][0]["content"]
    assert support.BRAND not in r["messages"][0]["content"]
    # The body (facts, escalation) is the same: the support scorer's checks other than voice.
    s_old, s_new = support.score_reply(gold, t), support.score_reply(new, r)
    for k in ("details", "invented", "escalation_ok"):
      np.testing.assert_equal(s_new[k], s_old[k])
    assert s_new["voice"] == 0.0 and sb.voice(new, name, sb.NORTHWIND) == 1.0
    # For the demo's own brand the check is support.score_reply's.
    assert sb.voice(gold, name, sb.LUMEN) == s_old["voice"] == 1.0
    assert sb.voice(gold, name, sb.NORTHWIND) == 0.0


def test_two_adapters_in_one_batch(base_dir, chat_files, tmp_path, monkeypatch):
  """The demo's wiring end to end: each row of the one mixed batch is what its own adapter,
  loaded alone, replies (greedy, the same batch and padding), and the report gives each
  adapter's rates with counts and Wilson intervals."""
  monkeypatch.setattr(support, "DATA_DIR", os.path.dirname(chat_files[0]))
  cfg = demo.stage_config("demo", "stage=sft,smoke", True, 0)
  cfg.model.hf_path = base_dir
  cfg.data.path, cfg.data.eval_path = chat_files
  cfg.adapter.update(rank=4, alpha=8.0)
  cfg.optim.update(warmup_steps=1)
  cfg.train.update(steps=3, eval_every=100)
  first = str(tmp_path / "sft")
  sft.run(cfg, first)
  r = second.run(cfg, str(tmp_path), first, eval_examples=6)
  assert r["dirs"] == {"lumen": first, "northwind": str(tmp_path / "sft_northwind")}
  for name in second.NAMES:
    a = r["adapters"][name]
    assert a["voice"][1] == a["other_signature"][1] == 3
  text = "\n".join(second.format_lines(r))
  a = r["adapters"]["northwind"]
  assert "northwind adapter (Northwind Supply)" in text
  assert stats.format_proportion("own brand voice", *a["voice"]) in text

  # Each half equals its adapter alone, on the very same batch (the run's tickets: the first
  # 6 held-out ones, 3 per adapter).
  rows = [t if i < 3 else sb.rebrand(t, sb.NORTHWIND)
          for i, t in enumerate(support.make_tickets(8, 1)[:6])]
  assert [x["adapter"] for x in r["replies"]] == ["lumen"] * 3 + ["northwind"] * 3
  alone = {}
  for name, d in r["dirs"].items():
    model, params, tok, _ = wd.load_trained(d)
    ids = [prompt_data.encode(tok, split_chat(x)[0]) for x in rows]
    ro = rollout.rollout(model, params, ids, n_samples=1, max_new_tokens=64,
                         rng=jax.random.PRNGKey(0), temperature=0.0,
                         eos_ids=rollout.eos_ids(tok, model), pad_id=rollout.pad_id(tok))
    alone[name] = [t.strip() for t in rollout.decode(tok, ro)]
    toks = np.asarray(ids[0])[None]
    alone[name + "_logits"] = np.asarray(model.apply({"params": params}, toks))
  assert [x["reply"] for x in r["replies"]] == alone["lumen"][:3] + alone["northwind"][3:]
  # The two adapters differ (else the check above could not tell them apart).
  assert np.abs(alone["lumen_logits"] - alone["northwind_logits"]).max() > 1e-3
