"""The package's layout rules, read from the source: every import goes to the importing module's own layer or one
below it (the layers are LAYERS, lowest first), and no module reaches into another's private names."""

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "gptrain"

# Lowest first. A module may import its own layer and those below, never one above, whether at the top of the file
# or inside a function.
LAYERS = (
    ("errors",),
    ("runtime",),  # files, locks, publishing, signals, devices, processes: nothing about models or training
    ("model", "lora", "data", "optim", "dpo"),
    ("config", "hf"),
    ("loop_state", "monitor", "checkpoint"),
    ("build", "evaluate", "exact_match", "generation"),
    ("train", "conversation", "scoring", "tasks"),
    ("analysis", "serving"),
    ("commands",),
    ("cli", "__main__", "__init__"),
)


def imports_of(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) for every `import m` and `from m import names` in a file, relative imports resolved."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = path.relative_to(ROOT).parent.parts[: len(path.relative_to(ROOT).parent.parts) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            found.append((module, [alias.name for alias in node.names]))
    return found


def layer_of(module: str) -> int:
    """The layer of gptrain.X or gptrain.X.Y, by X."""
    top = module.split(".")[1] if module.count(".") else "__init__"
    return next(i for i, members in enumerate(LAYERS) if top in members)


def gptrain_imports(path: Path) -> list[str]:
    """The gptrain modules a file imports (`from gptrain import checkpoint` names gptrain.checkpoint)."""
    modules = []
    for module, names in imports_of(path):
        if module == "gptrain":
            modules += [f"gptrain.{name}" for name in names if name != "__version__"]
        elif module.startswith("gptrain."):
            modules.append(module)
    return modules


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def test_every_module_has_a_layer():
    for path in PACKAGE.rglob("*.py"):
        layer_of(module_name(path))  # StopIteration names a module no layer holds


def test_no_import_runs_up_a_layer():
    offenders = [(module_name(p), module) for p in PACKAGE.rglob("*.py") for module in gptrain_imports(p)
                 if layer_of(module) > layer_of(module_name(p))]
    assert not offenders, offenders


def test_no_module_imports_another_modules_private_names():
    offenders = [(p.relative_to(ROOT), module, name) for p in PACKAGE.rglob("*.py") for module, names in imports_of(p)
                 if module.startswith("gptrain") for name in names if name.startswith("_")]
    assert not offenders, offenders


def private_attributes_of_gptrain_modules(path: Path) -> list[str]:
    """`alias._name` where alias is a gptrain module imported into the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gptrain"):
            aliases |= {alias.asname or alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            aliases |= {alias.asname or alias.name for alias in node.names if alias.name.startswith("gptrain")}
    return [f"{node.value.id}.{node.attr}" for node in ast.walk(tree) if isinstance(node, ast.Attribute)
            and node.attr.startswith("_") and not node.attr.startswith("__")
            and isinstance(node.value, ast.Name) and node.value.id in aliases]


def test_no_module_reads_another_modules_private_attributes():
    offenders = [(p.relative_to(ROOT), attr) for p in PACKAGE.rglob("*.py")
                 for attr in private_attributes_of_gptrain_modules(p)]
    assert not offenders, offenders


def test_the_rule_checkers_see_a_violation(tmp_path):
    bad = PACKAGE / "runtime" / "files.py"  # a runtime module importing the checkpoint (two layers up)
    assert layer_of("gptrain.checkpoint") > layer_of(module_name(bad))
    source = tmp_path / "bad.py"
    source.write_text("from gptrain.hf.gpt2 import _conv\nimport gptrain.analysis.plot\nfrom gptrain import train\n")
    assert imports_of(source) == [("gptrain.hf.gpt2", ["_conv"]), ("gptrain.analysis.plot", []), ("gptrain", ["train"])]
    assert gptrain_imports(source) == ["gptrain.hf.gpt2", "gptrain.analysis.plot", "gptrain.train"]
    source.write_text("from gptrain import checkpoint as ckpt_io\nckpt_io._fsync_dir(None)\n")
    assert private_attributes_of_gptrain_modules(source) == ["ckpt_io._fsync_dir"]
