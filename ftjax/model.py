"""The decoder: functional Flax linen modules for every supported family.

Einsum axis letters, used in every shape comment and einsum string of ftjax:
  B batch, T query length, S key length, N query heads, K kv heads, G query heads per kv head
  (N = K * G), H head dim, D model dim, F mlp dim, V vocab, L layers.

Params are plain nested dicts with HF-like paths. The blocks run under `nn.scan` over stacked
params (`layers/attn/q_proj/kernel` [L, in, out], logical axis `layers` first), so trace and
compile time do not grow with depth; `ModelConfig.scan_layers=False` unrolls them into
`layer_{i}/...` subtrees (the same arrays, unstacked) for debugging. Inside a block every kernel
is a 2-D [in, out] matrix so that LoRA and quantized kernels wrap one layer type.
Every param carries logical axis names (`nn.with_logical_partitioning`) for sharding.

Call signature:
  logits = model.apply({"params": p}, tokens)                       # [B, T] -> [B, T, V] fp32
  logits = model.apply(..., tokens, positions=pos, mask=m, segment_ids=seg)
  logits, cache = model.apply(..., tokens, mask=m, cache=cache)    # incremental decoding
  logits = model.apply(..., tokens, adapter_rows=rows)  # AdapterSpec.multi: row b's adapter
  hidden = model.apply(..., tokens, return_hidden=True)            # [B, T, D]; heads.py maps
                                                                    # it to logits/score/value

The KV cache (`init_cache`) is stacked too: k, v [L, B, S, K, H], scanned with the blocks.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftjax import heads, lora, offload, quant
from ftjax.config import (LORA_TARGET_PRESETS, BottleneckConfig, LoraConfig, ModelConfig,
                          PrefixConfig, dot_precision)

Array = jax.Array
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def _dtype(name):
  return jnp.dtype(name)


def _act(name: str):
  if name == "relu":  # bottleneck adapters' default (Houlsby's and AdapterHub's)
    return jax.nn.relu
  if name == "silu":
    return jax.nn.silu
  if name == "gelu_tanh":
    return functools.partial(jax.nn.gelu, approximate=True)
  return functools.partial(jax.nn.gelu, approximate=False)


def constrain(x: Array, names: tuple) -> Array:
  """Logical sharding hint for an activation; a no-op outside a mesh with rules."""
  return nn.with_logical_constraint(x, names)


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
  """What wraps the base linear layers: LoRA/DoRA, 4-bit kernels; hashable, part of the model.

  `adapters_enabled=False` runs the base model alone on the same params (DPO's reference model
  without a second copy of the weights).
  """

  lora: Optional[LoraConfig] = None
  quant: Any = None  # ftjax.quant.QuantConfig
  quant_targets: str = LORA_TARGET_PRESETS["all-linear"]  # embeddings and norms stay dense
  prefix: Optional[PrefixConfig] = None
  bottleneck: Optional[BottleneckConfig] = None
  multi: Optional[lora.MultiLoraConfig] = None  # N adapters, one per batch row (adapters.py)
  adapters_enabled: bool = True

  def prefix_of(self, kind: str) -> Optional[PrefixConfig]:
    if self.adapters_enabled and self.prefix is not None and self.prefix.kind == kind:
      return self.prefix
    return None

  def bottleneck_at(self, site: str) -> Optional[BottleneckConfig]:
    """The bottleneck config when `site` (attn | mlp) gets an adapter (declared even while
    adapters are disabled: the params tree does not change)."""
    if self.bottleneck is not None and site in self.bottleneck.sites():
      return self.bottleneck
    return None

  def lora_for(self, path: str) -> Optional[LoraConfig]:
    if self.lora is not None and re.search(self.lora.pattern, path):
      return self.lora
    return None

  def multi_lora_for(self, path: str) -> Optional[lora.MultiLoraConfig]:
    if self.multi is not None and re.search(self.multi.targets, path):
      return self.multi
    return None

  def lora_layer_on(self, layer) -> Optional[Array]:
    """bool [] (traced under the scan): LoRA is active in block `layer`; None: in every block."""
    if self.lora is None or self.lora.layers is None or layer is None:
      return None
    return jnp.isin(layer, jnp.asarray(self.lora.layers, jnp.int32))

  def quant_for(self, path: str):
    if self.quant is not None and re.search(self.quant_targets, path):
      return self.quant
    return None


class Linear(nn.Module):
  """y = x @ kernel (+ bias) (+ LoRA); kernel [in, out], plain or 4-bit quantized.

  The base kernel keeps its path (`.../q_proj/kernel`); a quantized kernel is a dict of code and
  scale arrays at the same path (`quant.kernel_param`, multiplied by `quant.dot`). LoRA adds
  `lora_a` [in, r] and `lora_b` [r, out] beside it (and `lora_magnitude` [out] for DoRA), declared
  and applied by `lora.apply`; or, serving several adapters, their stacked [N, ...] factors,
  row b taking adapter `rows[b]` (`lora.apply_multi`).
  """

  features: int
  axes: tuple[str, str]
  use_bias: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  adapter_dtype: Any = jnp.float32  # LoRA/DoRA leaves; cast to `dtype` in the matmul
  precision: str = "auto"  # a ModelConfig.matmul_precision name
  spec: AdapterSpec = AdapterSpec()

  @nn.compact
  def __call__(self, x: Array, layer: Optional[Array] = None,
               rows: Optional[Array] = None) -> Array:
    """x [..., in] -> [..., out]; `layer` (int32 []) is the block index, for LoraConfig.layers;
    `rows` (int32 [B]) each row's adapter under AdapterSpec.multi."""
    path = "/".join(self.scope.path)
    shape = (x.shape[-1], self.features)
    qcfg = self.spec.quant_for(path)
    kernel = quant.kernel_param(self, shape, self.axes, qcfg, nn.initializers.normal(0.02),
                                self.param_dtype)
    y = quant.dot(x, kernel, qcfg, self.dtype, dot_precision(self.precision, self.dtype))
    lcfg = self.spec.lora_for(path)
    if lcfg is not None:  # DoRA reads the dense kernel (a 4-bit one is dequantized for it)
      y = lora.apply(self, lcfg, x, y, lambda: quant.dense(kernel, qcfg, shape, self.dtype), layer)
    mcfg = self.spec.multi_lora_for(path)
    if mcfg is not None:
      y = lora.apply_multi(self, mcfg, x, y, rows)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                             (self.axes[1],)),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class Norm(nn.Module):
  """RMSNorm (optionally Gemma's x * (1 + w)) or LayerNorm, computed in float32 as HF does."""

  kind: str = "rmsnorm"
  eps: float = 1e-6
  add_one: bool = False
  use_bias: bool = False
  axis_name: str = "norm"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    init = nn.initializers.zeros if self.add_one else nn.initializers.ones
    scale = self.param("scale", nn.with_logical_partitioning(init, (self.axis_name,)), (d,),
                       self.param_dtype)
    xf = x.astype(jnp.float32)
    if self.kind == "layernorm":
      mean = xf.mean(-1, keepdims=True)
      var = jnp.square(xf - mean).mean(-1, keepdims=True)
      y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * scale.astype(jnp.float32)
      if self.use_bias:
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                               (self.axis_name,)),
                          (d,), self.param_dtype)
        y = y + bias.astype(jnp.float32)
      return y.astype(self.dtype)
    y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + self.eps)
    if self.add_one:
      return (y * (1.0 + scale.astype(jnp.float32))).astype(self.dtype)
    # Llama casts back to the input dtype before the weight multiply.
    return scale.astype(self.dtype) * y.astype(self.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """Inverse frequencies [H/2] including `rope_scaling` (linear, llama3), in float32 as HF."""
  h = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (np.arange(0, h, 2, dtype=np.int64).astype(np.float32) / h))
  inv = inv.astype(np.float32)
  sc = cfg.rope_scaling_dict
  if not sc:
    return inv
  kind = sc.get("rope_type", sc.get("type", "default"))
  if kind == "default":
    return inv
  if kind == "linear":
    return (inv / np.float32(sc["factor"])).astype(np.float32)
  if kind == "llama3":
    factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
    old = sc["original_max_position_embeddings"]
    lo_wavelen, hi_wavelen = old / lo, old / hi
    wavelen = 2 * math.pi / inv
    out = np.where(wavelen > lo_wavelen, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = ~(wavelen < hi_wavelen) & ~(wavelen > lo_wavelen)
    return np.where(medium, smoothed, out).astype(np.float32)
  raise ValueError(f"rope_scaling type {kind!r} is not supported (default, linear, llama3)")


def apply_rope(x: Array, positions: Array, inv_freq: np.ndarray) -> Array:
  """Rotary embedding in HF's rotate-half layout. x [B, T, N, H], positions [B, T]."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, H/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  cos = jnp.cos(emb)[:, :, None, :].astype(x.dtype)
  sin = jnp.sin(emb)[:, :, None, :].astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return x * cos + rotated * sin


def attention_mask(q_idx: Array, k_idx: Array, key_valid: Array,
                   q_seg: Optional[Array] = None, k_seg: Optional[Array] = None,
                   sliding_window: Optional[int] = None) -> Array:
  """Boolean [B, T, S]: causal by slot index, valid keys, same segment, inside the window.

  q_idx [T] and k_idx [S] are slot indices (cache slots when decoding); key_valid [B, S].
  """
  allowed = k_idx[None, None, :] <= q_idx[None, :, None]  # [1, T, S]
  allowed = allowed & key_valid[:, None, :]
  if q_seg is not None:
    allowed = allowed & (q_seg[:, :, None] == k_seg[:, None, :])
  if sliding_window is not None:
    allowed = allowed & (q_idx[None, :, None] - k_idx[None, None, :] < sliding_window)
  return allowed


def dot_attention(q: Array, k: Array, v: Array, allowed: Array, impl: str,
                  prec: Optional[jax.lax.Precision] = None) -> Array:
  """Grouped-query attention.

  Args:
    q: [B, T, N, H]; k, v: [B, S, K, H]; allowed: bool [B, T, S].
    prec: `precision=` of both einsums (see `dot_precision`).
  Returns:
    [B, T, N, H] in v's dtype; softmax in float32.
  """
  b, t, n, h = q.shape
  kv = k.shape[2]
  scale = h ** -0.5
  if impl == "dot_product":
    if prec is None:
      return jax.nn.dot_product_attention(q, k, v, mask=allowed[:, None], scale=scale)
    # It takes no precision argument; its XLA path reads the default at trace time.
    with jax.default_matmul_precision(prec.name.lower()):
      return jax.nn.dot_product_attention(q, k, v, mask=allowed[:, None], scale=scale)
  q = q.reshape(b, t, kv, n // kv, h)  # [B, T, K, G, H]
  scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32,
                      precision=prec) * scale
  scores = jnp.where(allowed[:, None, None], scores, _MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v, precision=prec)
  return out.reshape(b, t, n, h)


def _has_cudnn() -> bool:
  return jax.default_backend() == "gpu"


def fused_attention(q: Array, k: Array, v: Array, key_valid: Array, impl: str,
                    sliding_window: Optional[int] = None,
                    prec: Optional[jax.lax.Precision] = None) -> Array:
  """Causal self-attention told its structure, with no dense [B, T, S] mask.

  `jax.nn.dot_product_attention` gets `is_causal=True` and the sliding window as such, and the
  key padding as a [B, 1, 1, S] mask ("dot_product"), or, for cuDNN's flash kernel ("cudnn"),
  as per-row sequence lengths: the count of valid keys, which is exact for right-padded rows
  (training batches) and is what cuDNN can skip work for.

  Args:
    q: [B, T, N, H]; k, v: [B, T, K, H]; key_valid: bool [B, T].
  Returns:
    [B, T, N, H] in v's dtype.
  """
  kw = dict(scale=q.shape[-1] ** -0.5, is_causal=True,
            local_window_size=None if sliding_window is None else (sliding_window - 1, 0))
  if impl == "cudnn":
    lengths = key_valid.sum(-1, dtype=jnp.int32)  # [B]
    kw.update(query_seq_lengths=lengths, key_value_seq_lengths=lengths)
    if _has_cudnn():  # elsewhere (a CPU host tracing shapes) XLA honours the same arguments
      kw["implementation"] = "cudnn"
  else:
    kw["mask"] = key_valid[:, None, None, :]  # [B, 1, 1, S]
  if prec is None:
    return jax.nn.dot_product_attention(q, k, v, **kw)
  # It takes no precision argument; its XLA path reads the default at trace time.
  with jax.default_matmul_precision(prec.name.lower()):
    return jax.nn.dot_product_attention(q, k, v, **kw)


class Attention(nn.Module):
  cfg: ModelConfig
  spec: AdapterSpec = AdapterSpec()

  @nn.compact
  def __call__(self, x, positions, key_valid, q_idx, k_idx, q_seg, k_seg, cache, prefix=None,
               layer=None, rows=None):
    cfg = self.cfg
    dt, pdt = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
    b, t, _ = x.shape
    n, kv, h = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    lin = functools.partial(Linear, dtype=dt, param_dtype=pdt,
                            adapter_dtype=_dtype(cfg.adapter_dtype),
                            precision=cfg.matmul_precision, spec=self.spec)
    q = lin(n * h, ("embed", "q_heads"), cfg.qkv_bias, name="q_proj")(x, layer, rows)
    q = q.reshape(b, t, n, h)
    k = lin(kv * h, ("embed", "kv_heads"), cfg.qkv_bias, name="k_proj")(x, layer, rows)
    k = k.reshape(b, t, kv, h)
    v = lin(kv * h, ("embed", "kv_heads"), cfg.qkv_bias, name="v_proj")(x, layer, rows)
    v = v.reshape(b, t, kv, h)
    if cfg.qk_norm:
      norm = functools.partial(Norm, "rmsnorm", cfg.norm_eps, axis_name="head_dim", dtype=dt,
                               param_dtype=pdt)
      q, k = norm(name="q_norm")(q), norm(name="k_norm")(k)
    if cfg.positions == "rope":
      inv_freq = rope_inv_freq(cfg)
      q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    q = constrain(q, ("batch", "length", "act_heads", "head_dim"))
    if cache is not None:
      # Write this chunk's keys and values into the cache slots [index, index + T).
      idx = cache["index"]
      k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, idx, 0, 0))
      v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, idx, 0, 0))
      cache = {"k": k, "v": v}
      k, v = k.astype(dt), v.astype(dt)
    prec = dot_precision(cfg.matmul_precision, dt)
    if cfg.attention != "xla" and cache is None and prefix is None and q_seg is None:
      # Plain causal self-attention over padded rows: say so instead of building a mask.
      out = fused_attention(q, k, v, key_valid, cfg.attention, cfg.sliding_window, prec)
    else:
      allowed = attention_mask(q_idx, k_idx, key_valid, q_seg, k_seg, cfg.sliding_window)
      if prefix is not None:  # [2, P, K, H]: learned keys/values every query may attend to
        p = prefix.shape[1]
        k = jnp.concatenate([jnp.broadcast_to(prefix[0].astype(dt), (b, p, kv, h)), k], axis=1)
        v = jnp.concatenate([jnp.broadcast_to(prefix[1].astype(dt), (b, p, kv, h)), v], axis=1)
        allowed = jnp.concatenate([jnp.ones((b, t, p), bool), allowed], axis=-1)
      # cuDNN's kernel takes no dense mask here (cache, prefix, packing): the jax path does.
      impl = "dot_product" if cfg.attention == "cudnn" else cfg.attention
      out = dot_attention(q, k, v, allowed, impl, prec)  # [B, T, N, H]
    out = out.reshape(b, t, n * h)
    out = lin(cfg.d_model, ("q_heads", "embed"), cfg.o_bias, name="o_proj")(out, layer, rows)
    return out, cache


class Mlp(nn.Module):
  cfg: ModelConfig
  spec: AdapterSpec = AdapterSpec()

  @nn.compact
  def __call__(self, x, layer=None, rows=None):
    cfg = self.cfg
    lin = functools.partial(Linear, dtype=_dtype(cfg.dtype), param_dtype=_dtype(cfg.param_dtype),
                            adapter_dtype=_dtype(cfg.adapter_dtype),
                            precision=cfg.matmul_precision, use_bias=cfg.mlp_bias,
                            spec=self.spec)
    act = _act(cfg.activation)
    if cfg.gated_mlp:
      hidden = act(lin(cfg.mlp_dim, ("embed", "mlp"), name="gate_proj")(x, layer, rows)) * lin(
          cfg.mlp_dim, ("embed", "mlp"), name="up_proj")(x, layer, rows)
    else:
      hidden = act(lin(cfg.mlp_dim, ("embed", "mlp"), name="up_proj")(x, layer, rows))
    hidden = constrain(hidden, ("batch", "length", "act_mlp"))  # [B, T, F]
    return lin(cfg.d_model, ("mlp", "embed"), name="down_proj")(hidden, layer, rows)


class Bottleneck(nn.Module):
  """A bottleneck adapter (Houlsby et al. 2019; Pfeiffer et al. 2020) on a sublayer's output
  h [..., D]: h + up(act(down(h))), down [D, D/reduction_factor], up [D/r, D], both with a bias.
  `up` starts at zero, so a fresh adapter returns h exactly: training starts at the base model.
  Params are `adapter_dtype`, cast to the compute dtype in the matmuls, as LoRA's."""

  cfg: ModelConfig
  bottleneck: BottleneckConfig
  enabled: bool = True

  @nn.compact
  def __call__(self, h: Array) -> Array:
    cfg, bc = self.cfg, self.bottleneck
    d, r = h.shape[-1], bc.size(h.shape[-1])
    adt, dt = _dtype(cfg.adapter_dtype), _dtype(cfg.dtype)
    prec = dot_precision(cfg.matmul_precision, dt)
    part = nn.with_logical_partitioning
    down = self.param("down", part(nn.initializers.normal(bc.init_std), ("embed", "bottleneck")),
                      (d, r), adt)
    down_b = self.param("down_bias", part(nn.initializers.zeros, ("bottleneck",)), (r,), adt)
    up = self.param("up", part(nn.initializers.zeros, ("bottleneck", "embed")), (r, d), adt)
    up_b = self.param("up_bias", part(nn.initializers.zeros, ("embed",)), (d,), adt)
    if not self.enabled:
      return h
    z = jnp.einsum("...D,DR->...R", h.astype(dt), down.astype(dt), precision=prec)
    z = _act(bc.activation)(z + down_b.astype(dt))
    y = jnp.einsum("...R,RD->...D", z, up.astype(dt), precision=prec) + up_b.astype(dt)
    return h + y.astype(h.dtype)


def _norm(cfg: ModelConfig, name: str) -> Norm:
  return Norm(cfg.norm, cfg.norm_eps, cfg.norm_add_one, cfg.norm_bias, "norm",
              _dtype(cfg.dtype), _dtype(cfg.param_dtype), name=name)


class Block(nn.Module):
  """One decoder block, in `nn.scan`'s shape: (carry x, per-layer inputs, shared inputs).

  per_layer = (layer index int32 [], this layer's cache {"k", "v"} [B, S, K, H] or None,
  prefix [2, P, K, H] or None); returns (x, the updated {"k", "v"} or None).
  """

  cfg: ModelConfig
  spec: AdapterSpec = AdapterSpec()

  @nn.compact
  def __call__(self, x, per_layer, positions, key_valid, q_idx, k_idx, q_seg, k_seg,
               cache_index, rows=None):
    layer, kv, prefix = per_layer
    cache = None if kv is None else {**kv, "index": cache_index}
    attn = Attention(self.cfg, self.spec, name="attn")
    h, cache = attn(_norm(self.cfg, "attn_norm")(x), positions, key_valid, q_idx, k_idx, q_seg,
                    k_seg, cache, prefix, layer, rows)
    x = x + self._adapter("attn", h)
    h = Mlp(self.cfg, self.spec, name="mlp")(_norm(self.cfg, "mlp_norm")(x), layer, rows)
    x = x + self._adapter("mlp", h)
    return constrain(x, ("batch", "length", "act_embed")), cache

  def _adapter(self, site: str, h):
    """A sublayer's output through its bottleneck adapter (`<site>_adapter`), if it has one."""
    bc = self.spec.bottleneck_at(site)
    if bc is None:
      return h
    return Bottleneck(self.cfg, bc, self.spec.adapters_enabled, name=f"{site}_adapter")(h)


def segment_positions(segment_ids: Array) -> Array:
  """Per-segment positions 0, 1, ... restarting where the segment id changes. [B, T] -> [B, T]."""
  t = segment_ids.shape[1]
  idx = jnp.broadcast_to(jnp.arange(t), segment_ids.shape)
  new = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                         segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  start = jax.lax.cummax(jnp.where(new, idx, 0), axis=1)
  return idx - start


class PrefixEncoder(nn.Module):
  """Per-layer learned key/value prefixes: [L, 2, P, K, H] (optionally via a 2-layer MLP)."""

  cfg: ModelConfig
  prefix: PrefixConfig

  @nn.compact
  def __call__(self) -> Array:
    cfg, pc = self.cfg, self.prefix
    shape = (cfg.n_layers, 2, pc.length, cfg.n_kv_heads, cfg.head_dim)
    pdt = _dtype(cfg.adapter_dtype)  # trainable: see ModelConfig.adapter_dtype
    if not pc.reparam:
      return self.param("kv", nn.with_logical_partitioning(
          nn.initializers.normal(pc.init_std), ("layers", None, "prefix", "kv_heads", "head_dim")),
                        shape, pdt)
    # Li & Liang's reparametrisation (PEFT prefix_projection): embedding -> tanh MLP.
    emb = self.param("embedding", nn.with_logical_partitioning(
        nn.initializers.normal(1.0), ("prefix", "embed")), (pc.length, cfg.d_model), pdt)
    width = cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim
    lin = functools.partial(Linear, use_bias=True, param_dtype=pdt,
                            precision=cfg.matmul_precision)
    h = jnp.tanh(lin(pc.reparam_hidden, ("embed", "mlp"), name="mlp_in")(emb))
    out = lin(width, ("mlp", "kv_heads"), name="mlp_out")(h)  # [P, L*2*K*H]
    # PEFT's layout of a flat prefix row: (layer, key/value, kv head, head dim).
    out = out.reshape(pc.length, cfg.n_layers, 2, cfg.n_kv_heads, cfg.head_dim)
    return out.transpose(1, 2, 0, 3, 4)


def prompt_length(model: "Decoder") -> int:
  """Cache slots the soft prompt takes (prompt tuning), else 0."""
  pc = model.spec.prefix_of("prompt")
  return pc.length if pc is not None else 0


class Decoder(nn.Module):
  """Decoder-only LM. See the module docstring for the call signature.

  `decode=True` marks a call that continues a cached sequence, whose soft prompt (prompt
  tuning) is already in the cache; the sampler sets it after the prefill.
  """

  cfg: ModelConfig
  spec: AdapterSpec = AdapterSpec()

  @nn.compact
  def __call__(self, tokens: Array, positions: Optional[Array] = None,
               mask: Optional[Array] = None, segment_ids: Optional[Array] = None,
               cache: Optional[dict] = None, return_hidden: bool = False, decode: bool = False,
               adapter_rows: Optional[Array] = None):
    cfg = self.cfg
    dt, pdt = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
    b, t = tokens.shape
    mask = jnp.ones((b, t), bool) if mask is None else mask.astype(bool)

    embed = self.param("embed", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                             ("vocab", "embed")),
                       (cfg.vocab_size, cfg.d_model), pdt)
    x = jnp.take(embed, tokens, axis=0).astype(dt)  # [B, T, D]
    if cfg.embed_scale:
      x = x * jnp.asarray(math.sqrt(cfg.d_model), dt)

    # Prompt tuning: P soft tokens in front; they take positions 0..P-1 and cache slots.
    prompt_cfg = self.spec.prefix_of("prompt")
    n_soft = 0
    if prompt_cfg is not None:
      soft = self.param("prompt", nn.with_logical_partitioning(
          nn.initializers.normal(prompt_cfg.init_std), ("prefix", "embed")),
                        (prompt_cfg.length, cfg.d_model), _dtype(cfg.adapter_dtype))
      if segment_ids is not None:
        raise ValueError("prompt tuning does not combine with packed sequences (segment_ids)")
      if not decode:
        n_soft = prompt_cfg.length
        x = jnp.concatenate([jnp.broadcast_to(soft.astype(dt), (b, n_soft, cfg.d_model)), x], 1)
        mask = jnp.concatenate([jnp.ones((b, n_soft), bool), mask], axis=1)
        if positions is not None:
          positions = jnp.concatenate([jnp.broadcast_to(jnp.arange(n_soft), (b, n_soft)),
                                       positions + n_soft], axis=1)
    t_all = t + n_soft

    if cache is not None:
      s = cache["mask"].shape[1]
      index = cache["index"]
      if positions is None:
        seen = cache["mask"].sum(-1, dtype=jnp.int32)[:, None]
        positions = seen + jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1
      key_valid = jax.lax.dynamic_update_slice(cache["mask"], mask, (0, index))
      q_idx = index + jnp.arange(t_all)
      k_idx = jnp.arange(s)
      q_seg = k_seg = None
    else:
      if positions is None:
        if segment_ids is not None:
          positions = segment_positions(segment_ids)
        else:
          positions = jnp.maximum(jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)
      key_valid = mask
      q_idx = k_idx = jnp.arange(t_all)
      q_seg = k_seg = segment_ids
    positions = jnp.maximum(positions, 0)

    # Prefix tuning: per-layer learned keys/values; as in PEFT, tokens start at position P.
    prefix_cfg = self.spec.prefix_of("prefix")
    prefix_kv = None
    if prefix_cfg is not None:
      prefix_kv = PrefixEncoder(cfg, prefix_cfg, name="prefix")()  # [L, 2, P, K, H]
      positions = positions + prefix_cfg.length

    if cfg.positions == "learned":
      pos_embed = self.param("pos_embed", nn.with_logical_partitioning(
          nn.initializers.normal(0.01), ("position", "embed")), (cfg.max_seq_len, cfg.d_model), pdt)
      x = x + jnp.take(pos_embed, positions, axis=0).astype(dt)
    x = constrain(x, ("batch", "length", "act_embed"))

    x, new_kv = self._blocks(x, positions, key_valid, q_idx, k_idx, q_seg, k_seg, cache,
                             prefix_kv, adapter_rows)
    x = _norm(cfg, "final_norm")(x)
    x = x[:, n_soft:]  # outputs for the real tokens only
    # Heads live in heads.py as functions of (params, hidden); they are created here so that
    # `init` builds them and `apply` keeps returning logits (or scores).
    if return_hidden:
      out = x
    elif cfg.head == "score":
      kernel = self.param("score", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                heads.AXES["score"]),
                          (cfg.d_model, 1), _dtype(cfg.adapter_dtype))  # new, trained
      out = heads.score({"score": kernel}, x, cfg)  # [B, T]
    elif cfg.head == "token":
      kernel = self.param("token_score", nn.with_logical_partitioning(
          nn.initializers.zeros, heads.AXES["token_score"]),
          (cfg.d_model, heads.TOKEN_LABELS), _dtype(cfg.adapter_dtype))  # new, trained
      out = heads.token_logits({"token_score": kernel}, x, cfg)  # [B, T, 2]
    elif cfg.tie_embeddings:
      out = heads.lm_logits({"embed": embed}, x, cfg)  # [B, T, V]
    else:
      kernel = self.param("lm_head", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                  heads.AXES["lm_head"]),
                          (cfg.d_model, cfg.vocab_size), pdt)
      out = heads.lm_logits({"lm_head": kernel}, x, cfg)  # [B, T, V]
    if cache is None:
      return out
    new_cache = {**new_kv, "mask": key_valid, "index": cache["index"] + t_all}
    return out, new_cache

  def _blocks(self, x, positions, key_valid, q_idx, k_idx, q_seg, k_seg, cache, prefix_kv,
              rows=None):
    """The L blocks: scanned over stacked params, cache and prefix, or unrolled.

    Returns (x, {"k", "v"} [L, B, S, K, H] or None).
    """
    cfg, n = self.cfg, self.cfg.n_layers
    kv = None if cache is None else {"k": cache["k"], "v": cache["v"]}
    index = None if cache is None else cache["index"]
    shared = (positions, key_valid, q_idx, k_idx, q_seg, k_seg, index, rows)
    block_cls = Block
    if (cfg.remat != "none" or cfg.remat_offload) and cache is None:
      # Under scan the loop body is its own computation, so CSE cannot undo the remat.
      if cfg.remat_offload:
        policy = offload.residual_policy()
      else:
        policy = None if cfg.remat == "full" else getattr(jax.checkpoint_policies, cfg.remat)
      block_cls = nn.remat(Block, prevent_cse=not cfg.scan_layers, policy=policy)
    if cfg.scan_layers:
      scanned = nn.scan(block_cls, variable_axes={"params": 0},
                        split_rngs={"params": True, "dropout": True},
                        in_axes=(0,) + (nn.broadcast,) * len(shared), length=n,
                        metadata_params={nn.PARTITION_NAME: "layers"})
      per_layer = (jnp.arange(n, dtype=jnp.int32), kv, prefix_kv)
      return scanned(cfg, self.spec, name="layers")(x, per_layer, *shared)
    outs = []
    for i in range(n):
      per_layer = (jnp.asarray(i, jnp.int32),
                   None if kv is None else jax.tree_util.tree_map(lambda a, i=i: a[i], kv),
                   None if prefix_kv is None else prefix_kv[i])
      x, layer_kv = block_cls(cfg, self.spec, name=f"layer_{i}")(x, per_layer, *shared)
      outs.append(layer_kv)
    if kv is None:
      return x, None
    return x, jax.tree_util.tree_map(lambda *a: jnp.stack(a), *outs)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any = None) -> dict:
  """An empty KV cache: k, v [L, B, S, K, H] (scanned with the blocks), a key mask [B, S] and
  the write index."""
  dtype = _dtype(dtype or cfg.dtype)
  shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
          "mask": jnp.zeros((batch, max_len), bool), "index": jnp.zeros((), jnp.int32)}


def init_params(model: Decoder, rng: Array, seq_len: int = 8) -> dict:
  """Random params as a plain nested dict (logical-axis boxes removed)."""
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  return nn.meta.unbox(jax.jit(model.init)(rng, tokens)["params"])


def logical_axes(model: Decoder) -> dict:
  """The logical axis names of every param, as a tree of PartitionSpecs (no arrays built)."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
  return nn.get_partition_spec(shapes)["params"]
