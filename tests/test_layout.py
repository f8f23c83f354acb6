"""What keeps the package easy to fork: plain model code without Lightning, small files,
and a console that says each warning once."""

import ast
import re
import subprocess
import sys

import tomllib
from helpers import ROOT, tiny_config

HEAVY = ("lightning", "pytorch_lightning", "torchmetrics", "datasets", "tokenizers")


def loaded_after(statement: str) -> list[str]:
    code = f"import sys\n{statement}\nprint(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))"
    return eval(
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    )


def test_plain_model_code_loads_no_lightning():
    plain = "import adamoe.gates, adamoe.moe, adamoe.transformer, adamoe.parallel, adamoe.ops"
    assert loaded_after(plain + "\nfrom adamoe import AdaptiveGate, Transformer, TransformerConfig") == []
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
    out = subprocess.run(
        [sys.executable, ROOT / "train.py", *map(str, args)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr.count("smaller than the logging interval") == 1, out.stderr[-3000:]


def package_imports() -> dict[str, set[str]]:
    """Each module of the package and the modules it imports, at any depth of its code."""
    files = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
        for p in (ROOT / "adamoe").rglob("*.py")
    }
    graph = {}
    for name, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found |= {
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module for a in node.names
                }
        graph[name] = found
    return graph


def test_no_import_circle_in_the_package():
    graph = package_imports()
    inside = {name: {m for m in deps if m in graph and m != name} for name, deps in graph.items()}
    path: list[str] = []
    done: set[str] = set()

    def visit(name):
        assert name not in path, "import circle: " + " -> ".join(path[path.index(name) :] + [name])
        if name in done:
            return
        path.append(name)
        for dep in sorted(inside[name]):
            visit(dep)
        path.pop()
        done.add(name)

    for name in sorted(inside):
        visit(name)
    assert len(inside) > 20 and "adamoe.moe" in inside["adamoe.parallel"]


def test_model_code_runs_no_collective():
    """Expert parallelism is swapped in from outside (`adamoe.parallel`): the model has no
    `torch.distributed` call of its own."""
    for name in ("adamoe.transformer", "adamoe.moe", "adamoe.gates", "adamoe.blocks"):
        assert not {m for m in package_imports()[name] if m.startswith("torch.distributed")}, name


# What the package needs at run time but never imports itself.
LOADED_BY_OTHERS = {
    "tensorboard": "TensorBoardLogger",
    "sacrebleu": "torchmetrics' BLEU",
    "rich": "RichProgressBar",
    "jsonargparse": "LightningCLI",
}
IMPORT_NAMES = {"pyyaml": "yaml", "docstring-parser": "docstring_parser"}


def test_declared_dependencies_are_what_the_package_imports():
    declared = set()
    for requirement in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        name = re.split(r"[<>=\[ ]", requirement, maxsplit=1)[0].lower()
        declared.add(IMPORT_NAMES.get(name, name))
    imported = {m.split(".")[0] for deps in package_imports().values() for m in deps}
    third_party = {m for m in imported - set(sys.stdlib_module_names) if m != "adamoe"}
    assert third_party == declared - set(LOADED_BY_OTHERS)


def test_each_error_type_is_imported_from_one_place():
    where = {}
    for path in [*(ROOT / "adamoe").rglob("*.py"), *(ROOT / "tests").glob("*.py"), *(ROOT / "examples").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("adamoe"):
                for a in node.names:
                    if a.name.endswith("Error"):
                        where.setdefault(a.name, set()).add(node.module)
    assert where and all(modules == {"adamoe.errors"} for modules in where.values()), where


def test_functions_are_short_and_lines_fit():
    lengths = {
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name}": node.end_lineno - node.lineno + 1
        for path in (ROOT / "adamoe").rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    }
    assert len(lengths) > 100 and not {f: n for f, n in lengths.items() if n >= 60}
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]["line-length"] <= 120
