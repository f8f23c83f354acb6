"""Train, validate, test or predict: `python train.py fit --config configs/quickstart.yaml`."""

from adamoe.cli import main

if __name__ == "__main__":
    main()
