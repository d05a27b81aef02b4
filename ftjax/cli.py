"""Entry-point glue shared by the experiment scripts: bad input is one line and exit code 1.

`run(main, define_flags)` parses the flags itself so that a bad `--config.x` override (a typo,
a wrong type) or a config file's `UserError` is one line too, adds `--print_config` to scripts
with a `--config` flag (prints the resolved config, overrides applied, and exits), and turns
`errors.UserError` / `errors.Diverged` into `error: <one line>` with exit code 1 and
`errors.Interrupted` into a line saying how to resume with exit code 128 + signal (the shell's
convention for a process ended by a signal). Ctrl-C outside a training loop's signal handler
(while the model loads or the step compiles) is one line too, with exit code 130. Anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Callable, Optional

from absl import app, flags

from ftjax.errors import Diverged, Interrupted, UserError

FLAGS = flags.FLAGS

# What a user's input can cause (a typo, a missing file, a bad row, a diverged run): one line,
# no traceback. Anything else is a bug and keeps its traceback.
USER_ERRORS = (UserError, Diverged)


def one_line(e: BaseException) -> str:
  """The first non-empty line of an exception's message (its type name if there is none)."""
  msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
  lines = [ln.strip() for ln in str(msg).strip().splitlines() if ln.strip()]
  return lines[0] if lines else type(e).__name__


def _failing_flag(tb) -> tuple[str | None, object]:
  """The flag whose parse raised, from the traceback's frames: `config.train.stpes` for an
  override (ml_collections parses every `--config.*` override inside the `config` flag), and
  the config being overridden (None if not seen)."""
  name, config = None, None
  while tb is not None:
    local = tb.tb_frame.f_locals
    obj = local.get("self")
    if isinstance(obj, flags.Flag):
      name = obj.name
      path = next((local[k] for k in ("field_path", "override") if isinstance(local.get(k), str)),
                  None)
      if path:
        name = f"{obj.name}.{path}"
      if hasattr(local.get("config"), "keys"):
        config = local["config"]
    tb = tb.tb_next
  return name, config


def _known_fields(config, name: str) -> str:
  """`; config.train has: steps, ...`: the fields of the deepest section of `name` (a flag
  name, `config.train.stpes`) that exists, so a typo's line lists what was meant."""
  if config is None:
    return ""
  parts, where = name.split(".")[1:], [name.split(".")[0]]
  for part in parts[:-1]:
    if not (hasattr(config, "keys") and part in config and hasattr(config[part], "keys")):
      break
    config, where = config[part], where + [part]
  return f"; {'.'.join(where)} has: {', '.join(config.keys())}"


def _override_message(e: BaseException) -> str:
  # ConfigDict wraps its KeyError (with a "Did you mean" line) in an AttributeError.
  inner = e.args[0] if e.args and isinstance(e.args[0], BaseException) else e
  lines = [ln.strip().strip("'\"") for ln in
           str(inner.args[0] if isinstance(inner, KeyError) and inner.args else inner).splitlines()]
  lines = [ln for ln in lines if ln]
  if isinstance(inner, (KeyError, AttributeError)) and lines:
    return f"no such config field {lines[0]!r}" + (f" ({lines[1]})" if len(lines) > 1 else "")
  return "; ".join(lines) or type(e).__name__


def parse_flags(argv: list[str], flag_values: Optional[flags.FlagValues] = None) -> list[str]:
  """absl flag parsing where every bad flag or config override ends in one line, exit 1."""
  try:
    return check_flags(argv, flag_values)
  except UserError as e:
    _die(one_line(e))


def check_flags(argv: list[str], flag_values: Optional[flags.FlagValues] = None) -> list[str]:
  """`flag_values(argv)` (default: the module's FLAGS, looked up at call time), where a bad flag
  or config override raises a one-line UserError (sweep.py checks every run's flags this way
  before it starts any)."""
  flag_values = FLAGS if flag_values is None else flag_values
  try:
    return flag_values(argv)
  except UserError as e:  # raised by a config file's get_config / parse_arg
    raise UserError(one_line(e)) from None
  except flags.Error as e:
    # config_flags re-raises it as a UserError holding the traceback text; the innermost
    # UserError in the chain is the original one-line message.
    cause, link = None, e
    while link is not None:
      cause = link if isinstance(link, UserError) else cause
      link = link.__cause__ or link.__context__
    if cause is None and "config file" in str(e) and len(str(e).splitlines()) > 1:
      raise  # a bug in a config file: its traceback matters
    raise UserError(one_line(cause or e)) from None
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    # ml_collections raises these for an override naming no field or of the wrong type; a bug
    # in a config file raises other types, or these outside any flag's parse, and keeps its
    # traceback.
    name, config = _failing_flag(e.__traceback__)
    if name is None or "." not in name:  # not an override: a bug in a config file
      raise
    msg = _override_message(e)
    if msg.startswith("no such config field"):
      msg += _known_fields(config, name)
    raise UserError(f"--{name}: {msg}") from None


def _die(msg: str, code: int = 1):
  print(f"error: {msg}", file=sys.stderr)
  _quiet_teardown()
  sys.exit(code)


def _quiet_teardown():
  """After the one error line, nothing more on stderr: threads a library left running (orbax's
  commit threads, TensorStore's reads) may finish while the interpreter exits and log a
  traceback of their own ("cannot schedule new futures after shutdown"). Muted only once the
  interpreter exits (threading's exit hooks run before it joins those threads), so a caller
  that catches the SystemExit (a test, a notebook) keeps its stderr and logging."""
  import logging
  import threading

  def mute():
    sys.stderr.flush()
    logging.disable(logging.CRITICAL)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)

  try:
    threading._register_atexit(mute)  # pylint: disable=protected-access
  except (AttributeError, RuntimeError):  # no such hook, or the interpreter is already exiting
    pass


def _checkpoint_steps(workdir: str) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  return [int(n) for n in os.listdir(d) if n.isdigit()] if os.path.isdir(d) else []


def interrupted_message() -> str:
  """What a Ctrl-C outside the training loop leaves: for a script with --workdir, whether a
  rerun resumes (a checkpoint is there) or starts over."""
  msg = "interrupted by SIGINT (Ctrl-C)"
  workdir = FLAGS["workdir"].value if "workdir" in FLAGS else None
  if not workdir:
    return msg
  try:
    steps = _checkpoint_steps(workdir)
  except OSError:
    steps = []
  if steps:
    return (f"{msg}; {workdir} holds the checkpoint of step {max(steps)}: rerun the same command "
            "to resume from it")
  return f"{msg} before the first checkpoint; nothing to resume: rerun the same command to start"


def _die_interrupted():
  # A second Ctrl-C while this prints would be another traceback.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  print(interrupted_message(), file=sys.stderr)
  sys.stderr.flush()
  sys.stdout.flush()
  # No interpreter teardown: threads still compiling or loading (XLA, the tokenizer) have
  # crashed it once at exit. Nothing is left half-written: saves are atomic renames.
  os._exit(128 + signal.SIGINT)


def run(main: Callable, define_flags: Callable[[], None]):
  define_flags()
  has_config = "config" in FLAGS
  if has_config:
    flags.DEFINE_bool("print_config", False, "Print the resolved config (the config file with "
                      "its arg and --config.* overrides applied) and exit.")

  def _main(argv):
    if has_config and FLAGS.print_config:
      if FLAGS.config is None:
        raise app.UsageError("--print_config needs --config")
      print(FLAGS.config.to_json_best_effort(indent=2, sort_keys=False))
      return
    main(argv)

  try:
    app.run(_main, flags_parser=parse_flags)
  except USER_ERRORS as e:
    _die(one_line(e))
  except Interrupted as e:
    print(str(e), file=sys.stderr)
    sys.exit(128 + (e.signum or 15))
  except KeyboardInterrupt:
    _die_interrupted()


def train_main(train: Callable, config_help: str):
  """A trainer's whole script: `--config` and `--workdir` flags, then `train(config, workdir)`
  (a `ftjax.train.<algo>.run`) under `run`'s one-line errors; logs its result and wall time."""
  import time

  from absl import logging
  from ml_collections import config_flags

  def define_flags():
    config_flags.DEFINE_config_file("config", None, f"Config file ({config_help}).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Where the config, metrics and checkpoints go.")

  def main(argv):
    del argv
    if FLAGS.workdir is None or FLAGS.config is None:
      raise app.UsageError("--config and --workdir are required")
    t0 = time.time()
    out = train(FLAGS.config, FLAGS.workdir)
    logging.info("done in %.1fs: %s", time.time() - t0, out)

  run(main, define_flags)
