"""Heads over hidden states and chunked token log-probs: parity with torch, chunked ==
unchunked (value and gradient), and the memory a chunked train step saves."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ftjax
from ftjax import heads, losses, model as model_lib, partition
from ftjax.config import ModelConfig
from ftjax.train import common, dpo, sft
from tests.conftest import BASE_SEQ


def _hidden_head(seed=0, b=3, t=13, d=8, v=37):
  rng = np.random.default_rng(seed)
  hidden = rng.normal(size=(b, t, d)).astype(np.float32)
  w = rng.normal(size=(d, v)).astype(np.float32)
  targets = rng.integers(0, v, (b, t)).astype(np.int32)
  mask = rng.random((b, t)) < 0.7
  return hidden, w, targets, mask


def _lp(hidden, w, targets, mask, chunk):
  head = lambda h: jnp.einsum("BCD,DV->BCV", h, w, preferred_element_type=jnp.float32)
  return losses.token_logprobs(hidden, head, targets, mask, chunk=chunk)


@pytest.mark.parametrize("chunk", [0, 4, 5, 13, 64])
def test_token_logprobs_match_torch_cross_entropy(chunk):
  """Value and gradient (w.r.t. hidden and head) against torch's cross-entropy."""
  torch = pytest.importorskip("torch")
  hidden, w, targets, mask = _hidden_head()
  h_t = torch.tensor(hidden, dtype=torch.float64, requires_grad=True)
  w_t = torch.tensor(w, dtype=torch.float64, requires_grad=True)
  labels = torch.tensor(np.where(mask, targets, -100), dtype=torch.long)
  nll = torch.nn.functional.cross_entropy((h_t @ w_t).flatten(0, 1), labels.flatten(),
                                          ignore_index=-100, reduction="none")
  nll.sum().backward()
  want = -nll.detach().numpy().reshape(targets.shape)

  got = _lp(jnp.asarray(hidden), jnp.asarray(w), jnp.asarray(targets), jnp.asarray(mask), chunk)
  assert got.shape == targets.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  g_h, g_w = jax.grad(lambda h, w: -_lp(h, w, targets, mask, chunk).sum(), argnums=(0, 1))(
      jnp.asarray(hidden), jnp.asarray(w))
  np.testing.assert_allclose(np.asarray(g_h), h_t.grad.numpy(), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(g_w), w_t.grad.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 3, 4, 7])
def test_chunked_equals_unchunked(chunk):
  hidden, w, targets, mask = map(jnp.asarray, _hidden_head(seed=1))
  weights = mask.astype(jnp.float32) * 0.5
  f = lambda h, w, c: losses.sft_loss(_lp(h, w, targets, mask, c), weights)[0]
  full, full_g = jax.value_and_grad(f, argnums=(0, 1))(hidden, w, 0)
  part, part_g = jax.jit(jax.value_and_grad(f, argnums=(0, 1)), static_argnums=2)(
      hidden, w, chunk)
  np.testing.assert_allclose(float(part), float(full), rtol=1e-5)
  for a, b in zip(part_g, full_g):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pad,eos", [(0, 2), (2, 2)])
def test_sequence_score_equals_transformers_classifier(tmp_path, pad, eos):
  """`heads.sequence_score`, the one readout of the reward trainer, PPO and
  `rewards.reward_model`, against LlamaForSequenceClassification on rows padded right (reward
  batches) and left + right (PPO's prompt + completion), pad == eos included."""
  torch = pytest.importorskip("torch")
  import transformers
  from tests.conftest import hf_config
  cfg = hf_config("llama")
  cfg.update(dict(eos_token_id=eos, pad_token_id=pad, num_labels=1))
  torch.manual_seed(0)
  src = transformers.LlamaForSequenceClassification(cfg).eval()
  with torch.no_grad():
    src.score.weight.normal_(0.0, 1.0)
  src.save_pretrained(str(tmp_path))
  model, params = ftjax.load_pretrained(str(tmp_path))
  rng = np.random.default_rng(0)
  t = 12
  tokens = np.full((4, t), pad, np.int64)
  mask = np.zeros((4, t), bool)
  for i, (start, n) in enumerate([(0, 12), (0, 7), (3, 6), (2, 4)]):  # (left pad, length)
    tokens[i, start:start + n] = rng.integers(6, 320, n)
    mask[i, start:start + n] = True
  tokens[1, 6] = tokens[2, 8] = eos  # a trailing EOS: with pad == eos HF reads the token before
  tokens[3, 3] = eos  # and one mid-row
  hidden = model.apply({"params": params}, jnp.asarray(tokens, jnp.int32), mask=jnp.asarray(mask),
                       return_hidden=True)
  got = jax.jit(heads.sequence_score, static_argnums=4)(
      params, hidden, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask), model.cfg)
  assert got.shape == (4,) and got.dtype == jnp.float32
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)  # ftjax's positions under a mask
  with torch.no_grad():
    want = src(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)),
               position_ids=torch.tensor(pos)).logits[:, 0].numpy()
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)
  read = np.asarray(heads.score_index(jnp.asarray(tokens), jnp.asarray(mask), pad))
  last = [11, 6, 8, 5]
  assert list(read) == ([x - 1 if tokens[i, x] == eos else x for i, x in enumerate(last)]
                        if pad == eos else last)


@pytest.mark.parametrize("tie,head", [(False, "lm"), (True, "lm"), (False, "score")])
def test_hidden_then_head_equals_apply(tie, head):
  cfg = ModelConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                    head_dim=8, mlp_dim=32, tie_embeddings=tie, head=head)
  model = model_lib.Decoder(cfg)
  params = model_lib.init_params(model, jax.random.PRNGKey(0))
  if head == "score":  # zero-initialised; make it read something
    params["score"] = jax.random.normal(jax.random.PRNGKey(1), params["score"].shape)
  tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 7), 0, 50)
  out = model.apply({"params": params}, tokens)
  hidden = model.apply({"params": params}, tokens, return_hidden=True)
  assert hidden.shape == (2, 7, 16)
  fn = heads.score if head == "score" else heads.lm_logits
  np.testing.assert_array_equal(np.asarray(fn(params, hidden, cfg)), np.asarray(out))
  # The value head shares the trunk: zero at init, a [B, T] float32 per position.
  params = {**params, **heads.init_value(cfg)}
  v = heads.value(params, hidden, cfg)
  assert v.shape == (2, 7) and v.dtype == jnp.float32 and not np.asarray(v).any()
  np.testing.assert_array_equal(np.asarray(model.apply({"params": params}, tokens)),
                                np.asarray(out))  # an extra head does not disturb apply


def _sft_setup(cfg, t, b=1, opt="adamw"):
  model = model_lib.Decoder(cfg)
  params = model_lib.init_params(model, jax.random.PRNGKey(0))
  trainable, frozen, _ = common.split_params(params, partition.rules_for("full"))
  schedule = optax.constant_schedule(1e-3)
  tx = common.make_optimizer(opt, schedule, b1=0.0 if opt == "sgd" else 0.9)
  state = common.init_state(trainable, tx, 0)
  rng = np.random.default_rng(0)
  batch = {"inputs": jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)), jnp.int32),
           "targets": jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)), jnp.int32),
           "weights": jnp.asarray(rng.random((b, t)) < 0.8, jnp.float32)}
  return model, tx, schedule, state, frozen, batch


def test_sft_step_chunked_equals_unchunked():
  cfg = ModelConfig(vocab_size=300, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1,
                    head_dim=16, mlp_dim=64)
  # Plain SGD: the update is the gradient itself (Adam would magnify rounding in tiny grads).
  model, tx, schedule, state, frozen, batch = _sft_setup(cfg, 40, b=2, opt="sgd")
  out = {}
  for chunk in (0, 16):
    step = jax.jit(sft.make_step(model, tx, schedule, chunk=chunk))
    out[chunk] = jax.device_get(step(state, frozen, batch))
  for k in ("loss", "grad_norm", "update_norm", "param_norm"):
    np.testing.assert_allclose(out[16][1][k], out[0][1][k], rtol=1e-5, err_msg=k)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8),
                         out[16][0]["params"], out[0][0]["params"])


def test_chunked_logprobs_cut_step_memory_by_the_logits():
  """V = 32k, T = 1024: the compiled train step's temporaries drop by at least the
  [B, T, V] float32 logits once the LM head runs in chunks of T."""
  b, t, v = 1, 1024, 32000
  cfg = ModelConfig(vocab_size=v, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                    head_dim=8, mlp_dim=32)
  model, tx, schedule, state, frozen, batch = _sft_setup(cfg, t, b)
  temp = {}
  for chunk in (0, 128):
    step = jax.jit(sft.make_step(model, tx, schedule, chunk=chunk))
    mem = step.lower(state, frozen, batch).compile().memory_analysis()
    if mem is None:
      pytest.skip("this backend reports no memory analysis")
    temp[chunk] = mem.temp_size_in_bytes
  logits_bytes = b * t * v * 4
  assert temp[0] - temp[128] >= logits_bytes, (temp, logits_bytes)


def test_dpo_side_logps_chunked(base_dir, pref_files):
  from ftjax.data import preference as pref_data
  model, params = ftjax.load_pretrained(base_dir)
  tok = ftjax.tokenizer.load_tokenizer(base_dir)
  data = pref_data.build_preference_dataset({"sources": [{"path": pref_files[0]}],
                                             "format": "chat"}, tok, BASE_SEQ, 2)
  batch = next(data.train)
  # Reference: HF's log-softmax over the transformers model's own logits.
  torch = pytest.importorskip("torch")
  import transformers
  hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
  seg = np.asarray(batch["segment_ids"])
  with torch.no_grad():
    logits = hf(input_ids=torch.tensor(np.asarray(batch["inputs"]), dtype=torch.long),
                attention_mask=torch.tensor((seg > 0).astype(np.int64))).logits
  lp = torch.log_softmax(logits.double(), -1).gather(
      -1, torch.tensor(np.asarray(batch["targets"]), dtype=torch.long)[..., None])[..., 0]
  want = (lp.numpy() * np.asarray(batch["weights"])).sum(-1)
  for chunk in (0, 64, 100):
    sums, _ = dpo.side_logps(model, params, batch, chunk=chunk)
    np.testing.assert_allclose(np.asarray(sums), want, rtol=1e-4, atol=1e-3)
