"""Bad configs, data and checkpoints: each ends in one line that names the culprit, exit status 2,
and no traceback."""

import errno
import gzip
import sys

import pytest
import yaml
from helpers import tiny_config, tiny_task_config

from adamoe.cli import entry


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py"])


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A finished tiny translation run, for the checkpoint cases."""
    tmp = tmp_path_factory.mktemp("fitted")
    cfg = tiny_config(tmp)
    assert entry(["fit", "--config", str(cfg), "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"]) == 0
    return tmp, tmp / "logs" / "tiny" / "checkpoints" / "last.ckpt"


def parallel_files(tmp, de: list[bytes], en: list[bytes], split="train") -> str:
    root = tmp / "parallel"
    root.mkdir(exist_ok=True)
    for s in ("train", "val"):
        for lang, lines in (("de", de), ("en", en)):
            good = b"ein Hund\nzwei Hunde\n" if lang == "de" else b"a dog\ntwo dogs\n"
            (root / f"{s}.{lang}.gz").write_bytes(gzip.compress(b"".join(x + b"\n" for x in lines) if s == split else good))
    return str(root)


def with_source(tmp, root: str) -> list[str]:
    cfg = yaml.safe_load(tiny_config(tmp).read_text())
    cfg["data"]["init_args"]["source"] = {
        "class_path": "adamoe.data.ParallelText",
        "init_args": {"root": root, "src_lang": "de", "tgt_lang": "en", "test": None},
    }
    path = tmp / "parallel.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return ["fit", "--config", str(path)]


def labels_table(tmp, labels: list[int]) -> list[str]:
    rows = "".join(f"word{i} word{i + 1}\t{label}\n" for i, label in enumerate(labels))
    for split in ("train", "val"):
        (tmp / f"{split}.tsv").write_text("text\tlabel\n" + rows)
    files = {"train": str(tmp / "train.tsv"), "val": str(tmp / "val.tsv"), "columns": {"text": "text", "label": "label"}}
    return classification(
        tmp,
        "--data.init_args.num_classes",
        3,
        "--data.init_args.source",
        yaml.safe_dump({"class_path": "adamoe.data.TableFiles", "init_args": files}),
    )


def truncated(tmp, ckpt) -> str:
    path = tmp / "cut.ckpt"
    path.write_bytes(ckpt.read_bytes()[:1000])
    return str(path)


def fit(tmp, *more):
    return ["fit", "--config", str(tiny_config(tmp)), *map(str, more)]


def classification(tmp, *more):
    return ["fit", "--config", str(tiny_task_config(tmp, "classification", steps=2)), *map(str, more)]


# name -> (arguments for tmp and the fitted checkpoint, what the error line must contain)
CASES = {
    "threshold above 1": (
        lambda t, c: fit(t, "--model.init_args.net.gate.init_args.threshold", 1.5),
        "threshold must be in [0, 1], got 1.5",
    ),
    "threshold below 0": (
        lambda t, c: fit(t, "--model.init_args.net.gate.init_args.threshold", -0.1),
        "threshold must be in [0, 1], got -0.1",
    ),
    "unknown class_path": (lambda t, c: fit(t, "--model.init_args.net.gate.class_path", "adamoe.NoSuchGate"), "adamoe.NoSuchGate"),
    "max_tokens below the longest sequence": (
        lambda t, c: fit(t, "--data.init_args.max_tokens", 100),
        "max_tokens=100 cannot hold one sequence of max length 256",
    ),
    "no batch size at all": (lambda t, c: fit(t, "--data.init_args.max_tokens", "null"), "set max_tokens or batch_size"),
    "vocab_size below the special tokens": (lambda t, c: fit(t, "--data.init_args.vocab_size", 3), "vocab_size=3 leaves no room"),
    "heads do not divide d_model": (lambda t, c: fit(t, "--model.init_args.net.n_heads", 5), "d_model 32 is not divisible by n_heads 5"),
    "adaptive gate with one expert": (lambda t, c: fit(t, "--model.init_args.net.num_experts", 1), "AdaptiveGate needs at least 2 experts"),
    "dropout of 1 or more": (lambda t, c: fit(t, "--model.init_args.net.dropout", 1.0), "dropout must be in [0, 1), got 1.0"),
    "negative moe_every": (lambda t, c: fit(t, "--model.init_args.net.moe_every", -1), "moe_every must be >= 0, got -1"),
    "curriculum without MoE layers": (
        lambda t, c: fit(t, "--data.init_args.curriculum", "paper", "--model.init_args.net.moe_every", 0),
        "no MoE layer",
    ),
    "stop at target without a target": (lambda t, c: fit(t, "--timer.stop_at_target", "true"), "stop_at_target needs a target"),
    "encoder-only task with a decoder": (lambda t, c: classification(t, "--model.init_args.net.num_decoder_layers", 2), "encoder-only"),
    "fewer than 2 classes": (lambda t, c: classification(t, "--data.init_args.num_classes", 1), "num_classes >= 2, got 1"),
    "label outside num_classes": (lambda t, c: labels_table(t, [0, 1, 3]), "has label 3, outside num_classes=3"),
    "data folder missing": (lambda t, c: with_source(t, str(t / "nowhere")), "nowhere/train.de: file not found"),
    "empty split": (lambda t, c: with_source(t, parallel_files(t, [], [], split="val")), "val.de.gz: empty file"),
    "line counts differ": (lambda t, c: with_source(t, parallel_files(t, [b"ein", b"zwei"], [b"one"])), "train.de.gz has 2 lines"),
    "not UTF-8": (
        lambda t, c: with_source(t, parallel_files(t, [b"ein", b"\xff\xfe"], [b"one", b"two"])),
        "train.de.gz:2: not valid UTF-8",
    ),
    "empty line": (lambda t, c: with_source(t, parallel_files(t, [b"ein", b"  "], [b"one", b"two"])), "train.de.gz:2: empty line"),
    "checkpoint does not exist": (lambda t, c: fit(t, "--ckpt_path", t / "missing.ckpt"), "missing.ckpt: no such checkpoint file"),
    # `last` is looked up, not read for its arguments: the config's model meets the checkpoint.
    "checkpoint of another model size": (
        lambda t, c: ["fit", "--config", str(c.parents[3] / "tiny.yaml"), "--model.init_args.net.d_ff", "48", "--ckpt_path", "last"],
        "checkpoint does not fit this model",
    ),
    "checkpoint of another task": (
        lambda t, c: ["validate", *classification(t)[1:], "--ckpt_path", str(c)],
        "saved by adamoe.TranslationModule",
    ),
    "checkpoint file cut short": (
        lambda t, c: ["validate", "--config", str(tiny_config(t)), "--ckpt_path", truncated(t, c)],
        "not a readable checkpoint",
    ),
    "validation interval above an epoch's batches": (
        lambda t, c: fit(t, "--trainer.val_check_interval", 30, "--trainer.max_steps", 40),
        "`val_check_interval` (30)",
    ),
    "log folder is a file": (
        lambda t, c: fit(t, "--trainer.logger.init_args.save_dir", t / "tiny.yaml" / "logs"),
        "is not writable: Not a directory",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_naming_the_culprit(case, fitted, tmp_path, capsys):
    make_args, expected = CASES[case]
    args = make_args(tmp_path, fitted[1])
    try:
        code = entry(args)
    except SystemExit as e:  # the argument parser's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and expected in lines[0], err[-3000:]
    if case == "checkpoint of another model size":
        assert "net.encoder.1.ffn.experts.w0_EDF: checkpoint (4, 32, 64), model (4, 32, 48)" in lines[0]


def test_disk_full_while_checkpointing(tmp_path, capsys, monkeypatch):
    import adamoe.callbacks.run as run

    def full(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(getattr(f, "name", f)))

    monkeypatch.setattr(run.torch, "save", full)
    assert entry(fit(tmp_path, "--trainer.max_steps", 3, "--trainer.val_check_interval", 3)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and err[-1].endswith(".tmp: No space left on device"), err[-5:]
    checkpoints = tmp_path / "logs" / "tiny" / "checkpoints"
    assert not checkpoints.exists() or not list(checkpoints.iterdir())  # no partial or temporary file is left
