"""The package's layout rules, read from the source: the core never imports the tools, and no module reaches
into another's private names."""

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "gptrain"


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


def core_modules() -> list[Path]:
    """Everything but the command line and the tools."""
    return [p for p in PACKAGE.rglob("*.py") if p.name != "cli.py" and "tools" not in p.relative_to(PACKAGE).parts]


def test_the_core_never_imports_the_tools():
    offenders = [(p.relative_to(ROOT), module) for p in core_modules() for module, names in imports_of(p)
                 if module.startswith("gptrain.tools") or (module == "gptrain" and "tools" in names)]
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


def test_the_rule_checker_sees_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from gptrain.hf.gpt2 import _safetensors\nimport gptrain.analysis.plot\n")
    assert imports_of(bad) == [("gptrain.hf.gpt2", ["_safetensors"]), ("gptrain.analysis.plot", [])]
    bad.write_text("from gptrain import checkpoint as ckpt_io\nckpt_io._fsync_dir(None)\n")
    assert private_attributes_of_gptrain_modules(bad) == ["ckpt_io._fsync_dir"]
