"""Shared by the end-to-end tests: a tiny run config and a train.py runner."""

import contextlib
import io
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import yaml

ROOT = Path(__file__).resolve().parents[1]
TENSORBOARD = "lightning.pytorch.loggers.TensorBoardLogger"


def tiny_config(tmp: Path) -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "max_steps": 6,
            "val_check_interval": 3,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "logger": {"class_path": TENSORBOARD, "init_args": {"save_dir": str(tmp / "logs"), "name": "tiny"}},
        },
        "model": {
            "class_path": "adamoe.TranslationModule",
            "init_args": {
                "net": {
                    "d_model": 32,
                    "n_heads": 2,
                    "d_ff": 64,
                    "num_encoder_layers": 2,
                    "num_decoder_layers": 2,
                    "num_experts": 4,
                    "gate": {"class_path": "adamoe.AdaptiveGate", "init_args": {"threshold": 0.2}},
                },
                "max_decode_len": 20,
                "beam_size": 2,
                "predict_output": str(tmp / "pred.txt"),
            },
        },
        "data": {
            "class_path": "adamoe.data.TranslationData",
            "init_args": {
                "source": {
                    "class_path": "adamoe.data.SyntheticTranslation",
                    "init_args": {"train_size": 200, "val_size": 16, "test_size": 12},
                },
                "vocab_size": 300,
                "max_tokens": 400,
                "cache_dir": str(tmp / "cache"),
            },
        },
    }
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], cwd, ranks: int) -> SimpleNamespace:
    """Every rank of a DDP run started at once with its rank in the environment, as torchrun
    does: they import torch and Lightning side by side, where Lightning's own launcher starts
    the other ranks only once rank 0 has. tests/test_faults.py runs DDP through that launcher."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    env |= {"WORLD_SIZE": str(ranks), "NODE_RANK": "0"}
    logs = [tempfile.TemporaryFile("w+") for _ in range(2 * ranks)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *args],
            cwd=cwd,
            env={**env, "LOCAL_RANK": str(r)},
            stdout=logs[2 * r],
            stderr=logs[2 * r + 1],
            text=True,
        )
        for r in range(ranks)
    ]
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:  # a rank that hangs past the timeout is not left behind
        for p in procs:
            p.kill()
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read())
        log.close()
    return SimpleNamespace(returncode=max(codes, key=abs), stdout="".join(texts[::2]), stderr="".join(texts[1::2]))


def train(*args, cwd):
    """`python train.py ARGS` in `cwd`. Runs in this process, which saves the seconds of
    importing torch and Lightning again, unless it starts DDP processes: those run as
    processes of their own (`launch`)."""
    args = [str(a) for a in args]
    if "--trainer.devices" in args and args[args.index("--trainer.devices") + 1] != "1":
        out = launch(args, cwd, int(args[args.index("--trainer.devices") + 1]))
    else:
        from adamoe.cli import entry

        stdout, stderr, here, argv = io.StringIO(), io.StringIO(), os.getcwd(), sys.argv
        try:
            os.chdir(cwd)
            sys.argv = ["train.py", *args]
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                code = entry(args)
        finally:
            os.chdir(here)
            sys.argv = argv
        out = SimpleNamespace(returncode=code, stdout=stdout.getvalue(), stderr=stderr.getvalue())
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def scalars(run_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir))
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


TASKS = {
    "classification": (
        "adamoe.ClassificationModule",
        "adamoe.data.ClassificationData",
        "adamoe.data.SyntheticSentiment",
        {"num_encoder_layers": 2, "num_decoder_layers": 0},
        {},
    ),
    "causal_lm": (
        "adamoe.LanguageModelModule",
        "adamoe.data.LanguageModelData",
        "adamoe.data.SyntheticText",
        {"num_encoder_layers": 0, "num_decoder_layers": 2},
        {"max_new_tokens": 6},
    ),
}


def tiny_task_config(tmp: Path, task: str, steps: int = 30) -> Path:
    """A few-step run of an encoder-only or decoder-only task on its embedded data."""
    module, data, source, arch, task_args = TASKS[task]
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "max_steps": steps,
            "val_check_interval": steps // 2,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "logger": {"class_path": TENSORBOARD, "init_args": {"save_dir": str(tmp / "logs"), "name": task}},
        },
        "model": {
            "class_path": module,
            "init_args": {
                "net": {
                    "d_model": 32,
                    "n_heads": 2,
                    "d_ff": 64,
                    "num_experts": 4,
                    "dropout": 0.0,
                    **arch,
                    "gate": {"class_path": "adamoe.AdaptiveGate", "init_args": {"threshold": 0.2}},
                },
                "predict_output": str(tmp / "pred.txt"),
                "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}},
                "lr_scheduler": {"class_path": "adamoe.schedulers.WarmupInverseSqrt", "init_args": {"warmup_steps": 5}},
                **task_args,
            },
        },
        "data": {
            "class_path": data,
            "init_args": {
                "source": {"class_path": source, "init_args": {"train_size": 400, "val_size": 16, "test_size": 12}},
                "vocab_size": 300,
                "max_tokens": 400,
                "cache_dir": str(tmp / "cache"),
            },
        },
    }
    path = tmp / f"{task}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
