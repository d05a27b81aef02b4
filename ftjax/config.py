"""ModelConfig: one frozen dataclass for every supported decoder family, plus named presets.

A family is a bundle of switches (norm kind, activation, positions, biases, q/k norms, ...);
`hf.py` maps a Hugging Face `config.json` onto these fields and back.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from ftjax.errors import UserError

FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma")
# Parameter and compute dtypes a config may name (model.dtype, model.compute_dtype, adapter.dtype).
DTYPES = ("float32", "bfloat16", "float16")
ADAPTER_DTYPES = DTYPES
# "auto" plus the names jax.lax.Precision accepts.
MATMUL_PRECISIONS = ("auto", "highest", "float32", "high", "tensorfloat32", "bfloat16_3x",
                     "default", "bfloat16", "fastest")


def dot_precision(name: str, dtype: Any) -> Optional[jax.lax.Precision]:
  """The `precision=` of a dot computed in `dtype` under ModelConfig.matmul_precision `name`.

  "auto" asks for full float32 when the compute dtype is float32: GPUs otherwise round
  float32 operands to TF32 and TPUs to bf16 passes, a 1e-2 logit gap to the reference.
  """
  if name == "auto":
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None
  return jax.lax.Precision(name)


ATTENTIONS = ("xla", "dot_product", "cudnn")
HEADS = ("lm", "score", "token")
# A token head's classes, as TRL's PRMTrainer labels steps: 0 a bad step, 1 a good one.
TOKEN_LABELS = 2
# none: keep every activation; full: keep only each block's input (recompute the block);
# the others are jax.checkpoint_policies of that name (e.g. keep matmul outputs).
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "checkpoint_dots", "checkpoint_dots_with_no_batch_dims")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and architecture of a decoder-only transformer.

  Field names follow the einsum letters of `model.py`: d_model (D), n_heads (N),
  n_kv_heads (K), head_dim (H), mlp_dim (F), vocab_size (V).
  """

  family: str = "llama"
  vocab_size: int = 256
  d_model: int = 64
  n_layers: int = 2
  n_heads: int = 4
  n_kv_heads: int = 4
  head_dim: int = 16
  mlp_dim: int = 128
  max_seq_len: int = 2048  # learned position table size (gpt2); informational for RoPE
  # Normalisation.
  norm: str = "rmsnorm"  # rmsnorm | layernorm
  norm_eps: float = 1e-6
  norm_add_one: bool = False  # gemma: x * (1 + w)
  qk_norm: bool = False  # qwen3: RMSNorm over head_dim on q and k before RoPE
  # Feed-forward.
  activation: str = "silu"  # silu | gelu_tanh | gelu
  gated_mlp: bool = True  # SwiGLU / GeGLU (gate_proj, up_proj, down_proj) or plain (up, down)
  # Positions.
  positions: str = "rope"  # rope | learned
  rope_theta: float = 10000.0
  # rope_scaling as a sorted tuple of (key, value) so the config stays hashable, e.g.
  # (("factor", 32.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
  #  ("original_max_position_embeddings", 8192), ("rope_type", "llama3")).
  rope_scaling: Optional[tuple[tuple[str, Any], ...]] = None
  sliding_window: Optional[int] = None  # mistral v0.1: keys further back than this are masked
  # Biases.
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  norm_bias: bool = False  # layernorm bias
  # Embeddings.
  tie_embeddings: bool = False
  embed_scale: bool = False  # gemma: multiply embeddings by sqrt(d_model)
  # Numerics and implementation.
  param_dtype: str = "float32"
  dtype: str = "float32"  # compute dtype; logits are always float32
  # Trainable adapter params (LoRA/DoRA, prefixes, soft prompts, the score head) are kept and
  # optimised in this dtype whatever `param_dtype` is: small updates vanish in a bf16 master
  # copy (PEFT keeps adapters in float32 too). They are cast to `dtype` inside the matmul.
  adapter_dtype: str = "float32"
  # `precision=` of every dot: "auto" is full float32 when `dtype` is float32 (GPUs would
  # otherwise round operands to TF32, TPUs to bf16 passes) and the backend default otherwise;
  # or a jax.lax.Precision name (highest, high, tensorfloat32, default, ...).
  matmul_precision: str = "auto"
  # xla: einsums over a dense [B, T, S] mask. dot_product: jax.nn.dot_product_attention, told
  # "causal" and the key padding as such (no dense mask) when there is no cache, prefix or
  # packing. cudnn: the same with implementation="cudnn" (GPU) and padding as sequence lengths,
  # which assumes right-padded rows (as training batches are); other calls use dot_product.
  attention: str = "xla"
  # Rematerialisation of each block in the backward pass: a name of REMAT_POLICIES (True and
  # False, as older configs say, mean "full" and "none").
  remat: Any = "none"
  # Host offload of the remat residuals (`train.offload=activations`, ftjax/offload.py): each
  # block is rematerialised with offload_dot_with_no_batch_dims(device, pinned_host) in place
  # of `remat`'s policy.
  remat_offload: bool = False
  # Blocks run under a scan over stacked [L, ...] params (`layers/...`): trace and compile time
  # do not grow with depth. False keeps one `layer_{i}` subtree per block (for debugging).
  scan_layers: bool = True
  # Output head: "lm" (next-token logits [B, T, V]), "score" (a scalar per position [B, T],
  # read at the last real token by reward models; HF's *ForSequenceClassification `score`) or
  # "token" (TOKEN_LABELS logits per position [B, T, 2]: a process reward model's bad/good step
  # classifier; HF's *ForTokenClassification `score`).
  head: str = "lm"
  # Token ids carried through to export (generation_config.json).
  bos_token_id: Optional[int] = None
  eos_token_id: Optional[Any] = None
  pad_token_id: Optional[int] = None

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"ModelConfig.family={self.family!r} is not supported; one of {FAMILIES}")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(
          f"ModelConfig: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
    if self.norm not in ("rmsnorm", "layernorm"):
      raise ValueError(f"ModelConfig.norm={self.norm!r}: expected rmsnorm or layernorm")
    if self.activation not in ("silu", "gelu_tanh", "gelu"):
      raise ValueError(f"ModelConfig.activation={self.activation!r}: expected silu|gelu_tanh|gelu")
    if self.positions not in ("rope", "learned"):
      raise ValueError(f"ModelConfig.positions={self.positions!r}: expected rope or learned")
    if self.head not in HEADS:
      raise ValueError(f"ModelConfig.head={self.head!r}: expected one of {HEADS}")
    if self.attention not in ATTENTIONS:
      raise ValueError(f"ModelConfig.attention={self.attention!r}: expected one of {ATTENTIONS}")
    if isinstance(self.remat, bool):
      object.__setattr__(self, "remat", "full" if self.remat else "none")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"ModelConfig.remat={self.remat!r}: expected one of {REMAT_POLICIES}")
    if self.adapter_dtype not in ADAPTER_DTYPES:
      raise ValueError(f"ModelConfig.adapter_dtype={self.adapter_dtype!r}: expected one of "
                       f"{ADAPTER_DTYPES}")
    if self.matmul_precision not in MATMUL_PRECISIONS:
      raise ValueError(f"ModelConfig.matmul_precision={self.matmul_precision!r}: expected one "
                       f"of {MATMUL_PRECISIONS}")

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  @property
  def rope_scaling_dict(self) -> Optional[dict]:
    return dict(self.rope_scaling) if self.rope_scaling else None

  def num_params(self, include_embeddings: bool = True) -> int:
    """Parameter count computed from the shapes (no arrays built)."""
    d, h = self.d_model, self.head_dim
    attn = d * self.n_heads * h + 2 * d * self.n_kv_heads * h + self.n_heads * h * d
    if self.qkv_bias:
      attn += self.n_heads * h + 2 * self.n_kv_heads * h
    if self.o_bias:
      attn += d
    if self.qk_norm:
      attn += 2 * h
    n_mlp = 3 if self.gated_mlp else 2
    mlp = n_mlp * d * self.mlp_dim
    if self.mlp_bias:
      mlp += (n_mlp - 1) * self.mlp_dim + d
    norms = 2 * d * (2 if self.norm_bias else 1)
    total = self.n_layers * (attn + mlp + norms) + d * (2 if self.norm_bias else 1)
    if self.head == "score":
      total += d
    if self.head == "token":
      total += d * TOKEN_LABELS
    if include_embeddings:
      total += self.vocab_size * d
      if not self.tie_embeddings and self.head == "lm":
        total += self.vocab_size * d
      if self.positions == "learned":
        total += self.max_seq_len * d
    return total

  def flops_per_token(self, seq_len: int) -> float:
    """Forward+backward FLOPs per token (6N plus attention), as in the PaLM/MaxText MFU count."""
    n = self.num_params(include_embeddings=False) + self.vocab_size * self.d_model
    attn = 12 * self.n_layers * self.n_heads * self.head_dim * seq_len
    return 6.0 * n + attn


def _llama3_scaling(factor: float, orig: int) -> tuple:
  return tuple(sorted({
      "rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
      "high_freq_factor": 4.0, "original_max_position_embeddings": orig}.items()))


_GPT2 = dict(family="gpt2", norm="layernorm", norm_eps=1e-5, norm_bias=True, activation="gelu_tanh",
             gated_mlp=False, positions="learned", qkv_bias=True, o_bias=True, mlp_bias=True,
             tie_embeddings=True, vocab_size=50257, max_seq_len=1024, head_dim=64,
             bos_token_id=50256, eos_token_id=50256)
_LLAMA = dict(family="llama", norm_eps=1e-5, activation="silu", head_dim=128)
_QWEN2 = dict(family="qwen2", norm_eps=1e-6, qkv_bias=True, rope_theta=1e6, vocab_size=151936)
_QWEN3 = dict(family="qwen3", norm_eps=1e-6, qk_norm=True, rope_theta=1e6, vocab_size=151936,
              head_dim=128)
_GEMMA = dict(family="gemma", norm_eps=1e-6, norm_add_one=True, activation="gelu_tanh",
              embed_scale=True, tie_embeddings=True, vocab_size=256000, head_dim=256,
              max_seq_len=8192, bos_token_id=2, eos_token_id=1, pad_token_id=0)


def _preset(base: dict, **kw) -> ModelConfig:
  return ModelConfig(**{**base, **kw})


PRESETS: dict[str, ModelConfig] = {
    # Tiny shapes for tests and the CPU demo.
    "tiny": ModelConfig(family="llama", vocab_size=256, d_model=64, n_layers=2, n_heads=4,
                        n_kv_heads=2, head_dim=16, mlp_dim=128, max_seq_len=512),
    # The built-in demo's base (vocab set from its tokenizer): small enough to pretrain on CPU.
    "demo": ModelConfig(family="llama", vocab_size=1024, d_model=128, n_layers=2, n_heads=4,
                        n_kv_heads=2, head_dim=32, mlp_dim=384, max_seq_len=512,
                        tie_embeddings=True),
    # The demo base since session 8 (ftjax/demo/base): the same size with 8 heads of 16, each
    # with its own kv head. With copy drills in its corpus it forms an induction circuit (it
    # copies a ticket's tracking code) in ~2000 steps on every seed screened; the GQA shape
    # above started copying late or not at all (docs/demo_seeds/README.md, sessions 7b and 8).
    "demo-mha": ModelConfig(family="llama", vocab_size=1024, d_model=128, n_layers=2, n_heads=8,
                            n_kv_heads=8, head_dim=16, mlp_dim=384, max_seq_len=512,
                            tie_embeddings=True),
    "tiny-gpt2": _preset(_GPT2, vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4,
                         head_dim=16, mlp_dim=256, max_seq_len=512, bos_token_id=None,
                         eos_token_id=None),
    "gpt2": _preset(_GPT2, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, mlp_dim=3072),
    "gpt2-medium": _preset(_GPT2, d_model=1024, n_layers=24, n_heads=16, n_kv_heads=16,
                           mlp_dim=4096),
    "gpt2-large": _preset(_GPT2, d_model=1280, n_layers=36, n_heads=20, n_kv_heads=20,
                          mlp_dim=5120),
    "gpt2-xl": _preset(_GPT2, d_model=1600, n_layers=48, n_heads=25, n_kv_heads=25, mlp_dim=6400),
    "llama-2-7b": _preset(_LLAMA, vocab_size=32000, d_model=4096, n_layers=32, n_heads=32,
                          n_kv_heads=32, mlp_dim=11008, max_seq_len=4096, bos_token_id=1,
                          eos_token_id=2),
    "llama-3-8b": _preset(_LLAMA, vocab_size=128256, d_model=4096, n_layers=32, n_heads=32,
                          n_kv_heads=8, mlp_dim=14336, rope_theta=500000.0, max_seq_len=8192,
                          bos_token_id=128000, eos_token_id=128001),
    "llama-3.1-8b": _preset(_LLAMA, vocab_size=128256, d_model=4096, n_layers=32, n_heads=32,
                            n_kv_heads=8, mlp_dim=14336, rope_theta=500000.0,
                            rope_scaling=_llama3_scaling(8.0, 8192), max_seq_len=131072,
                            bos_token_id=128000, eos_token_id=128001),
    "llama-3-70b": _preset(_LLAMA, vocab_size=128256, d_model=8192, n_layers=80, n_heads=64,
                           n_kv_heads=8, mlp_dim=28672, rope_theta=500000.0, max_seq_len=8192,
                           bos_token_id=128000, eos_token_id=128001),
    "llama-3.2-1b": _preset(_LLAMA, vocab_size=128256, d_model=2048, n_layers=16, n_heads=32,
                            n_kv_heads=8, head_dim=64, mlp_dim=8192, rope_theta=500000.0,
                            rope_scaling=_llama3_scaling(32.0, 8192), tie_embeddings=True,
                            max_seq_len=131072, bos_token_id=128000, eos_token_id=128001),
    "llama-3.2-3b": _preset(_LLAMA, vocab_size=128256, d_model=3072, n_layers=28, n_heads=24,
                            n_kv_heads=8, mlp_dim=8192, rope_theta=500000.0,
                            rope_scaling=_llama3_scaling(32.0, 8192), tie_embeddings=True,
                            max_seq_len=131072, bos_token_id=128000, eos_token_id=128001),
    "mistral-7b": _preset(_LLAMA, family="mistral", vocab_size=32000, d_model=4096, n_layers=32,
                          n_heads=32, n_kv_heads=8, mlp_dim=14336, sliding_window=4096,
                          max_seq_len=32768, bos_token_id=1, eos_token_id=2),
    "mistral-7b-v0.3": _preset(_LLAMA, family="mistral", vocab_size=32768, d_model=4096,
                               n_layers=32, n_heads=32, n_kv_heads=8, mlp_dim=14336,
                               rope_theta=1e6, max_seq_len=32768, bos_token_id=1,
                               eos_token_id=2),
    "qwen2.5-0.5b": _preset(_QWEN2, d_model=896, n_layers=24, n_heads=14, n_kv_heads=2,
                            head_dim=64, mlp_dim=4864, tie_embeddings=True, max_seq_len=32768),
    "qwen2.5-1.5b": _preset(_QWEN2, d_model=1536, n_layers=28, n_heads=12, n_kv_heads=2,
                            head_dim=128, mlp_dim=8960, tie_embeddings=True, max_seq_len=32768),
    "qwen2.5-7b": _preset(_QWEN2, vocab_size=152064, d_model=3584, n_layers=28, n_heads=28,
                          n_kv_heads=4, head_dim=128, mlp_dim=18944, max_seq_len=32768),
    "qwen3-0.6b": _preset(_QWEN3, d_model=1024, n_layers=28, n_heads=16, n_kv_heads=8,
                          mlp_dim=3072, tie_embeddings=True, max_seq_len=40960),
    "qwen3-8b": _preset(_QWEN3, d_model=4096, n_layers=36, n_heads=32, n_kv_heads=8,
                        mlp_dim=12288, max_seq_len=40960),
    "gemma-2b": _preset(_GEMMA, d_model=2048, n_layers=18, n_heads=8, n_kv_heads=1,
                        mlp_dim=16384),
    "gemma-7b": _preset(_GEMMA, d_model=3072, n_layers=28, n_heads=16, n_kv_heads=16,
                        mlp_dim=24576),
}


def get_preset(name: str, **overrides) -> ModelConfig:
  """A named preset, optionally with fields replaced."""
  if name not in PRESETS:
    raise UserError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
  return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


LORA_TARGET_PRESETS = {
    "qv": r"attn/(q|v)_proj$",
    "attn": r"attn/(q|k|v|o)_proj$",
    "mlp": r"mlp/(gate|up|down)_proj$",
    # Like PEFT's "all-linear": every linear layer except the output head.
    "all-linear": r"(attn|mlp)/\w+_proj$",
}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA (and DoRA) on the linear layers whose path matches `targets`.

  Forward: h = W0 x + s * B(A(dropout(x))), s = alpha / rank (alpha / sqrt(rank) with rslora).
  A is initialised like PEFT (Kaiming-uniform, a=sqrt(5); or Gaussian std 1/rank), B = 0, so
  training starts exactly at the base model. `targets` is a preset name (qv, attn, mlp,
  all-linear) or a regex searched in the layer path, e.g. "attn/(q|v)_proj$" (paths are
  `layers/attn/q_proj` under scanned layers, `layer_0/attn/q_proj` unrolled). `layers`, a tuple
  of block indices, restricts LoRA to those blocks (PEFT's `layers_to_transform`): the stacked
  [L, ...] adapter arrays keep zero slices for the other blocks, which the forward ignores and
  so never get a gradient.
  """

  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: str = "all-linear"
  rslora: bool = False
  init: str = "kaiming"  # kaiming | gaussian
  dora: bool = False
  layers: Optional[tuple[int, ...]] = None

  def __post_init__(self):
    if self.layers is not None:
      object.__setattr__(self, "layers", tuple(sorted({int(i) for i in self.layers})))
      if not self.layers or min(self.layers) < 0:
        raise ValueError(f"LoraConfig.layers={self.layers}: expected non-negative block indices")
    if self.rank < 1:
      raise ValueError(f"LoraConfig.rank={self.rank} must be >= 1")
    if self.init not in ("kaiming", "gaussian"):
      raise ValueError(f"LoraConfig.init={self.init!r}: expected kaiming or gaussian")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoraConfig.dropout={self.dropout} must be in [0, 1)")

  @property
  def pattern(self) -> str:
    return LORA_TARGET_PRESETS.get(self.targets, self.targets)

  @property
  def scale(self) -> float:
    return self.alpha / (self.rank ** 0.5 if self.rslora else self.rank)


@dataclasses.dataclass(frozen=True)
class PrefixConfig:
  """Prefix tuning (learned per-layer key/value prefixes) or prompt tuning (soft tokens).

  prefix: every position of every layer also attends to `length` learned keys and values
  (kv heads, so GQA-aware); with `reparam`, they come from a two-layer MLP over a learned
  embedding (Li & Liang 2021; PEFT's prefix_projection) during training.
  prompt: `length` learned embeddings are prepended to the input embeddings (Lester et al. 2021).
  As in PEFT, the real tokens' positions start at `length`.
  """

  kind: str = "prefix"  # prefix | prompt
  length: int = 16
  reparam: bool = False
  reparam_hidden: int = 512
  init_std: float = 0.02

  def __post_init__(self):
    if self.kind not in ("prefix", "prompt"):
      raise ValueError(f"PrefixConfig.kind={self.kind!r}: expected prefix or prompt")
    if self.length < 0:
      raise ValueError(f"PrefixConfig.length={self.length} must be >= 0")


BOTTLENECK_PLACEMENTS = ("houlsby", "pfeiffer")


@dataclasses.dataclass(frozen=True)
class BottleneckConfig:
  """Bottleneck adapters: h + up(act(down(h))) on a sublayer's output, inside every block.

  houlsby (Houlsby et al. 2019): after the attention and after the MLP sublayer; pfeiffer
  (Pfeiffer et al. 2020): after the MLP only. down [D, D // reduction_factor] starts random
  (normal, `init_std`), up starts at zero: a fresh adapter leaves the model unchanged.
  """

  reduction_factor: int = 16
  placement: str = "houlsby"
  activation: str = "relu"  # relu | silu | gelu_tanh | gelu
  init_std: float = 0.02

  def __post_init__(self):
    if self.placement not in BOTTLENECK_PLACEMENTS:
      raise ValueError(f"BottleneckConfig.placement={self.placement!r}: expected houlsby or "
                       "pfeiffer")
    if int(self.reduction_factor) != self.reduction_factor or self.reduction_factor < 1:
      raise ValueError(f"BottleneckConfig.reduction_factor={self.reduction_factor}: expected "
                       "an integer >= 1")
    if self.activation not in ("relu", "silu", "gelu_tanh", "gelu"):
      raise ValueError(f"BottleneckConfig.activation={self.activation!r}: expected relu, silu, "
                       "gelu_tanh or gelu")

  def sites(self) -> tuple[str, ...]:
    """The sublayers whose output gets an adapter: attn and/or mlp."""
    return ("attn", "mlp") if self.placement == "houlsby" else ("mlp",)

  def size(self, d_model: int) -> int:
    """The bottleneck width: d_model // reduction_factor, at least 1."""
    return max(1, d_model // int(self.reduction_factor))
