"""The `train.py` command line: LightningCLI with the data-to-model links and run defaults."""

import errno
import os
import sys
from datetime import timedelta
from pathlib import Path

from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ProgressBar as LightningProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from adamoe import compat, console, precedence, runs, usage
from adamoe.callbacks import AtomicCheckpointIO, Checkpoint, EpochTimer, NonFiniteGuard, ProgressBar, RoutingAnalysis
from adamoe.data import TextData
from adamoe.errors import CheckpointError, ConfigError, DataError, TrainingError, read_checkpoint
from adamoe.moe import MoELayer
from adamoe.tasks import MoEModule

# The trainer, logger and callbacks every run starts from, before any --config.
BASE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "base.yaml"


class OneLineErrors(LightningArgumentParser):
    """A config error is one line: the config key and the innermost reason, not the usage
    and the nested tree of every type that was tried."""

    def error(self, message, ex=None):
        if not self.exit_on_error:
            return super().error(message, ex)
        key, reason = compat.parser_error(message)
        where = f"{key}: " if key else ""
        prog = self.prog.replace(" [options]", "")
        print(f"error: {where}{reason} (options: {prog} --help)", file=sys.stderr, flush=True)
        sys.exit(2)


class AdamoeCLI(compat.CheckpointArguments, LightningCLI):
    def add_arguments_to_parser(self, parser):
        # Callbacks with settings a run often changes get a config group of their own
        # (`--checkpoint.monitor val/acc`, `--timer.target 2.0`, `--nonfinite.action skip`),
        # which a config file sets as `checkpoint: {monitor: val/acc}`. The others are the
        # list `trainer.callbacks` in configs/base.yaml.
        parser.add_lightning_class_args(EpochTimer, "timer")
        parser.add_lightning_class_args(RoutingAnalysis, "analysis")
        parser.add_lightning_class_args(NonFiniteGuard, "nonfinite")
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.add_argument(
            "--collective_timeout",
            type=timedelta,
            default=timedelta(minutes=10),
            help="how long a DDP rank waits in a collective for the others before it fails (NCCL's default: 30 min)",
        )
        # The vocabulary is sized by the data config; special ids are the tokenizer's.
        parser.link_arguments("data.init_args.vocab_size", "model.init_args.vocab_size")
        for name in ("pad_id", "bos_id", "eos_id"):
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")
        parser.link_arguments("data.init_args.num_classes", "model.init_args.num_classes")

    def instantiate_trainer(self, **kwargs):
        root = self.config_init[self.subcommand] if self.subcommand else self.config_init
        config = root.trainer
        callbacks = config.get("callbacks") or []
        if config.get("enable_progress_bar") is not False and not any(
            isinstance(c, LightningProgressBar) for c in callbacks
        ):
            config.callbacks = [*callbacks, ProgressBar()]  # one a config can replace; without a bar, none
        # A resumed run writes its config over the one it resumes in the same log folder, and
        # an evaluation over the one of the evaluation before it.
        self.save_config_kwargs["overwrite"] = self.subcommand != "fit" or bool(
            self.config_init["fit"].get("ckpt_path")
        )
        trainer = super().instantiate_trainer(**kwargs)
        strategy = trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:  # the default; a configured one is kept
            strategy.checkpoint_io = AtomicCheckpointIO()
        if isinstance(strategy, DDPStrategy):
            compat.set_collective_timeout(strategy, root.collective_timeout)
        return trainer

    def parse_arguments(self, parser, args):
        # Kept to tell which `--model.*` the user typed (see `apply_checkpoint_arguments`); a dict or
        # Namespace of arguments types nothing.
        self._command_line = (
            [str(a) for a in (sys.argv[1:] if args is None else args)]
            if args is None or isinstance(args, (list, tuple))
            else []
        )
        for i, arg in enumerate(self._command_line[:-1]):  # jsonargparse's own YAML errors name neither file nor line
            if arg in ("-c", "--config") and Path(self._command_line[i + 1]).is_file():
                precedence.load_yaml(self._command_line[i + 1])
                precedence.check_imports(self._command_line[i + 1])
        super().parse_arguments(parser, args)

    def apply_checkpoint_arguments(self):
        """Lightning rebuilds the model from a checkpoint's saved arguments, over the config.
        Here the user's settings win instead (`adamoe.precedence`): the checkpoint fills what
        they leave unset, field by field, and says which of its values are not in effect. A
        checkpoint of another task stops here, rather than meeting this task's data deep
        inside a step; `--ckpt_path last` is looked up here, so that all of this applies to it."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        ckpt = self.config[subcommand].get("ckpt_path")
        if ckpt == "last":
            ckpt = runs.resolve_last(self.config[subcommand], subcommand)
        runs.place_logs(self.config[subcommand], subcommand, ckpt)
        if not ckpt or not Path(ckpt).is_file():
            return
        hparams = read_checkpoint(ckpt).get("hyper_parameters", {})
        if not isinstance(hparams, dict):
            raise CheckpointError(
                f"{ckpt}: not a checkpoint of this program (its hyper_parameters are a {type(hparams).__name__})"
            )
        hparams.pop("_instantiator", None)
        model = self.config[subcommand].get("model")
        saved, wanted = hparams.pop("_class_path", None), model.get("class_path") if model else None
        if saved and wanted and saved != wanted:
            raise CheckpointError(f"{ckpt} was saved by {saved}; this config's model is {wanted}, for another task")
        if not hparams or model is None:
            return
        effective = model.init_args.as_dict() if model.get("init_args") is not None else {}
        foreign = precedence.foreign_classes(hparams, effective)
        if foreign:
            raise CheckpointError(
                f"{ckpt} names {', '.join(foreign)}, from a package this run does not use: set the class in the "
                "config if you trust it"
            )
        merged = precedence.merge(hparams, effective, precedence.user_keys(self._command_line))
        unused = precedence.differences(hparams, merged)
        if unused:
            rank_zero_info(f"{Path(ckpt).name}: the config overrides its saved {'; '.join(unused)}")
        self.config = self.parser.parse_object(
            {subcommand: {"model": {"class_path": wanted or saved, "init_args": merged}}}, self.config
        )

    def _check_run(self):
        """What would otherwise fail late, or deep inside a library."""
        config = self.config_init[self.subcommand]
        ckpt = config.get("ckpt_path")
        if (
            ckpt not in (None, "last", "best", "hpc", "registry")
            and "://" not in str(ckpt)
            and not Path(ckpt).is_file()
        ):
            raise CheckpointError(f"--ckpt_path {ckpt}: no such checkpoint file")
        curriculum = getattr(self.datamodule, "curriculum", "none")
        if curriculum in ("paper", "reverse") and not any(isinstance(m, MoELayer) for m in self.model.modules()):
            raise ConfigError(
                f"data.curriculum={curriculum} orders samples by their routing, but the model has no MoE layer "
                "(moe_every: 0)"
            )
        if (
            "bf16" in str(self.trainer.precision)
            and self.trainer.strategy.root_device.type == "cpu"
            and not cpu_has_fast_bf16()
        ):
            rank_zero_warn(
                "this CPU has no fast bf16 matmul (no AMX-BF16 or AVX512-BF16): bf16-mixed will run slower than fp32"
            )
        logger = self.trainer.logger
        if logger is not None and self.trainer.is_global_zero and logger.save_dir:
            folder = Path(logger.save_dir)
            probe = folder / f".write-test-{os.getpid()}"
            try:
                folder.mkdir(parents=True, exist_ok=True)
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as e:
                raise ConfigError(f"log folder {folder} is not writable: {e.strerror}") from None
            saved = Path(self.trainer.log_dir) / "config.yaml"
            if self.subcommand == "fit" and not ckpt and saved.exists():
                raise ConfigError(
                    f"{saved.parent} already holds a run: resume it with --ckpt_path "
                    f"{saved.parent / 'checkpoints' / 'last.ckpt'}, "
                    "or choose another --trainer.logger.init_args.version"
                )

    before_fit = before_validate = before_test = before_predict = _check_run

    def after_fit(self):
        # Said after the progress bar has stopped, so that it stays on the screen.
        trainer = self.trainer
        if not trainer.is_global_zero or not trainer.loggers or trainer.loggers[0].log_dir is None:
            return
        log_dir = trainer.loggers[0].log_dir
        where = [f"Run logs:    {log_dir}  (metrics.json, config.yaml, TensorBoard events)"]
        if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.dirpath:
            where.append(f"Checkpoints: {trainer.checkpoint_callback.dirpath}")
        where.append(f"Watch it:    tensorboard --logdir {Path(log_dir).parent}")
        print("\n".join(where), flush=True)

    def after_predict(self):
        if self.trainer.is_global_zero:
            print(f"Predictions: {self.model.predictions_path}", flush=True)


def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no way to tell, so no warning
        return True
    return "amx_bf16" in flags or "avx512_bf16" in flags


def main(args=None, run: bool = True) -> AdamoeCLI:
    defaults = {"default_config_files": [str(BASE_CONFIG)]} if BASE_CONFIG.is_file() else {}
    return AdamoeCLI(
        MoEModule,
        TextData,
        parser_class=OneLineErrors,
        # With run=False there is one parser and no subcommand.
        parser_kwargs={name: defaults for name in AdamoeCLI.subcommands()} if run else defaults,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,  # the module takes its optimizer and schedule as arguments
        args=args,
        run=run,
    )


# Write failures a user fixes outside the code: a full disk, a read-only or missing folder.
WRITE_ERRNOS = {errno.EPERM, errno.ENOSPC, errno.EROFS, errno.EACCES, errno.ENOTDIR, errno.EDQUOT, errno.ENOENT}


def entry(args=None) -> int:
    """`train.py`: a mistake in the config, the data or a checkpoint, or a run that cannot
    go on, ends with one line that names the culprit and exit status 2, not a traceback.
    Set ADAMOE_TRACEBACK=1 to see the traceback."""
    console.say_each_warning_once()
    which = usage.asked(sys.argv[1:] if args is None else list(args))
    if which is not None:
        print(usage.subcommand(which) if which else usage.program())
        return 0
    try:
        main(args)
    except Exception as e:
        # jsonargparse wraps what a class raised while it was built: look down the chain.
        cause = e
        while cause is not None and not _is_users(cause):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            line = (
                f"error: {cause.filename or ''}: {cause.strerror}" if isinstance(cause, OSError) else f"error: {cause}"
            )
            return _fail(e, line, getattr(cause, "exit_code", 2))
        if compat.lost_peer(e):
            # The rank that failed first has said why; a page of traceback per survivor adds nothing.
            return _fail(
                e,
                "error: a collective failed because another rank exited or hung (its message says why): "
                f"{str(e).splitlines()[0]}",
            )
        raise
    return 0


def _is_users(e: BaseException) -> bool:
    return (
        isinstance(e, (ConfigError, DataError, CheckpointError, TrainingError, MisconfigurationException))
        or (isinstance(e, OSError) and e.errno in WRITE_ERRNOS)
        or compat.lightning_setting(e)
    )


def _fail(exception, line: str, code: int = 2) -> int:
    if os.environ.get("ADAMOE_TRACEBACK"):
        raise exception
    rank = os.environ.get("LOCAL_RANK")
    print(f"[rank {rank}] {line}" if rank not in (None, "0") else line, file=sys.stderr, flush=True)
    return code
