"""One command line everywhere (common.cli), and a known error is one line and exit status 2.

Every entry point runs in its own subprocess on a broken input (a label file that lists an
image twice, a bad config key, missing weights or folders, an unknown name): the exit status
is 2 and stderr is exactly one line that names the file or key and the reason. The processes
are forked from one that has imported torch already (tests/forked_commands.py): a fresh
interpreter per command would spend over a minute importing it.
"""
import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from common.cli import CommandLine, entry_point
from common.errors import UsageError, UserError
from configs import ConfigError, config_from, config_from_argv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DUPLICATE = ["trainset_label.txt:4", "'a.png' is listed twice"]
BAD_KEY = ["unknown config key 'train.epoch'"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}

# name: (command, what its one stderr line must contain). {d} is the test's folder; {d}/data
# is a data root whose every label file lists a.png twice.
BROKEN = {
    "experts.train": ("-m experts.train {d}/data", DUPLICATE),
    "ensemble.fit": ("-m ensemble.fit {d}/data", DUPLICATE),
    "ensemble.evaluate": ("-m ensemble.evaluate {d}/data --no-plots train.epoch=3", BAD_KEY),
    "experts.cluster_split": ("-m experts.cluster_split {d}/data --out {d}/folds --random", DUPLICATE),
    "data_prep.make_fakes": ("-m data_prep.make_fakes {d}/data --out {d}/with_fakes", DUPLICATE),
    "data_prep.demo": ("-m data_prep.demo {d}/demo --size 8", ["size must be at least 32 pixels"]),
    "data_prep.diffusion": ("-m data_prep.diffusion {d}/data --model {d}/no_model --out {d}/sd", DUPLICATE),
    "data_prep.video": ("-m data_prep.video {d}/no_videos {d}/frames", ["no_videos/labels.csv", "missing"]),
    "data_prep.audit": ("-m data_prep.audit {d}/data", DUPLICATE),
    "experts.check_pretrained": ("-m experts.check_pretrained --profile gpu train.epoch=3", BAD_KEY),
    "experts.export_onnx": ("-m experts.export_onnx --weights {d}/no_weights --out {d}/onnx",
                            ["no_weights/manifest.json", "no trained weights"]),
    "infer.py": ("infer.py {d}/data/testset/a.png --weights {d}/no_weights",
                 ["no_weights/manifest.json", "no trained weights"]),
    "bench.speed": ("-m bench.speed {d}/no_images", ["no_images", "not a directory"]),
    "bench.quality": ("-m bench.quality {d}/data --out {d}/q.md", DUPLICATE),
    "bench.ablation": ("-m bench.ablation {d}/data --work {d}/ablation train.epoch=3", BAD_KEY),
    "bench.generalization": ("-m bench.generalization {d}/data --protocols a --work {d}/gen",
                             ["trainset_methods.csv", "missing"]),
    "bench.precision": ("-m bench.precision --kind nope --steps 1", ["unknown expert kind 'nope'"]),
    "bench.face_detectors": ("-m bench.face_detectors {d}/no_images", ["no_images", "not a directory"]),
    "bench.onnx_speed": ("-m bench.onnx_speed --repeats 1 train.epoch=3", BAD_KEY),
    "bench.pipeline_waits": ("-m bench.pipeline_waits {d}/no_images", ["no_images", "no such file or directory"]),
    "bench.robustness": ("-m bench.robustness {d}/no_data", ["no_data"]),
}


@pytest.fixture(scope="module")
def broken_runs(tmp_path_factory):
    """{name: result} of every BROKEN command, each in its own process (tests/forked_commands.py)."""
    folder = tmp_path_factory.mktemp("broken")
    for split in ("trainset", "valset", "testset"):
        (folder / "data" / split).mkdir(parents=True)
        for name in ("a.png", "b.png"):
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "data" / split / name)
        (folder / "data" / f"{split}_label.txt").write_text("img_name,target\na.png,0\nb.png,1\na.png,1\n")
    results = folder / "results.json"
    commands = [command.format(d=folder) for command, _ in BROKEN.values()]
    subprocess.run([sys.executable, "tests/forked_commands.py", str(results), *commands], cwd=ROOT, env=ENV,
                   check=True, timeout=600)
    return dict(zip(BROKEN, json.loads(results.read_text())))


@pytest.mark.parametrize("name", list(BROKEN))
def test_known_error_is_one_line_and_exit_status_2(broken_runs, name):
    run = broken_runs[name]
    lines = run["stderr"].splitlines()
    assert run["returncode"] == 2 and len(lines) == 1, f"{name}: rc {run['returncode']}, stderr:\n{run['stderr']}"
    assert lines[0].startswith("error: ")
    for part in BROKEN[name][1]:
        assert part in lines[0], f"{name}: {part!r} not in {lines[0]!r}"


def test_experts_train_help_prints_usage():
    proc = subprocess.run([sys.executable, "-m", "experts.train", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=ENV)
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith("usage: python -m experts.train") and "--profile" in proc.stdout
    assert "python -m experts.train DATA_ROOT" in proc.stdout  # the module's own usage text


@pytest.mark.parametrize("module", ["experts.train", "ensemble.fit", "ensemble.evaluate", "experts.cluster_split",
                                    "data_prep.make_fakes", "data_prep.demo", "data_prep.diffusion",
                                    "data_prep.video", "data_prep.audit", "experts.check_pretrained",
                                    "experts.export_onnx", "infer", "bench.speed", "bench.quality", "bench.ablation",
                                    "bench.generalization", "bench.precision", "bench.face_detectors",
                                    "bench.onnx_speed", "bench.pipeline_waits", "bench.robustness"])
def test_every_entry_point_has_help(module, capsys):
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(module).main(["--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("usage: ")


# ---------------------------------------------------------------- the parser itself

def parser(**kwargs) -> CommandLine:
    command = CommandLine("python -m some.command", "Some command.", positional="DATA_ROOT", **kwargs)
    command.add_argument("--split", default="valset")
    return command


@pytest.mark.parametrize("argv", [
    ["root", "--profile", "gpu", "train.epochs=3", "--split", "testset"],
    ["profile=gpu", "--split", "testset", "train.epochs=3", "root"],
    ["--split", "testset", "train.epochs=3", "root", "profile=gpu"],
])
def test_profile_and_overrides_in_any_order(argv):
    args = parser().parse_args(argv)
    assert (args.positional, args.profile, args.overrides, args.split) == ("root", "gpu", ["train.epochs=3"],
                                                                          "testset")
    assert args.config_argv == ["profile=gpu", "train.epochs=3"]
    cfg = config_from(args, data_root=args.positional)
    assert (cfg.profile, cfg.train.epochs, cfg.data_root) == ("gpu", 3, "root")


def test_a_path_holding_an_equals_sign_is_still_the_data_root():
    args = parser().parse_args(["runs/lr=0.1", "seed=3"])
    assert args.positional == "runs/lr=0.1" and args.overrides == ["seed=3"]


def test_a_wildcard_override_is_an_override_at_every_entry_point():
    """`expert.*.pretrained=false`, the command issue 10 gives for the gpu profile offline: every
    command of train.sh takes it as an override, not as a second positional argument."""
    args = parser().parse_args(["root", "profile=gpu", "expert.*.pretrained=false"])
    assert args.positional == "root" and args.overrides == ["expert.*.pretrained=false"]
    cfg = config_from(args, data_root=args.positional)
    assert cfg.expert and not any(cfg.expert_config(name).pretrained for name in cfg.expert)


@pytest.mark.parametrize("argv, message", [
    (["a", "b"], r"expected one DATA_ROOT, got \['a', 'b'\]"),
    ([], "DATA_ROOT is missing"),
    (["a", "--profile", "cpu", "profile=gpu"], "two different profiles"),
    (["a", "--nope"], "unrecognized arguments: --nope"),
])
def test_usage_errors_are_known_errors(argv, message):
    with pytest.raises(UsageError, match=message) as err:
        parser().parse_args(argv)
    assert str(err.value).startswith("python -m some.command: ") and "--help" in str(err.value)


def test_a_bad_stacker_method_stops_ensemble_fit_before_it_reads_any_data(tmp_path, capsys):
    from ensemble import fit

    assert fit.main([str(tmp_path), "ensemble.method=lgbn"]) == 2  # tmp_path: no data root at all
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ensemble.method must be auto or one of" in err and "'lgbn'" in err


def test_config_from_argv_reads_like_the_commands():
    cfg = config_from_argv(["root", "--profile", "cpu", "experts=[dae]"])
    assert cfg.data_root == "root" and cfg.experts == ["dae"]
    with pytest.raises(ConfigError, match="train.epoch"):
        config_from_argv(["root", "train.epoch=3"])


def test_entry_point_turns_known_errors_into_one_line_and_keeps_other_tracebacks(capsys):
    @entry_point
    def main(argv=None):
        if argv == ["known"]:
            raise UserError("some/file.txt:3: a reason\non two lines")
        raise RuntimeError("a bug")

    assert main(["known"]) == 2
    assert capsys.readouterr().err == "error: some/file.txt:3: a reason on two lines\n"
    with pytest.raises(RuntimeError, match="a bug"):
        main(["other"])
