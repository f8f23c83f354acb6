"""`train.py --help` and `train.py fit --help`: the options people change first, each with
its description from the docstring it is documented in, on one screen and without building
the full parser. `--help all` prints jsonargparse's list of every option."""

import inspect
import shutil
import textwrap
from dataclasses import MISSING, fields
from pathlib import Path

from docstring_parser import parse
from lightning.pytorch import Trainer

from adamoe import dynamic_gates, gates
from adamoe.data import sources, tables
from adamoe.data.datamodule import TextData
from adamoe.transformer import TransformerConfig

SUBCOMMANDS = {
    "fit": "Trains a model, or resumes a run with --ckpt_path.",
    "validate": "Evaluates a checkpoint on the validation split.",
    "test": "Evaluates a checkpoint on the test split.",
    "predict": "Writes a checkpoint's outputs for a split or a text file, one line an input.",
}
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DATA_OPTIONS = ("vocab_size", "max_tokens", "curriculum", "predict_file", "seed")
TRAINER_OPTIONS = ("max_steps", "max_time", "precision", "accelerator", "devices")
KEY_WIDTH = 22


def asked(args: list[str]) -> str | None:
    """The subcommand whose short help `args` ask for ("" for the program's), else None."""
    if args in (["-h"], ["--help"]):
        return ""
    if len(args) == 2 and args[0] in SUBCOMMANDS and args[1] in ("-h", "--help"):
        return args[0]
    return None


def described(cls) -> dict[str, str]:
    """Each argument's description from the `Args:` sections of the docstrings of `cls`, its
    bases and its `__init__`."""
    docs = [c.__doc__ for c in reversed(inspect.getmro(cls))] + [cls.__init__.__doc__]
    return {p.arg_name: " ".join((p.description or "").split()) for doc in docs if doc for p in parse(doc).params}


def defaults(cls) -> dict[str, object]:
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def summary(cls) -> str:
    """The docstring's first paragraph, on one line."""
    return " ".join((cls.__doc__ or "").split("\n\n")[0].split()).rstrip(".")


def classes(module, base) -> list[type]:
    """The subclasses of `base` defined in `module`, in the order they are defined."""
    return [
        c
        for c in vars(module).values()
        if isinstance(c, type) and issubclass(c, base) and c.__module__ == module.__name__
    ]


def entry(key: str, text: str, default=MISSING, indent: int = 2) -> list[str]:
    """`key` and `text` side by side, the text wrapped to the terminal, with the default."""
    if default is not MISSING:
        shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else default
        text += f" (default: {shown})"
    width = min(max(shutil.get_terminal_size((100, 24)).columns, 80), 120)
    column = 2 + KEY_WIDTH  # one column of descriptions, however deep the key is indented
    lines = textwrap.wrap(text, width - column) or [""]
    first = f"{' ' * indent}{key:<{column - indent - 1}} "
    if len(first) > column:  # a key too long for its column gets a line of its own
        return [first.rstrip(), *(" " * column + line for line in lines)]
    return [first + lines[0], *(" " * column + line for line in lines[1:])]


def program() -> str:
    lines = ["usage: train.py {fit,validate,test,predict} [--config FILE ...] [--KEY VALUE ...]", ""]
    for name, text in SUBCOMMANDS.items():
        lines += entry(name, text)
    return "\n".join(lines + ["", "A subcommand's options: python train.py fit --help"])


def subcommand(name: str) -> str:
    groups = ", ".join(sorted(p.name for p in CONFIGS.iterdir() if p.is_dir() and p.name not in ("task", "optim")))
    lines = [f"usage: train.py {name} [--config FILE ...] [--KEY VALUE ...]", ""]
    lines += textwrap.wrap(SUBCOMMANDS[name] + " A key takes the value of the last config or option that sets it.", 100)
    tasks = "configs/task/NAME.yaml or configs/multi30k.yaml"
    lines += [""] + entry("--config FILE", f"a task config ({tasks}), then overlays ({groups} in configs/)")
    if name != "fit":
        lines += entry("--ckpt_path PATH", "the checkpoint to use; last: the newest of the config's run name")

    lines += ["", "Gate: --model.net.gate CLASS (or --config configs/gate/NAME.yaml), then --model.net.gate.KEY"]
    shared = defaults(gates.Gate)
    for gate in [*classes(gates, gates.Gate), *classes(dynamic_gates, gates.Gate)]:
        if gate is gates.Gate:
            continue
        lines += entry(gate.__name__, summary(gate))
        docs = described(gate)
        lines += sum((entry(k, docs.get(k, ""), v, 4) for k, v in defaults(gate).items() if k not in shared), [])

    lines += ["", "Model shape: --model.net.KEY"]
    docs = described(TransformerConfig)
    lines += sum((entry(f.name, docs[f.name], f.default) for f in fields(TransformerConfig) if f.name != "gate"), [])

    lines += ["", "Data: --data.source CLASS, then --data.source.KEY for its arguments; --data.KEY"]
    generated = [c for c in classes(sources, sources.Generated) if c is not sources.Generated]
    for cls in classes(sources, sources.DataSource) + classes(tables, sources.DataSource):
        if cls not in (sources.DataSource, sources.Generated, *generated):
            args = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
            lines += entry(cls.__name__, f"{summary(cls).split('. ')[0]}. Arguments: {', '.join(args)}")
    names = ", ".join(c.__name__ for c in generated)
    lines += entry(names, summary(sources.Generated))
    docs, values = described(TextData), defaults(TextData)
    lines += sum((entry(k, docs[k], values[k]) for k in DATA_OPTIONS), [])

    lines += ["", "Trainer: --trainer.KEY"]
    docs, values = described(Trainer), defaults(Trainer)
    lines += sum((entry(k, docs[k].split(". ")[0].rstrip("."), values[k]) for k in TRAINER_OPTIONS), [])
    lines += [
        "",
        f"Every option, with descriptions: python train.py {name} --help all",
        f"One class's options:             python train.py {name} --model.net.gate.help adamoe.AdaptiveGate",
        f"The config a command would run:  python train.py {name} --config FILE ... --print_config",
    ]
    return "\n".join(lines)
