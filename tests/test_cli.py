"""End to end through train.py, as a user runs it."""

import json
import shutil
import sys

import pytest
from helpers import ROOT, scalars, tiny_config, train

CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    cfg = tiny_config(tmp)
    train("fit", "--config", cfg, cwd=tmp)
    return tmp, cfg


def test_fit_writes_events_config_metrics_and_checkpoints(fitted):
    tmp, _ = fitted
    run = tmp / "logs" / "tiny" / "version_0"
    tags = scalars(run)
    assert {"train/loss", "train/aux_loss", "val/loss", "val/ppl", "val/bleu"} <= set(tags)
    assert (run / "config.yaml").exists()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == 6 and metrics["wall_time_s"] > 0
    assert metrics["final"]["val/loss"] == pytest.approx(tags["val/loss"][-1][1], rel=1e-5)
    assert metrics["best"]["val/loss"] == pytest.approx(min(v for _, v in tags["val/loss"]), rel=1e-5)
    assert (tmp / "logs" / "tiny" / "checkpoints" / "last.ckpt").exists()


def test_validate_test_predict_from_checkpoint(fitted):
    tmp, cfg = fitted
    ckpt = tmp / "logs" / "tiny" / "checkpoints" / "last.ckpt"
    out = train("validate", "--config", cfg, "--ckpt_path", ckpt, cwd=tmp)
    assert "val/bleu" in out.stdout
    out = train("test", "--config", cfg, "--ckpt_path", ckpt, cwd=tmp)
    assert "test/bleu" in out.stdout
    train("predict", "--config", cfg, "--ckpt_path", ckpt, cwd=tmp)
    assert len((tmp / "pred.txt").read_text().splitlines()) == 12


def test_resume_from_last_continues_the_step(fitted, tmp_path):
    # In a folder of its own: the shared run's last.ckpt and versions stay as they were.
    src, cfg = fitted
    ckpts = tmp_path / "logs" / "tiny" / "checkpoints"
    ckpts.mkdir(parents=True)
    shutil.copy(src / "logs" / "tiny" / "checkpoints" / "last.ckpt", ckpts / "last.ckpt")
    train("fit", "--config", cfg, "--ckpt_path", "last", "--trainer.max_steps", 9, "--trainer.logger.init_args.save_dir", tmp_path / "logs", cwd=tmp_path)
    resumed = tmp_path / "logs" / "tiny" / "version_0"
    assert json.loads((resumed / "metrics.json").read_text())["global_step"] == 9
    assert min(step for step, _ in scalars(resumed)["train/loss"]) >= 6


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py"])  # the in-process CLI must not see pytest's arguments


def test_load_from_checkpoint_rebuilds_the_configured_model(fitted):
    from adamoe.module import TranslationModule

    tmp, _ = fitted
    model = TranslationModule.load_from_checkpoint(tmp / "logs" / "tiny" / "checkpoints" / "last.ckpt")
    gates = [layer.gate for layer in model.model.moe_layers()]
    assert gates and all(type(g).__name__ == "AdaptiveGate" and g.threshold == 0.2 for g in gates)


def test_gate_threshold_from_the_command_line(tmp_path):
    from adamoe.cli import main

    cli = main(["--config", str(tiny_config(tmp_path)), "--model.gate.init_args.threshold", "0.35"], run=False)
    gates = [layer.gate for layer in cli.model.model.moe_layers()]
    assert gates and all(g.threshold == 0.35 for g in gates)
    assert cli.model.hparams.vocab_size == 300  # linked from the data config


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_config_instantiates(config, tmp_path):
    from adamoe.cli import main

    args = ["--config", str(config)]
    if config.parent.name in ("gate", "preset"):
        args = ["--config", str(ROOT / "configs" / "quickstart.yaml"), *args]  # they compose with a task config
    if config.name == "multi30k.yaml":
        args += ["--data.source.init_args.root", str(tmp_path)]
    args += ["--trainer.logger.init_args.save_dir", str(tmp_path), "--data.cache_dir", str(tmp_path)]
    if config.name == "ddp.yaml":
        args += ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.precision", "32"]
    cli = main(args, run=False)
    assert cli.model is not None and cli.datamodule is not None and cli.trainer is not None


@pytest.mark.parametrize("task", ["quickstart.yaml", "task/classification.yaml", "task/causal_lm.yaml"])
@pytest.mark.parametrize("gate", ["dense", "top1", "top2", "adaptive"])
def test_gate_configs_compose_with_every_task(task, gate, tmp_path):
    from adamoe.cli import main

    cli = main(["--config", str(ROOT / "configs" / task), "--config", str(ROOT / "configs" / "gate" / f"{gate}.yaml"),
                "--trainer.logger.init_args.save_dir", str(tmp_path), "--data.cache_dir", str(tmp_path)], run=False)  # fmt: skip
    gates = {type(layer.gate).__name__ for layer in cli.model.model.moe_layers()}
    assert gates == ({"dense": set(), "top1": {"Top1Gate"}, "top2": {"Top2Gate"}, "adaptive": {"AdaptiveGate"}}[gate])
