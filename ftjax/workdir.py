"""From a config to a model, and from a workdir back to a trained model.

Shared by the experiment scripts: `build_model` makes (model, params, tokenizer) from the
config's `model`, `adapter` and `quant` sections; `load_trained` rebuilds the same model from a
workdir's saved config and restores its latest (or best) checkpoint over it.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax

from ftjax import checkpoint, hf, partition, provenance
from ftjax.config import (ADAPTER_DTYPES, MATMUL_PRECISIONS, LoraConfig, PrefixConfig,
                          get_preset)
from ftjax.errors import UserError
from ftjax.model import AdapterSpec, Decoder, init_params
from ftjax.quant import QuantConfig
from ftjax.tokenizer import load_tokenizer
from ftjax.train import common

ADAPTER_KINDS = ("none", "lora", "prefix", "prompt")


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
  lora = prefix = quant = None
  try:  # the dataclasses check their fields; here the fields come from the user's config
    if kind == "lora":
      lora = LoraConfig(rank=a.rank, alpha=a.alpha, dropout=a.dropout, targets=a.targets,
                        rslora=a.rslora, init=a.init, dora=a.dora)
    elif kind in ("prefix", "prompt"):
      prefix = PrefixConfig(kind=kind, length=a.length, reparam=a.reparam,
                            reparam_hidden=a.reparam_hidden)
    if q.kind != "none":
      quant = QuantConfig(kind=q.kind, block_size=q.block_size, double_quant=q.double_quant)
  except ValueError as e:
    raise UserError(f"config.adapter / config.quant: {e}") from None
  return AdapterSpec(lora=lora, quant=quant, prefix=prefix)


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
  if m.hf_path:
    extra = {"head": head}
    if head == "score" and tok.pad_token_id is not None:
      extra["pad_token_id"] = tok.pad_token_id  # HF classifiers find the last token by it
    if par is not None and par.mode == "pjit":
      extra.update(mesh=par.mesh, rules=par.rules)
    model, params = hf.load_pretrained(
        m.hf_path, dtype=dtype, compute_dtype=cdt, attention=m.attention, remat=m.remat,
        lora=spec.lora, quant=spec.quant, prefix=spec.prefix, rng=rng, **numerics, **extra)
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


def optimizer(config):
  """(schedule, optax transform) from the `optim` section, over `train.steps` steps."""
  o = config.optim
  schedule = common.make_schedule(o.lr, int(config.train.steps), int(o.warmup_steps), o.schedule,
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


def has_checkpoints(workdir: str) -> bool:
  """Whether `workdir` holds a checkpoint directory from an earlier run (reads only)."""
  d = os.path.join(workdir, "checkpoints")
  return os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d))


def save_config(config, workdir: str):
  os.makedirs(workdir, exist_ok=True)
  tmp = os.path.join(workdir, "config.json.tmp")
  with open(tmp, "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  os.replace(tmp, os.path.join(workdir, "config.json"))


def check_resume(config, workdir: str) -> dict:
  """Refuses (UserError) a resume whose config drifted from the saved one; see provenance."""
  return provenance.check_resume(config, workdir)


def start_run(config, workdir: str, diff: Optional[dict] = None):
  """Saves the config and appends this attempt to run.json: call it once the config, model
  and data are checked, so a run that fails validation writes nothing."""
  resumed = os.path.exists(os.path.join(workdir, "config.json"))
  if diff is None:
    diff = check_resume(config, workdir)
  save_config(config, workdir)
  provenance.record_run(config, workdir, diff, resumed)


def load_config(workdir: str):
  import ml_collections
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise UserError(f"{path}: missing; not an ftjax workdir")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_trained(workdir: str, step: Any = None):
  """(model, params, tokenizer, config) of a workdir's checkpoint (latest, "best", or a step).

  The base is rebuilt from the saved config (and checked against the fingerprint recorded at
  training time); the checkpoint's trainable params are merged over it.
  """
  config = load_config(workdir)
  # Checked before the Checkpointer, which would create an empty checkpoints/ here.
  if not has_checkpoints(workdir):
    raise UserError(f"{workdir}: no checkpoint to restore (the run saved none yet)")
  if step not in (None, "best") and not str(step).isdigit():
    raise UserError(f"step={step!r}: expected a step number or 'best'")
  model, params, tok, base_ref = build_model(config)
  extra_rules = []
  if "ppo" in config:  # PPO trains a value head or critic beside the policy
    from ftjax.train import ppo
    params, extra_rules, _ = ppo.add_critic(config, model, params)
  trainable, frozen, _ = common.split_params(params, extra_rules + rules(config))
  ckpt = checkpoint.Checkpointer(workdir, keep=int(config.train.keep), async_save=False)
  try:
    if step == "best":
      step = ckpt.best_step() or ckpt.latest_step()
    elif step is not None:
      step = int(step)
      if step not in ckpt.all_steps():
        raise UserError(f"{workdir}: no checkpoint for step {step} (have {ckpt.all_steps()})")
    if ckpt.latest_step() is None:
      raise UserError(f"{workdir}: no checkpoint to restore")
    _, tx = optimizer(config)
    target = jax.eval_shape(lambda: common.init_state(trainable, tx, int(config.train.seed)))
    state, _, extra = ckpt.restore(step, target=target)
  finally:
    ckpt.close()
  if base_ref.get("kind") == "hf":
    checkpoint.check_base(extra, base_ref["path"])
  params = partition.merge(state["params"], frozen)
  if "ppo" in config:  # the policy alone
    params = {k: v for k, v in params.items() if k not in ppo.HEAD_KEYS}
  return model, params, tok, config
