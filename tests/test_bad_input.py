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
    return tmp, tmp / "logs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"


def parallel_files(tmp, de: list[bytes], en: list[bytes], split="train") -> str:
    root = tmp / "parallel"
    root.mkdir(exist_ok=True)
    for s in ("train", "val"):
        for lang, lines in (("de", de), ("en", en)):
            good = b"ein Hund\nzwei Hunde\n" if lang == "de" else b"a dog\ntwo dogs\n"
            (root / f"{s}.{lang}.gz").write_bytes(
                gzip.compress(b"".join(x + b"\n" for x in lines) if s == split else good)
            )
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
    files = {
        "train": str(tmp / "train.tsv"),
        "val": str(tmp / "val.tsv"),
        "columns": {"text": "text", "label": "label"},
    }
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
    "unknown class_path": (
        lambda t, c: fit(t, "--model.init_args.net.gate.class_path", "adamoe.NoSuchGate"),
        "adamoe.NoSuchGate",
    ),
    "max_tokens below the longest sequence": (
        lambda t, c: fit(t, "--data.init_args.max_tokens", 100),
        "max_tokens=100 cannot hold one sequence of max length 256",
    ),
    "no batch size at all": (
        lambda t, c: fit(t, "--data.init_args.max_tokens", "null"),
        "set max_tokens or batch_size",
    ),
    "vocab_size below the special tokens": (
        lambda t, c: fit(t, "--data.init_args.vocab_size", 3),
        "vocab_size=3 leaves no room",
    ),
    "heads do not divide d_model": (
        lambda t, c: fit(t, "--model.init_args.net.n_heads", 5),
        "d_model 32 is not divisible by n_heads 5",
    ),
    "adaptive gate with one expert": (
        lambda t, c: fit(t, "--model.init_args.net.num_experts", 1),
        "AdaptiveGate needs at least 2 experts",
    ),
    "dropout of 1 or more": (
        lambda t, c: fit(t, "--model.init_args.net.dropout", 1.0),
        "dropout must be in [0, 1), got 1.0",
    ),
    "negative moe_every": (
        lambda t, c: fit(t, "--model.init_args.net.moe_every", -1),
        "moe_every must be at least 0, got -1",
    ),
    "curriculum without MoE layers": (
        lambda t, c: fit(t, "--data.init_args.curriculum", "paper", "--model.init_args.net.moe_every", 0),
        "no MoE layer",
    ),
    "stop at target without a target": (
        lambda t, c: fit(t, "--timer.stop_at_target", "true"),
        "stop_at_target needs a target",
    ),
    "encoder-only task with a decoder": (
        lambda t, c: classification(t, "--model.init_args.net.num_decoder_layers", 2),
        "encoder-only",
    ),
    "fewer than 2 classes": (
        lambda t, c: classification(t, "--data.init_args.num_classes", 1),
        "num_classes >= 2, got 1",
    ),
    "label outside num_classes": (lambda t, c: labels_table(t, [0, 1, 3]), "has label 3, outside num_classes=3"),
    "data folder missing": (lambda t, c: with_source(t, str(t / "nowhere")), "nowhere/train.de: file not found"),
    "empty split": (lambda t, c: with_source(t, parallel_files(t, [], [], split="val")), "val.de.gz: empty file"),
    "line counts differ": (
        lambda t, c: with_source(t, parallel_files(t, [b"ein", b"zwei"], [b"one"])),
        "train.de.gz has 2 lines",
    ),
    "not UTF-8": (
        lambda t, c: with_source(t, parallel_files(t, [b"ein", b"\xff\xfe"], [b"one", b"two"])),
        "train.de.gz:2: not valid UTF-8",
    ),
    "empty line": (
        lambda t, c: with_source(t, parallel_files(t, [b"ein", b"  "], [b"one", b"two"])),
        "train.de.gz:2: empty line",
    ),
    "checkpoint does not exist": (
        lambda t, c: fit(t, "--ckpt_path", t / "missing.ckpt"),
        "missing.ckpt: no such checkpoint file",
    ),
    # `last` is looked up, not read for its arguments: the config's model meets the checkpoint.
    "checkpoint of another model size": (
        lambda t, c: [
            "fit",
            "--config",
            str(c.parents[4] / "tiny.yaml"),
            "--model.init_args.net.d_ff",
            "48",
            "--ckpt_path",
            "last",
        ],
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


def elsewhere(tmp, subcommand: str) -> list[str]:
    """A subcommand with `--ckpt_path last` in a log folder that holds no run."""
    return [
        subcommand,
        "--config",
        str(tiny_config(tmp)),
        "--trainer.logger.init_args.save_dir",
        str(tmp / "empty"),
        "--ckpt_path",
        "last",
    ]


def last_is(tmp, content: bytes) -> list[str]:
    """`--ckpt_path last` where the run's last.ckpt holds `content`."""
    folder = tmp / "logs" / "tiny" / "version_0" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "last.ckpt").write_bytes(content)
    return ["validate", "--config", str(tiny_config(tmp)), "--ckpt_path", "last"]


def malicious() -> bytes:
    import pickle

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    return pickle.dumps({"state_dict": Payload()})


def bad_yaml(tmp) -> list[str]:
    path = tmp / "broken.yaml"
    path.write_text("trainer:\n  max_steps: 3\n   logger: x\n")
    return ["fit", "--config", str(tiny_config(tmp)), "--config", str(path)]


def raw_files(tmp, de: bytes, en: bytes, split="train") -> str:
    root = tmp / "raw"
    root.mkdir(exist_ok=True)
    for s in ("train", "val", "test"):
        for lang, data in (("de", de), ("en", en)):
            (root / f"{s}.{lang}").write_bytes(data if s == split else (b"ein Hund\n" if lang == "de" else b"a dog\n"))
    return str(root)


def with_test_split(tmp, root: str) -> list[str]:
    args = with_source(tmp, root)
    return [*args, "--data.init_args.source.init_args.test", "test"]


def dense_checkpoint(tmp, d_ff: int) -> str:
    """A dense tiny translation model's checkpoint, as far as conversion reads one."""
    import torch

    from adamoe.transformer import Transformer, TransformerConfig

    net = Transformer(
        TransformerConfig(d_model=32, n_heads=2, d_ff=d_ff, num_encoder_layers=2, num_decoder_layers=2, moe_every=0),
        300,
    )
    path = tmp / "dense.ckpt"
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"_class_path": "adamoe.TranslationModule"}}, path)
    return str(path)


def convert(tmp, source) -> list[str]:
    return fit(tmp, "--model.init_args.convert_from", source, "--model.init_args.net.moe_every", 1)


CASES |= {
    "convert from a missing file": (
        lambda t, c: convert(t, t / "nowhere.ckpt"),
        "nowhere.ckpt: no such checkpoint file",
    ),
    "convert from an MoE checkpoint": (lambda t, c: convert(t, c), "is already an MoE model"),
    "convert from another size": (
        lambda t, c: convert(t, dense_checkpoint(t, d_ff=48)),
        "dense.ckpt does not fit this model: encoder.0.ffn.fc1.weight: checkpoint (48, 32), model (64, 32); "
        "encoder.1.ffn.fc1",
    ),
    "convert from another task": (
        lambda t, c: classification(t, "--model.init_args.convert_from", c),
        "was saved by adamoe.TranslationModule, for another task than ClassificationModule",
    ),
    "BPE sample of 0 texts": (
        lambda t, c: fit(t, "--data.init_args.bpe_sample", 0),
        "bpe_sample must be a positive number",
    ),
    "BPE sample too small for a vocabulary": (
        lambda t, c: fit(t, "--data.init_args.bpe_sample", 1),
        "of the training tokens are <unk>",
    ),
    "translation without an encoder": (
        lambda t, c: fit(t, "--model.init_args.net.num_encoder_layers", 0),
        "TranslationModule needs an encoder and a decoder",
    ),
    "translation without a decoder": (
        lambda t, c: fit(t, "--model.init_args.net.num_decoder_layers", 0),
        "TranslationModule needs an encoder and a decoder",
    ),
    "validate last without a checkpoint": (lambda t, c: elsewhere(t, "validate"), "no run with a last.ckpt in"),
    "test last without a checkpoint": (lambda t, c: elsewhere(t, "test"), "test needs trained weights"),
    "predict last without a checkpoint": (lambda t, c: elsewhere(t, "predict"), "predict needs trained weights"),
    "mistyped checkpoint monitor": (
        lambda t, c: fit(t, "--checkpoint.monitor", "val/los"),
        "checkpoint.monitor 'val/los' is not logged",
    ),
    "negative learning rate": (
        lambda t, c: fit(t, "--model.init_args.optimizer", "{class_path: torch.optim.AdamW, init_args: {lr: -0.001}}"),
        "model.optimizer: Invalid learning rate: -0.001",
    ),
    "zero learning rate": (
        lambda t, c: fit(t, "--model.init_args.optimizer", "{class_path: torch.optim.SGD, init_args: {lr: 0.0}}"),
        "the learning rate must be positive, got 0.0",
    ),
    "d_model 0": (lambda t, c: fit(t, "--model.init_args.net.d_model", 0), "d_model must be at least 1, got 0"),
    "n_heads 0": (lambda t, c: fit(t, "--model.init_args.net.n_heads", 0), "n_heads must be at least 1, got 0"),
    "no experts": (
        lambda t, c: fit(t, "--model.init_args.net.num_experts", 0),
        "num_experts must be at least 1, got 0",
    ),
    "negative batch size": (
        lambda t, c: fit(t, "--data.init_args.max_tokens", "null", "--data.init_args.batch_size", -4),
        "batch_size and max_tokens must be positive or null, got -4",
    ),
    "cache folder not permitted": (
        lambda t, c: fit(t, "--data.init_args.cache_dir", "/sys/adamoe-cache"),
        "Operation not permitted",
    ),
    "predict_output is a folder": (
        lambda t, c: [
            "predict",
            "--config",
            str(tiny_config(t)),
            "--ckpt_path",
            str(c),
            "--model.init_args.predict_output",
            str(t),
        ],
        "is a folder; give a file name",
    ),
    "foreign file as last.ckpt": (lambda t, c: last_is(t, b"not a checkpoint at all"), "not a readable checkpoint"),
    "malicious pickle as last.ckpt": (lambda t, c: last_is(t, malicious()), "not a readable checkpoint"),
    "YAML syntax error": (lambda t, c: bad_yaml(t), "broken.yaml:3: not valid YAML"),
    "line of zero-width space only": (
        lambda t, c: with_source(t, parallel_files(t, [b"ein", "\u200b".encode()], [b"one", b"two"])),
        "train.de.gz:2: empty line",
    ),
    "old Mac line endings": (
        lambda t, c: with_source(t, raw_files(t, b"ein Hund\rzwei Hunde\r", b"a dog\rtwo dogs\r")),
        "carriage return alone",
    ),
    "empty test split, found before tokenizing": (
        lambda t, c: with_test_split(t, raw_files(t, b"", b"", split="test")),
        "test.de: empty file",
    ),
    "gate in a module that fails to import": (
        lambda t, c: fork_gate(t, "import not_installed_package\n"),
        "gate.yaml:5: class_path forked_gates.MyGate: importing forked_gates failed: ModuleNotFoundError",
    ),
    "gate class missing from its module": (lambda t, c: fork_gate(t, "x = 1\n"), "forked_gates has no MyGate"),
    "predict file missing": (lambda t, c: predict_file(t, c, None), "new.txt: file not found"),
    "predict file line too long": (
        lambda t, c: predict_file(t, c, "ein Hund\n" + "w " * 300 + "\n"),
        "new.txt:2: 1 of 2 lines are longer",
    ),
    "too long, with file and line": (
        lambda t, c: with_source(t, parallel_files(t, [b"ein", b"zwei"], [b"one", b" ".join([b"w"] * 300)])),
        "train.en.gz:2: train: 1 of 2 samples",
    ),
}


def fork_gate(tmp, module: str) -> list[str]:
    """A config whose gate lives in a fork's module `forked_gates` with the given text."""
    (tmp / "forked_gates.py").write_text(module)
    sys.modules.pop("forked_gates", None)
    sys.path.insert(0, str(tmp))
    gate = {"model": {"init_args": {"net": {"gate": {"class_path": "forked_gates.MyGate", "init_args": {}}}}}}
    (tmp / "gate.yaml").write_text(yaml.safe_dump(gate))
    return ["fit", "--config", str(tiny_config(tmp)), "--config", str(tmp / "gate.yaml")]


def predict_file(tmp, ckpt, text: str | None) -> list[str]:
    if text is not None:
        (tmp / "new.txt").write_text(text)
    return [
        "predict",
        "--config",
        str(tiny_config(tmp)),
        "--ckpt_path",
        str(ckpt),
        "--data.init_args.predict_file",
        str(tmp / "new.txt"),
    ]


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
    import adamoe.callbacks.checkpoint as checkpoint

    def full(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(getattr(f, "name", f)))

    monkeypatch.setattr(checkpoint.torch, "save", full)
    assert entry(fit(tmp_path, "--trainer.max_steps", 3, "--trainer.val_check_interval", 3)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and err[-1].endswith(".tmp: No space left on device"), err[-5:]
    checkpoints = tmp_path / "logs" / "tiny" / "version_0" / "checkpoints"
    assert not checkpoints.exists() or not list(checkpoints.iterdir())  # no partial or temporary file is left
