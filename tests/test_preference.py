"""Reward models and DPO: reference log-probs, log 2 at the start, HF export, short runs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import ftjax
from configs import dpo as dpo_config
from configs import reward as reward_config
from ftjax import export, lora, partition, sharding, workdir as wd
from ftjax.data import preference as pref_data
from ftjax.train import common, dpo, reference as reference_lib, reward, setup
from tests.conftest import BASE_SEQ


def _batch(base_dir, pref_files, n=4):
  tok = ftjax.tokenizer.load_tokenizer(base_dir)
  data = pref_data.build_preference_dataset({"sources": [{"path": pref_files[0]}],
                                             "format": "chat"}, tok, BASE_SEQ, n)
  return next(data.train)


def test_reference_logps_with_adapters_off_equal_the_base(base_dir, pref_files):
  base_model, base = ftjax.load_pretrained(base_dir)
  model, params = ftjax.load_pretrained(base_dir, lora=ftjax.LoraConfig(rank=4))
  flat = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.3 if str(p[-1].key) == "lora_b" else x, params)  # B != 0
  batch = _batch(base_dir, pref_files)
  ref = dpo.side_logps(base_model, base, batch)
  off = dpo.side_logps(lora.disable(model), flat, batch)
  on = dpo.side_logps(model, flat, batch)
  np.testing.assert_array_equal(np.asarray(off[0]), np.asarray(ref[0]))
  assert np.abs(np.asarray(on[0]) - np.asarray(ref[0])).max() > 1e-2


def _reference_setup(base_dir, pref_files, arg, reference="auto", train_extra=""):
  cfg = dpo_config.get_config(arg)
  cfg.model.hf_path = base_dir
  cfg.adapter.train_extra = train_extra
  cfg.dpo.reference = reference
  model, params, _, _ = setup.build_model(cfg)
  return cfg, model, params, _batch(base_dir, pref_files)


def _reference(model, cfg, params):
  """The DPO trainer's reference for `cfg`."""
  return reference_lib.policy(model, cfg, params, setup.rules(cfg),
                              precomputed=cfg.dpo.reference == "precomputed")


def test_reference_stays_put_when_train_extra_moves_base_leaves(base_dir, pref_files):
  # The trained base leaves (here the final norm) change the model; the reference must not.
  cfg, model, params, batch = _reference_setup(base_dir, pref_files, "adapter=lora,smoke",
                                               train_extra="final_norm")
  ref_model, ref_params_fn, ref_frozen = _reference(model, cfg, params)
  trainable, frozen, _ = common.split_params(params, setup.rules(cfg))
  assert any("final_norm" in jax.tree_util.keystr(p)
             for p, _ in jax.tree_util.tree_leaves_with_path(trainable))
  moved = jax.tree_util.tree_map(lambda x: x * 1.5 + 0.1, trainable)  # as after some steps
  full = partition.merge(moved, {**frozen, **ref_frozen})
  base_model, base = ftjax.load_pretrained(base_dir)  # the initial model: the true reference
  want = dpo.side_logps(base_model, base, batch)[0]
  got = dpo.side_logps(ref_model, ref_params_fn(full), batch)[0]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(dpo.side_logps(ref_model, full, batch)[0])
                - np.asarray(want)).max() > 1e-3  # the moved leaves do change the logps


def test_full_finetuning_reference_copies(base_dir, pref_files):
  cfg, model, params, batch = _reference_setup(base_dir, pref_files, "adapter=none,smoke")
  _, fn, ref_frozen = _reference(model, cfg, params)
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
  assert sum(x.size for x in jax.tree_util.tree_leaves(ref_frozen)) == n_params
  # Precomputed: the reference log-probs come from the initial params once; no copy is kept.
  cfg, model, params, batch = _reference_setup(base_dir, pref_files, "adapter=none,smoke",
                                               reference="precomputed")
  _, _, ref_frozen = _reference(model, cfg, params)
  assert jax.tree_util.tree_leaves(ref_frozen) == []


def test_full_finetuning_precomputed_run(base_dir, pref_files, tmp_path):
  cfg = _config(dpo_config.get_config("adapter=none,smoke"), base_dir, pref_files, steps=1,
                log_every=1, eval_every=1, save_every=1, batch_size=2, eval_batches=1)
  cfg.dpo.reference = "precomputed"
  out = dpo.run(cfg, str(tmp_path / "dpo"))
  # Step 1's policy is the reference it was computed from.
  np.testing.assert_allclose(out["loss"], math.log(2), rtol=1e-5)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
def test_first_step_policy_equals_reference(base_dir, pref_files, loss_type):
  model, params = ftjax.load_pretrained(base_dir, lora=ftjax.LoraConfig(rank=4))
  batch = _batch(base_dir, pref_files)
  beta = 0.1
  loss_sum, n, aux = dpo.dpo_loss_fn(
      params, batch, None, model=model, ref_model=lora.disable(model),
      ref_params_fn=lambda p: p, beta=beta, loss_type=loss_type,
      label_smoothing=0.1 if loss_type == "robust" else 0.0)
  expected = {"sigmoid": math.log(2), "robust": math.log(2), "hinge": 1.0,
              "ipo": (1 / (2 * beta)) ** 2}[loss_type]
  np.testing.assert_allclose(float(loss_sum / n), expected, rtol=1e-6)
  assert float(aux["rewards/chosen"]) == 0.0 and float(aux["rewards/rejected"]) == 0.0


def test_grad_accumulation_keeps_pairs_together(base_dir, pref_files):
  model, params = ftjax.load_pretrained(base_dir, lora=ftjax.LoraConfig(rank=2))
  trainable, frozen, _ = common.split_params(params, partition.rules_for("lora"))
  trainable = jax.tree_util.tree_map(lambda x: x + 0.05, trainable)  # policy != reference
  schedule = common.make_schedule(1e-3, 10)
  tx = common.make_optimizer("adamw", schedule)
  batch = _batch(base_dir, pref_files, n=4)
  out = {}
  # 4 micro-batches of one pair each: a row moved to another micro-batch than its pair's shows.
  # (Accumulation 2 with DPO: test_sharding's mixed-mesh class, against one device.)
  for k in (1, 4):
    step = jax.jit(dpo.make_dpo_step(model, lora.disable(model), lambda p: p, tx,
                                            schedule, beta=0.1, loss_type="sigmoid",
                                            grad_accum=k))
    _, m = step(common.init_state(trainable, tx, 0), frozen,
                sharding.interleave_for_accum(batch, k))
    out[k] = m
  np.testing.assert_allclose(out[4]["loss"], out[1]["loss"], rtol=1e-5)
  np.testing.assert_allclose(out[4]["grad_norm"], out[1]["grad_norm"], rtol=1e-4)


@pytest.mark.parametrize("get_config", [dpo_config.get_config, reward_config.get_config])
def test_configs_take_no_demo_data_by_default(get_config, tmp_path):
  cfg = get_config("smoke")
  assert (cfg.data.path, cfg.data.eval_path, cfg.data.format) == ("", "", "auto")
  with pytest.raises(ValueError, match="config.data.path"):
    setup.data_config(cfg)
  own = tmp_path / "own.jsonl"  # a run on the user's data evaluates on nothing else
  cfg.data.path = str(own)
  assert "eval_sources" not in setup.data_config(cfg)
  demo = get_config("data=support,smoke")
  assert demo.data.path.endswith("prefs_train.jsonl") and demo.data.format == "chat"
  assert demo.data.eval_path.endswith("prefs_eval.jsonl")
  with pytest.raises(ftjax.errors.UserError, match="data='mine'"):
    get_config("data=mine")


def _config(cfg, base_dir, pref_files, **train):
  cfg.model.hf_path = base_dir
  cfg.data.path, cfg.data.eval_path = pref_files
  cfg.train.update(seq_len=BASE_SEQ, **train)
  return cfg


def test_reward_model_learns_and_exports(base_dir, pref_files, tmp_path):
  # 40 steps reach 0.75 held-out accuracy and loss 0.44 here (60: 0.83, 0.38).
  cfg = _config(reward_config.get_config("smoke"), base_dir, pref_files, steps=40,
                batch_size=8, eval_every=40, save_every=40)
  cfg.optim.lr = 5e-3
  out = reward.run(cfg, str(tmp_path / "rm"))
  # A zero head ties every pair (accuracy 0, loss log 2 at the start); training separates
  # held-out pairs (24 of them here, on a tiny random base).
  assert out["eval_accuracy"] > 0.6 and out["eval_loss"] < math.log(2) - 0.1, out
  hf_dir = export.export(str(tmp_path / "rm"), str(tmp_path / "rm_hf"), "merged")
  hf_rm = transformers.AutoModelForSequenceClassification.from_pretrained(hf_dir).eval()
  model, params, tok, _ = wd.load_trained(str(tmp_path / "rm"))
  batch = _batch(base_dir, pref_files)
  ours = np.asarray(reward.rewards_of(model, params, batch))
  tokens, mask = map(np.asarray, reward.full_sequences(batch))
  with torch.no_grad():
    ref = hf_rm(input_ids=torch.tensor(tokens, dtype=torch.long),
                attention_mask=torch.tensor(mask.astype(np.int64))).logits[:, 0].numpy()
  np.testing.assert_allclose(ours, ref, atol=1e-4)
  assert hf_rm.config.pad_token_id == tok.pad_token_id


@pytest.mark.parametrize("adapter,reference", [("lora", "auto"), ("lora", "precomputed"),
                                               ("none", "auto")])
def test_dpo_raises_heldout_preference_accuracy(base_dir, pref_files, tmp_path, adapter,
                                                reference):
  # 15 steps reach 0.875 held-out accuracy and loss 0.26 here (30: 0.875, 0.21).
  cfg = _config(dpo_config.get_config(f"adapter={adapter},smoke"), base_dir, pref_files,
                steps=15, batch_size=8, eval_every=15, save_every=15)
  cfg.dpo.reference = reference
  cfg.optim.lr = 5e-3 if adapter == "lora" else 1e-3
  out = dpo.run(cfg, str(tmp_path / "dpo"))
  # At the start policy == reference: every implicit reward is 0 and the loss is log 2.
  assert out["eval_rewards/accuracies"] > 0.75, out
  assert out["eval_loss"] < math.log(2)
  assert out["eval_rewards/margins"] > 0


def test_precomputed_reference_matches_live_reference(base_dir, pref_files):
  model, params = ftjax.load_pretrained(base_dir, lora=ftjax.LoraConfig(rank=2))
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.1 if str(p[-1].key) == "lora_b" else x, params)
  batch = _batch(base_dir, pref_files)
  table = dpo.precompute_reference(lora.disable(model), params, [batch])
  kw = dict(model=model, ref_model=lora.disable(model), ref_params_fn=lambda p: p, beta=0.2,
            loss_type="sigmoid", label_smoothing=0.0)
  live = dpo.dpo_loss_fn(params, batch, None, **kw)
  pre = dpo.dpo_loss_fn(params, dpo.attach_reference(batch, table), None, **kw)
  np.testing.assert_allclose(float(pre[0]), float(live[0]), rtol=1e-5)
  assert jnp.isfinite(pre[0])


def test_reward_readout_when_pad_is_eos(tmp_path):
  """pad == eos: ftjax reads the same token as HF's classifier and TRL's RewardTrainer."""
  from tests.conftest import hf_config
  eos = pad = 2
  hf_cfg = hf_config("llama")
  hf_cfg.update(dict(eos_token_id=eos, pad_token_id=pad, num_labels=1))
  torch.manual_seed(0)
  src = transformers.LlamaForSequenceClassification(hf_cfg).eval()
  with torch.no_grad():
    src.score.weight.normal_(0.0, 1.0)
  src.save_pretrained(str(tmp_path / "src"))
  model, params = ftjax.load_pretrained(str(tmp_path / "src"))
  assert model.cfg.head == "score" and model.cfg.pad_token_id == pad

  rng = np.random.default_rng(0)
  seqs = [np.r_[rng.integers(6, 320, 9), eos], np.r_[rng.integers(6, 320, 4), eos],
          np.r_[rng.integers(6, 320, 3), eos, rng.integers(6, 320, 2), eos]]  # EOS mid-row too
  t = max(map(len, seqs))
  batch = {k: np.zeros((len(seqs), t - 1), np.int32)
           for k in ("inputs", "targets", "segment_ids", "positions")}
  for i, s in enumerate(seqs):
    n = len(s) - 1
    batch["inputs"][i, :n], batch["targets"][i, :n] = s[:-1], s[1:]
    batch["segment_ids"][i, :n], batch["positions"][i, :n] = 1, np.arange(n)
  ours = np.asarray(reward.rewards_of(model, params, batch))

  # TRL's collator right-pads with pad_token_id; transformers pools by that id.
  ids = np.full((len(seqs), t), pad, np.int64)
  for i, s in enumerate(seqs):
    ids[i, :len(s)] = s
  attn = np.zeros_like(ids)
  for i, s in enumerate(seqs):
    attn[i, :len(s)] = 1
  tokens, mask = map(np.asarray, reward.full_sequences(batch))
  hf_rule = (torch.arange(t) * (torch.tensor(ids) != pad).int()).argmax(-1).numpy()
  np.testing.assert_array_equal(
      np.asarray(ftjax.heads.score_index(tokens, mask, model.cfg.pad_token_id)), hf_rule)
  assert list(hf_rule) == [len(s) - 2 for s in seqs]  # the token before the final EOS

  ftjax.save_pretrained(model, params, str(tmp_path / "export"))
  hf_rm = transformers.AutoModelForSequenceClassification.from_pretrained(
      str(tmp_path / "export")).eval()
  with torch.no_grad():
    ref = hf_rm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(attn)).logits[:, 0]
    direct = src(input_ids=torch.tensor(ids), attention_mask=torch.tensor(attn)).logits[:, 0]
  np.testing.assert_allclose(ours, ref.numpy(), atol=1e-4)
  np.testing.assert_allclose(ours, direct.numpy(), atol=1e-4)
