"""Which settings win when a run starts from a checkpoint, and what a checkpoint may not decide."""

import logging
import sys

import pytest
import torch
import yaml
from helpers import tiny_config, train

from adamoe import precedence


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py"])


def test_user_keys_from_files_and_flags(tmp_path):
    cfg = tmp_path / "a.yaml"
    cfg.write_text("model:\n  init_args:\n    net:\n      d_model: 8\n      gate: {class_path: adamoe.Top1Gate}\n")
    keys = precedence.user_keys(
        [
            "-c",
            str(cfg),
            "--model.init_args.net.dropout",
            "0.0",
            "--model.init_args.optimizer={lr: 0.1}",
            "--trainer.max_steps",
            "3",
        ]
    )
    assert keys == {("net", "d_model"), ("net", "gate", "class_path"), ("net", "dropout"), ("optimizer", "lr")}


def test_merge_takes_the_checkpoint_only_where_the_user_is_silent():
    saved = {
        "net": {
            "d_model": 64,
            "dropout": 0.1,
            "gate": {"class_path": "adamoe.Top2Gate", "init_args": {"aux_loss_coef": 0.02}},
        },
        "beam_size": 5,
        "predict_output": "/etc/passwd",
    }
    effective = {
        "net": {
            "d_model": 128,
            "dropout": 0.0,
            "gate": {"class_path": "adamoe.AdaptiveGate", "init_args": {"threshold": 0.1}},
        },
        "beam_size": 4,
        "predict_output": "predictions.txt",
    }
    # The user set only net.dropout: the rest of net, gate included, is the checkpoint's; never its path.
    merged = precedence.merge(saved, effective, {("net", "dropout")})
    assert merged == {**saved, "net": {**saved["net"], "dropout": 0.0}, "predict_output": "predictions.txt"}
    # The user named another gate class: the saved gate's arguments belong to the saved class and are dropped.
    merged = precedence.merge(saved, effective, {("net", "gate", "class_path")})
    assert merged["net"]["gate"] == effective["net"]["gate"] and merged["net"]["d_model"] == 64
    assert precedence.differences(saved, merged) == [
        "net.gate.class_path: checkpoint 'adamoe.Top2Gate', in effect 'adamoe.AdaptiveGate'"
    ]


def test_foreign_classes():
    saved = {"net": {"gate": {"class_path": "evil_pkg.Gate"}}, "optimizer": {"class_path": "torch.optim.SGD"}}
    assert precedence.foreign_classes(saved, {}) == ["evil_pkg.Gate"]
    assert precedence.foreign_classes(saved, {"net": {"gate": {"class_path": "evil_pkg.Other"}}}) == []


@pytest.fixture(scope="module")
def top2(tmp_path_factory):
    """A tiny top-2 run, trained with d_model 16 and d_ff 48 set on the command line."""
    tmp = tmp_path_factory.mktemp("top2")
    cfg = tiny_config(tmp)
    train(
        "fit",
        "--config",
        cfg,
        "--trainer.max_steps",
        2,
        "--trainer.val_check_interval",
        2,
        "--model.init_args.net.gate.class_path",
        "adamoe.Top2Gate",
        "--model.init_args.net.d_model",
        16,
        "--model.init_args.net.d_ff",
        48,
        cwd=tmp,
    )
    return tmp, cfg, tmp / "logs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"


def without_net_fields(tmp, cfg, *fields) -> str:
    config = yaml.safe_load(cfg.read_text())
    for f in fields:
        del config["model"]["init_args"]["net"][f]
    path = tmp / f"without-{'-'.join(fields)}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def validate(*args):
    from adamoe.cli import main

    return main(["validate", *map(str, args)])


def gates(cli) -> set[str]:
    return {type(layer.gate).__name__ for layer in cli.model.net.moe_layers()}


def test_one_net_override_keeps_the_rest_of_the_saved_net(top2, tmp_path):
    tmp, cfg, ckpt = top2
    quiet = without_net_fields(tmp, cfg, "gate", "d_model", "d_ff")
    cli = validate(
        "--config",
        quiet,
        "--ckpt_path",
        ckpt,
        "--model.init_args.net.dropout",
        0.0,
        "--trainer.logger.init_args.save_dir",
        tmp_path,
    )
    assert gates(cli) == {"Top2Gate"} and cli.model.net.config.d_model == 16 and cli.model.net.config.dropout == 0.0


def test_a_threshold_override_keeps_the_saved_sizes(top2, tmp_path):
    tmp, cfg, ckpt = top2
    quiet = without_net_fields(tmp, cfg, "d_model", "d_ff")
    cli = validate(
        "--config",
        quiet,
        "--ckpt_path",
        ckpt,
        "--model.init_args.net.gate.init_args.threshold",
        0.5,
        "--trainer.logger.init_args.save_dir",
        tmp_path,
    )
    # The config names AdaptiveGate and the command line its threshold: both are the user's.
    assert gates(cli) == {"AdaptiveGate"} and cli.model.net.moe_layers()[0].gate.threshold == 0.5
    assert cli.model.net.config.d_model == 16


def test_the_config_gate_wins_and_the_difference_is_said(top2, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    tmp, cfg, ckpt = top2
    quiet = without_net_fields(tmp, cfg, "d_model", "d_ff")
    cli = validate("--config", quiet, "--ckpt_path", ckpt, "--trainer.logger.init_args.save_dir", tmp_path)
    assert gates(cli) == {"AdaptiveGate"}
    assert "net.gate.class_path: checkpoint 'adamoe.Top2Gate', in effect 'adamoe.AdaptiveGate'" in caplog.text


def test_a_second_config_file_beats_the_checkpoint(top2, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no logger: the run's config is written to the working folder
    tmp, cfg, ckpt = top2
    quiet = without_net_fields(tmp, cfg, "d_model", "d_ff")
    pred = tmp_path / "pred.yaml"
    pred.write_text(
        yaml.safe_dump({"model": {"init_args": {"predict_output": str(tmp_path / "mine.txt"), "beam_size": 1}}})
    )
    from adamoe.cli import main

    cli = main(
        ["predict", "--config", quiet, "--config", str(pred), "--ckpt_path", str(ckpt), "--trainer.logger", "false"]
    )
    assert len((tmp_path / "mine.txt").read_text().splitlines()) == 12
    assert (
        torch.load(ckpt, weights_only=True)["hyper_parameters"]["beam_size"] == 2 and cli.model.hparams.beam_size == 1
    )


def crafted(ckpt, tmp_path, **hparams):
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["hyper_parameters"].update(hparams)
    path = tmp_path / "crafted.ckpt"
    torch.save(checkpoint, path)
    return path


def test_a_checkpoint_cannot_choose_where_predictions_go(top2, tmp_path):
    tmp, cfg, ckpt = top2
    victim = tmp_path / "outside" / "important.txt"
    victim.parent.mkdir()
    victim.write_text("keep me\n")
    evil = crafted(ckpt, tmp_path, predict_output=str(victim))
    config = yaml.safe_load(cfg.read_text())
    del config["model"]["init_args"][
        "predict_output"
    ]  # the config is silent: the default applies, not the checkpoint's
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    train(
        "predict",
        "--config",
        tmp_path / "run.yaml",
        "--ckpt_path",
        evil,
        "--model.init_args.net.d_model",
        16,
        "--model.init_args.net.d_ff",
        48,
        "--model.init_args.net.gate.class_path",
        "adamoe.Top2Gate",
        cwd=tmp_path,
    )
    assert victim.read_text() == "keep me\n"
    # The default: the predict run's own folder (the checkpoint lies outside any run of this logger).
    assert len((tmp / "logs" / "tiny" / "predict" / "predictions.txt").read_text().splitlines()) == 12


def test_a_checkpoint_cannot_import_a_package_the_run_does_not_use(top2, tmp_path, capsys):
    from adamoe.cli import entry

    tmp, cfg, ckpt = top2
    saved = torch.load(ckpt, weights_only=True)["hyper_parameters"]["net"]
    evil = crafted(ckpt, tmp_path, net={**saved, "gate": {"class_path": "antigravity.Gate", "init_args": {}}})
    quiet = without_net_fields(tmp, cfg, "gate", "d_model", "d_ff")
    assert (
        entry(
            [
                "validate",
                "--config",
                quiet,
                "--ckpt_path",
                str(evil),
                "--trainer.logger.init_args.save_dir",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "antigravity" not in sys.modules  # refused before anything was imported
    assert "names antigravity.Gate, from a package this run does not use" in capsys.readouterr().err


def test_paths_in_a_checkpoints_callback_state_are_not_deleted(top2, tmp_path):
    """A resumed run deletes its worse top-k checkpoints: never a file the checkpoint names outside the run's folder."""
    tmp, cfg, ckpt = top2
    victim = tmp_path / "important.ckpt"
    victim.write_text("keep me\n")
    state = torch.load(ckpt, weights_only=True)
    key = next(k for k in state["callbacks"] if k.startswith("Checkpoint"))
    saved = state["callbacks"][key]
    state["callbacks"][key] = saved | {
        "best_k_models": {str(victim): torch.tensor(99.0)},
        "kth_best_model_path": str(victim),
        "kth_value": torch.tensor(99.0),
        "best_model_path": str(victim),
        "best_model_score": torch.tensor(99.0),
        "last_model_path": str(victim),
    }
    folder = tmp / "logs" / "tiny" / "version_0" / "checkpoints"
    evil = folder / "evil.ckpt"
    torch.save(state, evil)
    train(
        "fit",
        "--config",
        cfg,
        "--ckpt_path",
        evil,
        "--trainer.max_steps",
        4,
        "--trainer.val_check_interval",
        2,
        "--model.init_args.net.gate.class_path",
        "adamoe.Top2Gate",
        "--model.init_args.net.d_model",
        16,
        "--model.init_args.net.d_ff",
        48,
        "--trainer.logger.init_args.version",
        "resumed",
        cwd=tmp_path,
    )
    assert victim.read_text() == "keep me\n"
