"""export.py's --out guards: the base, a workdir, a checkpoint and a user's files are never
overwritten unasked; --step=best needs an eval metric; write errors are one line and leave
nothing half-written. One tiny trained workdir (no eval) serves every test."""

import errno
import hashlib
import json
import os
import shutil
import subprocess

import pytest

from ftjax import export
from ftjax.errors import UserError
from ftjax.train import sft
from tests.test_cli import ENV, _error_lines, _script
from tests.test_sft import make_config


@pytest.fixture(scope="module")
def trained(base_dir, chat_files, tmp_path_factory):
  """A 2-step LoRA SFT workdir without eval data (so it never evaluated), nested one level down
  (its parent holds nothing else). Trained in-process: export.py is what runs as a script."""
  train, ev = chat_files
  w = str(tmp_path_factory.mktemp("export_guards") / "runs" / "w")
  config = make_config(base_dir, train, "", steps=2, save_every=1, eval_every=1000, log_every=1)
  sft.run(config, w)
  return w


def _tree(d):
  """{relative path: sha256} of every file under `d` (symlinks by their target)."""
  out = {}
  for root, dirs, files in os.walk(d):
    for n in files + [x for x in dirs if os.path.islink(os.path.join(root, x))]:
      p = os.path.join(root, n)
      rel = os.path.relpath(p, d)
      out[rel] = ("link:" + os.readlink(p) if os.path.islink(p)
                  else hashlib.sha256(open(p, "rb").read()).hexdigest())
  return out


def _export(w, out, *extra):
  return _script("export.py", f"--workdir={w}", f"--out={out}", *extra)


def _run_all(cases):
  """Starts every command at once; {name: (returncode, stderr)}."""
  procs = {name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=ENV) for name, cmd in cases.items()}
  errs = {name: p.communicate(timeout=300)[1] for name, p in procs.items()}
  return {name: (procs[name].returncode, err) for name, err in errs.items()}


def _no_leftovers(d):
  return [n for n in os.listdir(d) if n.startswith(".ftjax-")]


def test_export_refuses_base_workdir_checkpoints_and_user_dirs(trained, base_dir, tmp_path):
  w = trained
  runs = os.path.dirname(w)
  before = {"base": _tree(base_dir), "w": _tree(w)}
  # Another workdir (config.json + run.json), a folder holding a checkpoint, a user's model dir.
  other = tmp_path / "other_run"
  other.mkdir()
  (other / "config.json").write_text("{}")
  (other / "run.json").write_text("{}")
  holds_ckpt = tmp_path / "holds_ckpt"
  shutil.copytree(os.path.join(w, "checkpoints", "1"), holds_ckpt / "backup" / "1")
  user = tmp_path / "user_model"
  user.mkdir()
  (user / "config.json").write_text('{"mine": true}')
  (user / "notes.txt").write_text("keep me")
  link = tmp_path / "link_to_base"
  link.symlink_to(base_dir)
  before["user"] = _tree(str(user))
  # name -> (export.py's flags after --workdir, what the one error line must name)
  cases = {
      "base": ((base_dir,), [base_dir, "base model"]),
      "base_symlink": ((link,), [str(link), "base model"]),
      "inside_base": ((os.path.join(base_dir, "sub"),), ["inside", "base model"]),
      "workdir": ((w,), [w, "workdir"]),
      "holds_workdir": ((runs, "--overwrite"), [runs, "contains", w]),
      "checkpoint": ((os.path.join(w, "checkpoints", "2"),), ["checkpoint"]),
      "in_checkpoints": ((os.path.join(w, "checkpoints", "hf"),), ["checkpoint"]),
      "other_workdir": ((other, "--overwrite"), [str(other), "workdir"]),
      "holds_checkpoint": ((holds_ckpt, "--overwrite"), [str(holds_ckpt), "checkpoint"]),
      "user_dir": ((user,), [str(user), "not an earlier ftjax export", "--overwrite"]),
      "best_without_eval": ((tmp_path / "best", "--step=best"),
                            ["--step=best", "eval_loss", "--step=N"]),
      "file": ((os.path.join(w, "config.json"),), ["not a directory"]),
  }
  # Through the script (exit 1, the one line cli.run prints, no traceback): a path guard and
  # the --step guard. The others call what export.py's main calls with the same arguments;
  # cli.run prints a UserError's text as that line.
  by_cli = ("base_symlink", "best_without_eval")
  results = _run_all({name: _export(w, *cases[name][0]) for name in by_cli})
  for name, (rc, err) in results.items():
    assert rc == 1, (name, err[-3000:])
    assert "Traceback" not in err, (name, err[-3000:])
    lines = _error_lines(err)
    assert len(lines) == 1, (name, err[-3000:])
    for needle in cases[name][1]:
      assert needle in lines[0], (name, lines[0])
  for name, (args, needles) in cases.items():
    if name in by_cli:
      continue
    out, flags = str(args[0]), args[1:]
    with pytest.raises(UserError) as e:
      export.export(w, out, "merged", "best" if "--step=best" in flags else None, None,
                    "--overwrite" in flags)
    line = str(e.value)
    assert "\n" not in line, (name, line)
    for needle in needles:
      assert needle in line, (name, line)
  assert not os.path.exists(tmp_path / "best")
  assert _tree(base_dir) == before["base"]  # byte for byte
  assert _tree(w) == before["w"]  # config.json, run.json, checkpoints
  assert _tree(str(user)) == before["user"]
  assert json.load(open(other / "config.json")) == {}
  for d in (tmp_path, runs, os.path.dirname(base_dir)):
    assert not _no_leftovers(d), d


def test_export_replaces_an_earlier_export_and_a_user_dir_only_with_overwrite(trained, tmp_path):
  w = trained
  out = tmp_path / "hf"
  user = tmp_path / "user_model"
  user.mkdir()
  (user / "config.json").write_text('{"mine": true}')
  (user / "notes.txt").write_text("keep me")
  # The script once (the user's dir, --overwrite); the rest is export.py's main's one call.
  res = subprocess.run(_export(w, user, "--overwrite"), capture_output=True, text=True,
                       timeout=300, env=ENV)
  assert res.returncode == 0, res.stderr[-3000:]
  export.export(w, str(out), "merged", "1")
  marker = json.load(open(out / "ftjax_export.json"))
  assert marker["step"] == 1 and marker["format"] == "merged"
  assert os.path.realpath(marker["workdir"]) == os.path.realpath(w)
  # The user's config.json is replaced by the HF one; files no export writes stay.
  assert "model_type" in json.load(open(user / "config.json"))
  assert (user / "notes.txt").read_text() == "keep me"
  assert os.path.exists(user / "ftjax_export.json")
  # An earlier export is replaced without --overwrite (a PEFT adapter over the merged model).
  export.export(w, str(out), "peft")
  names = set(os.listdir(out))
  assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= names
  assert "config.json" not in names and "model.safetensors" not in names
  marker = json.load(open(out / "ftjax_export.json"))
  assert marker["step"] == 2 and marker["format"] == "peft"
  assert not _no_leftovers(tmp_path)


def _make_read_only(d) -> bool:
  """chmod, or (as root, which chmod does not stop) chattr +i; whether writes now fail."""
  os.chmod(d, 0o555)
  probe = os.path.join(d, "probe")
  for attempt in ("chmod", "chattr"):
    if attempt == "chattr" and shutil.which("chattr"):
      subprocess.run(["chattr", "+i", str(d)], capture_output=True)
    try:
      os.mkdir(probe)
      os.rmdir(probe)
    except OSError:
      return True
  return False


def test_export_to_read_only_dir_is_one_line(trained, tmp_path):
  ro = tmp_path / "ro"
  ro.mkdir()
  try:
    if not _make_read_only(ro):
      pytest.skip("cannot make a read-only directory here (root ignores permissions)")
    res = subprocess.run(_export(trained, ro / "hf"), capture_output=True, text=True,
                         timeout=300, env=ENV)
    assert res.returncode == 1, res.stderr[-3000:]
    lines = _error_lines(res.stderr)
    assert len(lines) == 1 and f"--out={ro / 'hf'}" in lines[0], res.stderr[-3000:]
    assert "cannot write" in lines[0] and "Traceback" not in res.stderr
    # Refused before the model was loaded.
    assert "trainable params" not in res.stderr and "exported" not in res.stderr
    assert os.listdir(ro) == []
  finally:
    subprocess.run(["chattr", "-i", str(ro)], capture_output=True)
    os.chmod(ro, 0o755)


def test_export_on_full_disk_is_one_line_and_leaves_nothing(trained, tmp_path, monkeypatch):
  from ftjax import export, st_io

  def full_disk(path, tensors, metadata=None):
    with open(path, "wb") as f:
      f.write(b"\0" * 100)  # a partial file, as a full disk leaves it
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

  monkeypatch.setattr(st_io, "write", full_disk)
  new = tmp_path / "new" / "hf"
  with pytest.raises(UserError, match=r"--out=.*new/hf: cannot write the export \(No space"):
    export.export(trained, str(new))
  assert not os.path.exists(tmp_path / "new")  # neither the export nor the parent it made
  # Over an earlier export: left as it was.
  old = tmp_path / "old"
  monkeypatch.undo()
  export.export(trained, str(old), "peft")
  before = _tree(str(old))
  monkeypatch.setattr(st_io, "write", full_disk)
  with pytest.raises(UserError, match="left as it was"):
    export.export(trained, str(old), "merged")
  assert _tree(str(old)) == before
  assert not _no_leftovers(tmp_path)
