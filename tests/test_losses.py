"""Preference losses: parity with TRL's own trainer code, TRL's formulas in torch, hand values."""

import functools
import math
from collections import defaultdict
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import losses as L

B, T = 6, 9
DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected")
LOSS_CASES = [("sigmoid", 0.0), ("robust", 0.0), ("robust", 0.2), ("hinge", 0.0), ("ipo", 0.0)]


def _pairs(seed=0, scale=3.0):
  """Random per-token logps and completion masks for chosen and rejected, policy and reference."""
  rng = np.random.default_rng(seed)
  tok = {k: -rng.uniform(0.0, scale, (B, T)).astype(np.float32)
         for k in ("pc", "pr", "rc", "rr")}
  masks = {}
  for side in ("c", "r"):
    lengths = rng.integers(1, T, B)  # column 0 is a prompt token; completions of 1..T-1 tokens
    m = np.zeros((B, T), np.float32)
    for i, n in enumerate(lengths):
      m[i, 1:1 + n] = 1.0
    masks[side] = m
  return tok, masks


def _ours(tok, masks, loss_type, eps, beta):
  """As the DPO trainer: sums per sequence, means for "ipo"; returns (sums, dpo_loss outputs)."""
  sums, means = {}, {}
  for k, v in tok.items():
    sums[k], means[k] = L.sequence_logps_sum_and_mean(jnp.asarray(v), jnp.asarray(masks[k[1]]))
  seq = means if loss_type == "ipo" else sums
  out = L.dpo_loss(seq["pc"], seq["pr"], seq["rc"], seq["rr"], beta=beta, loss_type=loss_type,
                   label_smoothing=eps)
  return sums, out


# ---- parity with TRL's DPOTrainer itself ----------------------------------------------------


def _trl_dpo(tok, masks, loss_type, eps, beta):
  """Run trl>=1.0 `DPOTrainer._compute_loss` on a stub trainer; returns (loss, metrics)."""
  torch = pytest.importorskip("torch")
  trl = pytest.importorskip("trl")
  from trl import DPOTrainer
  if not hasattr(DPOTrainer, "_compute_loss"):
    pytest.fail(f"trl {trl.__version__} has no DPOTrainer._compute_loss (0.x API)")
  completion_mask = torch.tensor(np.concatenate([masks["c"], masks["r"]]))  # [2B, T]
  shift = completion_mask[:, 1:]
  # The fused head returns per-token logps of shifted labels, zero where the label is -100.
  log_probs = torch.tensor(np.concatenate([tok["pc"], tok["pr"]])[:, 1:]) * shift  # [2B, T-1]
  ref_sum = lambda k, m: torch.tensor((tok[k][:, 1:] * masks[m][:, 1:]).sum(-1))
  inputs = {
      "input_ids": torch.zeros((2 * B, T), dtype=torch.long),
      "attention_mask": torch.ones((2 * B, T), dtype=torch.long),
      "completion_mask": completion_mask.long(),
      "ref_chosen_logps": ref_sum("rc", "c"),
      "ref_rejected_logps": ref_sum("rr", "r"),
  }
  outputs = SimpleNamespace(log_probs=log_probs, entropy=torch.zeros_like(log_probs),
                            mean_logits=torch.zeros_like(log_probs),
                            is_top1=torch.zeros_like(log_probs, dtype=torch.bool))
  identity = lambda x: x
  stub = SimpleNamespace(
      model=SimpleNamespace(training=False), aux_loss_enabled=False, ld_alpha=None,
      accelerator=SimpleNamespace(device=torch.device("cpu"), gather=identity,
                                  gather_for_metrics=identity),
      precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type],
      loss_weights=[1.0], beta=beta, label_smoothing=eps, use_weighting=False,
      _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
  try:
    loss = DPOTrainer._compute_loss(stub, lambda **kw: outputs, inputs, return_outputs=False)
  except (AttributeError, KeyError, TypeError) as e:  # a TRL version the stub does not fit
    pytest.fail(f"trl {trl.__version__} DPOTrainer._compute_loss does not fit the stub: {e!r}")
  return float(loss), {k: v[-1] for k, v in stub._metrics["eval"].items()}


@pytest.mark.parametrize("loss_type,eps", LOSS_CASES)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_matches_trl_trainer(loss_type, eps, beta):
  tok, masks = _pairs(seed=1)
  # Shift the policy so that the logits straddle 0 and the hinge's kink for beta=0.1 and 0.5.
  tok["pc"] = tok["pc"] + 0.3 * np.arange(B)[:, None].astype(np.float32)
  want_loss, want_metrics = _trl_dpo(tok, masks, loss_type, eps, beta)
  sums, (losses, rc, rr) = _ours(tok, masks, loss_type, eps, beta)
  np.testing.assert_allclose(float(losses.mean()), want_loss, rtol=1e-5, atol=1e-6)
  if loss_type == "ipo":  # trl 1.x logs rewards/logps from sums; we were given means
    return
  got = L.dpo_metric_sums(rc, rr, sums["pc"], sums["pr"])
  for k in DPO_METRICS:
    np.testing.assert_allclose(float(got[k]) / B, want_metrics[k], rtol=1e-5, atol=1e-6,
                               err_msg=k)


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("robust", 0.2)])
def test_dpo_metric_sums_skip_padding_pairs_like_trl(loss_type, eps):
  """The DPO trainer's weights: 1 per real pair, 0 per padding pair, the sums divided by the
  real pairs. Padding pairs with junk logps must leave TRL's metrics of the real pairs."""
  tok, masks = _pairs(seed=6)
  tok["pc"] = tok["pc"] + 0.3 * np.arange(B)[:, None].astype(np.float32)
  want_loss, want_metrics = _trl_dpo(tok, masks, loss_type, eps, 0.1)
  junk = np.random.default_rng(7)
  padded_tok = {k: np.concatenate([v, -junk.uniform(0, 30, (2, T)).astype(np.float32)])
                for k, v in tok.items()}
  padded_masks = {k: np.concatenate([v, np.ones((2, T), np.float32)]) for k, v in masks.items()}
  sums, (losses, rc, rr) = _ours(padded_tok, padded_masks, loss_type, eps, 0.1)
  valid = jnp.asarray([1.0] * B + [0.0, 0.0])
  np.testing.assert_allclose(float((losses * valid).sum() / valid.sum()), want_loss, rtol=1e-5)
  got = L.dpo_metric_sums(rc, rr, sums["pc"], sums["pr"], valid)
  for k in DPO_METRICS:
    np.testing.assert_allclose(float(got[k]) / B, want_metrics[k], rtol=1e-5, atol=1e-6,
                               err_msg=k)


# ---- TRL's formulas written in torch (covers cDPO, which trl 1.x dropped) -------------------


def _torch_dpo(pc, pr, rc, rr, beta, loss_type, eps):
  """TRL 0.x `DPOTrainer.dpo_loss` (sigmoid/robust/hinge/ipo), transcribed."""
  import torch
  import torch.nn.functional as F
  pc, pr, rc, rr = (torch.tensor(np.asarray(x), dtype=torch.float64) for x in (pc, pr, rc, rr))
  logits = (pc - pr) - (rc - rr)
  if loss_type == "sigmoid":
    losses = -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
  elif loss_type == "robust":
    losses = (-F.logsigmoid(beta * logits) * (1 - eps)
              + F.logsigmoid(-beta * logits) * eps) / (1 - 2 * eps)
  elif loss_type == "hinge":
    losses = torch.relu(1 - beta * logits)
  elif loss_type == "ipo":
    losses = (logits - 1 / (2 * beta)) ** 2
  return (losses.numpy(), (beta * (pc - rc)).numpy(), (beta * (pr - rr)).numpy())


@pytest.mark.parametrize("loss_type,eps", LOSS_CASES + [("sigmoid", 0.1), ("sigmoid", 0.3)])
def test_dpo_matches_trl_formulas_in_torch(loss_type, eps):
  pytest.importorskip("torch")
  rng = np.random.default_rng(2)
  pc, pr, rc, rr = (rng.normal(-20.0, 8.0, B).astype(np.float32) for _ in range(4))
  got = L.dpo_loss(*map(jnp.asarray, (pc, pr, rc, rr)), beta=0.1, loss_type=loss_type,
                   label_smoothing=eps)
  want = _torch_dpo(pc, pr, rc, rr, 0.1, loss_type, eps)
  for g, w in zip(got, want):
    assert g.shape == (B,) and g.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-5)


# ---- hand-computed properties ---------------------------------------------------------------


def test_policy_equal_to_reference():
  x = jnp.asarray([-12.0, -3.5, -40.0])
  y = jnp.asarray([-7.0, -9.0, -1.0])
  for loss_type, eps, want in [("sigmoid", 0.0, math.log(2)), ("sigmoid", 0.1, math.log(2)),
                               ("robust", 0.2, math.log(2)), ("hinge", 0.0, 1.0),
                               ("ipo", 0.0, (1 / (2 * 0.1)) ** 2)]:
    losses, rc, rr = L.dpo_loss(x, y, x, y, beta=0.1, loss_type=loss_type, label_smoothing=eps)
    np.testing.assert_allclose(np.asarray(losses), want, rtol=1e-6, err_msg=loss_type)
    np.testing.assert_array_equal(np.asarray(rc), 0.0)
    np.testing.assert_array_equal(np.asarray(rr), 0.0)


def test_robust_without_smoothing_is_sigmoid():
  rng = np.random.default_rng(3)
  args = [jnp.asarray(rng.normal(-10.0, 5.0, B)) for _ in range(4)]
  sig = L.dpo_loss(*args, beta=0.3, loss_type="sigmoid")[0]
  rob = L.dpo_loss(*args, beta=0.3, loss_type="robust", label_smoothing=0.0)[0]
  np.testing.assert_array_equal(np.asarray(sig), np.asarray(rob))


def test_hand_values():
  # logits = (-1 - -3) - (-2 - -2) = 2, beta = 0.5 -> beta * logits = 1.
  args = [jnp.asarray([v]) for v in (-1.0, -3.0, -2.0, -2.0)]
  sp = lambda z: math.log1p(math.exp(-z))  # -logsigmoid(z)
  cases = {("sigmoid", 0.0): sp(1.0), ("sigmoid", 0.1): 0.9 * sp(1.0) + 0.1 * sp(-1.0),
           ("robust", 0.1): (0.9 * sp(1.0) - 0.1 * sp(-1.0)) / 0.8, ("hinge", 0.0): 0.0,
           ("ipo", 0.0): (2.0 - 1.0) ** 2}
  for (loss_type, eps), want in cases.items():
    losses, rc, rr = L.dpo_loss(*args, beta=0.5, loss_type=loss_type, label_smoothing=eps)
    np.testing.assert_allclose(float(losses[0]), want, rtol=1e-6, err_msg=loss_type)
    np.testing.assert_allclose([float(rc[0]), float(rr[0])], [0.5, -0.5], rtol=1e-6)


@pytest.mark.parametrize("loss_type,eps", LOSS_CASES + [("sigmoid", 0.1)])
def test_gradient_signs(loss_type, eps):
  """Descent raises the chosen logp and lowers the rejected one; rewards carry no gradient."""
  # The chosen side trails the reference, so every variant (hinge included) is in its active region.
  pc, pr, rc, rr = (jnp.asarray([v, v + 1.0]) for v in (-12.0, -10.0, -11.0, -10.5))
  loss = lambda pc, pr: L.dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type=loss_type,
                                   label_smoothing=eps)[0].sum()
  g_c, g_r = jax.grad(loss, argnums=(0, 1))(pc, pr)
  assert (np.asarray(g_c) < 0).all() and (np.asarray(g_r) > 0).all()
  np.testing.assert_allclose(np.asarray(g_c), -np.asarray(g_r), rtol=1e-6)  # depends on logits
  rewards = lambda pc, pr: sum(r.sum() for r in L.dpo_loss(pc, pr, rc, rr, loss_type=loss_type,
                                                           label_smoothing=eps)[1:])
  for g in jax.grad(rewards, argnums=(0, 1))(pc, pr):
    np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_dpo_jit_dtype_and_errors():
  fn = jax.jit(functools.partial(L.dpo_loss, beta=0.2, loss_type="robust", label_smoothing=0.1))
  x = jnp.asarray([-5.0, -6.0], jnp.bfloat16)
  out = fn(x, x - 1, x + 0.5, x - 2)
  assert all(o.dtype == jnp.float32 and o.shape == (2,) for o in out)
  with pytest.raises(ValueError, match="loss_type"):
    L.dpo_loss(x, x, x, x, loss_type="kto")
  with pytest.raises(ValueError, match="label_smoothing"):
    L.dpo_loss(x, x, x, x, loss_type="robust", label_smoothing=0.5)


def test_dpo_metric_sums_hand_values():
  rc, rr = jnp.asarray([1.0, -0.5, 0.2, 0.0]), jnp.asarray([0.5, 0.5, 0.2, -1.0])
  pc, pr = jnp.asarray([-10.0, -20.0, -5.0, -1.0]), jnp.asarray([-3.0, -4.0, -5.0, -8.0])
  m = {k: float(v) / 4 for k, v in L.dpo_metric_sums(rc, rr, pc, pr).items()}
  want = {"rewards/chosen": 0.175, "rewards/rejected": 0.05, "rewards/accuracies": 0.5,
          "rewards/margins": 0.125, "logps/chosen": -9.0, "logps/rejected": -5.0}
  assert m.keys() == want.keys()
  for k, v in want.items():
    assert m[k] == pytest.approx(v, abs=1e-6), k


def test_dpo_metric_sums_weighted_equal_a_python_loop():
  """Any weights (not only 0/1) weight each pair's term; bf16 inputs are summed in float32."""
  rng = np.random.default_rng(8)
  rc, rr, pc, pr = (rng.normal(0, 2, 7).astype(np.float32) for _ in range(4))
  rr[2] = rc[2]  # a tie is not an accuracy
  w = np.array([1.0, 0.0, 0.5, 2.0, 1.0, 0.0, 0.25], np.float32)
  got = L.dpo_metric_sums(*map(jnp.asarray, (rc, rr, pc, pr)), weights=jnp.asarray(w))
  want = dict.fromkeys(DPO_METRICS, 0.0)
  for i in range(7):
    want["rewards/chosen"] += w[i] * float(rc[i])
    want["rewards/rejected"] += w[i] * float(rr[i])
    want["rewards/accuracies"] += w[i] * (1.0 if rc[i] > rr[i] else 0.0)
    want["rewards/margins"] += w[i] * (float(rc[i]) - float(rr[i]))
    want["logps/chosen"] += w[i] * float(pc[i])
    want["logps/rejected"] += w[i] * float(pr[i])
  assert got.keys() == want.keys()
  for k, v in want.items():
    assert got[k].dtype == jnp.float32 and got[k].shape == ()
    assert float(got[k]) == pytest.approx(v, rel=1e-6, abs=1e-6), k
  bf = L.dpo_metric_sums(*(jnp.asarray(x, jnp.bfloat16) for x in (rc, rr, pc, pr)))
  assert all(v.dtype == jnp.float32 for v in bf.values())
  # The metrics carry no gradient into the policy.
  g = jax.grad(lambda a: sum(L.dpo_metric_sums(a, a - 1, a, a).values()))(jnp.asarray(rc))
  np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_sequence_logps_masks():
  tok = jnp.asarray([[-1.0, -2.0, -3.0, -4.0], [-0.5, -0.5, -9.0, -9.0], [-7.0, -7.0, -7.0, -7.0]])
  mask = jnp.asarray([[0, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], bool)
  for m in (mask, mask.astype(jnp.float32)):
    sums, means = L.sequence_logps_sum_and_mean(tok, m)
    np.testing.assert_allclose(np.asarray(sums), [-9.0, -1.0, 0.0])
    np.testing.assert_allclose(np.asarray(means), [-3.0, -0.5, 0.0])  # an empty mask: 0, not nan
  # Composes with logprobs_from_logits: the masked sum of log p(target) over completion positions.
  rng = np.random.default_rng(4)
  logits = jnp.asarray(rng.normal(size=(2, 5, 11)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 11, (2, 5)))
  m = jnp.asarray([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], jnp.float32)
  lp = np.asarray(jax.nn.log_softmax(logits))
  want = [sum(lp[b, t, int(targets[b, t])] for t in range(5) if m[b, t]) for b in range(2)]
  got = L.sequence_logps_sum_and_mean(L.logprobs_from_logits(logits, targets), m)[0]
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


# ---- Bradley-Terry reward-model loss --------------------------------------------------------


def _bt(rc, rr, valid, margin=None, center=0.0):
  """As the reward trainer: (sum of pair losses / real pairs, metric sums / real pairs)."""
  n = valid.sum()
  loss = (L.bradley_terry_losses(rc, rr, margin, center) * valid).sum() / n
  return loss, {k: v / n for k, v in L.bradley_terry_metric_sums(rc, rr, valid).items()}


def test_bradley_terry_hand():
  rc, rr = jnp.asarray([1.0, 0.0, 3.0]), jnp.asarray([0.0, 2.0, 1.0])
  ones = jnp.ones(3)
  sp = lambda z: math.log1p(math.exp(-z))
  np.testing.assert_allclose(np.asarray(L.bradley_terry_losses(rc, rr)),
                             [sp(1.0), sp(-2.0), sp(2.0)], rtol=1e-6)
  loss, m = _bt(rc, rr, ones)
  assert float(loss) == pytest.approx((sp(1.0) + sp(-2.0) + sp(2.0)) / 3, rel=1e-6)
  assert float(m["accuracy"]) == pytest.approx(2 / 3)
  want = {"reward_chosen": 4 / 3, "reward_rejected": 1.0, "margin": 1 / 3}
  assert {k: float(m[k]) for k in want} == pytest.approx(want)
  margin = jnp.asarray([0.5, 0.0, 1.0])
  loss, m = _bt(rc, rr, ones, margin=margin, center=0.01)
  center = 0.01 * (1.0 + 4.0 + 16.0) / 3
  assert float(loss) == pytest.approx((sp(0.5) + sp(-2.0) + sp(1.0)) / 3 + center, rel=1e-6)
  assert float(m["accuracy"]) == pytest.approx(2 / 3)  # accuracy ignores the margin, as TRL
  g_c, g_r = jax.grad(lambda a, b: _bt(a, b, ones)[0], argnums=(0, 1))(rc, rr)
  assert (np.asarray(g_c) < 0).all() and (np.asarray(g_r) > 0).all()


def _trl_reward_loss(rc, rr, margin, center):
  """Run TRL's `RewardTrainer.compute_loss` on a stub trainer and model; returns (loss, acc)."""
  torch = pytest.importorskip("torch")
  trl = pytest.importorskip("trl")
  from trl import RewardTrainer
  scores = torch.tensor(np.concatenate([rc, rr]), dtype=torch.float32)[:, None]  # [2B, 1]
  inputs = {"input_ids": torch.zeros((scores.shape[0], 3), dtype=torch.long),
            "attention_mask": torch.ones((scores.shape[0], 3), dtype=torch.long)}
  if margin is not None:
    inputs["margin"] = torch.tensor(margin, dtype=torch.float32)
  identity = lambda x: x
  stub = SimpleNamespace(
      model=SimpleNamespace(training=False),
      args=SimpleNamespace(center_rewards_coefficient=center),
      accelerator=SimpleNamespace(gather=identity, gather_for_metrics=identity),
      _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
  model = lambda **kw: SimpleNamespace(logits=scores)
  try:
    loss = RewardTrainer.compute_loss(stub, model, inputs)
  except (AttributeError, KeyError, TypeError) as e:
    pytest.fail(f"trl {trl.__version__} RewardTrainer.compute_loss does not fit the stub: {e!r}")
  return float(loss), stub._metrics["eval"]["accuracy"][-1]


@pytest.mark.parametrize("with_margin", [False, True])
@pytest.mark.parametrize("center", [None, 0.01])
def test_bradley_terry_matches_trl_trainer(with_margin, center):
  rng = np.random.default_rng(5)
  rc, rr = rng.normal(0.5, 2.0, B).astype(np.float32), rng.normal(0.0, 2.0, B).astype(np.float32)
  margin = rng.uniform(0.0, 1.0, B).astype(np.float32) if with_margin else None
  want_loss, want_acc = _trl_reward_loss(rc, rr, margin, center)
  # Two padding pairs (weight 0, as the reward trainer gives them) must not count.
  pad = lambda x, v: jnp.asarray(np.concatenate([x, np.full(2, v, np.float32)]))
  valid = pad(np.ones(B, np.float32), 0.0)
  loss, m = _bt(pad(rc, 9.0), pad(rr, -9.0), valid,
                margin=None if margin is None else pad(margin, 0.5), center=center or 0.0)
  assert float(loss) == pytest.approx(want_loss, rel=1e-5)
  assert float(m["accuracy"]) == pytest.approx(want_acc)
