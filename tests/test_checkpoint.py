"""Checkpointer: exact round trips, retention, NaN refusal, target checks, atomicity, base hash."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import save_file

from ftjax import checkpoint as ckpt_lib
from ftjax.checkpoint import (BaseModelChangedError, Checkpointer, PreemptionHandler,
                              assert_finite, base_fingerprint, base_reference, check_base)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_state(seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 3)
  params = {"dense": {"kernel": jax.random.normal(k[0], (4, 3)),
                      "bias": jax.random.normal(k[1], (3,), jnp.bfloat16)},
            "lora_a": jax.random.normal(k[2], (2, 4))}
  tx = optax.adamw(1e-3)
  opt_state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = tx.update(grads, opt_state, params)  # non-zero moments
  return {"params": params, "opt_state": opt_state, "step": jnp.asarray(7, jnp.int32),
          "rng": jax.random.key(seed + 1), "raw_rng": jax.random.PRNGKey(seed + 2)}


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      assert jax.dtypes.issubdtype(y.dtype, jax.dtypes.prng_key)
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_exact(tmp_path):
  state = make_state()
  extra = {"base": {"path": "/models/x", "fingerprint": "ab" * 32}, "note": [1, 2]}
  with Checkpointer(str(tmp_path)) as ck:
    assert ck.latest_step() is None
    ck.save(7, state, data_state={"epoch": 1, "index": 42}, extra=extra)
  # A fresh instance, as after a restart.
  ck = Checkpointer(str(tmp_path))
  assert ck.latest_step() == 7
  for target in (jax.eval_shape(lambda: state), state):  # abstract or concrete target
    restored, data_state, got_extra = ck.restore(target=target)
    assert_trees_equal(restored, state)
    assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)
    assert data_state == {"epoch": 1, "index": 42}
    assert got_extra == extra
  ck.close()


def test_restore_into_target_shardings(tmp_path):
  mesh = jax.make_mesh((4, 2), ("data", "model"))
  shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", "model"))
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state = {"w": jax.device_put(jnp.arange(32.0).reshape(8, 4), shard), "step": jnp.int32(3)}
  ck = Checkpointer(str(tmp_path))
  ck.save(3, state)
  # Restore onto a different layout than the one saved: orbax reshards to the target.
  for sharding in (shard, repl):
    target = {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=sharding),
              "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=repl)}
    restored, _, _ = ck.restore(target=target)
    assert restored["w"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(32.0).reshape(8, 4))
  ck.close()


def test_state_may_be_donated_after_async_save(tmp_path):
  state = make_state()
  expected = jax.tree.map(lambda x: x.copy(), state)
  ck = Checkpointer(str(tmp_path), async_save=True)
  ck.save(1, state)
  for x in jax.tree.leaves(state):
    x.delete()  # what donate_argnums=0 does to the buffers on the next step
  ck.wait()
  restored, _, _ = ck.restore(1, target=jax.eval_shape(lambda: expected))
  assert_trees_equal(restored, expected)
  ck.close()


def test_keep_last_k_and_best(tmp_path):
  state = make_state()
  losses = {1: 3.0, 2: 1.0, 3: 2.0, 4: None, 5: 2.5}
  ck = Checkpointer(str(tmp_path / "a"), keep=2)
  for step, loss in losses.items():
    ck.save(step, state, metrics=None if loss is None else {"eval_loss": loss, "acc": 0.5})
  ck.wait()
  assert ck.all_steps() == [2, 4, 5]  # the last two, plus the best (step 2)
  assert ck.best_step() == 2
  assert ck.metrics(2)["eval_loss"] == 1.0
  ck.close()
  assert Checkpointer(str(tmp_path / "a"), keep=2).best_step() == 2  # survives a restart

  ck = Checkpointer(str(tmp_path / "b"), keep=2, keep_best=False)
  assert ck.best_step() is None
  for step, loss in losses.items():
    ck.save(step, state, metrics=None if loss is None else {"eval_loss": loss})
  ck.wait()
  assert ck.all_steps() == [4, 5]
  assert ck.best_step() is None
  ck.close()

  # A NaN eval loss ranks last instead of breaking the sort.
  ck = Checkpointer(str(tmp_path / "c"), keep=1)
  for step, loss in {1: 2.0, 2: float("nan"), 3: 4.0}.items():
    ck.save(step, state, metrics={"eval_loss": loss})
  ck.wait()
  assert ck.all_steps() == [1, 3] and ck.best_step() == 1
  ck.close()


def test_nan_state_is_refused_and_nothing_written(tmp_path):
  state = make_state()
  state["opt_state"][0].mu["dense"]["kernel"] = state["params"]["dense"]["kernel"].at[1, 2].set(
      jnp.nan)
  ck = Checkpointer(str(tmp_path))
  with pytest.raises(FloatingPointError, match=r"opt_state\.0\.mu\.dense\.kernel"):
    ck.save(3, state)
  ck.wait()
  assert ck.all_steps() == [] and ck.latest_step() is None
  assert os.listdir(ck.directory) == []
  ck.close()


def test_assert_finite():
  assert_finite({"a": jnp.ones(3), "i": jnp.arange(3), "k": jax.random.key(0), "f": 1.0})
  with pytest.raises(FloatingPointError, match=r"grads has NaN/Inf at 'b\.1' \(and 1 more\)"):
    assert_finite({"a": jnp.ones(2), "b": [jnp.ones(2), jnp.array([jnp.inf], jnp.bfloat16)],
                   "c": float("nan")}, "grads")


def test_restore_into_wrong_target_fails_clearly(tmp_path):
  state = make_state()
  ck = Checkpointer(str(tmp_path))
  ck.save(1, state)
  ck.wait()
  target = jax.eval_shape(lambda: state)
  bad = jax.tree.map(lambda x: x, target)
  bad["params"]["dense"]["kernel"] = jax.ShapeDtypeStruct((5, 3), jnp.float32)
  with pytest.raises(ValueError, match=r"'params\.dense\.kernel' is float32\[4, 3\] on disk but "
                                       r"the target wants float32\[5, 3\]"):
    ck.restore(target=bad)
  bad["params"]["dense"]["kernel"] = jax.ShapeDtypeStruct((4, 3), jnp.bfloat16)
  with pytest.raises(ValueError, match=r"'params\.dense\.kernel' is float32\[4, 3\].*bfloat16"):
    ck.restore(target=bad)
  bad = jax.tree.map(lambda x: x, target)
  bad["params"]["lora_b"] = bad["params"].pop("lora_a")
  with pytest.raises(ValueError, match=r"target leaf 'params\.lora_b' is not in the checkpoint"):
    ck.restore(target=bad)
  with pytest.raises(FileNotFoundError, match="step 9"):
    ck.restore(9, target=target)
  ck.close()
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    Checkpointer(str(tmp_path / "empty")).restore(target=target)


def test_unfinished_save_is_invisible_and_cleaned(tmp_path):
  """A leftover `<step>.orbax-checkpoint-tmp` (crash mid-save) is never a step; it is removed."""
  state = make_state()
  ck = Checkpointer(str(tmp_path))
  ck.save(1, state)
  ck.close()
  d = os.path.join(str(tmp_path), "checkpoints")
  shutil.copytree(os.path.join(d, "1"), os.path.join(d, "2.orbax-checkpoint-tmp"))
  os.remove(os.path.join(d, "2.orbax-checkpoint-tmp", "commit_success.txt"))
  ck = Checkpointer(str(tmp_path))
  assert ck.latest_step() == 1 and ck.all_steps() == [1]
  ck.save(2, state)  # awaits orbax's background cleanup of tmp dirs, then writes step 2 afresh
  ck.wait()
  assert ck.all_steps() == [1, 2] and sorted(os.listdir(d)) == ["1", "2"]
  restored, _, _ = ck.restore(2, target=state)
  assert_trees_equal(restored, state)
  ck.close()


def test_process_killed_mid_async_save(tmp_path):
  script = textwrap.dedent(f"""
      import os, sys, time
      sys.path.insert(0, {REPO!r})
      import jax.numpy as jnp
      from ftjax.checkpoint import Checkpointer
      ck = Checkpointer({str(tmp_path)!r})
      ck.save(1, {{"x": jnp.ones(4)}}); ck.wait()
      ck.save(2, {{"x": jnp.ones((16, 1024, 1024))}})  # 64 MiB, still being written
      for _ in range(5000):  # exit as soon as step 2's directory shows (orbax makes it async)
        names = sorted(os.listdir(ck.directory))
        if any(n.startswith("2") for n in names):
          break
        time.sleep(0.001)
      print(names, flush=True)
      os._exit(0)
  """)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                       timeout=60)
  assert out.returncode == 0, out.stderr[-2000:]
  if "2.orbax-checkpoint-tmp" not in out.stdout:
    pytest.skip("save finished before the kill; nothing to check")
  ck = Checkpointer(str(tmp_path))
  assert ck.latest_step() == 1
  ck.close()


def _write_model(d, kernel, cfg=None, norm=None):
  os.makedirs(d, exist_ok=True)
  with open(os.path.join(d, "config.json"), "w") as f:
    json.dump(cfg or {"model_type": "llama", "hidden_size": 8}, f)
  norm = np.ones(8, np.float32) if norm is None else norm
  # Data region: the embedding first, then the norm (the last bytes of the file).
  save_file({"model.embed.weight": kernel, "model.norm.weight": norm},
            os.path.join(d, "model.safetensors"))


def test_base_fingerprint(tmp_path):
  w = np.arange(64, dtype=np.float32).reshape(8, 8)
  a = str(tmp_path / "a")
  _write_model(a, w)
  fp = base_fingerprint(a)
  assert fp == base_fingerprint(a) and len(fp) == 64
  b = str(tmp_path / "b")
  shutil.copytree(a, b)
  os.utime(os.path.join(b, "model.safetensors"), (0, 0))
  assert base_fingerprint(b) == fp  # copies and mtimes do not matter
  ref = base_reference(a)
  check_base({"base": ref}, b)
  check_base({}, b)  # nothing recorded, nothing to check

  w2 = w.copy()
  w2[3, 3] += 1.0
  _write_model(b, w2)  # same shapes and header, one value differs
  assert base_fingerprint(b) != fp
  with pytest.raises(BaseModelChangedError, match="changed since the checkpoint") as e:
    check_base({"base": ref}, b)
  assert "\n" not in str(e.value)
  _write_model(b, w, cfg={"model_type": "llama", "hidden_size": 9})
  assert base_fingerprint(b) != fp  # config.json is hashed


def test_base_fingerprint_samples_large_files(tmp_path, monkeypatch):
  # Shrink the slices so a small file takes the sampled path: 16 slices of 4 bytes.
  monkeypatch.setattr(ckpt_lib, "_SAMPLE_BYTES", 4)
  w = np.zeros(1000, np.float32)  # 4000-byte data region
  d = str(tmp_path / "m")
  _write_model(d, w)
  fp = base_fingerprint(d)
  w2 = w.copy()
  w2[0] = 1.0  # the first slice starts at the data region
  _write_model(d, w2)
  assert base_fingerprint(d) != fp
  norm = np.ones(8, np.float32)
  norm[-1] = 2.0  # the last slice ends at the end of the file
  _write_model(d, w, norm=norm)
  assert base_fingerprint(d) != fp
  w2 = w.copy()
  w2[500] = 1.0  # bytes 2000..2004 fall between slices: documented blind spot
  _write_model(d, w2)
  assert base_fingerprint(d) == fp


def test_preemption_handler():
  old = signal.getsignal(signal.SIGTERM)
  with PreemptionHandler() as p:
    assert not p.requested and not p.any_requested()
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(1000):  # the handler runs at the next bytecode boundary
      if p.requested:
        break
    assert p.requested and p.any_requested()
  assert signal.getsignal(signal.SIGTERM) == old


def test_restore_float32_adapters_over_bf16_base(tmp_path):
  from ftjax import partition
  from ftjax.config import LoraConfig, get_preset
  from ftjax.model import AdapterSpec, Decoder, init_params
  from ftjax.train import common
  cfg = get_preset("tiny", n_layers=1, param_dtype="bfloat16", dtype="bfloat16")
  params = init_params(Decoder(cfg, AdapterSpec(lora=LoraConfig(rank=2))), jax.random.PRNGKey(0))
  trainable, frozen, _ = common.split_params(params, partition.rules_for("lora"))
  tx = optax.adamw(1e-3)
  state = common.init_state(trainable, tx, 0)
  grads = jax.tree.map(lambda x: jnp.full_like(x, 1e-3), trainable)
  _, state["opt_state"] = tx.update(grads, state["opt_state"], trainable)
  with Checkpointer(str(tmp_path), async_save=False) as ck:
    ck.save(1, state)
    restored, _, _ = ck.restore(target=jax.eval_shape(lambda: state))
  assert_trees_equal(restored, state)
  floats = [x.dtype for x in jax.tree.leaves((restored["params"], restored["opt_state"]))
            if jnp.issubdtype(x.dtype, jnp.floating)]
  assert floats and set(floats) == {jnp.dtype("float32")}
  assert {x.dtype for x in jax.tree.leaves(frozen)} == {jnp.dtype("bfloat16")}


def test_full_disk_waits_out_the_other_items_writes(tmp_path, monkeypatch):
  """Orbax stops waiting at the first item whose write fails; the UserError comes only once
  the other items' writes are done, so a resume in the same process (its tmp-dir cleanup)
  does not race them ('Directory not empty' from rmtree, seen on CI)."""
  import errno
  import threading
  import time
  from orbax.checkpoint._src.handlers import json_checkpoint_handler as jh
  from ftjax.errors import UserError
  save_fn = jh.JsonCheckpointHandler._save_fn
  extra_written = threading.Event()

  async def full(self, x, directory):
    if os.path.basename(str(directory)).startswith("data"):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
    if os.path.basename(str(directory)).startswith("extra"):
      time.sleep(1.0)  # a slower item, still writing when `data` fails
      await save_fn(self, x, directory)
      extra_written.set()
      return None
    return await save_fn(self, x, directory)
  monkeypatch.setattr(jh.JsonCheckpointHandler, "_save_fn", full)
  ck = Checkpointer(str(tmp_path))
  with pytest.raises(UserError, match="cannot save step 3"):
    ck.save(3, make_state(), data_state={"i": 1}, extra={"e": 1})
    ck.wait()
  assert extra_written.is_set()
  ck.close()
  monkeypatch.setattr(jh.JsonCheckpointHandler, "_save_fn", save_fn)
  with Checkpointer(str(tmp_path)) as ck:  # its cleanup removes the failed step's tmp dir
    assert ck.latest_step() is None
    ck.save(3, make_state(), data_state={"i": 1}, extra={"e": 1})
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]
