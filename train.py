"""Train, validate, test or predict: `python train.py fit --config configs/task/translation.yaml`."""

import sys

from adamoe.cli import entry

if __name__ == "__main__":
    sys.exit(entry())
