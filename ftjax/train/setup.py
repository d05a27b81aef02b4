"""From a config to the objects a run trains: model, params, tokenizer, trainable rules,
optimizer, placement (mesh or pmap), and the data builders' view of `config.data`.

The trainers in ftjax/train call these once at setup; `workdir.load_trained` calls them again to
rebuild a finished run's model from its saved config. Files on disk (config.json, run.json,
checkpoints, the lock) are workdir.py's.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import traverse_util

from ftjax import checkpoint, heads, hf, offload, partition
from ftjax.config import (ADAPTER_DTYPES, MATMUL_PRECISIONS, BottleneckConfig, LoraConfig,
                          PrefixConfig, get_preset)
from ftjax.errors import UserError
from ftjax.model import AdapterSpec, Decoder, init_params
from ftjax.quant import QuantConfig
from ftjax.tokenizer import load_tokenizer
from ftjax.train import common

ADAPTER_KINDS = ("none", "lora", "prefix", "prompt", "bottleneck")


def _get(c, key, default=None):
  return c.get(key, default) if hasattr(c, "get") else getattr(c, key, default)


def adapter_spec(config) -> AdapterSpec:
  a, q = config.adapter, config.quant
  kind = a.kind
  if kind not in ADAPTER_KINDS:
    raise UserError(f"config.adapter.kind={kind!r}: expected one of {ADAPTER_KINDS}")
  if q.kind not in ("none", "nf4", "int4"):
    raise UserError(f"config.quant.kind={q.kind!r}: expected none, nf4 or int4")
  if q.kind != "none" and kind == "none":
    raise UserError("config.quant.kind needs an adapter: a 4-bit base cannot be fully "
                     "fine-tuned (set config.adapter.kind=lora)")
  lora = prefix = quant = bottleneck = None
  try:  # the dataclasses check their fields; here the fields come from the user's config
    if kind == "lora":
      lora = LoraConfig(rank=a.rank, alpha=a.alpha, dropout=a.dropout, targets=a.targets,
                        rslora=a.rslora, init=a.init, dora=a.dora)
    elif kind in ("prefix", "prompt"):
      prefix = PrefixConfig(kind=kind, length=a.length, reparam=a.reparam,
                            reparam_hidden=a.reparam_hidden)
    elif kind == "bottleneck":  # configs saved before these keys existed get the defaults
      bottleneck = BottleneckConfig(reduction_factor=_get(a, "reduction_factor", 16),
                                    placement=_get(a, "placement", "houlsby"))
    if q.kind != "none":
      quant = QuantConfig(kind=q.kind, block_size=q.block_size, double_quant=q.double_quant)
  except ValueError as e:
    raise UserError(f"config.adapter / config.quant: {e}") from None
  return AdapterSpec(lora=lora, quant=quant, prefix=prefix, bottleneck=bottleneck)


def numerics_config(config) -> dict:
  """ModelConfig's adapter_dtype and matmul_precision from `adapter.dtype` and
  `model.matmul_precision` (configs saved before these keys existed get the defaults)."""
  out = dict(adapter_dtype=_get(config.adapter, "dtype", "float32"),
             matmul_precision=_get(config.model, "matmul_precision", "auto"))
  checks = (("adapter.dtype", out["adapter_dtype"], ADAPTER_DTYPES),
            ("model.matmul_precision", out["matmul_precision"], MATMUL_PRECISIONS))
  for key, value, allowed in checks:
    if value not in allowed:
      raise UserError(f"config.{key}={value!r}: expected one of {', '.join(allowed)}")
  return out


def rules(config) -> list:
  """Trainable-parameter rules: the adapter's set, with `adapter.train_extra` regexes first."""
  extra = [(rx, partition.TRAIN) for rx in _get(config.adapter, "train_extra", "").split(",")
           if rx]
  return partition.rules_for("full" if config.adapter.kind == "none" else config.adapter.kind,
                             extra)


def tokenizer_path(config) -> str:
  m = config.model
  path = m.tokenizer or m.hf_path
  if not path:
    raise UserError("config.model.tokenizer is required when no config.model.hf_path is given")
  return hf.resolve(path)


def build_model(config, rng: Optional[jax.Array] = None, par=None):
  """(model, params, tokenizer, base_ref) from the config's model/adapter/quant sections.

  With `model.hf_path` the HF checkpoint is loaded (quantized while streaming, adapters
  initialised beside it); otherwise the `model.preset` shape is initialised from
  `model.seed` with the tokenizer's vocabulary (continued pretraining from scratch).
  base_ref identifies the frozen base for checkpoint restores. With `par` (a pjit
  `sharding.Parallel`), params are built or loaded straight into their shards.
  """
  m = config.model
  spec = adapter_spec(config)
  tok = load_tokenizer(tokenizer_path(config))
  rng = jax.random.PRNGKey(m.seed) if rng is None else rng
  dtype, cdt = m.dtype, m.compute_dtype or m.dtype
  head = _get(m, "head", "lm")
  numerics = numerics_config(config)
  if offload.activations(offload.check(_get(_get(config, "train", {}), "offload", "none"))):
    numerics["remat_offload"] = True  # the blocks' remat residuals in pinned host memory
  if m.hf_path:
    extra = {"head": head}
    if head == "score" and tok.pad_token_id is not None:
      extra["pad_token_id"] = tok.pad_token_id  # HF classifiers find the last token by it
    if par is not None and par.mode == "pjit":
      extra.update(mesh=par.mesh, rules=par.rules)
    model, params = hf.load_pretrained(
        m.hf_path, dtype=dtype, compute_dtype=cdt, attention=m.attention, remat=m.remat,
        lora=spec.lora, quant=spec.quant, prefix=spec.prefix, bottleneck=spec.bottleneck,
        rng=rng, **numerics, **extra)
    path = hf.resolve(m.hf_path)
    return model, params, tok, {"kind": "hf", **checkpoint.base_reference(path)}
  cfg = get_preset(m.preset).replace(
      vocab_size=len(tok), param_dtype=dtype, dtype=cdt, attention=m.attention, remat=m.remat,
      head=head, **numerics,
      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
  model = Decoder(cfg, spec)
  if par is not None and par.mode == "pjit":
    from ftjax import sharding
    params = sharding.sharded_init(model, rng, par.mesh, par.rules)
  else:
    params = init_params(model, rng)
  if spec.quant is not None:
    raise UserError("config.quant needs a pretrained base (config.model.hf_path)")
  return model, params, tok, {"kind": "preset", "preset": m.preset, "seed": m.seed}


def data_config(config, workdir: Optional[str] = None) -> dict:
  """`config.data` as the dataset builders take it: `data.path` / `data.eval_path` (comma
  lists of files) are shortcuts for `data.sources` / `data.eval_sources`; an empty
  `data.cache_dir` is `workdir`/data_cache (no cache without a workdir)."""
  d = config.data.to_dict()
  if not d.get("cache_dir"):
    d["cache_dir"] = os.path.join(workdir, "data_cache") if workdir else ""
  if d.get("path"):
    d["sources"] = [{"path": p} for p in d["path"].split(",") if p]
  if d.get("eval_path"):
    d["eval_sources"] = [{"path": p} for p in d["eval_path"].split(",") if p]
  if "max_prompt_len" in d:  # the preference key's older name (configs saved before the rename)
    legacy = d.pop("max_prompt_len")
    if legacy and not d.get("max_prompt_length"):
      d["max_prompt_length"] = legacy
  if not d.get("sources"):
    raise UserError("config.data.path (or config.data.sources) is required")
  return d


def optimizer(config, steps: Optional[int] = None):
  """(schedule, optax transform) from the `optim` section, over `steps` updates (default
  `train.steps`; PPO makes several updates per step)."""
  o = config.optim
  steps = int(config.train.steps) if steps is None else int(steps)
  schedule = common.make_schedule(o.lr, steps, int(o.warmup_steps), o.schedule,
                                  float(o.min_lr_ratio))
  tx = common.make_optimizer(o.name, schedule, float(o.weight_decay), float(o.clip), float(o.b1),
                             float(o.b2), float(o.eps))
  return schedule, tx


def parallel(config):
  """The run's placement (`config.parallel`: pjit on `config.mesh`, or pmap), after
  `jax.distributed.initialize()` when `config.mesh.distributed` (multi-host)."""
  from ftjax import sharding
  mesh = config.mesh
  if _get(mesh, "distributed", False):
    init_distributed()
  rules = sharding.rules_from_config(dict(_get(mesh, "rules", {}) or {}))
  return sharding.Parallel(_get(config, "parallel", "pjit"), mesh.shape, rules)


_DISTRIBUTED = False


def init_distributed():
  """jax.distributed.initialize() once; on Cloud TPU pods and Slurm it needs no arguments."""
  global _DISTRIBUTED
  if not _DISTRIBUTED:
    jax.distributed.initialize()
    _DISTRIBUTED = True


# PPO trains a value head or a critic beside the policy: its params, for setup and restore.
CRITICS = ("shared", "separate")
CRITIC_KEY = "critic"  # the separate critic's params, beside the policy's
HEAD_KEYS = ("value", CRITIC_KEY)  # trained beside the policy, never read by its LM path


class Critic(NamedTuple):
  kind: str  # shared | separate
  model: Optional[object] = None  # the separate critic's Decoder (head "score")


def add_critic(config, model, params, reward_model=None, place=lambda m, p: p):
  """(params with the value head or the critic added, their trainable rules, Critic).

  `critic=shared`: a zero `value` head on the policy's trunk. `critic=separate`: a copy of the
  reward model (`reward_model` = (model, params), from `workdir.load_reward_model`), trained
  whole. `place(model, params)` puts new params in their shards. Also rebuilds a PPO workdir's
  params in `workdir.load_trained`.
  """
  kind = config.ppo.critic
  if kind == "shared":
    value = place(None, heads.init_value(model.cfg))
    return {**params, **value}, [("^value$", partition.TRAIN)], Critic("shared")
  if kind != "separate":
    raise UserError(f"config.ppo.critic={kind!r}: expected shared or separate")
  if reward_model is None:
    raise ValueError("add_critic(critic=separate) needs the reward model (model, params): "
                     "workdir.load_reward_model loads it")
  rm_model, rm_params = reward_model
  bad = [k for k, v in traverse_util.flatten_dict(rm_params).items()
         if not jnp.issubdtype(v.dtype, jnp.floating)]
  if bad:
    raise UserError("config.ppo.critic=separate trains a copy of the reward model whole; its "
                    f"{'/'.join(bad[0])} is quantized (use critic=shared)")
  critic = place(rm_model, jax.tree_util.tree_map(jnp.copy, rm_params))
  return ({**params, CRITIC_KEY: critic}, [(f"^{CRITIC_KEY}/", partition.TRAIN)],
          Critic("separate", rm_model))
