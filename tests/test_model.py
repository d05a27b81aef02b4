"""Decoder internals: KV cache, packed segments, attention implementations, remat, axes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ftjax
from ftjax import model as model_lib
from tests.conftest import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_incremental_decoding_matches_full_forward(hf_models, family):
  model, params = ftjax.load_pretrained(hf_models[family][0])
  rng = np.random.default_rng(0)
  b, t = 2, 14
  tokens = rng.integers(6, 320, (b, t)).astype(np.int32)
  mask = np.ones((b, t), bool)
  mask[1, :5] = False  # left padding in row 1
  full = np.asarray(model.apply({"params": params}, tokens, mask=mask))
  # Prefill 6 tokens, then decode the rest one at a time (and a 3-token chunk).
  cache = ftjax.init_cache(model.cfg, b, t + 2)
  out, cache = model.apply({"params": params}, tokens[:, :6], mask=mask[:, :6], cache=cache)
  pieces = [np.asarray(out)]
  for i in range(6, 9):
    out, cache = model.apply({"params": params}, tokens[:, i:i + 1], mask=mask[:, i:i + 1],
                             cache=cache)
    pieces.append(np.asarray(out))
  out, cache = model.apply({"params": params}, tokens[:, 9:12], mask=mask[:, 9:12], cache=cache)
  pieces.append(np.asarray(out))
  for i in range(12, t):
    out, cache = model.apply({"params": params}, tokens[:, i:i + 1], cache=cache)
    pieces.append(np.asarray(out))
  inc = np.concatenate(pieces, axis=1)
  assert int(cache["index"]) == t
  np.testing.assert_allclose(inc[mask], full[mask], atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma"])
def test_packed_row_equals_segments_one_by_one(hf_models, family):
  model, params = ftjax.load_pretrained(hf_models[family][0])
  rng = np.random.default_rng(1)
  lengths = [5, 7, 3]
  segs = [rng.integers(6, 320, (1, n)).astype(np.int32) for n in lengths]
  pad = 2
  packed = np.concatenate(segs + [np.zeros((1, pad), np.int32)], axis=1)
  seg_ids = np.concatenate([np.full((1, n), i + 1) for i, n in enumerate(lengths)]
                           + [np.zeros((1, pad), int)], axis=1).astype(np.int32)
  mask = seg_ids > 0
  out = np.asarray(model.apply({"params": params}, packed, mask=mask, segment_ids=seg_ids))
  start = 0
  for seg in segs:
    alone = np.asarray(model.apply({"params": params}, seg))
    np.testing.assert_allclose(out[:, start:start + seg.shape[1]], alone, atol=1e-5)
    start += seg.shape[1]


def test_segment_positions():
  seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0]])
  np.testing.assert_array_equal(model_lib.segment_positions(seg), [[0, 1, 2, 0, 1, 0, 0, 1]])


def test_dot_product_attention_matches_xla(hf_models):
  path = hf_models["qwen2"][0]
  model, params = ftjax.load_pretrained(path)
  model_dp, _ = ftjax.load_pretrained(path, attention="dot_product")
  rng = np.random.default_rng(2)
  tokens = rng.integers(6, 320, (2, 9)).astype(np.int32)
  mask = np.ones((2, 9), bool)
  mask[0, :3] = False
  a = np.asarray(model.apply({"params": params}, tokens, mask=mask))
  b = np.asarray(model_dp.apply({"params": params}, tokens, mask=mask))
  np.testing.assert_allclose(a[mask], b[mask], atol=1e-5)


@pytest.mark.parametrize("remat", ["full", "dots_saveable", "dots_with_no_batch_dims_saveable"])
def test_remat_same_loss_and_grads(hf_models, remat):
  path = hf_models["llama"][0]
  model, params = ftjax.load_pretrained(path)
  model_r, _ = ftjax.load_pretrained(path, remat=remat)
  assert model_r.cfg.remat == remat
  tokens = jnp.asarray(np.random.default_rng(3).integers(6, 320, (2, 8)), jnp.int32)

  def loss(p, m):
    return m.apply({"params": p}, tokens).mean()

  ga = jax.grad(loss)(params, model)
  gb = jax.grad(loss)(params, model_r)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), ga, gb)
  # The policy reaches the lowered step: full remat recomputes the block's matmuls in the
  # backward; a policy that saves dots recomputes only the rest, so its program differs from
  # both.
  text = lambda m: jax.jit(jax.grad(loss), static_argnums=1).lower(params, m).as_text()
  plain = text(model)
  full = text(ftjax.Decoder(model.cfg.replace(remat="full"), model.spec))
  assert full.count("dot_general") > plain.count("dot_general")
  if remat != "full":
    got = text(model_r)
    assert got not in (plain, full)
    assert got.count("dot_general") < full.count("dot_general")


def test_remat_bool_and_bad_policy():
  cfg = ftjax.get_preset("tiny")
  assert cfg.replace(remat=True).remat == "full" and cfg.replace(remat=False).remat == "none"
  with pytest.raises(ValueError, match="remat"):
    cfg.replace(remat="everything")


def _recording(monkeypatch, swap_cudnn=False):
  """Wrap jax.nn.dot_product_attention: record its kwargs; run cuDNN calls with XLA (CPU)."""
  calls, real = [], jax.nn.dot_product_attention

  def wrapper(q, k, v, *args, **kw):
    calls.append(dict(kw))
    if swap_cudnn and kw.get("implementation") == "cudnn":
      kw["implementation"] = "xla"  # the XLA path honours the same seq lengths and causality
    return real(q, k, v, *args, **kw)

  monkeypatch.setattr(jax.nn, "dot_product_attention", wrapper)
  return calls


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_fused_attention_is_told_causal_and_padding(hf_models, family, monkeypatch):
  """attention=dot_product without cache, prefix or packing passes is_causal and a [B,1,1,S]
  key mask (no dense [B, T, S] mask), with the same logits as the einsum path."""
  path = hf_models[family][0]
  model, params = ftjax.load_pretrained(path)
  window = 4 if family == "mistral" else None
  model = ftjax.Decoder(model.cfg.replace(sliding_window=window), model.spec)
  model_dp = ftjax.Decoder(model.cfg.replace(attention="dot_product"), model.spec)
  rng = np.random.default_rng(5)
  tokens = rng.integers(6, 320, (3, 10)).astype(np.int32)
  mask = np.ones((3, 10), bool)
  mask[0, :3] = False  # left padding
  mask[1, 7:] = False  # right padding
  calls = _recording(monkeypatch)
  a = np.asarray(model.apply({"params": params}, tokens, mask=mask))
  assert not calls
  b = np.asarray(model_dp.apply({"params": params}, tokens, mask=mask))
  np.testing.assert_allclose(a[mask], b[mask], atol=1e-5)
  assert calls and all(c["is_causal"] and c["mask"].shape == (3, 1, 1, 10) for c in calls)
  assert all(c["local_window_size"] == ((window - 1, 0) if window else None) for c in calls)


def test_cudnn_attention_passes_lengths_not_masks(hf_models, monkeypatch):
  """attention=cudnn gives cuDNN causality and per-row lengths of right-padded rows; run through
  XLA with the same arguments here, the logits equal the einsum path's. Cached decoding (a dense
  mask) goes through the jax path instead."""
  path = hf_models["llama"][0]
  model, params = ftjax.load_pretrained(path)
  model_c, _ = ftjax.load_pretrained(path, attention="cudnn")
  rng = np.random.default_rng(6)
  tokens = rng.integers(6, 320, (3, 9)).astype(np.int32)
  mask = np.ones((3, 9), bool)
  mask[1, 5:] = False
  mask[2, 8:] = False
  calls = _recording(monkeypatch, swap_cudnn=True)
  monkeypatch.setattr(model_lib, "_has_cudnn", lambda: True)  # as on a GPU
  a = np.asarray(model.apply({"params": params}, tokens, mask=mask))
  b = np.asarray(model_c.apply({"params": params}, tokens, mask=mask))
  np.testing.assert_allclose(a[mask], b[mask], atol=1e-5)
  assert calls and all(c["implementation"] == "cudnn" and "mask" not in c for c in calls)
  np.testing.assert_array_equal(calls[0]["key_value_seq_lengths"], mask.sum(-1))
  calls.clear()
  cache = ftjax.init_cache(model_c.cfg, 3, 12)
  model_c.apply({"params": params}, tokens, mask=mask, cache=cache)
  assert calls and all("implementation" not in c and c["mask"].ndim == 4 for c in calls)


def test_init_does_not_grow_with_depth():
  """Random init by shape: under scanned layers the init program (and so its compile) is the
  same size for 4 and 32 layers."""
  def init_text(n_layers):
    model = ftjax.Decoder(ftjax.get_preset("tiny").replace(n_layers=n_layers))
    return jax.jit(model.init).lower(jax.random.PRNGKey(0),
                                     jnp.zeros((1, 8), jnp.int32)).as_text()
  small, big = len(init_text(4)), len(init_text(32))
  assert big < 1.1 * small, (small, big)


def test_sliding_window_masks_far_keys():
  cfg = ftjax.get_preset("tiny").replace(sliding_window=3)
  model = ftjax.Decoder(cfg)
  params = ftjax.init_params(model, jax.random.PRNGKey(0))
  tokens = jnp.arange(6, 14, dtype=jnp.int32)[None]
  a = model.apply({"params": params}, tokens)
  # Changing token 0 cannot reach position 7 through 2 layers of window 3 (reach 2 * 2 = 4).
  b = model.apply({"params": params}, tokens.at[0, 0].set(40))
  np.testing.assert_allclose(a[0, 7], b[0, 7], atol=1e-6)
  assert np.abs(np.asarray(a[0, 2] - b[0, 2])).max() > 1e-4


def test_every_param_has_logical_axes():
  for name in ("tiny", "tiny-gpt2"):
    model = ftjax.Decoder(ftjax.get_preset(name))
    axes = ftjax.logical_axes(model)
    shapes = jax.eval_shape(functools.partial(ftjax.init_params, model), jax.random.PRNGKey(0))
    leaves, _ = jax.tree_util.tree_flatten_with_path(shapes)
    for path, leaf in leaves:
      spec = axes
      for k in path:
        spec = spec[k.key]
      assert len(spec) == len(leaf.shape) and all(isinstance(a, str) for a in spec), (path, spec)


@pytest.mark.parametrize("name", sorted(ftjax.PRESETS))
def test_presets_param_count_matches_shapes(name):
  cfg = ftjax.get_preset(name)
  model = ftjax.Decoder(cfg)
  shapes = jax.eval_shape(lambda: ftjax.init_params(model, jax.random.PRNGKey(0)))
  n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
  assert n == cfg.num_params()


def test_known_preset_sizes():
  # Published parameter counts (the models' cards / config shapes).
  assert ftjax.get_preset("gpt2").num_params() == 124_439_808
  assert ftjax.get_preset("llama-3.2-1b").num_params() == 1_235_814_400
  assert ftjax.get_preset("llama-3.1-8b").num_params() == 8_030_261_248
  assert ftjax.get_preset("qwen2.5-0.5b").num_params() == 494_032_768


def test_bad_config_errors():
  with pytest.raises(ValueError, match="family"):
    ftjax.ModelConfig(family="falcon")
  with pytest.raises(ValueError, match="n_kv_heads"):
    ftjax.ModelConfig(n_heads=4, n_kv_heads=3)
  with pytest.raises(ValueError, match="unknown model preset 'llama-9b'"):
    ftjax.get_preset("llama-9b")
