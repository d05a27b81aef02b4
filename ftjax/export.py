"""Export a trained workdir as a merged HF model, a PEFT adapter or, for bottleneck adapters,
the `adapters` library's layout (AdapterHub; ftjax/adapterhub.py) (experiments/export.py).

The checkpoint is the latest one (`step="best"` for the best by eval loss, or a number).
The tokenizer is copied alongside. Files are written to a temporary directory and moved
into place only when complete; the directory gets an `ftjax_export.json` (workdir, step,
format) that marks it as an ftjax export, and a model card, README.md (ftjax/model_card.py:
metadata, config diff, data, held-out metrics, provenance, limitations), written with the files.

`out` is checked before the model is loaded. Refused: the run's base model or tokenizer
directory, an ftjax workdir (this one or another), a checkpoint folder, any directory that
holds or lies inside one of these (a subfolder of a workdir outside its checkpoints/ is fine),
a path whose parent cannot be written, and a non-empty directory that is not an earlier ftjax
export unless `overwrite` (an earlier export is replaced). Errors name the command-line flags
(`--out`, `--step`), as the script's users see them.
"""

from __future__ import annotations

import errno
import os
import tempfile

from absl import logging
import jax

from ftjax import adapterhub, checkpoint, hf, model_card, provenance, workdir as wd
from ftjax.errors import UserError
from ftjax.peft_io import save_adapter
from ftjax.train import setup

# Filesystem errors a user can cause or fix (permissions, a read-only mount, a full disk).
WRITE_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# A directory with more entries than this is no export directory; walking it would take long,
# and replacing one would hard-link all of it into the new export.
MAX_WALK = 10_000


def _real(path: str) -> str:
  return os.path.realpath(os.path.abspath(path))


def _inside(path: str, root: str) -> bool:
  """Whether `path` is `root` or lies below it (both real paths)."""
  return os.path.commonpath([path, root]) == root


def is_workdir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "config.json")) and (
      os.path.isdir(os.path.join(path, "checkpoints"))
      or os.path.isfile(os.path.join(path, "run.json")))


def is_checkpoint_dir(path: str) -> bool:
  """An orbax step directory, or a folder of them (a workdir's checkpoints/)."""
  if os.path.isfile(os.path.join(path, "_CHECKPOINT_METADATA")):
    return True
  if os.path.basename(path) == "checkpoints" and is_workdir(os.path.dirname(path)):
    return True
  try:
    return any(n.isdigit() and os.path.isfile(os.path.join(path, n, "_CHECKPOINT_METADATA"))
               for n in os.listdir(path))
  except OSError:
    return False


def _ancestors(path: str):
  """`path` and every directory above it, nearest first."""
  while True:
    yield path
    parent = os.path.dirname(path)
    if parent == path:
      return
    path = parent


def _local_dir(path: str):
  return _real(path) if path and os.path.isdir(path) else None


def check_out(workdir: str, out: str, config, overwrite: bool = False):
  """Refuses (UserError, one line naming `out`) an --out whose export could destroy a base model,
  a workdir, a checkpoint or a user's files, or that cannot be written. Writes nothing."""
  real, work = _real(out), _real(workdir)
  if os.path.lexists(out) and not os.path.isdir(out):
    raise UserError(f"--out={out}: exists and is not a directory")
  protected = [(work, f"the workdir being exported ({workdir})")]
  m = config.model
  for key, path in (("config.model.hf_path", m.hf_path), ("config.model.tokenizer", m.tokenizer)):
    if _local_dir(path):
      protected.append((_local_dir(path), f"the run's base model ({key}={path})"
                        if key.endswith("hf_path") else f"the run's tokenizer ({key}={path})"))
  for root, what in protected:
    if real == root:
      raise UserError(f"--out={out}: is {what}; exporting there would overwrite it")
    if _inside(root, real):
      raise UserError(f"--out={out}: contains {what}; an export there would replace the folder "
                        "that holds it")
    if root != work and _inside(real, root):
      raise UserError(f"--out={out}: lies inside {what}; exporting there would change it")
  for d in _ancestors(real):
    if is_workdir(d):
      where = "is" if d == real else "lies inside the checkpoints of"
      if d == real or _inside(real, os.path.join(d, "checkpoints")):
        raise UserError(f"--out={out}: {where} the ftjax workdir {d}; exporting there would "
                        "break its config and resumes")
    elif os.path.isdir(d) and is_checkpoint_dir(d):
      raise UserError(f"--out={out}: {'is' if d == real else 'lies inside'} the checkpoint "
                      f"folder {d}")
  if os.path.isdir(out):
    _check_contents(out, real, overwrite)
  _check_writable(out)


def _check_contents(out: str, real: str, overwrite: bool):
  """A non-empty --out: nothing in it may be a workdir or a checkpoint folder, and unless it is
  an earlier ftjax export it is replaced only with --overwrite."""
  if not os.listdir(real):
    return
  seen = 0
  for d, dirs, files in os.walk(real):
    seen += len(dirs) + len(files)
    if seen > MAX_WALK:
      raise UserError(f"--out={out}: holds over {MAX_WALK} files, not an export directory; "
                      "choose an empty or new directory")
    if d != real and (is_workdir(d) or is_checkpoint_dir(d)):
      kind = "ftjax workdir" if is_workdir(d) else "checkpoint folder"
      raise UserError(f"--out={out}: contains the {kind} {d}; choose another directory")
  if not hf.is_export(real) and not overwrite:
    raise UserError(f"--out={out}: not empty and not an earlier ftjax export (it has no "
                    f"{hf.EXPORT_MARKER}); pass --overwrite to replace its model files, or "
                    "choose another directory")


def _check_writable(out: str):
  """Creates (and removes) a temporary directory where the export will be built: the nearest
  existing directory above --out. A read-only disk or missing permission fails here, before
  the model is loaded."""
  parent = next(d for d in _ancestors(os.path.dirname(os.path.abspath(out))) if os.path.isdir(d))
  try:
    os.rmdir(tempfile.mkdtemp(prefix=".ftjax-probe-", dir=parent))
  except OSError as e:
    if e.errno not in WRITE_ERRNOS:
      raise
    raise UserError(f"--out={out}: cannot write in {parent} ({os.strerror(e.errno)})") from None


def resolve_step(workdir: str, config, step):
  """The checkpoint step to export (an int): latest, best by eval loss, or the one asked for."""
  if step not in (None, "best") and not str(step).isdigit():
    raise UserError(f"--step={step!r}: expected a step number or 'best'")
  ckpt = checkpoint.Checkpointer(workdir, keep=int(config.train.keep), async_save=False)
  try:
    have = ckpt.all_steps()
    if not have:
      raise UserError(f"{workdir}: no checkpoint to restore (the run saved none yet)")
    if step is None:
      return ckpt.latest_step()
    if step == "best":
      best = ckpt.best_step()
      if best is None:
        raise UserError(f"--step=best: {workdir} saved no {ckpt.best_metric} to rank its "
                        f"checkpoints by (the run never evaluated); use --step=N (have {have}) "
                        "or omit --step for the latest")
      return best
    if int(step) not in have:
      raise UserError(f"{workdir}: no checkpoint for step {step} (have {have})")
    return int(step)
  finally:
    ckpt.close()


def _param_counts(params, config) -> dict:
  """{"total", "trainable"} parameter counts for the card (trainable: by the run's rules; a
  4-bit kernel counts its stored elements)."""
  from ftjax import partition
  from ftjax.train import setup
  return partition.summary(params, partition.label_params(params, setup.rules(config)))


def _missing_dirs(path: str) -> list[str]:
  return [d for d in _ancestors(path) if not os.path.exists(d)]


def _check_adapterhub(workdir: str, config):
  """Refuses (one line) a run whose adapters the `adapters` library cannot load exactly."""
  where = f"{workdir}: --format=adapterhub"
  kind = config.adapter.kind
  if kind != "bottleneck":
    raise UserError(f"{where} writes bottleneck adapters only (adapter.kind={kind}); use "
                    f"--format={'merged' if kind == 'none' else 'peft'}")
  if not config.model.hf_path:
    raise UserError(f"{where}: the run's base is no Hugging Face checkpoint "
                    "(config.model.hf_path is empty); the adapters library loads adapters over one")
  family = hf.read_hf_config(hf.resolve(config.model.hf_path)).get("model_type")
  why = adapterhub.refusal(family,
                           setup._get(config.model, "head", "lm"),
                           setup._get(config.adapter, "train_extra", ""))
  if why:
    raise UserError(f"{where}: {why}")


def export(workdir: str, out: str, format: str = "merged", step=None, dtype=None,
           overwrite: bool = False) -> str:
  """Writes the checkpoint `step` of `workdir` to `out` as `format` ("merged": HF weights in
  `dtype`, default the param dtype; "peft": the adapter; "adapterhub": bottleneck adapters in
  the `adapters` library's layout); returns `out`."""
  if jax.process_index() != 0:  # several hosts: one writer
    return out
  config = wd.load_config(workdir)
  # Checked before the Checkpointer, which would create an empty checkpoints/ here.
  if not wd.has_checkpoints(workdir):
    raise UserError(f"{workdir}: no checkpoint to restore (the run saved none yet)")
  if format == "adapterhub":
    _check_adapterhub(workdir, config)
  elif config.adapter.kind == "bottleneck":
    raise UserError(f"{workdir}: --format={format}: {hf.BOTTLENECK_NO_MERGE}")
  if format == "peft" and config.adapter.kind == "none":
    raise UserError(f"{workdir}: the run trained no adapter (adapter.kind=none); "
                     "use --format=merged")
  check_out(workdir, out, config, overwrite)
  step = resolve_step(workdir, config, step)
  tok_dir = setup.tokenizer_path(config)
  model, params, _, config = wd.load_trained(workdir, step)
  info = {"workdir": _real(workdir), "step": step}
  card = model_card.build(workdir, step, format, provenance.config_dict(config),
                          _param_counts(params, config))
  created = _missing_dirs(os.path.dirname(os.path.abspath(out)))
  try:
    if format == "merged":
      hf.save_pretrained(model, params, out, dtype=dtype, tokenizer_from=tok_dir,
                            export_info=info, readme=card)
    elif format == "adapterhub":
      adapterhub.save(model, params, out, adapterhub.adapter_name(workdir),
                      base_model_name_or_path=config.model.hf_path, tokenizer_from=tok_dir,
                      export_info=info, readme=card)
    else:
      save_adapter(model, params, out, base_model_name_or_path=config.model.hf_path or None,
                         tokenizer_from=tok_dir, export_info=info, readme=card)
  except OSError as e:
    if e.errno not in WRITE_ERRNOS:
      raise
    for d in created:  # the parents this export made, nearest first; only the empty ones go
      try:
        os.rmdir(d)
      except OSError:
        break
    state = "left as it was" if os.path.exists(out) else "not created"
    where = f": {e.filename}" if e.filename else ""
    raise UserError(f"--out={out}: cannot write the export ({os.strerror(e.errno)}{where}); "
                    f"{out} {state}") from None
  logging.info("exported %s step %d (%s) to %s", workdir, step, format, out)
  return out

