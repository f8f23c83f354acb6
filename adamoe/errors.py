"""Errors a user can fix. `train.py` prints them as one line (exit status 2), not a traceback."""


class ConfigError(ValueError):
    """A setting, or a combination of settings, that cannot work; the message names it."""


class DataError(ValueError):
    """Bad input data; the message names the file and, where one is to blame, the line."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or made by another task or model size."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message says where it stopped and what is saved."""


class Interrupted(TrainingError):
    """Ctrl-C or SIGTERM stopped training after saving; the message says how to resume."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
