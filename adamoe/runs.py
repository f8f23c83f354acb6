"""Where a run's files go: one folder per run, `<save_dir>/<name>/<version>/`, holding its
logs, config, metrics.json and `checkpoints/`; evaluations of it in folders inside it."""

from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info

from adamoe.errors import CheckpointError


def logger_args(config):
    """The logger's init_args when it is one with a save_dir and a name (TensorBoard, CSV)."""
    logger = config.trainer.get("logger")
    init = logger.get("init_args") if logger and not isinstance(logger, bool) and hasattr(logger, "get") else None
    return init if init is not None and "name" in init else None


def resolve_last(config, subcommand: str) -> str | None:
    """`--ckpt_path last`: the last.ckpt of the newest run of this name (or of the logger's
    version, or in `checkpoint.dirpath`, where set), written into `config.ckpt_path`. Fit
    without one starts afresh; evaluating random weights would be no evaluation."""
    init = logger_args(config)
    if config.get("checkpoint", {}).get("dirpath"):
        found, where = [Path(config.checkpoint.dirpath) / "last.ckpt"], config.checkpoint.dirpath
    elif init is not None:
        folder = Path(init.get("save_dir") or ".") / str(init.get("name") or "")
        version = init.get("version")
        pattern = "*" if version is None else version if isinstance(version, str) else f"version_{version}"
        found = sorted(folder.glob(f"{pattern}/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        where = folder if version is None else folder / pattern
    else:
        found, where = [], "the run's log folder (this logger has none)"
    last = found[-1] if found and found[-1].is_file() else None
    config.ckpt_path = str(last) if last is not None else None
    if last is None and subcommand != "fit":
        raise CheckpointError(
            f"--ckpt_path last: no run with a last.ckpt in {where}; {subcommand} needs trained weights"
        )
    if last is None:
        rank_zero_info(f"--ckpt_path last: no run with a last.ckpt in {where} yet; starting a new run")
    return config.ckpt_path


def place_logs(config, subcommand: str, ckpt: str | None):
    """A resumed fit logs into the run it resumes, so that its curves go on where they
    stopped; validate, test and predict log into a folder named for them, inside the
    checkpoint's run when it is one of this logger's, rather than into a new version of
    their own. A version set in the config is kept."""
    init = logger_args(config)
    if init is None or init.get("version") is not None:
        return
    folder = (Path(init.get("save_dir") or ".") / str(init.get("name") or "")).resolve()
    path = Path(ckpt).resolve() if ckpt and Path(ckpt).is_file() else None
    run = path.parent.parent if path is not None and path.parent.name == "checkpoints" else None
    run = run if run is not None and run.parent == folder else None
    if subcommand == "fit":
        if run is not None:
            init.version = run.name
    else:
        init.version = f"{run.name}/{subcommand}" if run is not None else subcommand
