"""A task written outside the package (examples/regression.py) trains, tests and predicts
through train.py with its own data module, module and config."""

import json
import statistics
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, scalars, train


def fork_config(tmp_path, name: str, **trainer) -> Path:
    """examples/<name>.yaml, made small and written into `tmp_path`."""
    cfg = yaml.safe_load((ROOT / "examples" / f"{name}.yaml").read_text())
    cfg["trainer"] |= {"log_every_n_steps": 5, "enable_progress_bar": False, **trainer}
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "logs")
    cfg["data"]["init_args"] |= {"cache_dir": str(tmp_path / "cache"), "max_tokens": 1024}
    cfg["data"]["init_args"]["source"]["init_args"] = {"train_size": 1500, "val_size": 100, "test_size": 60}
    cfg["model"]["init_args"]["predict_output"] = str(tmp_path / "pred.txt")
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def regression(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    return fork_config(tmp_path, "regression", max_epochs=8, val_check_interval=None)


@pytest.mark.slow  # the tagging test below trains a fork through train.py within the CI budget
def test_a_task_outside_the_package_trains_through_train_py(regression, tmp_path):
    import regression as fork

    assert fork.__file__ == str(ROOT / "examples" / "regression.py")  # not a file of adamoe/
    train("fit", "--config", regression, cwd=tmp_path)
    run = tmp_path / "logs" / "regression"
    logged = scalars(run / "version_0")
    val = fork.Clauses(1500, 100, 60).load("val")["score"]
    # Predicting the mean of the validation scores scores their variance: the model must do far better.
    assert logged["val/mse"][-1][1] < 0.3 * statistics.pvariance(val), logged["val/mse"]
    assert "experts/model/two_expert_share" in logged  # gates and statistics came with the base class
    best = json.loads((run / "version_0" / "metrics.json").read_text())["best"]
    assert best["val/mse"] == min(v for _, v in logged["val/mse"])  # best by the config's monitor
    assert any(p.name.startswith("best-") for p in (run / "version_0" / "checkpoints").iterdir())
    train(
        "predict", "--config", regression, "--ckpt_path", run / "version_0" / "checkpoints" / "last.ckpt", cwd=tmp_path
    )
    predictions = [float(x) for x in (tmp_path / "pred.txt").read_text().split()]
    truth = fork.Clauses(1500, 100, 60).load("test")["score"]
    assert len(predictions) == len(truth)
    assert statistics.fmean((p - t) ** 2 for p, t in zip(predictions, truth)) < 0.3 * statistics.pvariance(truth)


def test_a_token_level_task_outside_the_package_tags_every_word(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    import tagging

    path = fork_config(tmp_path, "tagging", max_epochs=4)
    train("fit", "--config", path, cwd=tmp_path)
    run = tmp_path / "logs" / "tagging" / "version_0"
    # Tagging every word 0, the most common tag, scores about a half.
    assert scalars(run)["val/acc"][-1][1] > 0.9
    train("predict", "--config", path, "--ckpt_path", "last", cwd=tmp_path)
    truth = [tagging.word_tags(t) for t in tagging.ArticlePhrases(1500, 100, 60).load("test")["text"]]
    predicted = [[int(t) for t in line.split()] for line in (tmp_path / "pred.txt").read_text().splitlines()]
    assert [len(p) for p in predicted] == [len(t) for t in truth]  # one tag per word
    words = [(p, t) for ps, ts in zip(predicted, truth) for p, t in zip(ps, ts)]
    assert sum(p == t for p, t in words) / len(words) > 0.9
    # New text, words the generator never made included: still one tag per word.
    (tmp_path / "new.txt").write_text("der hund sieht die katze .\nein xyzzyq qwv\n")
    train(
        "predict",
        "--config",
        path,
        "--ckpt_path",
        "last",
        "--data.init_args.predict_file",
        tmp_path / "new.txt",
        cwd=tmp_path,
    )
    lines = (tmp_path / "pred.txt").read_text().splitlines()
    assert [len(line.split()) for line in lines] == [6, 3]
    assert lines[0].split()[0] == "1" and lines[0].split()[3] == "1"  # the articles
