"""4-bit quantization: NF4 against bitsandbytes' published codebook, block layout and (if
installed) its quantize_4bit and transformers' BitsAndBytesConfig models; int4; double quant;
round-trip errors; the custom-VJP matmul; training memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import quant
from ftjax.errors import UserError

# bitsandbytes functional.py get_4bit_type("nf4") / QLoRA (Dettmers et al. 2023) appendix E, as
# published. The source prints 0.7229568362236023 for code 14; 0.7229568362236328, as some copies
# of the paper's table read, is the same float32.
BNB_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


def gaussian(shape, seed=0, std=0.02):
  return (np.random.default_rng(seed).standard_normal(shape) * std).astype(np.float32)


def rel_rms(approx, exact):
  approx, exact = np.asarray(approx, np.float64), np.asarray(exact, np.float64)
  return float(np.sqrt(np.mean((approx - exact) ** 2) / np.mean(exact ** 2)))


def test_nf4_codebook_is_bitsandbytes():
  assert quant.NF4_CODEBOOK.dtype == np.float32
  np.testing.assert_array_equal(quant.NF4_CODEBOOK, np.array(BNB_NF4, np.float32))
  assert np.float32(0.7229568362236328) == quant.NF4_CODEBOOK[14]
  # The thresholds of bitsandbytes' dQuantizeNF4 decision tree are these float32 midpoints.
  tree = [-0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
          -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
          0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
          0.5016634166240692, 0.6427869200706482, 0.8614784181118011]
  np.testing.assert_array_equal(quant._midpoints(quant.NF4_CODEBOOK), np.array(tree, np.float32))


def test_dynamic_map_shape():
  m = quant.DYNAMIC_MAP
  assert m.shape == (256,) and m.dtype == np.float32
  assert np.all(np.diff(m) > 0)  # sorted, no duplicates, so searchsorted is nearest-value
  assert m[-1] == 1.0 and m[127] == 0.0 and m[0] == pytest.approx(-0.99296875, abs=1e-7)
  np.testing.assert_array_equal(m[128:255], -m[126::-1])  # symmetric but for the extra 1.0


@pytest.mark.parametrize("kind", ["nf4", "int4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_round_trip_error(kind, double_quant):
  w = gaussian((256, 512))
  cfg = quant.QuantConfig(kind, block_size=64, double_quant=double_quant)
  q = quant.quantize(w, cfg)
  assert all(isinstance(v, jax.Array) for v in q.values())
  d = quant.dequantize(q, cfg, w.shape, jnp.float32)
  assert d.shape == w.shape and d.dtype == jnp.float32
  # Measured (seed 0, blocks of 64): nf4 0.0921 (0.0922 with double quant), int4 0.1083. For
  # int4 the uniform-error estimate is (E absmax / 7) / sqrt(12) ~ (2.5 sigma / 7) / 3.46 ~ 0.10.
  bound = {"nf4": 0.10, "int4": 0.12}[kind]
  assert rel_rms(d, w) < bound


def test_nf4_beats_int4_at_same_block_size():
  w = gaussian((256, 512), seed=1)
  errs = {}
  for kind in ("nf4", "int4"):
    cfg = quant.QuantConfig(kind, block_size=64, double_quant=False)
    errs[kind] = rel_rms(quant.dequantize(quant.quantize(w, cfg), cfg, w.shape), w)
  assert errs["nf4"] < 0.9 * errs["int4"], errs  # measured 0.092 vs 0.108


def test_double_quant_absmax_and_bytes():
  w = gaussian((256, 512), seed=2)
  cfg = quant.QuantConfig("nf4", block_size=64, double_quant=True)
  q = quant.quantize(w, cfg)
  n = w.size
  # [in, out] kernel: codes [in / 2, out]; one scale per 64 inputs of each output column.
  assert q["codes"].shape == (128, 512) and q["codes"].dtype == jnp.uint8
  assert q["scale_codes"].shape == (4, 512) and q["scale_codes"].dtype == jnp.uint8
  assert q["scale_absmax"].shape == (n // 64 // 256,) and q["scale_absmax"].dtype == jnp.float32
  assert q["scale_offset"].shape == () and q["scale_offset"].dtype == jnp.float32

  true = np.abs(w.reshape(4, 64, 512)).max(1)
  approx = np.asarray(quant._dequantize_scales(q))
  # Nearest-value error is at most half the widest map gap (1.0 - 0.99296875 at the top) times
  # the 256-block's absmax of (absmax - offset). bitsandbytes' 256-blocks run over the scales of
  # output row 0 first: here 4 scales a row, so a block covers 64 output columns.
  nested = np.asarray(q["scale_absmax"])[np.arange(512)[None, :] // 64].repeat(4, 0)
  assert np.all(np.abs(approx - true) <= 0.5 * 0.0140625 * nested + 1e-7)
  rel = np.abs(approx - true) / true
  assert rel.max() < 0.015 and rel.mean() < 0.004  # measured max 0.0078, mean 0.0017

  bpp = quant.bytes_per_param(q, n)
  assert bpp == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256) + 4 / n)
  assert bpp <= 0.53
  plain = quant.quantize(w, quant.QuantConfig("nf4", 64, double_quant=False))
  assert quant.bytes_per_param(plain, n) == pytest.approx(0.5 + 4 / 64)


def test_double_quant_partial_nested_block():
  # 32 * 64 / 64 = 32 scales: fewer than one nested block of 256. in = 32 < 64: a block spans
  # two output columns, as bitsandbytes' flat blocks span two rows of the [out, in] weight.
  w = gaussian((32, 64), seed=3)
  cfg = quant.QuantConfig("nf4", 64, double_quant=True)
  q = quant.quantize(w, cfg)
  assert q["scale_codes"].shape == (1, 32) and q["scale_absmax"].shape == (1,)
  assert rel_rms(quant.dequantize(q, cfg, w.shape), w) < 0.12


def test_nibble_order_matches_bitsandbytes():
  # Codes 0, 1, ..., 15 repeated: bitsandbytes puts element 2i in the high nibble.
  # One output column of 64 inputs ([64, 1] kernel = a [1, 64] weight row).
  codes = np.tile(np.arange(16), 4)
  w = (quant.NF4_CODEBOOK[codes] * np.float32(0.5))[:, None]
  cfg = quant.QuantConfig("nf4", 64, double_quant=False)
  q = quant.quantize(w, cfg)
  np.testing.assert_array_equal(
      np.asarray(q["codes"])[:, 0],
      np.tile(np.array([0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF], np.uint8), 4))
  np.testing.assert_array_equal(np.asarray(q["scale"]), [[0.5]])


def test_nf4_codebook_values_round_trip_exactly():
  rng = np.random.default_rng(4)
  absmax = np.array([0.037, 1.3, 2.0 ** -7, 0.0912], np.float32)
  codes = rng.integers(0, 16, (4, 64))
  codes[:, 0] = rng.choice([0, 15], 4)  # each block holds +-1, so its absmax is exact
  w = (quant.NF4_CODEBOOK[codes] * absmax[:, None]).T  # [in 64, out 4]: a block per column
  cfg = quant.QuantConfig("nf4", 64, double_quant=False)
  q = quant.quantize(w, cfg)
  np.testing.assert_array_equal(np.asarray(q["scale"]), absmax[None, :])
  np.testing.assert_array_equal(np.asarray(q["codes"]), (codes[:, 0::2] * 16 + codes[:, 1::2]).T)
  np.testing.assert_array_equal(np.asarray(quant.dequantize(q, cfg, w.shape)), w)


def test_int4_values_round_trip_exactly():
  rng = np.random.default_rng(5)
  scale = np.float32(2.0 ** -6)
  ints = rng.integers(-7, 8, (2, 128))
  ints[:, 3] = 7
  w = (ints * scale).astype(np.float32).T  # [in 128, out 2]
  cfg = quant.QuantConfig("int4", block_size=128, double_quant=False)
  q = quant.quantize(w, cfg)
  assert q["codes"].dtype == jnp.int4 and q["codes"].shape == (128, 2)
  np.testing.assert_array_equal(np.asarray(q["codes"]).astype(np.int8), ints.T)
  np.testing.assert_array_equal(np.asarray(quant.dequantize(q, cfg, w.shape)), w)
  assert quant.bytes_per_param(q, w.size) == pytest.approx(0.5 + 4 / 128)


def test_int4_bf16_scales():
  w = gaussian((64, 128), seed=6)
  cfg = quant.QuantConfig("int4", block_size=64, double_quant=False, scale_dtype="bfloat16")
  q = quant.quantize(w, cfg)
  assert q["scale"].dtype == jnp.bfloat16
  assert np.abs(np.asarray(q["codes"]).astype(np.int8)).max() <= 7
  assert rel_rms(quant.dequantize(q, cfg, w.shape), w) < 0.12
  assert quant.bytes_per_param(q, w.size) == pytest.approx(0.5 + 2 / 64)


def test_bad_shapes_and_configs():
  # NF4 packs two inputs a byte: an odd `in` would put a byte across two rows. One line, for
  # the CLI.
  with pytest.raises(UserError, match=r"^cannot quantize a kernel of shape \(3, 20\) to nf4: "
                                      r"[^\n]*in = 3 is odd"):
    quant.quantize(np.zeros((3, 20), np.float32), quant.QuantConfig())
  with pytest.raises(UserError, match=r"shape \(64,\)"):
    quant.quantize(np.zeros((64,), np.float32), quant.QuantConfig())
  # int4 packs nothing: the odd `in` takes the flat layout, codes in weight orientation.
  w = gaussian((3, 20), seed=15)
  cfg = quant.QuantConfig("int4", 64, double_quant=False)
  q = quant.quantize(w, cfg)
  assert quant.is_flat(q) and q["codes"].shape == (20, 3) and q["scale"].shape == (1,)
  np.testing.assert_array_equal(np.asarray(q["scale"]), np.abs(w).max() / np.float32(7))
  assert rel_rms(quant.dequantize(q, cfg), w) < 0.12
  with pytest.raises(ValueError, match="kind"):
    quant.QuantConfig(kind="fp4")
  with pytest.raises(ValueError, match="block_size"):
    quant.QuantConfig(block_size=63)


@pytest.mark.parametrize("kind", ["nf4", "int4"])
@pytest.mark.parametrize("shape", [(128, 192), (80, 192)])  # 2-D blocks; flat blocks
def test_jit_dequantize_and_matmul(kind, shape):
  w = gaussian(shape, seed=7)
  cfg = quant.QuantConfig(kind, block_size=64, double_quant=True)
  q = quant.quantize(w, cfg)
  eager = quant.dequantize(q, cfg, w.shape, jnp.float32)
  jitted = jax.jit(quant.dequantize, static_argnums=(1, 2, 3))(q, cfg, w.shape, jnp.float32)
  # XLA may contract code * absmax + offset into one FMA: equal up to an ulp.
  np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-6, atol=1e-9)

  x = np.random.default_rng(8).standard_normal((2, 5, shape[0])).astype(np.float32)
  y = jax.jit(quant.matmul, static_argnums=(2, 3))(x, q, cfg, jnp.float32)
  assert y.shape == (2, 5, 192) and y.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y), np.asarray(x @ eager), rtol=1e-5, atol=1e-5)
  y16 = quant.matmul(x, q, cfg, jnp.bfloat16)
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y16, np.float32), np.asarray(x @ eager), atol=0.03)


def test_matmul_vjp_keeps_no_dense_kernel():
  """The gradient to x is dy @ W^T with W dequantized again; the pullback holds only q."""
  w = gaussian((128, 192), seed=10)
  cfg = quant.QuantConfig("nf4", 64, double_quant=True)
  q = quant.quantize(w, cfg)
  x = np.random.default_rng(11).standard_normal((3, 128)).astype(np.float32)
  dy = np.random.default_rng(12).standard_normal((3, 192)).astype(np.float32)
  dense = np.asarray(quant.dequantize(q, cfg))

  y, pullback = jax.vjp(lambda x: quant.matmul(x, q, cfg, jnp.float32), x)
  (dx,) = pullback(dy)
  np.testing.assert_allclose(np.asarray(dx), dy @ dense.T, rtol=1e-5, atol=1e-5)
  big = lambda f: [r.shape for r in jax.tree_util.tree_leaves(f)  # noqa: E731
                   if jnp.issubdtype(r.dtype, jnp.floating) and r.size >= w.size]
  assert big(pullback) == []
  # Plain autodiff of dequantize-then-einsum keeps the [in, out] float kernel as a residual.
  _, plain = jax.vjp(lambda x: x @ quant.dequantize(q, cfg), x)
  assert (128, 192) in big(plain)


@pytest.mark.parametrize("kind", ["nf4", "int4"])
@pytest.mark.parametrize("shape", [(128, 64), (144, 80)])  # 2-D blocks; flat blocks
def test_leading_dims_quantize_each_matrix(kind, shape):
  """Stacked [L, in, out] kernels (scanned layers): each matrix as if quantized alone."""
  w = gaussian((3, *shape), seed=13)
  cfg = quant.QuantConfig(kind, 64, double_quant=True)
  q = quant.quantize(w, cfg)
  assert q["scale_offset"].shape == (3,)
  d = np.asarray(quant.dequantize(q, cfg))
  for i in range(3):
    qi = quant.quantize(w[i], cfg)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(
        np.asarray(a, np.float32), np.asarray(b, np.float32)), {k: v[i] for k, v in q.items()}, qi)
    np.testing.assert_allclose(d[i], np.asarray(quant.dequantize(qi, cfg)), rtol=1e-6, atol=1e-9)


def _bnb_layout(p, st, out, n_in, bs=64):
  """bitsandbytes' flat packed codes and absmax of an [out, in] weight, in ftjax's 2-D layout."""
  bi, bo = (bs, 1) if n_in % bs == 0 else (n_in, bs // n_in)
  codes = p.numpy().reshape(out, n_in // 2).T
  absmax = st.absmax.numpy().reshape(out // bo, n_in // bi).T
  return codes, absmax


def _bnb_dequantize(F, p, st):
  """bitsandbytes' dequantize_4bit of (p, st): codebook[code] * absmax of each flat block, as its
  CUDA kernel and generic backend compute it. Its CPU kernel (0.50) blocks each row of the
  [out, in] weight on its own, so where in % blocksize != 0 it does not invert its own
  quantize_4bit (max error 0.021 on in = 32, 0.039 on in = 80, vs 0.009, on std 0.02 data):
  there bitsandbytes' generic backend computes it."""
  import torch
  if st.shape[-1] % st.blocksize == 0:
    return F.dequantize_4bit(p, st).numpy()
  from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
  from bitsandbytes.backends.utils import _get_4bit_code
  absmax = st.absmax
  if st.nested:  # as F.dequantize_4bit does
    absmax = F.dequantize_blockwise(st.absmax, st.state2) + st.offset
  code = _get_4bit_code(st.quant_type, p.device)
  return _dequantize_4bit_compute(p.view(torch.uint8).reshape(-1), absmax.float(), code,
                                  st.blocksize, st.shape, torch.float32).numpy()


@pytest.mark.parametrize("out,n_in", [(384, 256), (128, 32)])  # blocks in a row; over 2 rows
def test_bitsandbytes_parity(out, n_in):
  """The kernel [in, out] = weight.T quantizes to bitsandbytes' quantize_4bit(weight), bit for
  bit (transposed into the kernel's orientation), and dequantizes to its dequantize_4bit."""
  F = pytest.importorskip("bitsandbytes.functional")
  import torch

  np.testing.assert_array_max_ulp(
      quant.DYNAMIC_MAP, F.create_dynamic_map(signed=True).numpy(), maxulp=1)  # exact on AVX512
  weight = gaussian((out, n_in), seed=9)  # torch layout [out, in]
  t = torch.from_numpy(weight)
  kernel = weight.T

  p, st = F.quantize_4bit(t, blocksize=64, quant_type="nf4", compress_statistics=False)
  cfg = quant.QuantConfig("nf4", 64, double_quant=False)
  q = quant.quantize(kernel, cfg)
  codes, absmax = _bnb_layout(p, st, out, n_in)
  np.testing.assert_array_equal(np.asarray(q["codes"]), codes)
  np.testing.assert_array_equal(np.asarray(q["scale"]), absmax)
  np.testing.assert_array_equal(np.asarray(quant.dequantize(q, cfg)),
                                _bnb_dequantize(F, p, st).T)
  # int4 uses the same blocks: its scales are bitsandbytes' absmax / 7.
  q4 = quant.quantize(kernel, quant.QuantConfig("int4", 64, double_quant=False))
  np.testing.assert_allclose(np.asarray(q4["scale"]), absmax / 7, rtol=1e-6)

  p2, st2 = F.quantize_4bit(t, blocksize=64, quant_type="nf4", compress_statistics=True)
  cfg = quant.QuantConfig("nf4", 64, double_quant=True)
  q2 = quant.quantize(kernel, cfg)
  codes2, scale_codes = _bnb_layout(p2, st2, out, n_in)
  np.testing.assert_array_equal(np.asarray(q2["codes"]), codes2)
  np.testing.assert_allclose(float(q2["scale_offset"]), st2.offset.item(), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(q2["scale_absmax"]), st2.state2.absmax.numpy(), rtol=1e-6)
  # Nested 8-bit codes: the offset (a float32 mean) may differ by an ulp in summation order,
  # and bnb's CPU binary search is not always nearest for |x| < 1e-4, so a few codes move by
  # one step (measured: 0-6 of 2048).
  ours, theirs = np.asarray(q2["scale_codes"], np.int32), scale_codes.astype(np.int32)
  assert np.abs(ours - theirs).max() <= 1 and np.mean(ours != theirs) < 0.01

  # Our dequantize reads bitsandbytes' arrays as-is and reproduces its dequantize_4bit.
  bnb_q = {"codes": codes2, "scale_codes": scale_codes,
           "scale_absmax": st2.state2.absmax.numpy(), "scale_offset": st2.offset.numpy()}
  np.testing.assert_allclose(np.asarray(quant.dequantize(bnb_q, cfg)),
                             _bnb_dequantize(F, p2, st2).T, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("out,n_in", [(144, 80), (80, 144), (10, 90)])
def test_bitsandbytes_parity_flat(out, n_in):
  """Where a 64-block ends mid-row of the [out, in] weight (in = 80, 144; 10 x 90 also has a
  partial last block), the flat layout holds bitsandbytes' quantize_4bit arrays as they are,
  bit for bit, and dequantizes to its dequantize_4bit."""
  F = pytest.importorskip("bitsandbytes.functional")
  import torch

  weight = gaussian((out, n_in), seed=14)
  t = torch.from_numpy(weight)
  p, st = F.quantize_4bit(t, blocksize=64, quant_type="nf4", compress_statistics=False)
  cfg = quant.QuantConfig("nf4", 64, double_quant=False)
  q = quant.quantize(weight.T, cfg)
  assert quant.is_flat(q) and quant.kernel_shape(q, cfg) == (n_in, out)
  np.testing.assert_array_equal(np.asarray(q["codes"]), p.numpy().reshape(out, n_in // 2))
  np.testing.assert_array_equal(np.asarray(q["scale"]), st.absmax.numpy())
  np.testing.assert_array_equal(np.asarray(quant.dequantize(q, cfg)), _bnb_dequantize(F, p, st).T)
  # Flat blocks follow no kernel axis: every array is replicated.
  assert quant.logical_names(q, ("embed", "mlp")) == {"codes": (None, None), "scale": (None,)}
  q4 = quant.quantize(weight.T, quant.QuantConfig("int4", 64, double_quant=False))
  np.testing.assert_allclose(np.asarray(q4["scale"]), st.absmax.numpy() / 7, rtol=1e-6)

  p2, st2 = F.quantize_4bit(t, blocksize=64, quant_type="nf4", compress_statistics=True)
  cfg = quant.QuantConfig("nf4", 64, double_quant=True)
  q2 = quant.quantize(weight.T, cfg)
  np.testing.assert_array_equal(np.asarray(q2["codes"]), p2.numpy().reshape(out, n_in // 2))
  np.testing.assert_allclose(float(q2["scale_offset"]), st2.offset.item(), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(q2["scale_absmax"]), st2.state2.absmax.numpy(), rtol=1e-6)
  # As in test_bitsandbytes_parity, a nested code may move one step (measured: none here).
  ours, theirs = np.asarray(q2["scale_codes"], np.int32), st2.absmax.numpy().astype(np.int32)
  assert ours.shape == theirs.shape and np.abs(ours - theirs).max() <= 1
  bnb_q = {"codes": p2.numpy().reshape(out, n_in // 2), "scale_codes": st2.absmax.numpy(),
           "scale_absmax": st2.state2.absmax.numpy(), "scale_offset": st2.offset.numpy()}
  np.testing.assert_allclose(np.asarray(quant.dequantize(bnb_q, cfg)),
                             _bnb_dequantize(F, p2, st2).T, rtol=1e-6, atol=1e-9)


@pytest.fixture(scope="module")
def llama64(tmp_path_factory):
  """A tiny HF Llama whose inputs (64, 128) are whole multiples of the 64-blocks."""
  import torch
  import transformers as T
  torch.manual_seed(0)
  cfg = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=320,
                      initializer_range=0.2, bos_token_id=None, eos_token_id=None,
                      pad_token_id=None)
  d = str(tmp_path_factory.mktemp("llama64"))
  T.AutoModelForCausalLM.from_config(cfg).eval().save_pretrained(d)
  return d


@pytest.fixture(scope="module")
def llama80(tmp_path_factory):
  """A tiny HF Llama whose inputs (80, 144) neither fill nor divide the 64-blocks: every 4-bit
  kernel takes the flat layout."""
  import torch
  import transformers as T
  torch.manual_seed(0)
  cfg = T.LlamaConfig(hidden_size=80, intermediate_size=144, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=320,
                      initializer_range=0.2, bos_token_id=None, eos_token_id=None,
                      pad_token_id=None)
  d = str(tmp_path_factory.mktemp("llama80"))
  T.AutoModelForCausalLM.from_config(cfg).eval().save_pretrained(d)
  return d


def _bnb_reference(path, double_quant):
  """(transformers' BitsAndBytesConfig nf4 model, the float model on bitsandbytes' dequantized
  weights of it, their number)."""
  F = pytest.importorskip("bitsandbytes.functional")
  import torch
  import transformers as T
  bnb_cfg = T.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                 bnb_4bit_use_double_quant=double_quant,
                                 bnb_4bit_compute_dtype=torch.float32)
  ref = T.AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_cfg,
                                               device_map="cpu", dtype=torch.float32).eval()
  # bitsandbytes 0.50's CPU Linear4bit forward is not an exact float32 x @ W^T (1.7e-2 off on a
  # q_proj, logits up to 0.19 off), so the logits reference is the float model on bitsandbytes'
  # own dequantized weights.
  exact = T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  weights = {}
  for name, module in ref.named_modules():
    if hasattr(getattr(module, "weight", None), "quant_state"):
      w = _bnb_dequantize(F, module.weight.data, module.weight.quant_state)
      exact.get_submodule(name).weight.data = torch.from_numpy(w)
      weights[name + ".weight"] = (w, module.weight.quant_state)
  return exact, weights


@pytest.mark.parametrize("llama", ["llama64", "llama80"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_model_matches_transformers_bitsandbytes(request, llama, double_quant):
  """load_pretrained(quant=nf4) gives BitsAndBytesConfig(load_in_4bit, nf4)'s base: the same
  dequantized weights (double quant: up to bitsandbytes' one-step nested rounding) and logits;
  with 2-D blocks (llama64) and flat ones (llama80)."""
  import torch

  import ftjax
  from ftjax import hf as hf_lib
  from ftjax import model as model_lib

  path = request.getfixturevalue(llama)
  exact, weights = _bnb_reference(path, double_quant)
  cfg = quant.QuantConfig("nf4", 64, double_quant=double_quant)
  model, params = ftjax.load_pretrained(path, quant=cfg)
  assert quant.is_flat(params["layers"]["mlp"]["down_proj"]["kernel"]) == (llama == "llama80")
  if llama == "llama80" and not double_quant:
    # Replicated: the flat blocks follow no kernel axis. Loaded straight into the shards of a
    # tensor-parallel mesh, the kernel's arrays are whole on every device; same params.
    names = model_lib.logical_axes(model)["layers"]["attn"]["q_proj"]["kernel"]
    assert tuple(names["codes"]) == ("layers", None, None)
    from ftjax import sharding
    _, sharded = ftjax.load_pretrained(path, quant=cfg, mesh=sharding.make_mesh("fsdp=4,tensor=2"))
    q_proj = sharded["layers"]["attn"]["q_proj"]["kernel"]
    assert all(a is None for a in q_proj["codes"].sharding.spec)
    assert q_proj["codes"].addressable_shards[0].data.shape == (2, 80, 40)
    assert tuple(sharded["embed"].sharding.spec) == ("tensor", "fsdp")  # the rest still shards
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a),
                                                                      np.asarray(b)),
                           params, sharded)
  plain, dense = ftjax.merge(model, params)  # every 4-bit kernel dequantized, nothing else
  n_quantized = 0
  for name, ours in hf_lib.hf_tensors(plain.cfg, dense):
    if name not in weights:
      continue
    n_quantized += 1
    theirs, state = weights[name]
    if not double_quant:
      np.testing.assert_array_equal(ours, theirs, err_msg=name)
    else:
      # A nested code one step off moves a block scale by at most one dynamic-map step (0.0140625
      # at the top) times its 256-block's absmax.
      step = 0.0140625 * float(state.state2.absmax.max())
      assert np.abs(ours - theirs).max() <= step, name
      # The rest differ by ulps (the float32 offset's summation order, FMA).
      assert np.mean(np.isclose(ours, theirs, rtol=1e-6, atol=1e-9)) > 0.95, name
  assert n_quantized == len(weights) == 2 * 7

  tokens = np.random.default_rng(0).integers(0, 320, (2, 11))
  with torch.no_grad():
    want = exact(torch.from_numpy(tokens)).logits.numpy()
  got = np.asarray(model.apply({"params": params}, tokens))
  # Double quant: the few block scales one nested step off move logits by up to 3.3e-4.
  np.testing.assert_allclose(got, want, atol=1e-3 if double_quant else 1e-4, rtol=0)
  # The 4-bit forward is the dense forward on the dequantized kernels, up to float32 rounding
  # (measured 1.1e-5 on logits of up to 3).
  np.testing.assert_allclose(got, np.asarray(plain.apply({"params": dense}, tokens)),
                             atol=5e-5, rtol=0)


def test_nf4_odd_input_size_is_a_user_error(tmp_path):
  """A checkpoint whose down_proj has an odd input size (intermediate 145) cannot be NF4: the
  load stops with one UserError line (the CLI prints it as `error: ...`); int4 loads it."""
  import torch
  import transformers as T

  import ftjax
  torch.manual_seed(0)
  cfg = T.LlamaConfig(hidden_size=80, intermediate_size=145, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
  T.AutoModelForCausalLM.from_config(cfg).save_pretrained(str(tmp_path))
  with pytest.raises(UserError, match=r"shape \(145, 80\) to nf4") as e:
    ftjax.load_pretrained(str(tmp_path), quant="nf4")
  assert "\n" not in str(e.value)
  _, params = ftjax.load_pretrained(str(tmp_path), quant="int4")
  assert quant.is_flat(params["layers"]["mlp"]["down_proj"]["kernel"])


def test_nf4_flat_lora_exports(llama80, tmp_path):
  """A LoRA over flat NF4 kernels exports both ways: save_pretrained (dequantized and merged)
  loads in transformers, and save_adapter loads in PEFT over bitsandbytes' dequantized base,
  each with ftjax's logits."""
  import peft
  import torch
  import transformers as T
  from flax import traverse_util

  import ftjax
  exact, _ = _bnb_reference(llama80, double_quant=True)
  model, params = ftjax.load_pretrained(llama80, quant="nf4", lora=ftjax.LoraConfig(rank=4))
  flat = traverse_util.flatten_dict(params)
  for i, k in enumerate(sorted(flat)):
    if k[-1] == "lora_b":
      flat[k] = 0.3 * jax.random.normal(jax.random.PRNGKey(i), flat[k].shape, flat[k].dtype)
  params = traverse_util.unflatten_dict(flat)
  tokens = np.random.default_rng(1).integers(0, 320, (2, 9))
  ours = np.asarray(model.apply({"params": params}, tokens))
  with torch.no_grad():
    base = exact(torch.from_numpy(tokens)).logits.numpy()
  assert np.abs(ours - base).max() > 1e-2  # the adapter matters

  ftjax.save_pretrained(model, params, str(tmp_path / "merged"))
  merged = T.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
  ftjax.save_adapter(model, params, str(tmp_path / "adapter"))
  with_adapter = peft.PeftModel.from_pretrained(exact, str(tmp_path / "adapter")).eval()
  with torch.no_grad():
    for ref in (merged, with_adapter):
      np.testing.assert_allclose(ref(torch.from_numpy(tokens)).logits.numpy(), ours,
                                 atol=1e-4, rtol=0)


def test_nf4_lora_train_step_memory_below_bf16():
  """A compiled LoRA train step over an NF4 base needs (arguments + temporaries) at least 60% of
  the kernels' bf16 bytes less than over a bf16 base: no dequantized kernel is kept for the
  backward pass."""
  import optax

  from ftjax import config as config_lib
  from ftjax import model as model_lib
  from ftjax import partition
  from ftjax.train import common, sft

  cfg = config_lib.ModelConfig(family="llama", vocab_size=256, d_model=256, n_layers=4,
                               n_heads=4, n_kv_heads=4, head_dim=64, mlp_dim=1024,
                               param_dtype="bfloat16", dtype="bfloat16")
  tx = optax.adam(1e-3)
  batch = {"inputs": jax.ShapeDtypeStruct((2, 32), jnp.int32),
           "targets": jax.ShapeDtypeStruct((2, 32), jnp.int32),
           "weights": jax.ShapeDtypeStruct((2, 32), jnp.float32)}

  def step_bytes(qcfg):
    model = model_lib.Decoder(cfg, model_lib.AdapterSpec(lora=config_lib.LoraConfig(rank=4),
                                                         quant=qcfg))
    params = jax.eval_shape(lambda: model_lib.init_params(model, jax.random.PRNGKey(0)))
    trainable, frozen, _ = common.split_params(params, partition.rules_for("lora"))
    state = jax.eval_shape(lambda t: common.init_state(t, tx, 0), trainable)
    step = sft.make_step(model, tx, optax.constant_schedule(1e-3))
    mem = jax.jit(step, donate_argnums=0).lower(state, frozen, batch).compile().memory_analysis()
    return mem.argument_size_in_bytes + mem.temp_size_in_bytes, params

  nf4, q_params = step_bytes(quant.QuantConfig("nf4", 64, double_quant=True))
  bf16, _ = step_bytes(None)
  kernels = [v for k, v in _flat(q_params).items() if k[-2:] == ("kernel", "codes")]
  kernel_bf16 = sum(2 * 2 * v.size for v in kernels)  # codes hold two values a byte
  assert kernel_bf16 > 0.8 * 4 * 7 * 256 * 1024 // 2  # the MLP and attention kernels
  assert bf16 - nf4 >= 0.6 * kernel_bf16, (bf16, nf4, kernel_bf16)


@pytest.mark.parametrize("custom_vjp", [True, False])
def test_scanned_layers_keep_no_dequantized_kernels(custom_vjp):
  """Under a scan over stacked 4-bit layers (how the decoder runs its blocks), plain autodiff
  saves every layer's dequantized kernel for the backward scan; quant.matmul saves none."""
  n_layers, d = 8, 256
  cfg = quant.QuantConfig("nf4", 64, double_quant=True)
  q = jax.eval_shape(lambda: quant.quantize(jnp.zeros((n_layers, d, d)), cfg))
  x = jax.ShapeDtypeStruct((4, d), jnp.bfloat16)

  def loss(bias, q, x):
    def body(h, q_l):
      y = (quant.matmul(h, q_l, cfg, jnp.bfloat16) if custom_vjp
           else h @ quant.dequantize(q_l, cfg, dtype=jnp.bfloat16))
      return jnp.tanh(y + bias), None
    return jax.lax.scan(body, x, q)[0].astype(jnp.float32).sum()

  bias = jax.ShapeDtypeStruct((d,), jnp.bfloat16)
  mem = jax.jit(jax.grad(loss)).lower(bias, q, x).compile().memory_analysis()
  kernels_bf16 = n_layers * d * d * 2
  if custom_vjp:
    assert mem.temp_size_in_bytes < 0.5 * kernels_bf16, mem.temp_size_in_bytes
  else:  # the control: the residuals this test exists to catch
    assert mem.temp_size_in_bytes >= kernels_bf16, mem.temp_size_in_bytes


def _flat(tree):
  from flax import traverse_util
  return traverse_util.flatten_dict(tree)
