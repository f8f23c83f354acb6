"""What keeps the package easy to fork: plain model code without Lightning, small files,
and a console that says each warning once."""

import subprocess
import sys

from helpers import ROOT, tiny_config

HEAVY = ("lightning", "pytorch_lightning", "torchmetrics", "datasets", "tokenizers")


def loaded_after(statement: str) -> list[str]:
    code = f"import sys\n{statement}\nprint(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))"
    return eval(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout)


def test_plain_model_code_loads_no_lightning():
    assert loaded_after("import adamoe.gates, adamoe.moe, adamoe.transformer, adamoe.parallel, adamoe.ops") == []
    assert loaded_after("from adamoe import AdaptiveGate, Transformer, TransformerConfig") == []
    # The tasks do load it: the check sees a module when there is one.
    assert "lightning" in loaded_after("from adamoe import TranslationModule")


def test_no_file_of_the_package_is_over_300_lines():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in (ROOT / "adamoe").rglob("*.py")}
    assert len(sizes) > 10 and not {p: n for p, n in sizes.items() if n > 300}


def test_a_warning_is_said_once_per_run(tmp_path):
    """Lightning warns that an epoch has fewer batches than the logging interval each time
    it rebuilds the loader, that is every epoch."""
    args = ["fit", "--config", tiny_config(tmp_path), "--trainer.max_steps", -1, "--trainer.max_epochs", 3]
    args += ["--trainer.val_check_interval", "null", "--trainer.log_every_n_steps", 1000]
    out = subprocess.run([sys.executable, ROOT / "train.py", *map(str, args)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr.count("smaller than the logging interval") == 1, out.stderr[-3000:]
