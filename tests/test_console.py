"""What a user sees in a terminal, and where a run's files go."""

import os
import pty
import subprocess
import sys

import torch
import yaml
from helpers import ROOT, scalars, tiny_config, train

# Said by Lightning or by this program on every run, and of no use there.
NOISE = (
    "litlogger",
    "FLOPs",
    "could not find the monitored key",
    "drop_last",
    "exists and is not empty",
    "v_num",
    "0.00 samples",
)


def in_terminal(*args, cwd) -> str:
    """`python train.py ARGS` with a pseudo-terminal as its console, as a user runs it."""
    main, other = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120", "LINES": "40", "TERM": "xterm"}
    command = [sys.executable, str(ROOT / "train.py"), *map(str, args)]
    process = subprocess.Popen(command, cwd=cwd, env=env, stdin=other, stdout=other, stderr=other)
    os.close(other)
    chunks = []
    while True:
        try:
            chunk = os.read(main, 1 << 16)
        except OSError:  # the other side closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(main)
    assert process.wait(timeout=300) == 0, b"".join(chunks)[-3000:].decode(errors="replace")
    return b"".join(chunks).decode(errors="replace")


def test_the_end_of_fit_summary_stays_on_screen_and_the_noise_is_gone(tmp_path):
    cfg = yaml.safe_load(tiny_config(tmp_path).read_text())
    cfg["trainer"]["enable_progress_bar"] = True
    cfg["model"]["init_args"].pop("predict_output")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    fit = in_terminal("fit", "--config", tmp_path / "tiny.yaml", cwd=tmp_path)
    run = tmp_path / "logs" / "tiny" / "version_0"
    # Nothing after the last of the bar's cursor moves and erasures: the summary is what stays.
    after_bar = fit[fit.rfind("\x1b[") :]
    for line in (f"Run logs:    {run}", f"Checkpoints: {run / 'checkpoints'}", "Watch it:    tensorboard --logdir"):
        assert line in after_bar, after_bar
    # The sanity check's metrics never reach the bar: the first val/loss shown comes after training began.
    assert "val/loss" not in fit[: fit.find("train/loss")]
    (tmp_path / "new.txt").write_text("first line\n\nthird line\n")
    resumed = in_terminal(
        "fit", "--config", tmp_path / "tiny.yaml", "--ckpt_path", "last", "--trainer.max_steps", 7, cwd=tmp_path
    )
    new = ("--data.predict_file", tmp_path / "new.txt")
    predict = in_terminal("predict", "--config", tmp_path / "tiny.yaml", "--ckpt_path", "last", *new, cwd=tmp_path)
    assert f"Predictions: {run / 'predict' / 'predictions.txt'}" in predict
    for text in (fit, resumed, predict):
        assert not [n for n in NOISE if n in text], [n for n in NOISE if n in text]


def test_runs_of_one_name_keep_their_own_folders_and_evaluations_make_no_version(tmp_path):
    cfg = tiny_config(tmp_path)
    runs = tmp_path / "logs" / "tiny"
    train("fit", "--config", cfg, cwd=tmp_path)
    train("fit", "--config", cfg, "--trainer.max_steps", 3, cwd=tmp_path)
    assert sorted(p.name for p in runs.iterdir()) == ["version_0", "version_1"]
    for version, step in (("version_0", 6), ("version_1", 3)):
        saved = torch.load(runs / version / "checkpoints" / "last.ckpt", weights_only=True)
        assert saved["global_step"] == step
    # `last` is the newest run; an evaluation logs inside it; a resumed fit goes on in it.
    train("validate", "--config", cfg, "--ckpt_path", "last", cwd=tmp_path)
    train("fit", "--config", cfg, "--ckpt_path", "last", "--trainer.max_steps", 5, cwd=tmp_path)
    assert sorted(p.name for p in runs.iterdir()) == ["version_0", "version_1"]
    assert (runs / "version_1" / "validate" / "config.yaml").exists()
    assert torch.load(runs / "version_1" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5
    steps = [s for s, _ in scalars(runs / "version_1")["train/loss"]]
    assert steps == list(range(5)), steps  # one set of curves, the resumed steps after the first ones
