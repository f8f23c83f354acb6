"""Which value of a model argument is in effect when a run starts from a checkpoint.

defaults < the checkpoint's saved arguments < config files < the command line. A saved
argument fills only what the user did not set, one field at a time (`net.d_model`, not
`net` as a whole). Two kinds of saved argument are never taken: a path (a checkpoint is
data and does not choose where the program writes), and a class from a package that the
run does not already use (a class path names code to import).
"""

import importlib
import re
import sys
from collections.abc import Iterable
from pathlib import Path

import yaml

# Arguments that name a place on disk: only a config or the command line sets them.
PATHS = ("predict_output", "convert_from")
# Packages whose classes a checkpoint may name without the config naming them too.
TRUSTED = ("adamoe", "torch", "lightning")

Key = tuple[str, ...]


def _plain(path: Iterable[str]) -> Key:
    """A key without jsonargparse's `init_args` levels: `net.init_args.gate.init_args.k`
    and `net.gate.k` are one key."""
    return tuple(p for p in path if p != "init_args")


def leaves(tree, prefix: Key = ()) -> dict[Key, object]:
    """Every leaf of a nested dict by its plain key."""
    if not isinstance(tree, dict) or not tree:
        return {_plain(prefix): tree}
    out = {}
    for k, v in tree.items():
        out.update(leaves(v, (*prefix, str(k))))
    return out


def user_keys(args: list[str]) -> set[Key]:
    """The model keys set by the `--config` files and `--model...` flags of a command line."""
    keys: set[Key] = set()

    def value(i: int, arg: str) -> str | None:
        if "=" in arg:
            return arg.split("=", 1)[1]
        return args[i + 1] if i + 1 < len(args) else None

    for i, arg in enumerate(args):
        name = arg.split("=", 1)[0]
        if name in ("-c", "--config") and (file := value(i, arg)) is not None:
            model = (load_yaml(file) or {}).get("model")
            keys |= set(leaves(model)) if isinstance(model, dict) else set()
        elif name == "--model" and (given := value(i, arg)) is not None:
            tree = load_yaml(given) if Path(given).is_file() else yaml.safe_load(given)
            keys |= set(leaves(tree)) if isinstance(tree, dict) else set()
        elif name.startswith("--model."):
            path = tuple(name.removeprefix("--model.").split("."))
            given = value(i, arg)
            tree = yaml.safe_load(given) if given is not None else None
            keys |= {(*_plain(path), *k) for k in leaves(tree)} if isinstance(tree, dict) else {_plain(path)}
    return keys


def load_yaml(file: str):
    """A YAML file, or a ConfigError that names the file, the line and the reason."""
    from adamoe.errors import ConfigError

    try:
        return yaml.safe_load(Path(file).read_text())
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{file}:{mark.line + 1}" if mark else file
        raise ConfigError(f"{where}: not valid YAML: {e.problem or e.context}") from None
    except OSError as e:
        raise ConfigError(f"{file}: {e.strerror}") from None


def check_imports(file: str):
    """Every dotted `class_path` in a YAML file can be imported, or a ConfigError names the
    file, the line and the import error (which the argument parser reports as a type that
    does not match, for a gate)."""
    from adamoe.errors import ConfigError

    for number, line in enumerate(Path(file).read_text().splitlines(), 1):
        found = re.search(r"class_path:\s*['\"]?([\w.]+)", line)
        if not found or "." not in found[1]:
            continue
        module, _, name = found[1].rpartition(".")
        try:
            imported = importlib.import_module(module)
        except Exception as e:  # whatever the module raised while it was imported
            raise ConfigError(
                f"{file}:{number}: class_path {found[1]}: importing {module} failed: {type(e).__name__}: {e}"
            ) from None
        if not hasattr(imported, name):
            raise ConfigError(f"{file}:{number}: class_path {found[1]}: {module} has no {name}")


def _set_by_user(key: Key, users: set[Key]) -> bool:
    return any(key[: len(u)] == u for u in users)


def merge(saved: dict, effective: dict, users: set[Key], prefix: Key = ()) -> dict:
    """The model's arguments: the user's where set (in `effective`), else the checkpoint's,
    else `effective`'s defaults. Where the user names another class than the saved one, the
    saved arguments of that class do not apply."""
    if "class_path" in saved and saved["class_path"] != effective.get("class_path"):
        return effective if _set_by_user(_plain((*prefix, "class_path")), users) else saved
    out = dict(effective)
    for k, v in saved.items():
        key = (*prefix, k)
        if _set_by_user(_plain(key), users) or k in PATHS and not prefix:
            continue
        out[k] = merge(v, effective[k], users, key) if isinstance(v, dict) and isinstance(effective.get(k), dict) else v
    return out


def differences(saved: dict, effective: dict) -> list[str]:
    """`key: checkpoint X, in effect Y` for every saved leaf that the run does not use."""
    ours = leaves(effective)
    return [
        f"{'.'.join(k)}: checkpoint {v!r}, in effect {ours[k]!r}"
        for k, v in leaves(saved).items()
        if k in ours and ours[k] != v and k[-1:] not in [(p,) for p in PATHS]
    ]


def foreign_classes(saved: dict, effective: dict) -> list[str]:
    """Class paths in `saved` from a package that neither `TRUSTED` nor the run's own config
    (`effective`) names, and that is not imported already."""
    own = {str(v).split(".")[0] for k, v in leaves(effective).items() if k[-1:] == ("class_path",)}
    return [
        path
        for k, path in leaves(saved).items()
        if k[-1:] == ("class_path",)
        and isinstance(path, str)
        and path.split(".")[0] not in (*TRUSTED, *own)
        and path.rsplit(".", 1)[0] not in sys.modules
    ]
