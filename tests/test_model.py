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


def test_remat_same_loss_and_grads(hf_models):
  path = hf_models["llama"][0]
  model, params = ftjax.load_pretrained(path)
  model_r, _ = ftjax.load_pretrained(path, remat=True)
  tokens = jnp.asarray(np.random.default_rng(3).integers(6, 320, (2, 8)), jnp.int32)

  def loss(p, m):
    return m.apply({"params": p}, tokens).mean()

  ga = jax.grad(loss)(params, model)
  gb = jax.grad(loss)(params, model_r)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), ga, gb)


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
