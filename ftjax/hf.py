"""Hugging Face interop: config.json <-> ModelConfig, safetensors <-> params, per family.

Loading streams: one tensor is read from a memory-mapped safetensors file, checked, converted
and placed before the next is read, so the model is never held twice in host memory.
Only safetensors are read (never pickle `.bin`), and no remote code runs.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ftjax import lora as lora_lib, st_io
from ftjax.config import TOKEN_LABELS, ModelConfig
from ftjax.errors import UserError
from ftjax.model import Decoder

log = logging.getLogger("ftjax")

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma")
_SEQ_CLS = {"gpt2": "GPT2ForSequenceClassification", "llama": "LlamaForSequenceClassification",
            "mistral": "MistralForSequenceClassification",
            "qwen2": "Qwen2ForSequenceClassification", "qwen3": "Qwen3ForSequenceClassification",
            "gemma": "GemmaForSequenceClassification"}
_TOKEN_CLS = {k: v.replace("Sequence", "Token") for k, v in _SEQ_CLS.items()}
_ARCH = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
         "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM"}
_ACTS = {"silu": "silu", "swish": "silu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
         "gelu_fast": "gelu_tanh", "gelu": "gelu"}
_ACTS_BACK = {"gpt2": {"gelu_tanh": "gelu_new", "gelu": "gelu", "silu": "silu"},
              "default": {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "silu": "silu"}}
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


class CheckpointError(UserError):
  """A checkpoint that cannot be loaded; the message names the file and the tensor."""


# ----------------------------------------------------------------------------- config


def _act(name: str, path: str) -> str:
  if name not in _ACTS:
    raise CheckpointError(f"{path}: activation {name!r} is not supported ({', '.join(_ACTS)})")
  return _ACTS[name]


def _rope(hf: dict, path: str) -> tuple[float, Optional[tuple]]:
  """rope_theta and rope_scaling from either transformers v5 `rope_parameters` or v4 keys."""
  params = hf.get("rope_parameters")
  if params:
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
  else:
    theta = hf.get("rope_theta", 10000.0)
    scaling = dict(hf.get("rope_scaling") or {})
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind == "default":
    return float(theta), None
  if kind not in ("linear", "llama3"):
    raise CheckpointError(f"{path}: rope type {kind!r} is not supported (default, linear, llama3)")
  scaling["rope_type"] = kind
  scaling.pop("type", None)
  return float(theta), tuple(sorted(scaling.items()))


def config_from_hf(hf: dict, path: str = "config.json", **overrides) -> ModelConfig:
  """Map a Hugging Face config dict onto a ModelConfig."""
  mt = hf.get("model_type")
  if mt not in SUPPORTED_MODEL_TYPES:
    raise CheckpointError(f"{path}: model_type {mt!r} is not supported; ftjax supports "
                          f"{', '.join(SUPPORTED_MODEL_TYPES)}")
  eos = hf.get("eos_token_id")
  common = dict(family=mt, vocab_size=hf["vocab_size"], bos_token_id=hf.get("bos_token_id"),
                eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
                pad_token_id=hf.get("pad_token_id"))
  if mt == "gpt2":
    d, n = hf["n_embd"], hf["n_head"]
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx"):
      raise CheckpointError(f"{path}: gpt2 attention scaling variants are not supported")
    cfg = dict(common, d_model=d, n_layers=hf["n_layer"], n_heads=n, n_kv_heads=n,
               head_dim=d // n, mlp_dim=hf.get("n_inner") or 4 * d,
               max_seq_len=hf.get("n_positions", 1024), norm="layernorm",
               norm_eps=hf.get("layer_norm_epsilon", 1e-5), norm_bias=True,
               activation=_act(hf.get("activation_function", "gelu_new"), path), gated_mlp=False,
               positions="learned", qkv_bias=True, o_bias=True, mlp_bias=True,
               tie_embeddings=hf.get("tie_word_embeddings", True))
  else:
    d, n = hf["hidden_size"], hf["num_attention_heads"]
    theta, scaling = _rope(hf, path)
    act = hf.get("hidden_activation") or hf.get("hidden_act", "silu")
    layer_types = hf.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types) or (
        mt in ("qwen2", "qwen3") and hf.get("use_sliding_window")):
      raise CheckpointError(f"{path}: per-layer sliding-window attention is not supported")
    attn_bias = bool(hf.get("attention_bias", False))
    cfg = dict(common, d_model=d, n_layers=hf["num_hidden_layers"], n_heads=n,
               n_kv_heads=hf.get("num_key_value_heads") or n,
               head_dim=hf.get("head_dim") or d // n, mlp_dim=hf["intermediate_size"],
               max_seq_len=hf.get("max_position_embeddings", 2048),
               norm_eps=hf.get("rms_norm_eps", 1e-6), activation=_act(act, path),
               rope_theta=theta, rope_scaling=scaling,
               qkv_bias=attn_bias or mt == "qwen2", o_bias=attn_bias and mt != "qwen2",
               mlp_bias=bool(hf.get("mlp_bias", False)),
               tie_embeddings=hf.get("tie_word_embeddings", mt == "gemma"))
    if mt == "mistral":
      cfg["sliding_window"] = hf.get("sliding_window")
    if mt == "qwen3":
      cfg["qk_norm"] = True
    if mt == "gemma":
      cfg.update(norm_add_one=True, embed_scale=True)
  if any(a.endswith("ForSequenceClassification") for a in hf.get("architectures") or []):
    if hf.get("num_labels", len(hf.get("id2label") or {0: 0})) != 1:
      raise CheckpointError(f"{path}: only single-score (num_labels=1) classifiers are supported")
    cfg["head"] = "score"
  if any(a.endswith("ForTokenClassification") for a in hf.get("architectures") or []):
    labels = hf.get("num_labels", len(hf.get("id2label") or {0: 0, 1: 1}))
    if labels != TOKEN_LABELS or mt == "gpt2" or hf.get("token_classification_bias", True):
      raise CheckpointError(f"{path}: only {TOKEN_LABELS}-label token classifiers without a bias "
                            "(ftjax's process reward models: token_classification_bias=false, "
                            "not gpt2) are supported")
    cfg["head"] = "token"
  cfg.update(overrides)
  return ModelConfig(**cfg)


def config_to_hf(cfg: ModelConfig) -> dict:
  """A config.json dict that transformers' AutoConfig reads back into the same model."""
  eos = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
  ids = dict(bos_token_id=cfg.bos_token_id, eos_token_id=eos, pad_token_id=cfg.pad_token_id)
  if cfg.family == "gpt2":
    out = dict(ids, vocab_size=cfg.vocab_size, n_embd=cfg.d_model, n_layer=cfg.n_layers,
               n_head=cfg.n_heads, n_inner=cfg.mlp_dim, n_positions=cfg.max_seq_len,
               layer_norm_epsilon=cfg.norm_eps,
               activation_function=_ACTS_BACK["gpt2"][cfg.activation],
               tie_word_embeddings=cfg.tie_embeddings)
  else:
    out = dict(ids, vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
               num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
               num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
               intermediate_size=cfg.mlp_dim, max_position_embeddings=cfg.max_seq_len,
               rms_norm_eps=cfg.norm_eps, hidden_act=_ACTS_BACK["default"][cfg.activation],
               rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings)
    if cfg.rope_scaling:
      out["rope_scaling"] = dict(cfg.rope_scaling)
    if cfg.family in ("llama", "qwen3", "gemma"):
      out["attention_bias"] = cfg.qkv_bias
    if cfg.family == "llama":
      out["mlp_bias"] = cfg.mlp_bias
    if cfg.family == "mistral":
      out["sliding_window"] = cfg.sliding_window
  out["model_type"] = cfg.family
  if cfg.head == "token" and cfg.family == "gpt2":
    raise UserError("a token-classification head exports for llama, mistral, qwen2, qwen3 and "
                    "gemma (transformers' GPT2ForTokenClassification has a bias ftjax lacks)")
  arch = {"lm": _ARCH, "score": _SEQ_CLS, "token": _TOKEN_CLS}[cfg.head]
  out["architectures"] = [arch[cfg.family]]
  if cfg.head == "score":
    out["num_labels"] = 1
  if cfg.head == "token":  # transformers' generic token classifier, its Linear without a bias
    out.update(num_labels=TOKEN_LABELS, token_classification_bias=False,
               id2label={0: "bad", 1: "good"}, label2id={"bad": 0, "good": 1})
  out["torch_dtype"] = out["dtype"] = cfg.param_dtype
  try:  # Let the installed transformers fill in its defaults and its own key layout.
    import transformers
    kw = {k: v for k, v in out.items() if k not in ("model_type", "torch_dtype", "dtype")}
    full = transformers.AutoConfig.for_model(cfg.family, **kw).to_dict()
    full.pop("transformers_version", None)
    full["dtype"] = cfg.param_dtype
    full["architectures"] = out["architectures"]
    return full
  except ImportError:
    return out


# ----------------------------------------------------------------------------- tensor maps


@dataclasses.dataclass(frozen=True)
class Entry:
  """One HF tensor and the ftjax param path(s) it fills.

  kind: "copy" (same layout), "T" (torch Linear [out, in] -> kernel [in, out]),
  "split3" (GPT-2's fused c_attn, split on the last axis into q, k, v).
  layer: for a block's tensor under scanned layers, its slice of the stacked `layers/...`
  params ([L, ...] arrays); None when the path holds the tensor alone.
  """
  hf: str
  paths: tuple[tuple[str, ...], ...]
  kind: str = "copy"
  layer: Optional[int] = None


def tensor_map(cfg: ModelConfig) -> list[Entry]:
  """Every HF tensor name of this config and where it goes in the ftjax params tree."""
  e: list[Entry] = []
  i = None  # the block whose tensors `one` is adding (None outside the blocks)

  def one(hf, path, kind="copy"):
    e.append(Entry(hf, (tuple(path.split("/")),), kind, i if cfg.scan_layers else None))

  def block(i):
    return "layers" if cfg.scan_layers else f"layer_{i}"

  if cfg.family == "gpt2":
    one("transformer.wte.weight", "embed")
    one("transformer.wpe.weight", "pos_embed")
    for i in range(cfg.n_layers):
      p, l = f"transformer.h.{i}", block(i)
      for hf_norm, norm in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
        one(f"{p}.{hf_norm}.weight", f"{l}/{norm}/scale")
        one(f"{p}.{hf_norm}.bias", f"{l}/{norm}/bias")
      for leaf, hfleaf in (("kernel", "weight"), ("bias", "bias")):
        e.append(Entry(f"{p}.attn.c_attn.{hfleaf}",
                       tuple((l, "attn", f"{x}_proj", leaf) for x in "qkv"), "split3",
                       i if cfg.scan_layers else None))
        one(f"{p}.attn.c_proj.{hfleaf}", f"{l}/attn/o_proj/{leaf}")
        one(f"{p}.mlp.c_fc.{hfleaf}", f"{l}/mlp/up_proj/{leaf}")
        one(f"{p}.mlp.c_proj.{hfleaf}", f"{l}/mlp/down_proj/{leaf}")
    i = None
    one("transformer.ln_f.weight", "final_norm/scale")
    one("transformer.ln_f.bias", "final_norm/bias")
    _head(cfg, one)
    return e
  one("model.embed_tokens.weight", "embed")
  for i in range(cfg.n_layers):
    p, l = f"model.layers.{i}", block(i)
    one(f"{p}.input_layernorm.weight", f"{l}/attn_norm/scale")
    one(f"{p}.post_attention_layernorm.weight", f"{l}/mlp_norm/scale")
    for x in "qkvo":
      one(f"{p}.self_attn.{x}_proj.weight", f"{l}/attn/{x}_proj/kernel", "T")
      if (cfg.qkv_bias if x != "o" else cfg.o_bias):
        one(f"{p}.self_attn.{x}_proj.bias", f"{l}/attn/{x}_proj/bias")
    if cfg.qk_norm:
      one(f"{p}.self_attn.q_norm.weight", f"{l}/attn/q_norm/scale")
      one(f"{p}.self_attn.k_norm.weight", f"{l}/attn/k_norm/scale")
    for x in (("gate", "up", "down") if cfg.gated_mlp else ("up", "down")):
      one(f"{p}.mlp.{x}_proj.weight", f"{l}/mlp/{x}_proj/kernel", "T")
      if cfg.mlp_bias:
        one(f"{p}.mlp.{x}_proj.bias", f"{l}/mlp/{x}_proj/bias")
  i = None
  one("model.norm.weight", "final_norm/scale")
  _head(cfg, one)
  return e


def _head(cfg: ModelConfig, one):
  if cfg.head == "score":
    one("score.weight", "score", "T")  # [1, D] in HF
  elif cfg.head == "token":
    one("score.weight", "token_score", "T")  # [2, D] in HF
  elif not cfg.tie_embeddings:
    one("lm_head.weight", "lm_head", "T")


# Tensors that some checkpoints carry and that hold nothing to load (buffers, tied copies).
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


def _canonical(name: str, cfg: ModelConfig) -> str:
  """Old GPT-2 checkpoints (saved from GPT2Model) drop the `transformer.` prefix."""
  if cfg.family == "gpt2" and not name.startswith(("transformer.", "lm_head.")):
    return "transformer." + name
  return name


def _get(tree: dict, path: tuple[str, ...]):
  for k in path:
    tree = tree[k]
  return tree


def _set(tree: dict, path: tuple[str, ...], value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _to_params(entry: Entry, arr: np.ndarray) -> list[np.ndarray]:
  if entry.kind == "T":
    return [arr.T]
  if entry.kind == "split3":
    return list(np.split(arr, 3, axis=-1))
  return [arr]


def _from_params(entry: Entry, arrs: list[np.ndarray]) -> np.ndarray:
  if entry.kind == "T":
    return arrs[0].T
  if entry.kind == "split3":
    return np.concatenate(arrs, axis=-1)
  return arrs[0]


def _hf_shape(entry: Entry, shapes: list[tuple]) -> tuple:
  if entry.kind == "T":
    return tuple(reversed(shapes[0]))
  if entry.kind == "split3":
    return shapes[0][:-1] + (3 * shapes[0][-1],)
  return shapes[0]


# ----------------------------------------------------------------------------- load


def resolve(path: str) -> str:
  """A local HF directory, or a hub name fetched with huggingface_hub (where there is network)."""
  if os.path.isdir(path):
    return path
  if os.path.exists(path):
    raise CheckpointError(f"{path}: expected a Hugging Face model directory, got a file")
  if path.count("/") == 1 and not path.startswith((".", "/")):
    try:
      from huggingface_hub import snapshot_download
      return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "tokenizer*",
                                                     "*.model", "*.txt", "*.jinja"])
    except Exception as e:  # noqa: BLE001 - any hub failure becomes one clear line
      raise CheckpointError(f"{path}: not a local directory and the hub download failed: "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                            ) from None
  raise CheckpointError(f"{path}: no such directory")


def read_hf_config(path: str) -> dict:
  cfg_path = os.path.join(path, "config.json")
  if not os.path.exists(cfg_path):
    raise CheckpointError(f"{cfg_path}: missing; a Hugging Face model directory needs config.json")
  try:
    with open(cfg_path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from None


def safetensors_files(path: str) -> list[str]:
  """The checkpoint's safetensors files (from the index when sharded); refuses pickles."""
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      names = sorted(set(json.load(f)["weight_map"].values()))
    files = [os.path.join(path, n) for n in names]
    for fpath in files:
      if not os.path.exists(fpath):
        raise CheckpointError(f"{index}: lists {os.path.basename(fpath)}, which is missing")
    return files
  single = os.path.join(path, "model.safetensors")
  if os.path.exists(single):
    return [single]
  files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
  if files:
    return files
  pickles = [os.path.basename(p) for ext in ("*.bin", "*.pt", "*.pth", "*.ckpt")
             for p in glob.glob(os.path.join(path, ext))]
  if pickles:
    raise CheckpointError(
        f"{os.path.join(path, pickles[0])}: pickle checkpoints are refused (they can run code); "
        "convert to safetensors, e.g. model.save_pretrained(dir, safe_serialization=True)")
  raise CheckpointError(f"{path}: no model.safetensors (or sharded index) found")


@functools.partial(jax.jit, donate_argnums=0)
def _write_slice(buf, value, i):
  return jax.lax.dynamic_update_index_in_dim(buf, value.astype(buf.dtype), i, 0)


@functools.lru_cache(maxsize=None)
def _zeros(shape: tuple, dtype, sharding):
  """A jitted zeros of this shape, dtype and sharding, made once per process: a new lambda per
  param would be traced and lowered again at every load."""
  return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


class _Stacker:
  """Per-layer tensors into preallocated [L, ...] device arrays, slice by slice.

  The buffer of a stacked param is allocated (in its shards, when `shardings` is given) on its
  first slice and updated in place (donated) for each further one, so loading holds one HF
  tensor on the host at a time, as without stacking.
  """

  def __init__(self, n_layers: int, shardings=None):
    self.n, self.shardings, self.bufs = n_layers, shardings, {}

  def put(self, path: tuple, i: int, value):
    buf = self.bufs.get(path)
    if buf is None:
      target = None if self.shardings is None else _get(self.shardings, path)

      def alloc(v, sharding=None):
        return _zeros((self.n,) + tuple(np.shape(v)), np.dtype(v.dtype), sharding)()

      buf = (jax.tree_util.tree_map(alloc, value) if target is None
             else jax.tree_util.tree_map(alloc, value, target))
    self.bufs[path] = jax.tree_util.tree_map(
        lambda b, v: _write_slice(b, jnp.asarray(v), jnp.int32(i)), buf, value)

  def into(self, params: dict):
    for path, buf in self.bufs.items():
      _set(params, path, buf)


def load_params(path: str, cfg: ModelConfig,
                convert: Optional[Callable[[tuple, np.ndarray], Any]] = None,
                shardings: Any = None) -> dict:
  """Stream HF safetensors into an ftjax params tree for `cfg` (param_dtype applied; a score
  head, trained as an adapter, in adapter_dtype).

  Under scanned layers each block's tensor is written into its slice of the stacked [L, ...]
  param as it streams in.

  Args:
    path: local HF directory.
    cfg: the ModelConfig the params must fit.
    convert: optional `convert(param_path, host_array) -> array or dict of arrays` for one
      param (or one layer's slice of it): a cast, a quantizer; default: the param's dtype.
    shardings: optional tree of `jax.sharding.Sharding` for the params tree (stacked shapes);
      every param is placed straight into its shards.
  """
  entries = {en.hf: en for en in tensor_map(cfg)}
  abstract = _unbox(lora_lib.init_shapes(Decoder(cfg))["params"])
  shapes = jax.tree_util.tree_map(lambda s: s.shape, abstract)
  dtypes = jax.tree_util.tree_map(lambda s: np.dtype(s.dtype), abstract)
  convert = convert or (lambda p, a: np.asarray(a, dtype=_get(dtypes, p)))
  stacker = _Stacker(cfg.n_layers, shardings)

  def place(p, layer, arr):
    value = convert(p, arr)
    if layer is not None:
      return stacker.put(p, layer, value)
    if shardings is None:
      value = jax.tree_util.tree_map(jnp.asarray, value)
    else:
      value = jax.tree_util.tree_map(jax.device_put, value, _get(shardings, p))
    _set(params, p, value)

  params: dict = {}
  seen, unexpected = set(), []
  for fpath in safetensors_files(path):
    f = st_io.SafetensorsFile(fpath)
    for raw_name in f.names():
      name = _canonical(raw_name, cfg)
      entry = entries.get(name)
      if entry is None:
        if not name.endswith(_IGNORED_SUFFIXES) and not (
            name == "lm_head.weight" and (cfg.tie_embeddings or cfg.head != "lm")):
          unexpected.append(raw_name)
        continue
      want = _hf_shape(entry, [_get(shapes, p)[entry.layer is not None:] for p in entry.paths])
      if f.shape(raw_name) != want:
        raise CheckpointError(f"{fpath}: tensor {raw_name!r} has shape {list(f.shape(raw_name))},"
                              f" expected {list(want)} from config.json")
      arr = f.get(raw_name)
      for p, part in zip(entry.paths, _to_params(entry, arr)):
        place(p, entry.layer, np.asarray(part).astype(_get(dtypes, p)))
      del arr
      seen.add(name)
  missing = [n for n in entries if n not in seen]
  if cfg.head == "score" and "score.weight" in missing:
    # A causal-LM checkpoint loaded as a reward model: a fresh (zero) score head.
    log.info("%s: no score.weight; the reward head starts at zero", path)
    place(("score",), None, np.zeros((cfg.d_model, 1), dtypes["score"]))
    missing.remove("score.weight")
  if cfg.head == "token" and "score.weight" in missing:
    log.info("%s: no score.weight; the step classifier starts at zero", path)
    place(("token_score",), None, np.zeros((cfg.d_model, TOKEN_LABELS), dtypes["token_score"]))
    missing.remove("score.weight")
  if missing:
    raise CheckpointError(f"{path}: tensor {missing[0]!r} is missing from the safetensors files"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
  stacker.into(params)
  if unexpected:
    log.warning("%s: ignored %d unexpected tensors, e.g. %s", path, len(unexpected),
                unexpected[:3])
  return params


def _unbox(tree):
  import flax.linen as nn
  return nn.meta.unbox(tree)


def load_pretrained(path: str, dtype: str = "float32", compute_dtype: Optional[str] = None,
                    attention: str = "xla", remat: bool | str = False, lora=None, quant=None,
                    prefix=None, rng: Optional[jax.Array] = None, mesh=None, rules=None,
                    quant_targets: Optional[str] = None, adapter_dtype: str = "float32",
                    bottleneck=None, **config_overrides):
  """Load a HF causal LM directory (or hub name) as (Decoder, params).

  Args:
    path: directory with config.json and safetensors, or a hub name (needs network).
    dtype: param dtype (master weights).
    compute_dtype: matmul dtype; defaults to `dtype`.
    attention: "xla", "dot_product" or "cudnn" (`ModelConfig.attention`).
    remat: rematerialise each block in the backward pass: False/"none", True/"full", or a policy of
      config.REMAT_POLICIES ("dots_saveable" keeps matmul outputs, recomputes the rest).
    lora: a `LoraConfig`; adapters are initialised (B = 0) beside the loaded kernels.
    quant: None, "nf4", "int4" or a `QuantConfig`: the linear kernels are quantized tensor by
      tensor while streaming, so the full model never exists in float32.
    prefix: a `PrefixConfig` (prefix or prompt tuning), initialised beside the base.
    bottleneck: a `BottleneckConfig` (Houlsby / Pfeiffer adapters), initialised beside it.
    rng: key for the adapter initialisation (default PRNGKey(0)).
    mesh, rules: place every tensor straight into its shards on this mesh (see sharding.py).
    quant_targets: regex of the linear layers kept in 4 bits (default: all attention and MLP
      projections); embeddings, norms and the output head always stay dense.
    adapter_dtype: dtype of the trainable adapter params (LoRA, prefix, prompt, score head),
      whatever `dtype` is; they are cast to the compute dtype inside the matmul.
    config_overrides: other ModelConfig fields, e.g. matmul_precision="tensorfloat32".
  """
  from ftjax.model import AdapterSpec
  path = resolve(path)
  hf_cfg = read_hf_config(path)
  cfg = config_from_hf(hf_cfg, os.path.join(path, "config.json"), param_dtype=dtype,
                       dtype=compute_dtype or dtype, attention=attention, remat=remat,
                       adapter_dtype=adapter_dtype, **config_overrides)
  gen = os.path.join(path, "generation_config.json")
  if os.path.exists(gen):
    with open(gen) as f:
      eos = json.load(f).get("eos_token_id")
    if eos is not None:
      cfg = cfg.replace(eos_token_id=tuple(eos) if isinstance(eos, list) else eos)
  qcfg = quant
  if isinstance(quant, str):
    from ftjax.quant import QuantConfig
    qcfg = QuantConfig(kind=quant)
  spec = AdapterSpec(lora=lora, quant=qcfg, prefix=prefix, bottleneck=bottleneck)
  if quant_targets:
    spec = dataclasses.replace(spec, quant_targets=quant_targets)
  model = Decoder(cfg, spec)
  target = None
  if mesh is not None:
    # Each tensor goes straight into its shards: the model never sits whole on one device.
    from ftjax import sharding
    abstract = _unbox(lora_lib.init_shapes(model)["params"])
    target = sharding.param_shardings(model, abstract, mesh, rules or sharding.RULES)

  def convert(p, arr):
    # A stacked kernel arrives one layer at a time: each slice is quantized on its own.
    if qcfg is not None and p[-1] == "kernel" and spec.quant_for("/".join(p[:-1])):
      from ftjax import quant as quant_lib
      return quant_lib.quantize(arr.astype(np.float32), qcfg)
    return arr  # load_params cast it to the param's dtype

  params = load_params(path, cfg, convert, target)
  if lora is not None or prefix is not None or bottleneck is not None:
    params = lora_lib.init_adapters(model, params,
                                    jax.random.PRNGKey(0) if rng is None else rng)
    if target is not None:  # the (small) adapter leaves into their shards too
      params = jax.tree_util.tree_map(jax.device_put, params, target)
  return model, params


# ----------------------------------------------------------------------------- save


def hf_tensors(cfg: ModelConfig, params: dict, dtype: Optional[str] = None
               ) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, host array) for every tensor, one at a time."""
  np_dtype = np.dtype(jnp.dtype(dtype or cfg.param_dtype))
  for entry in tensor_map(cfg):
    arrs = [_get(params, p) for p in entry.paths]
    if entry.layer is not None:  # this block's slice of the stacked param
      arrs = [a[entry.layer] for a in arrs]
    arrs = [np.asarray(jax.device_get(a)) for a in arrs]
    yield entry.hf, _from_params(entry, arrs).astype(np_dtype)


EXPORT_MARKER = "ftjax_export.json"
# Why a bottleneck adapter has no merged export (and, PEFT having no bottleneck type, no PEFT one).
BOTTLENECK_NO_MERGE = (
    "bottleneck adapters cannot be merged into the base weights (a nonlinearity sits between "
    "their two projections, so no single linear layer equals them) and PEFT has no format for "
    "them; keep the ftjax workdir (generate.py and eval.py --workdir=... load it), or export "
    "them for the adapters library (AdapterHub) with --format=adapterhub")


def is_export(path: str) -> bool:
  """Whether `path` is a directory that `write_hf_dir` wrote (it holds `EXPORT_MARKER`)."""
  return os.path.isfile(os.path.join(path, EXPORT_MARKER))


def write_hf_dir(out_dir: str, write: Callable[[str], None], info: Optional[dict] = None,
                 readme: Optional[str] = None):
  """Run `write(tmp_dir)`, then swap tmp_dir in for out_dir: no half-written export.

  `readme` (a model card, ftjax/model_card.py) is written as README.md with the files, so the
  card and the weights it describes arrive together.

  `EXPORT_MARKER` (`info` as JSON) goes in beside the files, so that a later export knows the
  directory for an ftjax export it may replace (experiments/export.py refuses other non-empty
  directories unless told to overwrite them).

  Files are built in a temporary sibling directory; an interruption at any point leaves the
  old directory or the new one complete at out_dir. Files of an old out_dir that no export
  writes (a README, a tokenizer) are carried over, as hard links where the filesystem allows;
  its old weights and configs are not (a shard count may shrink; a merged export over an
  adapter must not leave adapter_config.json behind).
  """
  out_dir = os.path.abspath(out_dir)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  _recover(out_dir)
  tmp = tempfile.mkdtemp(prefix=".ftjax-tmp-", dir=parent)
  try:
    umask = os.umask(0o22)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would become the export's mode
    write(tmp)
    if readme is not None:
      with open(os.path.join(tmp, "README.md"), "w") as f:
        f.write(readme)
    with open(os.path.join(tmp, EXPORT_MARKER), "w") as f:
      json.dump({"written_by": "ftjax", **(info or {})}, f, indent=2)
    if not os.path.exists(out_dir):
      os.replace(tmp, out_dir)
      return
    for name in os.listdir(out_dir):
      src, dst = os.path.join(out_dir, name), os.path.join(tmp, name)
      if os.path.lexists(dst) or _is_export_file(name):
        continue
      if os.path.isdir(src) and not os.path.islink(src):
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
      else:
        _link_or_copy(src, dst)
    _swap(tmp, out_dir)  # tmp now holds the old directory
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _is_export_file(name: str) -> bool:
  return (name.startswith(("model", "adapter_")) and ".safetensors" in name) or name in (
      "config.json", "generation_config.json", "adapter_config.json", EXPORT_MARKER,
      "pytorch_adapter.bin", "adapter.safetensors")  # the last two: adapterhub.FILES


def _link_or_copy(src: str, dst: str):
  try:
    os.link(src, dst, follow_symlinks=False)
  except OSError:
    shutil.copy2(src, dst, follow_symlinks=False)


def _backup(out_dir: str) -> str:
  return os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.ftjax-old")


def _exchange(a: str, b: str) -> bool:
  """Atomically exchange two paths with Linux renameat2(RENAME_EXCHANGE); False if unavailable."""
  try:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, rename_exchange = -100, 2
    return libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b),
                          rename_exchange) == 0
  except (AttributeError, OSError):  # not Linux, old libc
    return False


def _swap(new: str, out_dir: str):
  """Exchange the directories `new` and `out_dir` (afterwards `new` holds the old files).

  Without renameat2, two renames: out_dir is briefly missing while the old directory sits at
  `_backup(out_dir)`; a failure puts it back, and `_recover` does after a kill.
  """
  if _exchange(new, out_dir):
    return
  backup = _backup(out_dir)
  shutil.rmtree(backup, ignore_errors=True)
  os.replace(out_dir, backup)
  try:
    os.replace(new, out_dir)
  except BaseException:
    os.replace(backup, out_dir)
    raise
  os.replace(backup, new)


def _recover(out_dir: str):
  """Undo an export killed between the two renames of `_swap`'s fallback."""
  backup = _backup(out_dir)
  if os.path.isdir(backup):
    if os.path.exists(out_dir):
      shutil.rmtree(backup, ignore_errors=True)
    else:
      os.replace(backup, out_dir)


def save_pretrained(model: Decoder, params: dict, out_dir: str, dtype: Optional[str] = None,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, tokenizer_from: str = None,
                    export_info: Optional[dict] = None, readme: Optional[str] = None):
  """Write config.json, generation_config.json and safetensors that transformers loads.

  LoRA/DoRA adapters are merged in and 4-bit kernels dequantized first (see `lora.merge`).

  Args:
    dtype: tensor dtype on disk (default: the model's param dtype).
    max_shard_bytes: above this, shards plus model.safetensors.index.json.
    tokenizer_from: an HF directory whose tokenizer files are copied alongside.
    export_info: facts for the export marker (see `write_hf_dir`), e.g. the workdir and step.
    readme: the model card, written as README.md inside the same atomic write.
  """
  if model.spec.bottleneck is not None:
    raise ValueError(BOTTLENECK_NO_MERGE)
  if model.spec.prefix is not None:
    raise ValueError("save_pretrained: prefix/prompt tuning cannot be merged into HF weights; "
                     "export the adapter with save_adapter (PEFT format) instead")
  if model.spec.lora is not None or model.spec.quant is not None:
    model, params = lora_lib.merge(model, params)
  cfg = model.cfg
  if dtype:
    cfg = cfg.replace(param_dtype=dtype)

  def write(tmp):
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(config_to_hf(cfg), f, indent=2)
    gen = {k: v for k, v in (("bos_token_id", cfg.bos_token_id),
                             ("eos_token_id", list(cfg.eos_token_id)
                              if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id),
                             ("pad_token_id", cfg.pad_token_id)) if v is not None}
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
      json.dump(gen, f, indent=2)
    st_io.write_sharded(tmp, hf_tensors(cfg, params, cfg.param_dtype), max_shard_bytes)
    if tokenizer_from:
      copy_tokenizer(tokenizer_from, tmp)

  write_hf_dir(out_dir, write, {"format": "merged", **(export_info or {})}, readme)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja",
                   "chat_template.json", "added_tokens.json")


def copy_tokenizer(src: str, dst: str):
  for name in TOKENIZER_FILES:
    if os.path.exists(os.path.join(src, name)):
      shutil.copy(os.path.join(src, name), os.path.join(dst, name))
