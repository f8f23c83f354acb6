"""What the console says: each warning once, and none of the notices that say nothing to a
user of this program. Imported by the command line."""

import logging
import warnings

# Said once per epoch by Lightning itself, about its own code.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
# The data module's batch sampler resumes mid-epoch from its own state: the warning does not apply.
warnings.filterwarnings("ignore", message=r".*resuming from a checkpoint that ended before the epoch ended")
# Every new run has a folder of its own: a full checkpoint folder is the run being resumed.
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
# `Checkpoint` checks its monitor against the task's metrics before the first step; this
# one is said again by every run that ends before its first validation.
warnings.filterwarnings("ignore", message=r".*ModelCheckpoint\(monitor=.*could not find the monitored key")
# The batch sampler yields every sample of the predicted split (a test checks each line).
warnings.filterwarnings("ignore", message=r".*custom batch sampler .* for prediction")
# An advertisement, said at every start.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda record: "litlogger" not in record.getMessage()
)


def say_each_warning_once():
    """Lightning repeats some warnings every epoch, when it rebuilds the loaders, with other
    numbers in them (and Python's own once-per-place record is reset whenever any library
    touches the warning filters): show each place's warning once per run."""
    if getattr(warnings.showwarning, "once_per_place", False):  # entry() ran before in this process
        return
    shown, show = set(), warnings.showwarning

    def once(message, category, filename, lineno, file=None, line=None):
        if (category, filename, lineno) not in shown:
            shown.add((category, filename, lineno))
            show(message, category, filename, lineno, file, line)

    once.once_per_place = True
    warnings.showwarning = once
