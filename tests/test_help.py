"""`train.py --help`: the short help lists what a user changes first, every entry with a
description, under names the full parser accepts."""

import re

import pytest
from helpers import ROOT

import adamoe
from adamoe.cli import entry, main


def short_help(capsys, *args) -> list[str]:
    assert entry(list(args)) == 0
    return capsys.readouterr().out.splitlines()


def test_fit_help_starts_with_gates_threshold_and_data_sources(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")  # the help wraps to the terminal; narrower ones scroll sooner
    lines = short_help(capsys, "fit", "--help")
    first = "\n".join(lines[:60])
    gates = [
        c.__name__
        for c in vars(adamoe).values()
        if isinstance(c, type) and issubclass(c, adamoe.Gate) and c is not adamoe.Gate
    ]
    assert len(gates) >= 6 and all(re.search(rf"^  {g} ", first, re.M) for g in gates)
    assert re.search(r"^    threshold +a token whose normalized top-1/top-2 gap", first, re.M)
    for name in ("ParallelText", "TableFiles", "HubDataset", "TextLines"):
        assert re.search(rf"^  {name} +\S", first, re.M), name
    # Every option has its own description, not only a default: a parameter left out of a
    # docstring's Args section shows as an empty text before "(default: ...)".
    options = [line for line in lines if re.match(r"^ {2,4}[a-z_]+ +", line)]
    assert len(options) > 25
    assert not [line for line in options if re.match(r"^ +[a-z_]+ +\(default:", line)]


def test_program_help_lists_the_subcommands(capsys):
    text = "\n".join(short_help(capsys, "--help"))
    assert all(re.search(rf"^  {s} +\S", text, re.M) for s in ("fit", "validate", "test", "predict"))


def test_short_names_in_the_help_are_accepted_by_the_parser():
    cli = main(
        [
            "--config",
            str(ROOT / "configs/task/translation.yaml"),
            "--model.net.gate",
            "TopPGate",
            "--model.net.gate.p",
            "0.6",
            "--model.net.d_model",
            "64",
            "--data.max_tokens",
            "1000",
            "--data.source",
            "ParallelText",
            "--data.source.root",
            "x",
            "--data.source.src_lang",
            "de",
            "--data.source.tgt_lang",
            "en",
            "--trainer.max_steps",
            "5",
        ],
        run=False,
    )
    config = cli.config
    assert config.model.init_args.net.gate.class_path == "adamoe.TopPGate"
    assert config.model.init_args.net.gate.init_args.p == 0.6 and config.model.init_args.net.d_model == 64
    assert config.data.class_path == "adamoe.data.TranslationData" and config.data.init_args.max_tokens == 1000
    assert config.data.init_args.source.class_path == "adamoe.data.ParallelText"
    assert config.trainer.max_steps == 5


@pytest.mark.parametrize(
    "args, described",
    [
        (["fit", "--help", "all"], "Stop training after this number of steps"),
        (["fit", "--model.help", "TranslationModule"], "beams of the test and predict search"),
        (["fit", "--model.net.gate.help", "AdaptiveGate"], "gets two experts"),
    ],
)
def test_full_help_has_descriptions_and_no_list_of_every_torch_module(capsys, args, described):
    with pytest.raises(SystemExit) as exit:
        entry(args)
    assert exit.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert described in text and "torch.nn.Linear" not in text
