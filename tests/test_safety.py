"""Safe by construction: no code path can unpickle, start a shell, or follow a manifest out
of the weights folder. The code checks walk every .py file of the project (tests excepted)
with `ast`, so a new violation anywhere fails here, with the file and line."""
import ast
import json
import shutil
from pathlib import Path

import pytest
import torch

import infer
from configs import load_config
from ensemble.predictor import EnsembleDetector
from experts import create_expert
from experts.weights import MANIFEST, WeightsError, load_expert, save_expert
from helpers import tiny_overrides

ROOT = Path(__file__).resolve().parent.parent

# Calls that run code hidden in a file, or a command line through a shell, whatever their arguments.
ALWAYS_UNSAFE = {
    "pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "dill.loads", "joblib.load",
    "pandas.read_pickle", "shelve.open", "marshal.load", "marshal.loads",
    "os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput",
}


def project_files() -> list[Path]:
    """Every .py file of the project but the tests (and hidden folders: .git, caches...)."""
    return sorted(p for p in ROOT.rglob("*.py")
                  if not any(part.startswith(".") or part in ("tests", "__pycache__")
                             for part in p.relative_to(ROOT).parts[:-1]))


def imported_names(tree: ast.AST) -> dict[str, str]:
    """Local name -> the dotted name it stands for: `np` -> numpy, `load` -> torch.load."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                names[alias.asname or top] = alias.name if alias.asname else top
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def called_name(func: ast.AST, names: dict[str, str]) -> str | None:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        return None
    return ".".join([names.get(func.id, func.id), *reversed(parts)])


def keyword_is(call: ast.Call, key: str, value) -> bool | None:
    """True/False when `key=<literal>` is passed and equals `value` or not; None when absent."""
    for keyword in call.keywords:
        if keyword.arg == key:
            return isinstance(keyword.value, ast.Constant) and keyword.value.value is value
    return None


def unsafe_calls(source: str, filename: str = "<snippet>") -> list[str]:
    """`file:line: what` for every unsafe call in the source."""
    tree = ast.parse(source, filename)
    names = imported_names(tree)
    found = []
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
        name = called_name(call.func, names)
        where = f"{filename}:{call.lineno}"
        if name in ALWAYS_UNSAFE:
            found.append(f"{where}: {name}")
        elif name == "torch.load" and keyword_is(call, "weights_only", True) is not True:
            found.append(f"{where}: torch.load without weights_only=True")
        elif name == "numpy.load" and keyword_is(call, "allow_pickle", False) is False:
            found.append(f"{where}: numpy.load with allow_pickle other than False")
        if keyword_is(call, "shell", False) is False:
            found.append(f"{where}: {name or 'a call'} with shell=...")
    return found


def test_the_project_never_unpickles_nor_uses_a_shell():
    files = project_files()
    assert ROOT / "infer.py" in files and ROOT / "experts" / "weights.py" in files
    assert not [f for f in files if "tests" in f.relative_to(ROOT).parts[:-1]]
    found = [hit for f in files for hit in unsafe_calls(f.read_text(encoding="utf-8"), str(f.relative_to(ROOT)))]
    assert found == []


def test_the_check_catches_each_unsafe_call():
    bad = """
import pickle, joblib, os, subprocess
import numpy as np
import torch
from torch import load as tload
from pickle import loads
torch.load("a.pt")
torch.load("a.pt", weights_only=False)
tload("a.pt")
pickle.load(f)
loads(b"")
joblib.load("m.joblib")
np.load("a.npy", allow_pickle=True)
os.system("ls " + name)
os.popen("ls")
subprocess.run(f"convert {name}", shell=True)
subprocess.check_output(cmd, shell=flag)
"""
    found = unsafe_calls(bad)
    assert [hit.split(":")[1] for hit in found] == [str(n) for n in range(7, 18)]
    good = """
import numpy as np, subprocess, torch
torch.load("a.pt", map_location="cpu", weights_only=True)
np.load("a.npy")
np.load("a.npy", allow_pickle=False)
subprocess.run(["ffprobe", name], check=True)
subprocess.run(["git", "log"], shell=False)
"""
    assert unsafe_calls(good) == []


# ---------------------------------------------------------------- manifest file names

@pytest.fixture(scope="module")
def saved_expert(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("manifest_names")
    cfg = load_config("cpu", tiny_overrides(tmp, experts="convnext"))
    torch.manual_seed(0)
    save_expert(create_expert(cfg.expert_config("convnext"), 64), cfg.out, "convnext", cfg.face, {})
    return Path(cfg.out)


def edited_copy(saved_expert, tmp_path, edit) -> Path:
    folder = tmp_path / "weights"
    shutil.copytree(saved_expert, folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    edit(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize("name", ["/etc/passwd", "../convnext.safetensors", "sub/../../convnext.safetensors",
                                  "..\\convnext.safetensors", "C:\\weights\\convnext.safetensors"])
def test_an_expert_file_outside_the_weights_folder_is_refused(saved_expert, tmp_path, name):
    (tmp_path / "convnext.safetensors").write_bytes((saved_expert / "convnext.safetensors").read_bytes())
    folder = edited_copy(saved_expert, tmp_path, lambda m: m["experts"]["convnext"].update(file=name))
    with pytest.raises(WeightsError, match="outside the weights folder"):
        load_expert(folder, "convnext")


def test_a_stacker_file_outside_the_weights_folder_is_refused(saved_expert, tmp_path):
    stacker = {"file": "../ensemble.json", "sha256": "0" * 64, "experts": ["convnext"], "tta": []}
    folder = edited_copy(saved_expert, tmp_path, lambda m: m.setdefault("ensemble", {}).update(stacker=stacker))
    with pytest.raises(WeightsError, match=r"ensemble file '\.\./ensemble\.json' is outside"):
        EnsembleDetector.from_weights(folder, device="cpu")


def test_infer_reports_an_escaping_manifest_in_one_line(saved_expert, tmp_path, capsys):
    folder = edited_copy(saved_expert, tmp_path, lambda m: m["experts"]["convnext"].update(file="/etc/hostname"))
    image = tmp_path / "x.png"
    from PIL import Image
    Image.new("RGB", (32, 32)).save(image)
    assert infer.main([str(image), "--weights", str(folder), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "outside the weights folder" in err[0]
