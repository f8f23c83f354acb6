"""Every use of a library's private API or of its message text, in one place. Each says
which public API is missing; `tests/test_compat.py` fails when one of them changes."""

import os
import re
from datetime import timedelta

import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


class CheckpointArguments:
    """A mixin for a LightningCLI subclass. LightningCLI puts a checkpoint's saved
    hyperparameters over the parsed config in its private `_parse_ckpt_path`, between
    `parse_arguments` and `before_instantiate_classes`,
    and no public hook replaces it: a subclass says what to do instead in
    `apply_checkpoint_arguments`."""

    def apply_checkpoint_arguments(self) -> None:
        raise NotImplementedError

    def _parse_ckpt_path(self) -> None:
        self.apply_checkpoint_arguments()


def set_collective_timeout(ddp_strategy, timeout: timedelta) -> None:
    """DDPStrategy takes its collectives' timeout only as a constructor argument; a strategy
    that the Trainer builds from a name (`strategy: ddp`, or `auto` on several devices) has
    the default, so it is set on the built strategy before its process group starts."""
    ddp_strategy._timeout = timeout


def ddp_ignore(root: nn.Module, names: list[str]) -> None:
    """DDP has no public way to leave parameters out of its all-reduce; this is the helper
    its own wrappers use (it records the names on the module, where DDP reads them)."""
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(root, names)


# jsonargparse reports a bad value only as message text: the key and the reasons are read
# from it. Lines that explain the nesting rather than the mistake are left out.
PARSER_KEY = re.compile(r'Parser key "([^"]+)"')
NESTING = (
    "Parser key",
    "Does not validate",
    "Subtypes:",
    "Errors:",
    "Given value",
    "- Expected a <class 'NoneType'>",
    "- Problem with given class_path",
)
# A union of a config and a class reports the branch the value was not meant for last.
OTHER_BRANCH = ("does not correspond to a subclass of", "does not implement protocol")


def parser_error(message: str) -> tuple[str, str]:
    """The dotted config key a jsonargparse error is about ("" if none) and its innermost reason."""
    keys = list(dict.fromkeys(PARSER_KEY.findall(message)))
    lines = [line.strip() for line in message.splitlines()]
    reasons = [line.removeprefix("- ") for line in lines if line and not line.startswith(NESTING)]
    reasons = [r for r in reasons if not any(s in r for s in OTHER_BRANCH)] or reasons
    return ".".join(keys), reasons[-1] if reasons else message.strip()


# NCCL and the store raise torch.distributed.DistError when a peer is gone or a collective
# timed out; gloo raises a plain RuntimeError, and only its text tells.
LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out")


def lost_peer(e: BaseException) -> bool:
    if isinstance(e, dist.DistError):
        return True
    return isinstance(e, RuntimeError) and any(s in str(e) for s in LOST_PEER)


def lightning_setting(e: BaseException) -> bool:
    """Lightning checks some trainer settings against the data only once fit runs (e.g.
    `val_check_interval` above the number of batches) and raises a plain ValueError from
    its loops: where it was raised tells."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = tb.tb_frame.f_code.co_filename if tb is not None else ""
    return isinstance(e, ValueError) and f"lightning{os.sep}pytorch{os.sep}loops" in where
