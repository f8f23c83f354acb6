"""The README is a guide whose commands and code run as written."""

import re
import shlex
import sys

import pytest
import torch
from helpers import ROOT

from adamoe.cli import entry

README = (ROOT / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def train_commands() -> list[list[str]]:
    """Every `python train.py ...` in the README's shell blocks, continuation lines joined."""
    out = []
    for block in blocks("bash"):
        for command in block.replace("\\\n", " ").splitlines():
            for part in command.split("&&"):
                words = shlex.split(part)
                if "train.py" in words:
                    out.append(words[words.index("train.py") + 1 :])
    return out


def test_the_readme_is_a_guide_of_at_most_300_lines():
    assert len(README.splitlines()) <= 300
    assert len(train_commands()) >= 8


@pytest.mark.parametrize("args", train_commands(), ids=lambda a: " ".join(a)[:60])
def test_every_train_command_in_the_readme_parses(args, monkeypatch, tmp_path, capsys):
    """Each command's configs exist and its options are accepted: the config is resolved
    (`--print_config`), not trained. A help command runs as written."""
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    monkeypatch.setattr(sys, "argv", ["train.py"])
    if "--help" in args:
        assert entry(args) == 0 and capsys.readouterr().out.startswith(f"usage: train.py {args[0]}")
        return
    with pytest.raises(SystemExit) as stop:
        entry([*args, "--print_config"])
    assert stop.value.code in (0, None), capsys.readouterr().err[-2000:]
    assert "model:" in capsys.readouterr().out


def test_the_readme_python_runs():
    gate, model = [b for b in blocks("python") if "torch.load" not in b]
    scope: dict = {}
    exec(gate, scope)
    g = scope["TopKGate"](8, 4, k=3)
    tokens, experts, weights = g.assign(torch.softmax(torch.randn(5, 4), -1))
    assert tokens.tolist() == [0, 1, 2, 3, 4] * 3 and experts.shape == weights.shape == (15,)
    assert torch.allclose(weights.view(3, 5).sum(0), torch.ones(5))
    exec(model, scope)
    assert len(scope["net"].moe_layers()) == 6  # every FFN of the default 3 + 3 layers
