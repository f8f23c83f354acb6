"""Faults: kill -9 at any moment, a resumed run that is the same run, non-finite steps, dead
ranks, and caches that cannot be confused. Faults are injected by `faulty_train.py`."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ROOT, scalars, tiny_config, tiny_task_config, train

FAULTY = Path(__file__).with_name("faulty_train.py")
STEPS = 14


def run(*args, cwd, fault: str = "", timeout: int = 240, **env):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FAULT": fault, **env}
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, str(FAULTY), *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    out.seconds = time.perf_counter() - started
    return out


def resumable_config(tmp: Path, **trainer) -> Path:
    """Two epochs and a half of the tiny run in the paper's curriculum order, with dropout,
    validating mid-epoch and saving last.ckpt after every step."""
    cfg = yaml.safe_load(tiny_config(tmp).read_text())
    cfg["trainer"].update(max_steps=STEPS, val_check_interval=5, **trainer)
    cfg["data"]["init_args"]["curriculum"] = "paper"
    cfg["checkpoint"] = {"save_last_every": "0:00:00"}
    path = tmp / "resumable.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def losses(logs: Path) -> dict[int, float]:
    """train/loss by step over every version of a run; a step run again after a resume
    keeps its last value."""
    out = {}
    for version in sorted(logs.glob("version_*"), key=lambda p: int(p.name.split("_")[1])):
        out.update(dict(scalars(version).get("train/loss", [])))
    return out


def last_step(ckpt_dir: Path) -> int | None:
    last = ckpt_dir / "last.ckpt"
    return torch.load(last, weights_only=True)["global_step"] if last.exists() else None


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run."""
    tmp = tmp_path_factory.mktemp("reference")
    train("fit", "--config", resumable_config(tmp), cwd=tmp)
    return losses(tmp / "logs" / "tiny")


@pytest.mark.slow  # minutes: the CI budget leaves them to `-m slow`
def test_killed_at_every_stage_resumes_to_the_same_losses(reference, tmp_path):
    cfg = resumable_config(tmp_path)
    ckpts = tmp_path / "logs" / "tiny" / "version_0" / "checkpoints"
    for fault in ("prepare:1", "step:4", "checkpoint:3", "validation:1"):
        before = last_step(ckpts)
        out = run("fit", "--config", cfg, "--ckpt_path", "last", cwd=tmp_path, fault=fault)
        assert out.returncode == -signal.SIGKILL, f"{fault}: {out.stderr[-2000:]}"
        after = last_step(ckpts)  # loads with weights_only: a whole, plain-data file
        if fault == "prepare:1":
            assert after is None and not any(
                p.is_dir() and not p.name.startswith(".") for p in (tmp_path / "cache" / "datasets").iterdir()
            )
        elif fault == "step:4":
            assert after == (before or 0) + 3  # the three finished steps of this process are saved
        elif fault == "checkpoint:3":
            assert after == (before or 0) + 2  # the half-written third file never replaced the second
    final = run("fit", "--config", cfg, "--ckpt_path", "last", cwd=tmp_path)
    assert final.returncode == 0, final.stderr[-3000:]
    assert last_step(ckpts) == STEPS
    resumed = losses(tmp_path / "logs" / "tiny")
    assert sorted(resumed) == sorted(reference) == list(range(STEPS))
    for step in reference:
        assert resumed[step] == pytest.approx(reference[step], abs=1e-6, rel=0), f"step {step}"


def ddp(*args):
    return [*args, "--trainer.accelerator", "cpu", "--trainer.devices", 2, "--trainer.strategy", "ddp"]


@pytest.mark.slow  # minutes: the CI budget leaves them to `-m slow`
def test_ddp_dead_rank_fails_fast_and_the_resumed_run_is_the_same_run(tmp_path_factory):
    ref_dir, tmp = tmp_path_factory.mktemp("ddp-reference"), tmp_path_factory.mktemp("ddp-killed")
    out = run(*ddp("fit", "--config", resumable_config(ref_dir)), cwd=ref_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    reference = losses(ref_dir / "logs" / "tiny")

    cfg = resumable_config(tmp)
    killed = run(*ddp("fit", "--config", cfg), cwd=tmp, fault="step:9", FAULT_RANK="1")
    assert killed.returncode != 0
    # Everything, startup included, ends well inside the collective timeout.
    assert killed.seconds < 120, killed.seconds
    assert last_step(tmp / "logs" / "tiny" / "version_0" / "checkpoints") == 8
    out = run(*ddp("fit", "--config", cfg, "--ckpt_path", "last"), cwd=tmp)
    assert out.returncode == 0, out.stderr[-3000:]
    resumed = losses(tmp / "logs" / "tiny")
    assert sorted(resumed) == sorted(reference) == list(range(STEPS))
    for step in reference:
        assert resumed[step] == pytest.approx(reference[step], abs=1e-6, rel=0), f"step {step}"


def poison(monkeypatch, layer: str, steps: set[int]):
    from faulty_train import poisoned

    from adamoe.tasks import MoEModule

    monkeypatch.setattr(MoEModule, "training_step", poisoned(MoEModule.training_step, layer, steps))


def fit_in_process(*args, tmp_path, capsys) -> tuple[int, str]:
    from adamoe.cli import entry

    code = entry(["fit", "--config", str(tiny_config(tmp_path)), *map(str, args)])
    return code, capsys.readouterr().err


def assert_finite_checkpoint_at(tmp_path, step: int):
    ckpt = torch.load(tmp_path / "logs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == step
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values())


def test_nan_stops_with_the_step_layer_and_last_checkpoint(tmp_path, monkeypatch, capsys):
    poison(monkeypatch, "net.encoder.1.ffn", {4})
    code, err = fit_in_process("--trainer.max_steps", 8, tmp_path=tmp_path, capsys=capsys)
    line = err.strip().splitlines()[-1]
    assert code == 2 and "step 4" in line and "net.encoder.1.ffn" in line and "last.ckpt" in line, err[-3000:]
    assert "Traceback" not in err
    assert_finite_checkpoint_at(tmp_path, 3)


def test_nan_on_one_ddp_rank_stops_both_with_that_rank_named(tmp_path):
    args = ddp("fit", "--config", tiny_config(tmp_path), "--trainer.max_steps", 8)
    out = run(*args, cwd=tmp_path, POISON="net.encoder.1.ffn:4", FAULT_RANK="1")
    assert out.returncode == 2, out.stderr[-3000:]
    line = out.stderr.strip().splitlines()[-1]
    assert "step 4" in line and "on rank 1" in line and "net.encoder.1.ffn" in line and "last.ckpt" in line, line
    assert "Traceback" not in out.stderr
    assert_finite_checkpoint_at(tmp_path, 3)


def test_nan_steps_skipped_counted_then_stopped(tmp_path, monkeypatch, capsys):
    common = ["--nonfinite.action", "skip", "--nonfinite.max_consecutive", 2]
    poison(monkeypatch, "net.decoder.1.ffn", {2, 4})
    code, err = fit_in_process(*common, tmp_path=tmp_path, capsys=capsys)
    assert code == 0, err[-3000:]
    assert scalars(tmp_path / "logs" / "tiny" / "version_0")["train/skipped_steps"][-1][1] == 2
    assert_finite_checkpoint_at(tmp_path, 6)

    poison(monkeypatch, "net.decoder.1.ffn", {1, 2, 3})
    code, err = fit_in_process(*common, tmp_path=tmp_path, capsys=capsys)
    assert code == 2 and "(3 in a row)" in err and "net.decoder.1.ffn" in err, err[-3000:]


def test_skipped_step_leaves_weights_and_optimizer_state_alone():
    """The skip path drops gradients; AdamW must then leave every parameter and its state
    untouched (a weight decay or a moment update would still move them)."""
    from adamoe.callbacks.faults import NonFiniteGuard

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    (model(torch.randn(2, 4)) * float("nan")).sum().backward()

    class Trainer:  # the parts of a trainer the guard reads
        global_step, precision_plugin, checkpoint_callback = 1, None, None

        class strategy:
            root_device = torch.device("cpu")
            reduce = staticmethod(lambda t, reduce_op: t)

    guard = NonFiniteGuard(action="skip")
    guard.on_train_batch_start(Trainer, model, None, 0)
    model.log = lambda *a, **k: None
    guard.on_before_optimizer_step(Trainer, model, opt)
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(state[id(p)][k], v) for p, s in opt.state.items() for k, v in s.items())
    assert guard.skipped == 1


def test_rank0_data_error_in_prepare_stops_every_rank(tmp_path):
    data = tmp_path / "bad"
    data.mkdir()
    for split in ("train", "val"):
        (data / f"{split}.de").write_text("ein Hund\nzwei Katzen\n")
        (data / f"{split}.en").write_text("a dog\n")
    cfg = yaml.safe_load(tiny_config(tmp_path).read_text())
    cfg["data"]["init_args"]["source"] = {
        "class_path": "adamoe.data.ParallelText",
        "init_args": {"root": str(data), "src_lang": "de", "tgt_lang": "en", "test": None},
    }
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = run(*ddp("fit", "--config", path), cwd=tmp_path, timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "train.de has 2 lines" in out.stderr and "Traceback" not in out.stderr
    assert out.seconds < 90


def test_cache_keys_keep_tasks_with_equal_sources_apart(tmp_path):
    """Translation, then classification, from embedded sources with equal arguments, in one cache folder."""
    translation = yaml.safe_load(tiny_config(tmp_path).read_text())
    classification = yaml.safe_load(tiny_task_config(tmp_path, "classification", steps=2).read_text())
    classification["data"]["init_args"]["source"]["init_args"] = translation["data"]["init_args"]["source"]["init_args"]
    for name, cfg in (("translation", translation), ("classification", classification)):
        cfg["trainer"]["max_steps"] = 2
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        train("fit", "--config", tmp_path / f"{name}.yaml", cwd=tmp_path)
    assert (
        len([p for p in (tmp_path / "cache" / "datasets").iterdir() if not p.name.startswith(".")]) == 2
    )  # not the locks


@pytest.mark.slow
def test_kill_at_random_moments_then_resume(tmp_path):
    """20 SIGKILLs at random moments of one long run (start-up, data preparation, steps,
    validation and checkpoint writes alike), each followed by a resume; then the run
    finishes. With last.ckpt written after every step, a kill loses at most the step in
    flight."""
    cfg = resumable_config(tmp_path)
    c = yaml.safe_load(cfg.read_text())
    c["trainer"]["max_steps"] = 10_000
    cfg.write_text(yaml.safe_dump(c))
    ckpts, rng, kills = tmp_path / "logs" / "tiny" / "version_0" / "checkpoints", random.Random(0), []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    while len(kills) < 20:
        before = last_step(ckpts)
        command = [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(cfg), "--ckpt_path", "last"]
        proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        delay = rng.uniform(2.0, 15.0)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        kills.append((round(delay, 1), before, last_step(ckpts)))  # the checkpoint loads (weights_only) every time
    end = (last_step(ckpts) or 0) + 5
    train("fit", "--config", cfg, "--ckpt_path", "last", "--trainer.max_steps", end, cwd=tmp_path)
    assert last_step(ckpts) == end
    assert all((after or 0) >= (before or 0) for _, before, after in kills)  # never back to an older state
    print("\nkills (seconds after start, checkpoint step before, after):", kills)


# SIGTERM in one process is the same path as SIGINT; the DDP test below sends SIGTERM.
@pytest.mark.parametrize("name", ["sigint", pytest.param("sigterm", marks=pytest.mark.slow)])
def test_signal_saves_the_step_and_resume_gives_the_same_losses(reference, tmp_path, name):
    """Ctrl-C or a scheduler's SIGTERM in step 6: last.ckpt holds steps 0-5 and 6, the process
    says how to resume, and the resumed run's losses are the uninterrupted run's."""
    cfg = resumable_config(tmp_path, **{})
    ckpts = tmp_path / "logs" / "tiny" / "version_0" / "checkpoints"
    out = run("fit", "--config", cfg, cwd=tmp_path, fault=f"{name}:7")
    assert out.returncode == 128 + getattr(signal, name.upper()), out.stderr[-3000:]
    line = out.stderr.strip().splitlines()[-1]
    assert (
        line.startswith(f"error: stopped by {name.upper()} at step 7") and f"--ckpt_path {ckpts / 'last.ckpt'}" in line
    ), line
    assert last_step(ckpts) == 7
    final = run("fit", "--config", cfg, "--ckpt_path", "last", cwd=tmp_path)
    assert final.returncode == 0, final.stderr[-3000:]
    resumed = losses(tmp_path / "logs" / "tiny")
    assert sorted(resumed) == sorted(reference)
    for step in reference:
        assert resumed[step] == pytest.approx(reference[step], abs=1e-6, rel=0), f"step {step}"


def test_sigterm_to_one_ddp_rank_saves_the_same_step_on_both(tmp_path):
    cfg = resumable_config(tmp_path)
    cfg.write_text(cfg.read_text().replace("save_last_every: 0:00:00", "save_last_every: null"))
    out = run(*ddp("fit", "--config", cfg), cwd=tmp_path, fault="sigterm:5", FAULT_RANK="1")
    assert out.returncode == 128 + signal.SIGTERM, out.stderr[-3000:]
    ckpt = torch.load(tmp_path / "logs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    # Rank 1 was signalled in its fifth step: both ranks stop after it, and the one file holds that step.
    assert ckpt["global_step"] == 5
    assert "stopped by" in out.stderr and "--ckpt_path" in out.stderr
