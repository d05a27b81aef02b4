"""Entry-point glue shared by the experiment scripts: bad input is one line and exit code 1."""

from __future__ import annotations

import sys
from typing import Callable

from absl import app

# What a user's input can cause (a typo, a missing file, a bad row, a diverged run): one line,
# no traceback. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, OSError, FloatingPointError)


def run(main: Callable, define_flags: Callable[[], None]):
  define_flags()
  try:
    app.run(main)
  except USER_ERRORS as e:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)
