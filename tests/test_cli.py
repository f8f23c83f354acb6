"""End to end through train.py, as a user runs it."""

import json
import shutil
import sys

import pytest
import torch
import yaml
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
    assert (tmp / "logs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt").exists()


def test_test_bleu_is_sacrebleu_of_the_predicted_hypotheses(fitted):
    """`test` and `predict` decode the test split with the same beam search: test/bleu must
    be sacreBLEU's corpus score of the prediction file against the references, line by line."""
    import sacrebleu

    from adamoe.data import SyntheticTranslation

    tmp, cfg = fitted
    ckpt = tmp / "logs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    out = train(
        "test", "--config", cfg, "--ckpt_path", ckpt, "--trainer.logger.init_args.version", "bleu-test", cwd=tmp
    )
    train("predict", "--config", cfg, "--ckpt_path", ckpt, cwd=tmp)
    hyps = (tmp / "pred.txt").read_text().splitlines()
    refs = SyntheticTranslation(200, 16, 12).load("test")["target"]
    assert len(hyps) == len(refs) == 12
    logged = scalars(tmp / "logs" / "tiny" / "bleu-test")["test/bleu"][-1][1]
    assert logged == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=1e-4), out.stdout[-2000:]


def test_val_bleu_is_sacrebleu_of_the_decoded_hypotheses(fitted, tmp_path, monkeypatch):
    """With hypotheses that share part of each reference (a nonzero score), the logged
    val/bleu equals sacreBLEU's corpus BLEU over the validation set."""
    import sacrebleu

    from adamoe.cli import main
    from adamoe.data import SyntheticTranslation
    from adamoe.tasks import TranslationModule

    src, cfg = fitted
    monkeypatch.setattr(
        TranslationModule, "decode", lambda self, batch, beam: [" ".join(t.split()[:-1]) for t in batch["target"]]
    )
    cli = main(
        [
            "validate",
            "--config",
            str(cfg),
            "--ckpt_path",
            str(src / "logs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
        ]
    )
    refs = SyntheticTranslation(200, 16, 12).load("val")["target"]
    want = sacrebleu.corpus_bleu([" ".join(t.split()[:-1]) for t in refs], [refs]).score
    assert 10 < want < 100 and float(cli.trainer.callback_metrics["val/bleu"]) == pytest.approx(want, abs=1e-3)


def test_resume_from_last_continues_the_step_in_the_same_folder(fitted, tmp_path, capsys):
    # In a folder of its own: the shared run's last.ckpt and versions stay as they were.
    from adamoe.cli import entry

    src, cfg = fitted
    resumed = tmp_path / "logs" / "tiny" / "run"
    ckpts = resumed / "checkpoints"
    ckpts.mkdir(parents=True)
    shutil.copy(src / "logs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt", ckpts / "last.ckpt")
    (resumed / "config.yaml").write_text("written by the run that was stopped\n")
    same = (
        "--config",
        cfg,
        "--trainer.max_steps",
        9,
        "--trainer.logger.init_args.save_dir",
        tmp_path / "logs",
        "--trainer.logger.init_args.version",
        "run",
    )
    # Starting afresh over a run's folder would mix two runs' logs: refused, with the way to resume.
    assert entry([str(a) for a in ("fit", *same)]) == 2
    assert f"already holds a run: resume it with --ckpt_path {ckpts / 'last.ckpt'}" in capsys.readouterr().err
    train("fit", *same, "--ckpt_path", "last", cwd=tmp_path)
    assert json.loads((resumed / "metrics.json").read_text())["global_step"] == 9
    assert min(step for step, _ in scalars(resumed)["train/loss"]) >= 6
    assert f"ckpt_path: {ckpts / 'last.ckpt'}" in (resumed / "config.yaml").read_text()  # `last`, as found


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py"])  # the in-process CLI must not see pytest's arguments


def test_load_from_checkpoint_rebuilds_the_configured_model(fitted):
    from adamoe.tasks import TranslationModule

    tmp, _ = fitted
    model = TranslationModule.load_from_checkpoint(tmp / "logs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt")
    gates = [layer.gate for layer in model.net.moe_layers()]
    assert gates and all(type(g).__name__ == "AdaptiveGate" and g.threshold == 0.2 for g in gates)


def test_gate_threshold_from_the_command_line(tmp_path):
    from adamoe.cli import main

    cli = main(["--config", str(tiny_config(tmp_path)), "--model.net.gate.init_args.threshold", "0.35"], run=False)
    gates = [layer.gate for layer in cli.model.net.moe_layers()]
    assert gates and all(g.threshold == 0.35 for g in gates)
    assert cli.model.hparams.vocab_size == 300  # linked from the data config


def merged(*paths) -> dict:
    """The YAML files layered as LightningCLI layers them: later keys win, dicts merge."""

    def merge(a, b):
        if a.get("class_path", b.get("class_path")) != b.get("class_path", a.get("class_path")):
            return b  # another class: its own arguments only
        return {
            **a,
            **{k: merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v for k, v in b.items()},
        }

    out = {}
    for path in paths:
        out = merge(out, yaml.safe_load(path.read_text()) or {})
    return out


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_config_builds_the_model_and_data_it_names(config, tmp_path):
    from adamoe.cli import main

    base = ROOT / "configs" / "base.yaml"
    files = [config]
    if config == base:
        files = [ROOT / "configs" / "task" / "translation.yaml"]
    elif config.parent.name in ("gate", "preset"):
        files = [ROOT / "configs" / "task" / "translation.yaml", *files]  # they compose with a task config
        if config.name in ("replicate.yaml", "paper_shape.yaml"):
            files = [ROOT / "configs" / "multi30k.yaml", *files[1:]]
    if config.parent.name == "optim":  # a value for `optimizer`, not a config of the whole run
        files = [ROOT / "configs" / "task" / "translation.yaml"]
    args = sum((["--config", str(f)] for f in files), [])
    if config.parent.name == "optim":
        args += ["--model.init_args.optimizer", str(config)]
    if "multi30k.yaml" in args[1]:
        args += ["--data.source.init_args.root", str(tmp_path)]
    args += ["--trainer.logger.init_args.save_dir", str(tmp_path), "--data.cache_dir", str(tmp_path)]
    if config.name == "ddp.yaml":
        args += ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.precision", "32"]
    cli = main(args, run=False)
    if config.parent.name == "optim":
        given = yaml.safe_load(config.read_text())
        optimizer = cli.model.optimizer([torch.nn.Parameter(torch.zeros(1))])
        assert f"{type(optimizer).__module__}.{type(optimizer).__name__}".replace(".adamw", "") == given["class_path"]
        assert {k: optimizer.defaults[k] for k in given["init_args"]} == {
            k: tuple(v) if isinstance(v, list) else v for k, v in given["init_args"].items()
        }
    want = merged(base, *files)  # train.py reads configs/base.yaml first
    model, data = want["model"], want["data"]
    assert f"{type(cli.model).__module__.split('.')[0]}.{type(cli.model).__name__}" == model["class_path"]
    assert type(cli.datamodule).__name__ == data["class_path"].rsplit(".", 1)[1]
    init, net = model["init_args"].get("net", {}), cli.model.net.config
    for key in ("d_model", "d_ff", "num_experts", "moe_every", "num_encoder_layers", "num_decoder_layers", "dropout"):
        if key in init:
            assert getattr(net, key) == init[key], key
    layers = cli.model.net.moe_layers()
    every = net.moe_every
    assert len(layers) == (0 if every == 0 else net.num_encoder_layers // every + net.num_decoder_layers // every)
    assert all(layer.experts.w0_EDF.shape == (net.num_experts, net.d_model, net.d_ff) for layer in layers)
    gate = init.get("gate", {}).get("class_path", "adamoe.Top2Gate").rsplit(".", 1)[1]
    assert {type(layer.gate).__name__ for layer in layers} <= {gate}
    if "threshold" in init.get("gate", {}).get("init_args", {}):
        assert all(layer.gate.threshold == init["gate"]["init_args"]["threshold"] for layer in layers)
    assert cli.datamodule.vocab_size == data["init_args"]["vocab_size"] == cli.model.hparams["vocab_size"]
    # The trainer, its callbacks and the checkpoint's monitor come from the config files.
    callbacks = {type(c).__name__ for c in cli.trainer.callbacks}
    assert {c["class_path"].rsplit(".", 1)[1] for c in want["trainer"]["callbacks"]} | {
        "Checkpoint",
        "EpochTimer",
    } <= callbacks
    assert (cli.trainer.checkpoint_callback.monitor, cli.trainer.checkpoint_callback.mode) == (
        want["checkpoint"]["monitor"],
        want["checkpoint"]["mode"],
    )


@pytest.mark.parametrize("task", ["task/translation.yaml", "task/classification.yaml", "task/causal_lm.yaml"])
@pytest.mark.parametrize("gate", ["dense", "top1", "top2", "adaptive"])
def test_gate_configs_compose_with_every_task(task, gate, tmp_path):
    from adamoe.cli import main

    cli = main(
        [
            "--config",
            str(ROOT / "configs" / task),
            "--config",
            str(ROOT / "configs" / "gate" / f"{gate}.yaml"),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
            "--data.cache_dir",
            str(tmp_path),
        ],
        run=False,
    )
    gates = {type(layer.gate).__name__ for layer in cli.model.net.moe_layers()}
    assert gates == ({"dense": set(), "top1": {"Top1Gate"}, "top2": {"Top2Gate"}, "adaptive": {"AdaptiveGate"}}[gate])


TASK_CONFIGS = ["task/translation.yaml", "multi30k.yaml", "task/causal_lm.yaml", "task/classification.yaml"]
# Overlays, each after the task config it is written for. ddp.yaml asks for 4 GPUs: its own precision is bf16-mixed.
OVERLAYS = [
    str(p.relative_to(ROOT / "configs"))
    for p in CONFIGS
    if p.parent.name in ("gate", "preset") and p.name != "ddp.yaml"
]
WITH_MULTI30K = ("preset/replicate.yaml", "preset/paper_shape.yaml", "preset/wide_experts.yaml")


@pytest.mark.parametrize(
    "config, precision",
    # Each overlay under bf16 is left to `-m slow`: a minute of CI for what the task configs cover.
    [(c, p) for c in TASK_CONFIGS for p in ("32-true", "bf16-mixed")]
    + [pytest.param(c, "bf16-mixed", marks=pytest.mark.slow) for c in OVERLAYS],
)
def test_every_config_trains_under_every_precision(config, precision, tmp_path):
    """A training step and a validation batch through train.py, gradient clipping and the fused
    optimizer included, on a few hundred samples of the config's own kind of data."""
    task = "multi30k.yaml" if config in WITH_MULTI30K else "task/translation.yaml" if config in OVERLAYS else config
    args = ["fit", "--config", ROOT / "configs" / task, "--config", ROOT / "configs" / "preset" / "debug.yaml"]
    if config != task:
        args += ["--config", ROOT / "configs" / config, "--config", ROOT / "configs" / "preset" / "debug.yaml"]
    if task == "multi30k.yaml":
        for split in ("train", "val", "test_2016_flickr"):
            (tmp_path / f"{split}.de").write_text("".join(f"ein Hund {i} läuft\n" for i in range(40)))
            (tmp_path / f"{split}.en").write_text("".join(f"a dog {i} runs\n" for i in range(40)))
        args += ["--data.source.init_args.root", tmp_path, "--data.init_args.vocab_size", 200]
    else:
        args += ["--data.source.init_args.train_size", 300, "--data.source.init_args.val_size", 20]
    args += [
        "--trainer.precision",
        precision,
        "--trainer.gradient_clip_val",
        1.0,
        "--data.init_args.cache_dir",
        tmp_path / "cache",
    ]
    train(*args, "--trainer.logger.init_args.save_dir", tmp_path / "logs", cwd=tmp_path)
