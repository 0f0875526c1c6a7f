"""The one base class of every error a user can cause or fix: bad input, a missing file, a run that cannot go on.

Each module raises its own subclass (ConfigError, CheckpointError, DataError, AdapterError, HeadError, ...)
with a message that names the file, line or tensor and says what to do. The command lines catch UsageError
once (cli.py) and print that message as one line; anything else is a bug and keeps its traceback.
"""


class UsageError(ValueError):
    """An error the user can fix; its message is the whole story, printed as one line."""
