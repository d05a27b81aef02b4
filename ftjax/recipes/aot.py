"""Ahead-of-time compilation of the real train, GRPO, DPO and decode steps from abstract shapes.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
    python experiments/bench.py --bench=aot --preset=llama-3.1-8b --seq_len=2048 --batch=1 \
        --dtype=bfloat16 --compute_dtype=bfloat16 --remat --aot_modes=full,lora,qlora,int4 \
        --mesh=fsdp=8

Nothing is allocated and nothing runs: params come from `jax.eval_shape(model.init)`, are split
into trainable and frozen by the trainers' own rules (`common.split_params`,
`partition.rules_for`), the optimizer state is `jax.eval_shape(common.init_state)`, and the
batch is `jax.ShapeDtypeStruct`s. The state passed is the one every step after the first
sees, the step's own output state (`jax.eval_shape` of the step): with bf16 params under full
fine-tuning optax's moments come back float32, so `init_state`'s bf16 moments would under-count
(`state_dtype_changes` counts such leaves). The step is the trainers' (`sft.make_step`,
`grpo.make_step`, `dpo.make_dpo_step`, the sampler's one-token decode) jitted with the state
donated, lowered and compiled. Reported per row:

  arg/out/temp/code  `compiled.memory_analysis()`: argument, output, temporary and generated
                     code bytes. On a mesh (`--mesh=fsdp=8`) these are per device.
  compile_s          lowering + compilation seconds.
  flops/token        the step's FLOPs per token. `cost_analysis()` counts a loop body once, so
                     the scanned step (and chunked logprobs) would under-count by ~L. The FLOPs
                     are therefore measured on two extra compiles of the same step with the
                     layers unrolled (`scan_layers=False`) at 1 and 2 layers of the same widths,
                     remat off and logprobs unchunked (no loop anywhere):
                     F(L) = F(1) + (L - 1) * (F(2) - F(1)). That is the model's FLOPs (what MFU
                     counts), without remat's recomputation. `ratio` divides it by the formula
                     bench.py's MFU uses (`metrics.train_flops_per_token`: 6N trained, 4N
                     frozen, 12 L H d T attention), so the MFU accounting is checked.
  largest temps      (`--aot_temps`) the largest values XLA's buffer assignment places in
                     temporary allocations, by instruction, shape and op (read from an XLA dump
                     of the compile). On CPU, bf16 dots are computed by upcasting operands to
                     f32, so f32 copies of bf16 kernels show up here that a GPU does not hold.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import re
import shutil
import tempfile
import time
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
from flax import traverse_util

import ftjax
from ftjax import metrics, offload as offload_lib, partition, sharding
from ftjax.config import ModelConfig
from ftjax.model import AdapterSpec

MODES = ("full", "lora", "qlora", "int4")
KINDS = ("sft", "grpo", "dpo", "decode")
GiB = 2 ** 30


def adapter_spec(mode: str, rank: int = 16) -> AdapterSpec:
  """full: no adapters; lora: LoRA on all linear layers over a dense base; qlora: over an NF4
  base with double quant (QLoRA); int4: over an int4 base with double quant."""
  if mode == "full":
    return AdapterSpec()
  quant = {"lora": None, "qlora": ftjax.QuantConfig(kind="nf4", double_quant=True),
           "int4": ftjax.QuantConfig(kind="int4", double_quant=True)}[mode]
  return AdapterSpec(lora=ftjax.LoraConfig(rank=rank, alpha=2.0 * rank, targets="all-linear"),
                     quant=quant)


def abstract_params(model) -> dict:
  """Param ShapeDtypeStructs of `model` (no array built), logical-axis boxes removed."""
  return jax.eval_shape(lambda r: nn.meta.unbox(
      model.init(r, jnp.zeros((1, 8), jnp.int32))["params"]), jax.random.PRNGKey(0))


def tree_bytes(tree) -> int:
  """Bytes of a tree of arrays or shape structs (int4 packs two per byte)."""
  return partition._nbytes(tree)


@dataclasses.dataclass
class Setup:
  """The abstract inputs of one step: the model, its trainable/frozen shapes, optimizer."""
  model: Any
  trainable: dict
  frozen: dict
  tx: Any
  schedule: Any
  state: dict


def setup(cfg: ModelConfig, mode: str, rank: int = 16) -> Setup:
  from ftjax.train import common
  model = ftjax.Decoder(cfg, adapter_spec(mode, rank))
  trainable, frozen, _ = common.split_params(abstract_params(model),
                                             partition.rules_for("full" if mode == "full"
                                                                 else "lora"))
  schedule = common.make_schedule(1e-5, 1000, 0, "constant")
  tx = common.make_optimizer("adamw", schedule, weight_decay=0.01)
  state = jax.eval_shape(lambda t: common.init_state(t, tx, 0), trainable)
  return Setup(model, trainable, frozen, tx, schedule, state)


def _sds(shape, dtype) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


# ---- the steps: each returns (function, args, donate_argnums, tokens per call, formula FLOPs)

def sft_step(cfg, mode, batch, seq_len, rank=16, chunk=256, **_):
  from ftjax.train import sft
  s = setup(cfg, mode, rank)
  b = {"inputs": _sds((batch, seq_len), jnp.int32), "targets": _sds((batch, seq_len), jnp.int32),
       "weights": _sds((batch, seq_len), jnp.float32)}
  fpt = metrics.train_flops_per_token(cfg, seq_len, s.trainable, s.frozen)
  fn = sft.make_step(s.model, s.tx, s.schedule, chunk=chunk)
  return s, fn, (s.state, s.frozen, b), batch * seq_len, fpt * batch * seq_len


def grpo_step(cfg, mode, batch, seq_len, rank=16, chunk=256, num_generations=8,
              max_new_tokens=256, **_):
  """`batch` prompts of `seq_len` tokens x G completions of `max_new_tokens` (dapo, beta 0)."""
  from ftjax.train import grpo
  s = setup(cfg, mode, rank)
  n, p, m = batch * num_generations, seq_len, max_new_tokens
  b = {"prompt_tokens": _sds((n, p), jnp.int32), "prompt_mask": _sds((n, p), bool),
       "completion_tokens": _sds((n, m), jnp.int32), "completion_mask": _sds((n, m), bool),
       "old_logprobs": _sds((n, m), jnp.float32), "advantages": _sds((n,), jnp.float32),
       "terminated": _sds((n,), bool)}
  settings = grpo.GRPOSettings(loss_type="dapo", max_completion_length=m)
  fn = grpo.make_step(s.model, s.tx, s.schedule, settings, chunk=chunk)
  fpt = metrics.train_flops_per_token(cfg, p + m, s.trainable, s.frozen)
  return s, fn, (s.state, s.frozen, b), n * (p + m), fpt * n * (p + m)


def dpo_step(cfg, mode, batch, seq_len, rank=16, chunk=256, **_):
  """`batch` pairs (2 * batch rows, both sides in one forward) and the reference forward: the
  same params with the adapters off (LoRA), as train/reference.py builds it. Full FT is
  refused here (its reference is a second full copy of the params; not in this table)."""
  from ftjax import lora
  from ftjax.train import dpo
  if mode == "full":
    raise ValueError("aot dpo: modes lora, qlora, int4 (full FT's reference is a param copy)")
  s = setup(cfg, mode, rank)
  rows = 2 * batch
  b = {k: _sds((rows, seq_len), jnp.int32) for k in ("inputs", "targets", "segment_ids",
                                                      "positions")}
  b["weights"] = _sds((rows, seq_len), jnp.float32)
  fn = dpo.make_dpo_step(s.model, lora.disable(s.model), lambda p: p, s.tx, s.schedule, beta=0.1,
                         loss_type="sigmoid", chunk=chunk)
  # Policy forward + backward, plus the reference's forward (a third of a frozen 4N... pass).
  fpt = metrics.train_flops_per_token(cfg, seq_len, s.trainable, s.frozen)
  fwd = cfg.flops_per_token(seq_len) / 3.0
  return s, fn, (s.state, s.frozen, b), rows * seq_len, (fpt + fwd) * rows * seq_len


def decode_step(cfg, mode, batch, seq_len, rank=16, max_new_tokens=256, **_):
  """One decode step of the sampler (`model.apply(..., decode=True)` with the KV cache of a
  `seq_len` prompt + `max_new_tokens`), the cache donated; params are all frozen."""
  from ftjax.model import init_cache, prompt_length
  s = setup(cfg, mode, rank)
  model = s.model
  params = partition.merge(s.trainable, s.frozen)
  cache = jax.eval_shape(lambda: init_cache(cfg, batch, seq_len + max_new_tokens
                                            + prompt_length(model)))

  def fn(cache, params, tok):
    logits, cache = model.apply({"params": params}, tok, cache=cache, decode=True)
    return logits[:, -1], cache

  # 2 FLOPs per weight and token forward, attention over the full cache (no causal discount).
  s_len = seq_len + max_new_tokens
  f = (2.0 * (cfg.num_params(include_embeddings=False) + cfg.vocab_size * cfg.d_model)
       + 4.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * s_len)
  return s, fn, (cache, params, _sds((batch, 1), jnp.int32)), batch, f * batch


STEPS: dict[str, Callable] = {"sft": sft_step, "grpo": grpo_step, "dpo": dpo_step,
                              "decode": decode_step}


# ---- compile and analyse

def _single_device_shardings(args: tuple, opt_on_host: bool):
  """in_shardings on one device (used only to give the optimizer state a memory kind). Named
  shardings on a 1-device mesh: a SingleDeviceSharding's memory kind does not reach the traced
  values' memory space (jax 0.10.2)."""
  dev = sharding.replicated(sharding.make_mesh("data=1", jax.devices()[:1]))
  sh = jax.tree_util.tree_map(lambda _: dev, args)
  if opt_on_host:
    sh[0]["opt_state"] = offload_lib.on_host(sh[0]["opt_state"])
  return sh


def placed(args: tuple, in_shardings) -> tuple:
  """The abstract args carrying their shardings. A value's memory space inside the jitted step
  (`float32<host>[...]`, what `offload.to_device` moves) comes from its argument's sharding, as
  for the trainers' arrays, not from jit's in_shardings."""
  return jax.tree_util.tree_map(
      lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), args, in_shardings)


def _shardings(s: Setup, kind: str, args: tuple, mesh, rules, opt_on_host: bool = False):
  """in_shardings of the step's args on `mesh`: params by their logical names (as the
  trainers shard them), the optimizer state as `loop.init_state` places it (each moment like
  its param; in pinned host memory with `opt_on_host`), the batch over data x fsdp."""
  names = sharding.param_shardings(s.model, partition.merge(s.trainable, s.frozen), mesh, rules)
  flat = traverse_util.flatten_dict(names)

  def pick(tree):
    return traverse_util.unflatten_dict(
        {k: flat[k] for k in traverse_util.flatten_dict(tree, keep_empty_nodes=False)})

  rep = sharding.replicated(mesh)
  batch_sh = sharding.batch_sharding(mesh)
  if kind == "decode":
    cache = jax.tree_util.tree_map(lambda _: rep, args[0])
    return (cache, pick(args[1]), rep)
  from ftjax.train import loop
  state_sh = loop.state_shardings(s.tx, args[0], pick(s.trainable), mesh)  # as the trainers
  if opt_on_host:
    state_sh["opt_state"] = offload_lib.on_host(state_sh["opt_state"])
  n = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
  # A batch of fewer rows than batch shards (batch 1 on fsdp=8) is replicated.
  batch = jax.tree_util.tree_map(lambda x: batch_sh if x.ndim and x.shape[0] % n == 0 else rep,
                                 args[2])
  return (state_sh, pick(s.frozen), batch)


def compile_step(fn, args: tuple, donate: int = 0, in_shardings=None, mesh=None, rules=None,
                 dump: Optional[str] = None):
  """(compiled, seconds to lower and compile)."""
  jit = (jax.jit(fn, donate_argnums=donate) if in_shardings is None
         else jax.jit(fn, donate_argnums=donate, in_shardings=in_shardings))
  opts = {"xla_dump_to": dump} if dump else None
  t0 = time.perf_counter()
  if mesh is not None:
    with sharding.use_mesh(mesh, rules):
      compiled = jit.lower(*args).compile(compiler_options=opts)
  else:
    compiled = jit.lower(*args).compile(compiler_options=opts)
  return compiled, time.perf_counter() - t0


def host_residual_bytes(jaxpr, host_only: bool = True) -> int:
  """Bytes of the values the traced step keeps in host memory across its layer scan: the
  stacked [L, ...] residuals that the forward scan writes to pinned_host for the backward one
  (`offload=activations`). Counted on the scans' outputs (a scan body's per-layer values are
  what it stacks), through every other nesting (jit, remat, custom VJPs). `host_only=False`
  counts every scan output, wherever it lives."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "scan":
      total += sum(tree_bytes(jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype))
                   for v in eqn.outvars if not host_only
                   or getattr(v.aval, "memory_space", None) == jax.memory.Space.Host)
      continue
    for sub in jex_core.jaxprs_in_params(eqn.params):
      total += host_residual_bytes(sub, host_only)
  return total


def host_entry_params(compiled) -> int:
  """How many of the compiled step's parameters XLA places in host memory (`S(5)` in the
  entry computation layout): the memory kinds reached the executable."""
  head = compiled.as_text().split("\n", 2)[:2]
  m = re.search(r"entry_computation_layout=\{\((.*?)\)->", " ".join(head))
  return 0 if m is None else m.group(1).count("S(5)")


def memory(compiled) -> dict:
  m = compiled.memory_analysis()
  if m is None:
    return {}
  return {"argument_bytes": int(m.argument_size_in_bytes),
          "output_bytes": int(m.output_size_in_bytes),
          "alias_bytes": int(m.alias_size_in_bytes),
          "temp_bytes": int(m.temp_size_in_bytes),
          "code_bytes": int(m.generated_code_size_in_bytes)}


def flops(compiled) -> float:
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return float((ca or {}).get("flops", 0.0))


def extrapolated_flops(cfg: ModelConfig, kind: str, mode: str, **kw) -> dict:
  """Model FLOPs of the whole step from two loop-free compiles at 1 and 2 unrolled layers."""
  f = {}
  for n in (1, 2):
    small = cfg.replace(n_layers=n, scan_layers=False, remat="none", remat_offload=False)
    _, fn, args, _, _ = STEPS[kind](small, mode, **{**kw, "chunk": 0})
    f[n] = flops(compile_step(fn, args, 0)[0])
  per_layer = f[2] - f[1]
  return {"flops": f[1] + (cfg.n_layers - 1) * per_layer, "flops_per_layer": per_layer,
          "flops_base": f[1] - per_layer}


_ALLOC = re.compile(r"^allocation (\d+): size (\d+)(.*)$")
_VALUE = re.compile(r"^\s+value: <\d+ (\S+) @\d+> \(size=(\d+),offset=\d+\): (.*)$")


def largest_temps(dump: str, top: int = 8) -> list[dict]:
  """The largest values in temporary allocations (not parameters, not live-out outputs) of the
  main module's buffer assignment in an XLA dump, with the op that produces each."""
  files = sorted(glob.glob(os.path.join(dump, "*after_optimizations-buffer-assignment.txt")),
                 key=os.path.getsize)
  if not files:
    return []
  path = files[-1]  # the step's module (the largest; the dump also holds small helpers)
  hlo_path = path.replace("-buffer-assignment.txt", ".txt")
  hlo = open(hlo_path).read() if os.path.exists(hlo_path) else ""
  out, temp = [], False
  for line in open(path):
    m = _ALLOC.match(line)
    if m:
      rest = m.group(3)
      temp = not ("parameter" in rest or "output shape" in rest or "constant" in rest
                  or "thread-local" in rest)
      continue
    v = _VALUE.match(line)
    if v and temp:
      out.append({"name": v.group(1), "bytes": int(v.group(2)), "shape": v.group(3).strip()})
  out.sort(key=lambda r: -r["bytes"])
  seen, rows = set(), []
  for r in out:
    if r["name"] in seen:
      continue
    seen.add(r["name"])
    hit = re.search(r"%" + re.escape(r["name"]) + r" = (\S+) (\w+)\((.*)$", hlo, re.M)
    if hit:
      r["op"] = hit.group(2)
      op_name = re.search(r'op_name="([^"]*)"', hit.group(3))
      r["op_name"] = op_name.group(1)[-90:] if op_name else ""
    rows.append(r)
    if len(rows) == top:
      break
  return rows


def run_one(cfg: ModelConfig, kind: str, mode: str, *, batch: int, seq_len: int, mesh=None,
            rules=sharding.RULES, temps: bool = False, count_flops: bool = True,
            offload: str = "none", **kw) -> dict:
  """Compile one step and return its record. `offload` (`train.offload`, ftjax/offload.py):
  the optimizer state's shardings in pinned_host memory, and/or the blocks' remat residuals
  offloaded (`ModelConfig.remat_offload`)."""
  offload_lib.check(offload, "--aot_offload")
  opt_on_host = offload_lib.optimizer(offload) and kind != "decode"
  if offload_lib.activations(offload):
    cfg = cfg.replace(remat_offload=True)
  s, fn, args, tokens, formula = STEPS[kind](cfg, mode, batch=batch, seq_len=seq_len, **kw)
  changed = 0
  if kind != "decode":
    # The state every step after the first sees: the step's own output. With bf16 params under
    # full FT, optax's moments come back float32 (the gradients are float32), so the state
    # `init_state` builds is not the steady one (and the trainer's step 2 recompiles).
    steady = jax.eval_shape(fn, *args)[0]
    changed = sum(a.dtype != b.dtype for a, b in zip(jax.tree_util.tree_leaves(args[0]),
                                                     jax.tree_util.tree_leaves(steady)))
    args = (steady,) + tuple(args[1:])
    s.state = steady
  if mesh is not None:
    in_sh = _shardings(s, kind, args, mesh, rules, opt_on_host)
  else:
    in_sh = _single_device_shardings(args, True) if opt_on_host else None
  if opt_on_host:
    args = placed(args, in_sh)
  dump = tempfile.mkdtemp(prefix="ftjax-aot-") if temps else None
  try:
    compiled, secs = compile_step(fn, args, 0, in_sh, mesh, rules, dump)
    mem = memory(compiled)
    # XLA's CPU backend counts host-resident parameters in argument_size (its host_* sizes
    # stay 0): the bytes in pinned_host are read from the executable's input shardings.
    host_args = offload_lib.host_bytes(compiled.input_shardings[0], args)
    # The offloaded residuals, from the traced step (on one device; a mesh row's would be
    # global shapes, not per device).
    residuals = 0 if mesh is None else None
    if offload_lib.activations(offload) and kind != "decode" and mesh is None:
      jit = jax.jit(fn) if in_sh is None else jax.jit(fn, in_shardings=in_sh)
      residuals = host_residual_bytes(jit.trace(*args).jaxpr.jaxpr)
    rec = {"kind": kind, "mode": mode, "offload": offload, "batch": batch, "seq_len": seq_len,
           "devices": 1 if mesh is None else mesh.size,
           "mesh": None if mesh is None else {k: int(v) for k, v in mesh.shape.items() if v > 1},
           "compile_s": secs, **mem,
           "host_argument_bytes": host_args, "host_entry_params": host_entry_params(compiled),
           "host_residual_bytes": residuals,
           "device_argument_bytes": mem.get("argument_bytes", 0) - host_args,
           "trainable_bytes": tree_bytes(s.trainable), "frozen_bytes": tree_bytes(s.frozen),
           "opt_state_bytes": tree_bytes(s.state["opt_state"]) if kind != "decode" else 0,
           "state_dtype_changes": changed,
           "tokens": tokens, "formula_flops": formula,
           "flops_scanned": flops(compiled)}
    if temps:
      rec["largest_temps"] = largest_temps(dump)
  finally:
    if dump:
      shutil.rmtree(dump, ignore_errors=True)
  del compiled
  if count_flops and mesh is None:
    ex = extrapolated_flops(cfg, kind, mode, batch=batch, seq_len=seq_len, **kw)
    rec.update(ex, ratio=ex["flops"] / formula, flops_per_token=ex["flops"] / tokens,
               formula_flops_per_token=formula / tokens)
  return rec


def _h(n: Optional[float]) -> str:
  return "-" if n is None else f"{n / GiB:.2f}"


def format_table(records: list[dict], offload_columns: Optional[bool] = None) -> str:
  """One row per record. With any offload row, four more columns: the offload mode, the
  arguments in pinned_host (the optimizer state) and those left on the device, and the remat
  residuals the step writes to pinned_host (from the traced step; the CPU itself keeps them in
  its temporaries, see ftjax/offload.py)."""
  off = (any(r.get("offload", "none") != "none" for r in records) if offload_columns is None
         else offload_columns)
  head = (f"{'step':<7} {'mode':<6} " + (f"{'offload':<11} " if off else "")
          + f"{'dev':>3} {'arg GiB':>8} {'out GiB':>8} {'temp GiB':>8} "
          + (f"{'host arg':>8} {'dev arg':>8} {'resid GiB':>9} " if off else "")
          + f"{'code MiB':>8} {'compile_s':>9} {'GFLOP/tok':>9} {'formula':>9} {'ratio':>6}")
  rows = [head, "-" * len(head)]
  for r in records:
    fpt = r.get("flops_per_token")
    extra = ""
    if off:
      extra = (f"{_h(r.get('host_argument_bytes')):>8} {_h(r.get('device_argument_bytes')):>8} "
               f"{_h(r.get('host_residual_bytes')):>9} ")
    rows.append(
        f"{r['kind']:<7} {r['mode']:<6} " + (f"{r.get('offload', 'none'):<11} " if off else "")
        + f"{r['devices']:>3} {_h(r.get('argument_bytes')):>8} "
        f"{_h(r.get('output_bytes')):>8} {_h(r.get('temp_bytes')):>8} {extra}"
        f"{r.get('code_bytes', 0) / 2**20:>8.1f} {r['compile_s']:>9.1f} "
        f"{'-' if fpt is None else format(fpt / 1e9, '9.2f'):>9} "
        f"{r['formula_flops'] / r['tokens'] / 1e9:>9.2f} "
        f"{'-' if fpt is None else format(r['ratio'], '6.3f'):>6}")
    for t in r.get("largest_temps", []):
      rows.append(f"    temp {t['bytes'] / 2**20:9.1f} MiB  {t['shape']:<28} "
                  f"{t.get('op', '?'):<14} {t['name']}  {t.get('op_name', '')}")
  return "\n".join(rows)


def run(preset: str, modes=("full", "lora", "qlora", "int4"), kinds=("sft",), batch: int = 1,
        seq_len: int = 2048, dtype: str = "bfloat16", compute_dtype: str = "bfloat16",
        remat: Any = "full", rank: int = 16, chunk: int = 256, mesh: str = "",
        temps: bool = False, count_flops: bool = True, num_generations: int = 8,
        max_new_tokens: int = 256, mesh_modes=None, verbose: bool = True,
        out: Optional[str] = None, offloads=("none",)) -> list[dict]:
  """Every (kind, mode) on one device, then (with `mesh`, e.g. "fsdp=8") the `mesh_modes`
  (default: all `modes`) on that mesh. Each record is appended to the JSON-lines file `out` as
  soon as it is compiled (a long table keeps its rows if a later one fails)."""
  for m in list(modes) + list(mesh_modes or []):
    if m not in MODES:
      raise ValueError(f"--aot_modes={m!r}: expected some of {', '.join(MODES)}")
  for k in kinds:
    if k not in KINDS:
      raise ValueError(f"--aot_steps={k!r}: expected some of {', '.join(KINDS)}")
  for o in offloads:
    if o not in offload_lib.OFFLOADS:
      raise ValueError(f"--aot_offload={o!r}: expected some of {', '.join(offload_lib.OFFLOADS)}")
  cfg = ftjax.get_preset(preset).replace(param_dtype=dtype, dtype=compute_dtype, remat=remat)
  meshes = [None]
  if mesh:
    spec, n = sharding._subset_spec(mesh, jax.device_count())
    meshes.append(sharding.make_mesh(spec, jax.devices()[:n]))
  kw = dict(batch=batch, seq_len=seq_len, rank=rank, chunk=chunk,
            num_generations=num_generations, max_new_tokens=max_new_tokens)
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  records = []
  rows = [(msh, kind, mode, o) for msh in meshes for kind in kinds
          for mode in (modes if msh is None or not mesh_modes else mesh_modes)
          for o in offloads if not (kind == "dpo" and mode == "full")
          and not (kind == "decode" and o != "none")]  # decode has no state, no backward
  for msh, kind, mode, o in rows:
    # Offload moves bytes, not FLOPs: those are counted on the rows without it.
    rec = run_one(cfg, kind, mode, mesh=msh, temps=temps, offload=o,
                  count_flops=count_flops and o == "none", **kw)
    rec.update(preset=preset, param_dtype=dtype, compute_dtype=compute_dtype,
               remat=cfg.remat, platform=jax.devices()[0].platform, jax=jax.__version__)
    records.append(rec)
    if out:
      with open(out, "a") as f:
        f.write(json.dumps({"time": time.time(), "bench": "aot", **rec}) + "\n")
    if verbose:
      print(format_table([rec], any(o != "none" for o in offloads)).splitlines()[2], flush=True)
  if verbose:
    print(f"preset={preset} ({cfg.num_params():,} params) B={batch} T={seq_len} "
          f"params={dtype} compute={compute_dtype} remat={cfg.remat} logprob_chunk={chunk} "
          f"platform={jax.devices()[0].platform} (AOT: compiled, not run)")
    print(format_table(records))
  return records
