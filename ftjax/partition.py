"""Trainable vs frozen params by ordered path-regex rules.

Each leaf's path ("layers/attn/q_proj/lora_a"; stacked [L, ...] under scanned layers) is matched
against the rules in order; the first rule whose regex is found in the path gives its label
("train" or "freeze"). The params tree is split into a trainable and a frozen part so that
`jax.grad` and the optimizer run over the trainable part only: frozen leaves carry neither
gradients nor optimizer state.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

TRAIN, FREEZE = "train", "freeze"
Rules = Sequence[tuple[str, str]]

# Named rule sets; the last rule is the default for everything else.
RULES: dict[str, list[tuple[str, str]]] = {
    "full": [(".*", TRAIN)],
    "lora": [(r"/lora_(a|b|magnitude)$", TRAIN), (".*", FREEZE)],
    "prefix": [(r"^prefix(/|$)", TRAIN), (".*", FREEZE)],
    "prompt": [(r"^prompt(/|$)", TRAIN), (".*", FREEZE)],
    "bottleneck": [(r"(^|/)(attn|mlp)_adapter/", TRAIN), (".*", FREEZE)],
    "none": [(".*", FREEZE)],
}


def _path_str(path: tuple) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def rules_for(kind: str, extra: Optional[Rules] = None) -> list[tuple[str, str]]:
  """The rule set of an adapter kind, with `extra` rules tried first."""
  if kind not in RULES:
    raise ValueError(f"unknown trainable-parameter rule set {kind!r}; one of {sorted(RULES)}")
  return list(extra or []) + RULES[kind]


def label_params(params: Any, rules: Rules) -> Any:
  """A tree of "train"/"freeze" labels with the structure of `params`."""
  compiled = [(re.compile(rx), label) for rx, label in rules]
  for _, label in rules:
    if label not in (TRAIN, FREEZE):
      raise ValueError(f"partition rule label {label!r}: expected 'train' or 'freeze'")

  def label(path, _):
    s = _path_str(path)
    for rx, lab in compiled:
      if rx.search(s):
        return lab
    raise ValueError(f"param {s} matches no partition rule; add a catch-all ('.*', 'freeze')")

  labels = jax.tree_util.tree_map_with_path(label, params)
  if not any(lab == TRAIN for lab in jax.tree_util.tree_leaves(labels)):
    raise ValueError(f"no param is trainable under rules {list(rules)}")
  return labels


def split(params: dict, labels: dict) -> tuple[dict, dict]:
  """(trainable, frozen) as nested dicts holding only their own leaves."""
  flat = traverse_util.flatten_dict(params, keep_empty_nodes=False)
  flat_labels = traverse_util.flatten_dict(labels)
  train = {k: v for k, v in flat.items() if _label_of(flat_labels, k) == TRAIN}
  frozen = {k: v for k, v in flat.items() if _label_of(flat_labels, k) != TRAIN}
  return traverse_util.unflatten_dict(train), traverse_util.unflatten_dict(frozen)


def _label_of(flat_labels: dict, key: tuple) -> str:
  # A quantized kernel is a dict of arrays: its leaves sit under the kernel's label.
  while key not in flat_labels:
    key = key[:-1]
  return flat_labels[key]


def merge(trainable: dict, frozen: dict) -> dict:
  """Inverse of `split`."""
  flat = traverse_util.flatten_dict(frozen, keep_empty_nodes=False)
  flat.update(traverse_util.flatten_dict(trainable, keep_empty_nodes=False))
  return traverse_util.unflatten_dict(flat)


def _bits(dtype) -> int:
  if jnp.issubdtype(dtype, jnp.integer):
    return int(jnp.iinfo(dtype).bits)  # int4 reports itemsize 1 but packs two per byte
  return np.dtype(dtype).itemsize * 8


def _nbytes(tree) -> int:
  return int(sum(_bits(x.dtype) * int(np.prod(x.shape)) // 8
                 for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "shape")))


def _count(tree) -> int:
  return int(sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree)
                 if hasattr(x, "shape")))


def summary(params: dict, labels: dict, opt_state: Any = None) -> dict:
  """PEFT's print_trainable_parameters, plus bytes of params and optimizer state."""
  train, frozen = split(params, labels)
  n_train, n_frozen = _count(train), _count(frozen)
  out = {"trainable": n_train, "total": n_train + n_frozen,
         "percent": 100.0 * n_train / max(1, n_train + n_frozen),
         "param_bytes": _nbytes(params), "trainable_bytes": _nbytes(train)}
  if opt_state is not None:
    out["opt_state_bytes"] = _nbytes(opt_state)
  return out


def format_summary(s: dict) -> str:
  line = (f"trainable params: {s['trainable']:,} || all params: {s['total']:,} || "
          f"trainable%: {s['percent']:.4f} || param bytes: {s['param_bytes']:,}")
  if "opt_state_bytes" in s:
    line += f" || optimizer state bytes: {s['opt_state_bytes']:,}"
  return line
