"""Imports flow one way: common < configs < data_prep < experts < ensemble < scripts; and no
file is longer than MAX_LINES.

Every module of the project is parsed with `ast` (nothing is imported or run) and every
import it makes, at the top or inside a function, is checked:

* upward: a module may import from its own layer and the layers below, never from above
  (`experts.train` must not reach into `ensemble`, `data_prep` into `experts`);
* sideways: a module of a stage must not import another module's command line (a module
  that runs as `python -m ...`) of its own stage, as `data_prep.make_fakes` (then called
  `augment`) once imported `data_prep.demo`: what two commands share belongs in a module of
  its own. The scripts on top (infer.py, bench/) may use each other: bench/speed.py measures
  infer.py itself.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"common": 0, "configs": 1, "data_prep": 2, "experts": 3, "ensemble": 4, "infer": 5, "bench": 5}
SCRIPTS = 5


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    modules = {}
    for top in LAYERS:
        package, script = ROOT / top, ROOT / f"{top}.py"
        for path in sorted(package.rglob("*.py")) if package.is_dir() else [script]:
            modules[module_name(path)] = path
    return modules


MODULES = project_modules()


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every project module `path` imports; `from a import b` counts as
    `a.b` when that is a module, else as `a`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: resolve against the importing module's package
                package = module_name(path).split(".")
                package = package[:len(package) - node.level + (path.name == "__init__.py")]
                module = ".".join(package + ([module] if module else []))
            found += [(node.lineno, f"{module}.{alias.name}" if f"{module}.{alias.name}" in MODULES else module)
                      for alias in node.names]
    return sorted({(line, name) for line, name in found if name.split(".")[0] in LAYERS})


def is_command_line(path: Path) -> bool:
    """A module with an `if __name__ == "__main__":` block."""
    return any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)
               for node in ast.parse(path.read_text(encoding="utf-8")).body)


def layer(module: str) -> int:
    return LAYERS[module.split(".")[0]]


def test_every_stage_is_found():
    assert {name.split(".")[0] for name in MODULES} == set(LAYERS)
    assert "experts.train" in MODULES and "common.cli" in MODULES


def upward_imports(module: str, path: Path) -> list[str]:
    return [f"{path.name}:{line} imports {name}" for line, name in imports_of(path) if layer(name) > layer(module)]


def sideways_imports(module: str, path: Path) -> list[str]:
    return [f"{path.name}:{line} imports {name}" for line, name in imports_of(path)
            if name != module and name in MODULES and layer(name) == layer(module)
            and is_command_line(MODULES[name])]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_flow_downward(module):
    upward = upward_imports(module, MODULES[module])
    assert not upward, f"{module} imports from a higher stage: " + "; ".join(upward)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer(m) < SCRIPTS))
def test_no_stage_module_imports_a_command_line_of_its_stage(module):
    sideways = sideways_imports(module, MODULES[module])
    assert not sideways, f"{module} imports another command of its stage: " + "; ".join(sideways)


def test_the_checks_catch_what_they_are_for(tmp_path):
    """The two rules flag the imports this layout once had, also inside a function."""
    probe = tmp_path / "probe.py"
    probe.write_text("import numpy\n\ndef main():\n    from ensemble.plots import plot_roc\n")
    assert upward_imports("data_prep.probe", probe) == ["probe.py:4 imports ensemble.plots"]
    assert upward_imports("ensemble.probe", probe) == []
    probe.write_text("from data_prep import demo\nfrom data_prep.dataset import read_label_file\n")
    assert sideways_imports("data_prep.probe", probe) == ["probe.py:1 imports data_prep.demo"]
    assert upward_imports("data_prep.probe", probe) == []


# ---------------------------------------------------------------- file length

MAX_LINES = 400  # a file a newcomer reads top-down in one sitting
LONGER_ALLOWED = {"bench/speed.py"}  # one measurement protocol, kept whole on purpose


def python_files() -> list[Path]:
    """Every .py file of the repository, tests included; hidden and output folders skipped."""
    skipped = {"demo_data", "weights", "reports", "runs"}
    return sorted(p for p in ROOT.rglob("*.py")
                  if not any(part.startswith(".") or part in skipped for part in p.relative_to(ROOT).parts))


def test_no_file_is_longer_than_max_lines():
    assert len(python_files()) > len(MODULES)  # the tests are counted too
    lengths = {p.relative_to(ROOT).as_posix(): len(p.read_text(encoding="utf-8").splitlines()) for p in python_files()}
    too_long = {name: n for name, n in lengths.items() if n >= MAX_LINES and name not in LONGER_ALLOWED}
    assert not too_long, f"files of {MAX_LINES} lines or more (split them by what they do): {too_long}"
