"""Meshes, logical-axis rules and shardings: the same pure steps on 1 device, a mesh, or pmap.

Every param carries logical axis names (`model.py`); `RULES` maps them to the mesh axes
`data`, `fsdp` and `tensor` and is plain data (override it in the config's `mesh.rules`).
A param whose names have no rule is an error that names the param. 4-bit kernels' code and
scale arrays carry their kernel's two logical names (quant.py), so they shard like it; a kernel
in quant.py's flat layout (blocks that end mid-row) is replicated.

  mesh = make_mesh("data=2,fsdp=2,tensor=2")
  with use_mesh(mesh, rules):                       # activation constraints need the rules
    params = shard_params(model, params, mesh, rules)
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ftjax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical name -> mesh axis (or axes, or None for replicated).
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("position", None),
    ("lora", None),
    ("bottleneck", None),
    ("prefix", None),
    ("layers", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
)


def parse_shape(spec: str, n_devices: Optional[int] = None) -> dict[str, int]:
  """"data=-1,fsdp=2,tensor=1" -> {"data": 4, "fsdp": 2, "tensor": 1} on 8 devices."""
  n = n_devices or jax.device_count()
  shape = {a: 1 for a in MESH_AXES}
  for part in (spec or "").split(","):
    part = part.strip()
    if not part:
      continue
    k, _, v = part.partition("=")
    if k not in MESH_AXES:
      raise UserError(f"mesh.shape: unknown axis {k!r}; axes are {MESH_AXES}")
    shape[k] = int(v)
  free = [k for k, v in shape.items() if v == -1]
  if len(free) > 1:
    raise UserError(f"mesh.shape {spec!r}: at most one axis may be -1")
  fixed = math.prod(v for v in shape.values() if v != -1)
  if free:
    if n % fixed:
      raise UserError(f"mesh.shape {spec!r}: {n} devices do not divide by {fixed}")
    shape[free[0]] = n // fixed
  if math.prod(shape.values()) != n:
    raise UserError(f"mesh.shape {spec!r} has {math.prod(shape.values())} devices; "
                     f"there are {n}")
  return shape


def make_mesh(spec: str = "data=-1", devices: Optional[Sequence] = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  shape = parse_shape(spec, len(devices))
  dims = tuple(shape[a] for a in MESH_AXES)
  try:
    from jax.experimental import mesh_utils
    arr = mesh_utils.create_device_mesh(dims, devices=devices)
  except (ValueError, AssertionError, NotImplementedError):
    arr = np.array(devices).reshape(dims)
  return Mesh(arr, MESH_AXES)


def rules_from_config(overrides: Optional[dict] = None) -> tuple:
  """The default rules with `overrides` (logical name -> mesh axis or None) applied."""
  rules = dict(RULES)
  for k, v in (overrides or {}).items():
    rules[k] = tuple(v) if isinstance(v, list) else (v or None)
  return tuple(rules.items())


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules=RULES):
  """Mesh and logical rules for tracing (activation constraints resolve inside it)."""
  with mesh, nn.logical_axis_rules(rules):
    yield


def _mesh_axes(name, rules: dict, where: str):
  if name is None:
    return None
  if name not in rules:
    raise ValueError(f"param {where}: logical axis {name!r} has no sharding rule; add it to "
                     f"mesh.rules (known: {sorted(rules)})")
  return rules[name]


def _fits(dim: int, axes, mesh: Mesh) -> bool:
  if axes is None:
    return True
  axes = (axes,) if isinstance(axes, str) else axes
  return dim % math.prod(mesh.shape[a] for a in axes) == 0


def param_shardings(model, params: Any, mesh: Mesh, rules=RULES) -> Any:
  """NamedSharding for every leaf of `params` (a tree of arrays or ShapeDtypeStructs).

  Logical names come from the model's boxed params; an axis whose size the mesh axes do not
  divide is replicated (e.g. 2 kv heads on tensor=4) rather than failing.
  """
  rules = dict(rules)
  names = _logical_names(model)
  flat = traverse_util.flatten_dict(params)
  out = {}
  for key, leaf in flat.items():
    where = "/".join(key)
    shape = leaf.shape
    if names.get(key) is not None:
      axes = [_mesh_axes(n, rules, where) for n in names[key]]
    else:
      raise ValueError(f"param {where} has no logical axis names, so no sharding rule matches")
    axes = [a if _fits(d, a, mesh) else None for d, a in zip(shape, axes)]
    out[key] = NamedSharding(mesh, P(*axes))
  return traverse_util.unflatten_dict(out)


def _logical_names(model) -> dict:
  from ftjax import lora  # traced once per model, shared with the load (lora.init_shapes)
  boxed = lora.init_shapes(model)["params"]
  tree = jax.tree_util.tree_map(lambda x: x.names if isinstance(x, nn.Partitioned) else None,
                                boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  return traverse_util.flatten_dict(tree)


def shard_params(model, params, mesh: Mesh, rules=RULES):
  shardings = param_shardings(model, params, mesh, rules)
  return jax.tree_util.tree_map(lambda x, s: jax.device_put(x, s), params, shardings)


def sharded_init(model, rng, mesh: Mesh, rules=RULES):
  """Random params built directly in their shards: shapes first, then a jitted init with
  out_shardings, so a model larger than one device initialises."""
  from ftjax.model import init_params
  abstract = jax.eval_shape(lambda r: init_params(model, r), rng)
  shardings = param_shardings(model, abstract, mesh, rules)
  with use_mesh(mesh, rules):
    return jax.jit(lambda r: init_params(model, r), out_shardings=shardings)(rng)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def put_batch(batch: dict, mesh: Mesh) -> dict:
  """Host batch (this process's rows) -> global arrays split over data x fsdp."""
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1:
    return {k: jax.device_put(v, sharding) for k, v in batch.items()}
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def interleave_for_accum(batch: dict, grad_accum: int) -> dict:
  """Reorder a preference batch's [chosen B; rejected B] rows so that each of `grad_accum`
  consecutive row blocks (micro-batches as `update_step` splits them, or devices) holds its
  own chosen rows then their rejected rows."""
  if grad_accum == 1:
    return batch

  def f(x):
    two_b = x.shape[0]
    b = two_b // 2
    if b % grad_accum:
      raise ValueError(f"{b} pairs per batch do not split into {grad_accum} micro-batches")
    x = x.reshape((2, grad_accum, b // grad_accum) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1).reshape((two_b,) + x.shape[3:])

  return jax.tree_util.tree_map(f, batch)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _subset_spec(spec: str, n: int) -> tuple[str, int]:
  """A spec without -1 may use fewer devices than there are (e.g. data=1 for a smoke run)."""
  shape = {a: 1 for a in MESH_AXES}
  for part in (spec or "").split(","):
    if part.strip():
      k, _, v = part.strip().partition("=")
      shape[k] = int(v)
  if -1 in shape.values():
    return spec, n
  return spec, min(n, math.prod(shape.values()))


class Parallel:
  """How a run places its state and batches: `pjit` (jax.jit with shardings on a mesh) or
  `pmap` (data parallel, replicated state, gradients summed over devices).

  Only placement lives here; the step functions are the same pure functions either way.
  """

  def __init__(self, mode: str = "pjit", mesh_shape: str = "data=-1", rules=RULES):
    if mode not in ("pjit", "pmap"):
      raise UserError(f"config.parallel={mode!r}: expected pjit or pmap")
    self.mode, self.rules = mode, rules
    if mode == "pjit":
      spec, n = _subset_spec(mesh_shape, jax.device_count())
      self.mesh = make_mesh(spec, jax.devices()[:n])
      self.n_batch_shards = math.prod(self.mesh.shape[a] for a in BATCH_AXES)
    else:
      self.mesh = None
      self.devices = jax.local_devices()
      self.n_batch_shards = len(self.devices) * jax.process_count()

  def check_batch(self, batch_size: int, what: str = "config.train.batch_size"):
    if batch_size % self.n_batch_shards:
      where = (f"mesh {dict(self.mesh.shape)}" if self.mesh is not None
               else f"{self.n_batch_shards} pmap devices")
      raise UserError(f"{what}={batch_size} does not divide over the {self.n_batch_shards} "
                       f"batch shards of {where}")

  def context(self):
    return use_mesh(self.mesh, self.rules) if self.mesh is not None else contextlib.nullcontext()

  def params(self, model, params):
    """Params in their shards (pjit) or as they are (pmap replicates the train state later)."""
    if self.mode == "pjit":
      return shard_params(model, params, self.mesh, self.rules)
    return params

  def _replicate(self, tree):
    # jax.device_put_replicated is deprecated; an identity pmap over a broadcast copy leaves
    # one replica on each local device.
    n = len(self.devices)
    if not jax.tree_util.tree_leaves(tree):
      return tree
    return jax.pmap(lambda x: x, devices=self.devices)(
        jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), tree))

  def state(self, state):
    if self.mode == "pjit":
      return state  # params are already sharded; the optimizer state follows them
    return self._replicate(state)

  def frozen(self, frozen):
    return frozen if self.mode == "pjit" else self._replicate(frozen)

  def compile(self, make_step: Any, state, frozen, schedule: Any = None):
    """`make_step(axis_name)` -> pure step; jitted with shardings and donation, or pmapped.

    `schedule` (train.common.Schedule, the one the step's optimizer calls): its numbers
    (lr, steps, warmup, kind) become an argument of the compiled step rather than constants in it,
    so runs that differ only in those share one program (and the persistent compile cache)."""
    fn = make_step("batch" if self.mode == "pmap" else None)
    if schedule is not None:
      # Placed once, here: a step call makes no host-to-device transfer (grpo's loop runs
      # under jax.transfer_guard("disallow")).
      inner = fn
      values = jax.tree_util.tree_map(jnp.asarray, schedule.values)
      values = (self._replicate(values) if self.mode == "pmap"
                else jax.device_put(values, replicated(self.mesh)))

      def fn(state, frozen, batch, numbers):
        with schedule.bound(numbers):
          return inner(state, frozen, batch)
    if self.mode == "pmap":
      mapped = jax.pmap(fn, axis_name="batch", donate_argnums=0)
      if schedule is None:
        return mapped
      return lambda state, frozen, batch: mapped(state, frozen, batch, values)
    state_sh = jax.tree_util.tree_map(lambda x: x.sharding, state)
    frozen_sh = jax.tree_util.tree_map(lambda x: x.sharding, frozen)
    in_sh = (state_sh, frozen_sh, batch_sharding(self.mesh))
    if schedule is not None:
      in_sh += (replicated(self.mesh),)
    step = jax.jit(fn, in_shardings=in_sh, out_shardings=(state_sh, replicated(self.mesh)),
                   donate_argnums=0)

    def run(state, frozen, batch):
      with self.context():
        if schedule is None:
          return step(state, frozen, batch)
        return step(state, frozen, batch, values)
    return run

  def batch(self, batch: dict) -> dict:
    if self.mode == "pjit":
      return put_batch(batch, self.mesh)
    n = len(self.devices)
    return {k: v.reshape((n, v.shape[0] // n) + v.shape[1:]) for k, v in batch.items()}

  def pair_batch(self, batch: dict, grad_accum: int = 1) -> dict:
    """A preference batch ([chosen B; rejected B] rows) placed so that every device's (and
    every micro-batch's) rows are its own chosen rows followed by their rejected rows."""
    if jax.process_count() > 1:
      raise NotImplementedError("preference training is single-host for now: each host's rows "
                                "would interleave chosen and rejected in the global batch")
    if self.mode == "pjit":
      return put_batch(interleave_for_accum(batch, grad_accum), self.mesh)
    n = len(self.devices)
    blocks = interleave_for_accum(batch, n * grad_accum)
    return {k: v.reshape((n, v.shape[0] // n) + v.shape[1:]) for k, v in blocks.items()}

  def host_state(self, state):
    """The state as checkpoints hold it (one replica under pmap)."""
    return state if self.mode == "pjit" else jax.tree_util.tree_map(lambda x: x[0], state)

  def metrics(self, m):
    return m if self.mode == "pjit" else jax.tree_util.tree_map(lambda x: x[0], m)
