"""bench.py --bench=aot: the SFT step compiled ahead of time from abstract shapes. Its NF4
argument saving is read from the compiled executable's memory analysis and checked against
bitsandbytes' storage of the same kernels (QLoRA's NF4 + double quant)."""

import pytest

import ftjax
from ftjax.config import ModelConfig
from ftjax.recipes import aot

# A scaled-down Llama: every linear kernel's `in` is a multiple of the 64-wide NF4 block.
CFG = ModelConfig(family="llama", vocab_size=512, d_model=256, n_layers=2, n_heads=4,
                  n_kv_heads=2, head_dim=64, mlp_dim=512, param_dtype="bfloat16",
                  dtype="bfloat16")


def _kernel_shapes(cfg):
  """[in, out] of every linear layer of one block, from the config (not from our params)."""
  d, q, kv, f = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.mlp_dim
  return [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]


def _bnb_nf4_bytes(n_in, n_out):
  """Bytes bitsandbytes stores for one nn.Linear weight [out, in] in NF4 with double quant:
  packed codes, 8-bit absmax, float32 second-level absmax and the float32 offset. Its two
  code tables (16 and 256 float32) are constants of the format, not per-weight storage."""
  torch = pytest.importorskip("torch")
  bnb = pytest.importorskip("bitsandbytes.functional")
  w = torch.randn(n_out, n_in, dtype=torch.bfloat16)
  packed, st = bnb.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
  return (packed.numel() * packed.element_size() + st.absmax.numel() * st.absmax.element_size()
          + st.state2.absmax.numel() * st.state2.absmax.element_size()
          + st.offset.numel() * st.offset.element_size())


def test_aot_nf4_argument_saving_matches_bitsandbytes():
  kw = dict(batch=2, seq_len=16, chunk=0, count_flops=False)
  lora = aot.run_one(CFG, "sft", "lora", **kw)
  qlora = aot.run_one(CFG, "sft", "qlora", **kw)
  saving = lora["argument_bytes"] - qlora["argument_bytes"]
  bf16 = sum(2 * i * o for i, o in _kernel_shapes(CFG)) * CFG.n_layers
  nf4 = sum(_bnb_nf4_bytes(i, o) for i, o in _kernel_shapes(CFG)) * CFG.n_layers
  assert saving == bf16 - nf4, (saving, bf16, nf4)
  assert saving > 0.7 * bf16  # 4.127 bits per param instead of 16
  # The LoRA factors and their optimizer state are the same in both: only the base shrinks.
  assert lora["opt_state_bytes"] == qlora["opt_state_bytes"]
  assert lora["formula_flops"] == qlora["formula_flops"]


def test_aot_preset_names_checked():
  with pytest.raises(ValueError, match="aot_modes"):
    aot.run("tiny", modes=("nf8",), verbose=False)
  with pytest.raises(ftjax.errors.UserError):
    aot.run("no-such-preset", verbose=False)
