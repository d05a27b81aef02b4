"""The error type for bad user input (a typo, a missing file, a malformed row, a bad config).

The experiment scripts print a `UserError` as one line on stderr and exit 1; every other
exception is a bug and keeps its traceback. It subclasses ValueError so that callers that
caught ValueError keep working.
"""


class UserError(ValueError):
  """Bad input from the user: the message names the file, row and field, or the config key."""
