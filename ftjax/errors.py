"""The error types the experiment scripts report in one line: bad user input, a diverged run,
a run stopped by a signal.

The experiment scripts (`ftjax/cli.py`) print a `UserError` or `Diverged` as one line on stderr
and exit 1, and an `Interrupted` as one line saying how to resume; every other exception is a
bug and keeps its traceback. `UserError` subclasses ValueError so that callers that caught
ValueError keep working.
"""


class UserError(ValueError):
  """Bad input from the user: the message names the file, row and field, or the config key."""


class Diverged(FloatingPointError):
  """The loss went NaN/Inf: usually the learning rate or the data, not a bug in ftjax."""


class Interrupted(Exception):
  """A run saved its checkpoint and stopped early on SIGTERM/SIGINT; rerunning resumes it."""

  def __init__(self, signum: int, step: int, workdir: str):
    import signal
    self.signum, self.step, self.workdir = signum, step, workdir
    name = signal.Signals(signum).name if signum else "a signal"
    super().__init__(f"stopped by {name} at step {step}, checkpoint saved in {workdir}; "
                     "rerun the same command to resume")
