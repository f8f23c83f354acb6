"""The `train.py` command line: LightningCLI with the data-to-model links and run defaults."""

from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningCLI

from adamoe.callbacks import Checkpoint, Curriculum, EpochTimer, ExpertStats, MetricsSummary, RoutingAnalysis
from adamoe.data import TextData
from adamoe.module import MoEModule


class AdamoeCLI(LightningCLI):
    def add_arguments_to_parser(self, parser):
        # Always on, with their own config groups: `--timer.target 2.0`, `--analysis.top_k 20`.
        parser.add_lightning_class_args(EpochTimer, "timer")
        parser.add_lightning_class_args(RoutingAnalysis, "analysis")
        # The vocabulary is sized by the data config; special ids are the tokenizer's.
        parser.link_arguments("data.init_args.vocab_size", "model.init_args.vocab_size")
        for name in ("pad_id", "bos_id", "eos_id"):
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")
        parser.link_arguments("data.init_args.num_classes", "model.init_args.num_classes")


def main(args=None, run: bool = True) -> AdamoeCLI:
    return AdamoeCLI(
        MoEModule,
        TextData,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults={
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "logs", "name": "adamoe", "default_hp_metric": False}},
            "callbacks": [
                Checkpoint(monitor="val/loss", mode="min", save_last=True, filename="best-{epoch}-{step}"),
                MetricsSummary(),
                ExpertStats(),
                Curriculum(),
                LearningRateMonitor(logging_interval="step"),
            ],
            "use_distributed_sampler": False,  # the data module shards its own batches
            "reload_dataloaders_every_n_epochs": 1,  # and their number changes with the epoch's order
        },
        auto_configure_optimizers=False,  # the module takes its optimizer and schedule as arguments
        args=args,
        run=run,
    )
