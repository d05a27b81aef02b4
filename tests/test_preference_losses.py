"""TRL's preference losses beyond the original four DPO types: every DPO `loss_type` of TRL
1.16 (weighted combinations, ld_alpha, f-divergences), ORPO, CPO/SimPO and KTO. Each is checked
by running TRL's own trainer code on a stub trainer with the same tensors: loss, gradient with
respect to the per-token logps, and the logged metrics."""

from collections import defaultdict
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import losses as L
from ftjax.train import dpo

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")

B, T = 6, 9
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected")
identity = lambda x: x


def _rows(seed=0):
  """Per-token policy and reference logps [2B, T] (rows chosen, then rejected) and response
  masks [2B, T]; column 0 is a prompt token, responses of 1..T-1 tokens."""
  rng = np.random.default_rng(seed)
  pol = -rng.uniform(0.0, 1.0, (2 * B, T)).astype(np.float32)
  ref = -rng.uniform(0.0, 1.0, (2 * B, T)).astype(np.float32)
  mask = np.zeros((2 * B, T), np.float32)
  for i, n in enumerate(rng.integers(1, T, 2 * B)):
    mask[i, 1:1 + n] = 1.0
  # The chosen side drifts up pair by pair, so logits take both signs.
  pol[:B] += 0.08 * np.arange(B)[:, None]
  return pol * mask, ref * mask, mask


def _eval_module():
  """A stand-in policy module in eval mode (TRL reads `.training` and checks it for PEFT)."""
  m = torch.nn.Module().eval()
  m.is_gradient_checkpointing = False
  return m


def _trl_dpo(pol, ref, mask, opts):
  """TRL 1.16 `DPOTrainer._compute_loss` on a stub: (loss, d loss / d per-token logps, metrics)."""
  from trl import DPOTrainer
  log_probs = torch.tensor(pol[:, 1:], dtype=torch.float32, requires_grad=True)
  ref_lp = torch.tensor(ref[:, 1:], dtype=torch.float32)
  n = pol.shape[0]
  inputs = {"input_ids": torch.zeros((n, T), dtype=torch.long),
            "attention_mask": torch.ones((n, T), dtype=torch.long),
            "completion_mask": torch.tensor(mask).long()}
  out = lambda lp: SimpleNamespace(log_probs=lp, entropy=torch.zeros_like(lp),
                                   mean_logits=torch.zeros_like(lp),
                                   is_top1=torch.zeros_like(lp, dtype=torch.bool))
  stub = SimpleNamespace(
      model=_eval_module(),
      ref_model=lambda **kw: out(ref_lp),
      aux_loss_enabled=False, ld_alpha=opts["ld_alpha"],
      accelerator=SimpleNamespace(device=torch.device("cpu"), gather=identity,
                                  gather_for_metrics=identity),
      args=SimpleNamespace(discopop_tau=opts["discopop_tau"], gradient_checkpointing_kwargs=None),
      precompute_ref_logps=False, f_divergence_type=opts["f_divergence_type"],
      f_alpha_divergence_coef=opts["f_alpha_divergence_coef"],
      loss_types=list(opts["loss_types"]), loss_weights=list(opts["loss_weights"]),
      beta=opts["beta"], label_smoothing=opts["label_smoothing"], use_weighting=False,
      _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
  loss = DPOTrainer._compute_loss(stub, lambda **kw: out(log_probs), inputs,
                                  return_outputs=False)
  loss.backward()
  grad = np.zeros_like(pol)
  grad[:, 1:] = log_probs.grad.numpy()
  return float(loss.detach()), grad * mask, {k: v[-1] for k, v in stub._metrics["eval"].items()}


def _ours_dpo(pol, ref, mask, opts, valid=None):
  """The DPO trainer's `multi_pair_losses`: (loss, gradient, metrics) as TRL reports them."""
  valid = jnp.ones(B) if valid is None else valid
  n = valid.sum()

  def f(tok):
    per, aux = dpo.multi_pair_losses(tok, jnp.asarray(ref), jnp.asarray(mask), valid, opts)
    return per.sum() / n, aux
  (loss, aux), g = jax.value_and_grad(f, has_aux=True)(jnp.asarray(pol))
  return float(loss), np.asarray(g) * mask, {k: float(v) / float(n) for k, v in aux.items()}


def _opts(loss_types, weights=None, *, beta=0.1, eps=0.0, f="reverse_kl", f_alpha=0.5,
          ld_alpha=None, tau=0.05):
  return dict(loss_types=tuple(loss_types), loss_weights=weights or [1.0] * len(loss_types),
              beta=beta, label_smoothing=eps, f_divergence_type=f, f_alpha_divergence_coef=f_alpha,
              discopop_tau=tau, ld_alpha=ld_alpha)


NEW_TYPES = ["exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero",
             "apo_down", "discopop", "sft", "sigmoid_norm"]
CASES = (
    [(_opts([t], eps=1e-3 if t == "exo_pair" else 0.0), f"{t}") for t in NEW_TYPES]
    + [(_opts(["aot"], eps=0.1), "aot-eps"),
       (_opts(["discopop"], beta=0.5, tau=0.2), "discopop-tau"),
       (_opts(["sigmoid", "sft"], [0.8, 0.2]), "mpo-like"),
       (_opts(["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]), "mpo"),
       (_opts(["hinge", "ipo", "robust"], [1.0, 0.5, 2.0], eps=0.2), "legacy-mix"),
       (_opts(["sigmoid"], ld_alpha=0.3), "ld_alpha"),
       (_opts(["ipo", "sigmoid_norm"], ld_alpha=0.0), "ld_alpha0-norm"),
       (_opts(["sigmoid", "sft"], f="forward_kl"), "forward_kl"),
       (_opts(["hinge", "exo_pair"], eps=0.01, f="js_divergence"), "js"),
       (_opts(["sigmoid", "discopop", "ipo"], f="alpha_divergence", f_alpha=0.3), "alpha"),
       (_opts(["robust"], eps=0.1, f="alpha_divergence", f_alpha=1.0), "alpha1")])


@pytest.mark.parametrize("opts", [c[0] for c in CASES], ids=[c[1] for c in CASES])
def test_dpo_loss_types_match_trl_trainer(opts):
  pol, ref, mask = _rows(seed=1)
  want_loss, want_grad, want_m = _trl_dpo(pol, ref, mask, opts)
  loss, grad, m = _ours_dpo(pol, ref, mask, opts)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
  assert np.abs(want_grad).max() > 0
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6)
  for k in METRICS:
    np.testing.assert_allclose(m[k], want_m[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("loss_type", ["aot", "aot_unpaired", "sft", "exo_pair"])
def test_batch_level_losses_skip_padding_pairs(loss_type):
  """aot sorts over the batch and sft averages over its tokens: two padding pairs with junk
  logps (weight 0, as the trainer's eval padding) must leave TRL's loss of the real pairs."""
  opts = _opts([loss_type], eps=1e-3 if loss_type == "exo_pair" else 0.0)
  pol, ref, mask = _rows(seed=2)
  want_loss, want_grad, _ = _trl_dpo(pol, ref, mask, opts)
  junk = np.random.default_rng(3)
  pad = lambda x, lo: np.concatenate([x[:B], lo, x[B:], lo])
  jp = lambda: -junk.uniform(0, 40, (2, T)).astype(np.float32)
  ones = np.ones((2, T), np.float32)
  pol2, ref2, mask2 = pad(pol, jp()), pad(ref, jp()), pad(mask, ones)
  global B
  b0, B = B, B + 2
  try:
    loss, grad, _ = _ours_dpo(pol2, ref2, mask2, opts,
                              valid=jnp.asarray([1.0] * b0 + [0.0, 0.0]))
  finally:
    B = b0
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
  real = np.r_[np.arange(B), B + 2 + np.arange(B)]
  np.testing.assert_allclose(grad[real], want_grad, rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(grad[[B, B + 1, 2 * B + 2, 2 * B + 3]], 0.0)


def test_legacy_config_keeps_the_original_loss_path():
  d = dict(loss_type="sigmoid", beta=0.1, label_smoothing=0.0, loss_weights="", ld_alpha=None,
           f_divergence_type="reverse_kl")
  assert dpo.loss_options(d) is None
  for t in L.DPO_LOSS_TYPES:
    assert dpo.loss_options({**d, "loss_type": t, "label_smoothing": 0.1}) is None
  assert dpo.loss_options({**d, "loss_type": "sigmoid,sft"})["loss_types"] == ("sigmoid", "sft")
  assert dpo.loss_options({**d, "loss_type": ["sigmoid", "sft"], "loss_weights": "1,0.5"})[
      "loss_weights"] == [1.0, 0.5]
  assert dpo.loss_options({**d, "ld_alpha": 0.5}) is not None


@pytest.mark.parametrize("change,key", [
    ({"loss_type": "kto"}, "dpo.loss_type"), ({"loss_type": "sigmoid,nope"}, "dpo.loss_type"),
    ({"loss_type": "sigmoid,sft", "loss_weights": "1"}, "dpo.loss_weights"),
    ({"loss_weights": "a,b", "loss_type": "sigmoid,sft"}, "dpo.loss_weights"),
    ({"f_divergence_type": "tv"}, "dpo.f_divergence_type"),
    ({"f_divergence_type": "forward_kl", "loss_type": "bco_pair"}, "dpo.f_divergence_type"),
    ({"loss_type": "exo_pair"}, "dpo.label_smoothing"),
    ({"ld_alpha": 1.5}, "dpo.ld_alpha")])
def test_bad_dpo_options_are_one_line_errors(change, key):
  from ftjax.errors import UserError
  d = dict(loss_type="sigmoid", beta=0.1, label_smoothing=0.0, loss_weights="", ld_alpha=None,
           f_divergence_type="reverse_kl", **{})
  d.update(change)
  with pytest.raises(UserError, match=key.replace(".", r"\.")) as e:
    dpo.loss_options(d)
  assert "\n" not in str(e.value)


# ---- ORPO and CPO/SimPO: TRL's get_batch_loss_metrics on stub trainers --------------------

V = 11


def _token_rows(seed=0):
  """ids, attention masks and labels [2B, T+1] (chosen rows, then rejected) as TRL's ORPO/CPO
  collators build them, plus random logits [2B, T+1, V]."""
  rng = np.random.default_rng(seed)
  n, width = 2 * B, T + 1
  ids = rng.integers(0, V, (n, width))
  attn = np.zeros((n, width), np.int64)
  labels = np.full((n, width), -100, np.int64)
  for i in range(n):
    p = int(rng.integers(1, 4))  # prompt tokens (the pair's two rows share none here: no matter)
    length = int(rng.integers(p + 1, width + 1))
    attn[i, :length] = 1
    labels[i, p:length] = ids[i, p:length]
  logits = rng.normal(0, 1.5, (n, width, V)).astype(np.float32)
  return ids, attn, labels, logits


def _trl_pair_trainer(cls, ids, attn, labels, logits, **attrs):
  """Run `cls.get_batch_loss_metrics` (ORPO or CPO) on a stub: (loss, d loss / d logits,
  metrics)."""
  import functools
  lg = torch.tensor(logits, requires_grad=True)
  t = lambda x: torch.tensor(x)
  batch = {"chosen_input_ids": t(ids[:B]), "chosen_attention_mask": t(attn[:B]),
           "chosen_labels": t(labels[:B]), "rejected_input_ids": t(ids[B:]),
           "rejected_attention_mask": t(attn[B:]), "rejected_labels": t(labels[B:])}
  stub = SimpleNamespace(is_encoder_decoder=False, padding_value=0, pad_token_id=0,
                         aux_loss_enabled=False,
                         accelerator=SimpleNamespace(device=torch.device("cpu"),
                                                     gather_for_metrics=identity), **attrs)
  stub.concatenated_inputs, stub.get_batch_logps = cls.concatenated_inputs, cls.get_batch_logps
  stub.concatenated_forward = functools.partial(cls.concatenated_forward, stub)
  for name in ("odds_ratio_loss", "cpo_loss"):
    if hasattr(cls, name):
      setattr(stub, name, functools.partial(getattr(cls, name), stub))
  model = lambda *a, **kw: SimpleNamespace(logits=lg)
  try:
    loss, metrics = cls.get_batch_loss_metrics(stub, model, batch, "train")
  except (AttributeError, KeyError, TypeError) as e:
    pytest.fail(f"trl {trl.__version__} {cls.__name__} does not fit the stub: {e!r}")
  loss.backward()
  return float(loss.detach()), lg.grad.numpy(), {k: float(v) for k, v in metrics.items()}


def _ours_pair(fn, ids, attn, labels, logits):
  """The trainer's view of the same rows: targets = ids[1:], weights on the response labels."""
  targets = jnp.asarray(ids[:, 1:])
  seg = jnp.asarray(attn[:, 1:])
  weights = jnp.asarray((labels[:, 1:] != -100).astype(np.float32))
  valid = jnp.ones(B)

  def f(lg):
    tok = L.logprobs_from_logits(lg[:, :-1], targets) * seg
    per, aux = fn(tok, weights, seg, valid)
    return per.sum() / B, aux
  (loss, aux), g = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logits))
  return float(loss), np.asarray(g), {k: float(v) / B for k, v in aux.items()}


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_matches_trl(beta):
  from trl.experimental.orpo import ORPOTrainer
  rows = _token_rows(seed=4)
  want_loss, want_g, want_m = _trl_pair_trainer(ORPOTrainer, *rows, beta=beta)
  loss, g, m = _ours_pair(lambda tok, w, seg, valid: dpo.orpo_pair_losses(tok, w, seg, valid, beta),
                          *rows)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(g, want_g, rtol=1e-4, atol=1e-7)
  for k in METRICS + ("nll_loss", "log_odds_ratio", "log_odds_chosen"):
    np.testing.assert_allclose(m[k], want_m[k], rtol=1e-5, atol=1e-6, err_msg=k)


CPO_CASES = [dict(loss_type="sigmoid"), dict(loss_type="sigmoid", label_smoothing=0.2),
             dict(loss_type="hinge", beta=0.5), dict(loss_type="ipo"),
             dict(loss_type="simpo", cpo_alpha=0.0, simpo_gamma=0.5, beta=2.0),
             dict(loss_type="simpo", cpo_alpha=0.3), dict(loss_type="sigmoid", alpha=0.2)]


@pytest.mark.parametrize("case", CPO_CASES, ids=[str(c) for c in CPO_CASES])
def test_cpo_simpo_match_trl(case):
  from trl.experimental.cpo import CPOTrainer
  c = {**dpo.CPO_DEFAULTS, **case}
  rows = _token_rows(seed=5)
  want_loss, want_g, want_m = _trl_pair_trainer(CPOTrainer, *rows, **c)
  loss, g, m = _ours_pair(lambda tok, w, seg, valid: dpo.cpo_pair_losses(tok * w, w, valid, c),
                          *rows)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(g, want_g, rtol=1e-4, atol=1e-7)
  for k in METRICS + ("nll_loss",):
    np.testing.assert_allclose(m[k], want_m[k], rtol=1e-5, atol=1e-6, err_msg=k)


# ---- KTO: TRL's KTOTrainer._compute_loss on a stub trainer --------------------------------


def _trl_kto(pol, ref, mask, labels, k):
  """pol/ref/mask [2B, T]: rows [0, B) the examples, [B, 2B) their KL rows."""
  import functools
  from trl import KTOTrainer
  ex_lp = torch.tensor(pol[:B, 1:], requires_grad=True)
  kl_lp, ref_ex, ref_kl = (torch.tensor(x[:, 1:]) for x in (pol[B:], ref[:B], ref[B:]))
  ids, kl_ids = torch.zeros((B, T), dtype=torch.long), torch.ones((B, T), dtype=torch.long)
  batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
           "completion_mask": torch.tensor(mask[:B]).long(), "KL_input_ids": kl_ids,
           "KL_attention_mask": torch.ones_like(kl_ids),
           "KL_completion_mask": torch.tensor(mask[B:]).long(),
           "label": torch.tensor(labels.astype(bool))}
  out = lambda lp: SimpleNamespace(log_probs=lp, entropy=torch.zeros_like(lp),
                                   mean_logits=torch.zeros_like(lp))
  pick = lambda ex, kl: (lambda **kw: out(kl if kw["input_ids"] is kl_ids else ex))
  stub = SimpleNamespace(
      model=_eval_module(), ref_model=pick(ref_ex, ref_kl), aux_loss_enabled=False,
      calculate_KL=k["loss_type"] == "kto", precompute_ref_logps=False,
      accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=identity),
      args=SimpleNamespace(gradient_checkpointing_kwargs=None),
      _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1, **k)
  stub._compute_kl_logps = functools.partial(KTOTrainer._compute_kl_logps, stub)
  try:
    loss = KTOTrainer._compute_loss(stub, pick(ex_lp, kl_lp), batch, return_outputs=False)
  except (AttributeError, KeyError, TypeError) as e:
    pytest.fail(f"trl {trl.__version__} KTOTrainer._compute_loss does not fit the stub: {e!r}")
  loss.backward()
  g = np.zeros_like(pol)
  g[:B, 1:] = ex_lp.grad.numpy()
  return float(loss.detach()), g * mask, {k: v[-1] for k, v in stub._metrics["eval"].items()}


def _ours_kto(pol, ref, mask, labels, k):
  valid = jnp.ones(B)

  def f(tok):
    sums = (tok * mask).sum(-1)
    b = B
    sums = jnp.concatenate([sums[:b], jax.lax.stop_gradient(sums[b:])])
    per, aux = dpo.kto_example_losses(sums, jnp.asarray((ref * mask).sum(-1)),
                                      jnp.asarray(labels), valid, k)
    return per.sum() / B, aux
  (loss, aux), g = jax.value_and_grad(f, has_aux=True)(jnp.asarray(pol))
  m = dpo.kto_metrics({kk: float(v) / B for kk, v in aux.items()})
  return float(loss), np.asarray(g) * mask, m


KTO_CASES = [dict(loss_type="kto"), dict(loss_type="kto", beta=0.5, desirable_weight=1.33,
                                          undesirable_weight=0.7),
             dict(loss_type="apo_zero_unpaired", undesirable_weight=2.0)]


@pytest.mark.parametrize("case", KTO_CASES, ids=[str(c) for c in KTO_CASES])
@pytest.mark.parametrize("kl_sign", [1.0, -1.0])  # z0 > 0, and a negative estimate clamped to 0
def test_kto_matches_trl_trainer(case, kl_sign):
  k = {**dpo.KTO_DEFAULTS, **case}
  pol, ref, mask = _rows(seed=7)
  pol[B:] += kl_sign * 0.3 * mask[B:]  # moves the KL estimate's sign
  labels = np.array([1, 0, 1, 1, 0, 0], np.float32)
  want_loss, want_g, want_m = _trl_kto(pol, ref, mask, labels, k)
  loss, g, m = _ours_kto(pol, ref, mask, labels, k)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-7)
  assert np.abs(want_g).max() > 0
  np.testing.assert_allclose(g, want_g, rtol=1e-4, atol=1e-7)
  assert np.all(g[B:] == 0)  # the KL rows carry no gradient, as TRL's no_grad pass
  for key in ("kl",) + METRICS[:2] + ("rewards/margins", "logps/chosen", "logps/rejected"):
    np.testing.assert_allclose(m[key], want_m[key], rtol=1e-5, atol=1e-6, err_msg=key)
