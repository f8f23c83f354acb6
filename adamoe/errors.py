"""Errors a user can fix. `train.py` prints them as one line (exit status 2), not a traceback."""


class ConfigError(ValueError):
    """A setting, or a combination of settings, that cannot work; the message names it."""


class DataError(ValueError):
    """Bad input data; the message names the file and, where one is to blame, the line."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or made by another task or model size."""


def read_checkpoint(path) -> dict:
    """A checkpoint's plain data, loaded without running any code it holds; a truncated,
    foreign or malicious file is a CheckpointError."""
    import torch

    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # torch raises many types for a bad file
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message says where it stopped and what is saved."""


class Interrupted(TrainingError):
    """Ctrl-C or SIGTERM stopped training after saving; the message says how to resume."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
