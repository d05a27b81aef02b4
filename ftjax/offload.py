"""Host offload (`config.train.offload`): JAX's counterpart of QLoRA's paged optimizers.

  none         everything on the device.
  optimizer    the optimizer state lives in `pinned_host` memory between steps (its shardings
               carry memory_kind="pinned_host", so the jitted step takes and returns it there);
               `common.update_step` moves it to the device for the update and back
               (`to_device`, `like`).
  activations  each block is rematerialised with `offload_dot_with_no_batch_dims(device,
               pinned_host)` (`ModelConfig.remat_offload`, MaxText's "minimal_offloaded"): the
               matmul outputs that `dots_with_no_batch_dims_saveable` keeps on the device are
               kept in pinned host memory, the rest is recomputed; model.remat is replaced.
  both         the two.

JAX places values by memory space: a host-resident array's aval is `float32<host>[...]` inside
the jitted step, and an op mixing it with device values is an error, so a missing move fails at
trace time rather than running on the wrong memory. On GPU and TPU `jax.device_put` to a memory
space lowers to XLA's `annotate_device_placement` and XLA's host offloader inserts the copies.
On XLA's CPU backend (jax 0.10.2) the CPU "device" is host memory: the step's parameter and
result layouts still carry the memory space (`S(5)`), but `device_put` between memory kinds
inside a jit lowers to nothing (jax registers its memory-kind lowering for tpu and gpu only), so
the CPU runs the same arithmetic and its memory_analysis() cannot show a saving: ftjax/recipes/
aot.py reads the host-resident bytes from the compiled step's input shardings and the offloaded
residuals from the traced step instead.
"""

from __future__ import annotations

import math

import jax
import numpy as np

from ftjax.errors import UserError

OFFLOADS = ("none", "optimizer", "activations", "both")
HOST = "pinned_host"


def check(mode: str, where: str = "config.train.offload") -> str:
  """`mode`, or a UserError naming `where` and the allowed values."""
  if mode not in OFFLOADS:
    raise UserError(f"{where}={mode!r}: expected one of {', '.join(OFFLOADS)}")
  return mode


def optimizer(mode: str) -> bool:
  return mode in ("optimizer", "both")


def activations(mode: str) -> bool:
  return mode in ("activations", "both")


def residual_policy():
  """The remat policy of `offload=activations`: dots without batch dims (the projections'
  outputs) saved to pinned host memory, everything else recomputed."""
  return jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", HOST)


def on_host(shardings):
  """The same shardings in pinned host memory."""
  return jax.tree_util.tree_map(lambda s: s.with_memory_kind(HOST), shardings)


def _space(x):
  return jax.typeof(x).memory_space


def to_device(tree):
  """Inside a jit: the leaves that live in host memory, moved to the device (the rest as is)."""
  host = jax.memory.Space.Host
  return jax.tree_util.tree_map(
      lambda x: jax.device_put(x, jax.memory.Space.Device) if _space(x) == host else x, tree)


def like(tree, ref):
  """Inside a jit: each leaf of `tree` put back in the memory space of its leaf in `ref`."""
  return jax.tree_util.tree_map(
      lambda x, r: jax.device_put(x, _space(r)) if _space(x) != _space(r) else x, tree, ref)


def host_bytes(shardings, args) -> int:
  """Bytes per device of the leaves of `args` whose sharding is in host memory (a compiled
  step's `input_shardings` and the abstract args it was lowered with)."""
  total = 0
  for s, a in zip(jax.tree_util.tree_leaves(shardings), jax.tree_util.tree_leaves(args)):
    if getattr(s, "memory_kind", None) in (HOST, "unpinned_host"):
      total += math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
  return total
