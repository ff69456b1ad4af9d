"""Interruptions, proven: kill -9 in the middle of a training epoch then `resume=true` gives
bit-identical weights; SIGINT / SIGTERM during `infer.py --csv` leaves no partial file and
keeps the previous CSV; a full disk is one clear error and leaves weights and manifest whole.

The subprocess tests pause the real command at a chosen point (a tiny wrapper patches one
function to write a marker file and sleep), then signal it from outside, as a user would."""
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import infer
from common import files
from common.errors import WriteError
from configs import load_config
from experts import create_expert
from experts import train as experts_train
from experts.weights import MANIFEST, load_expert, save_expert
from helpers import tiny_overrides

ROOT = Path(__file__).resolve().parent.parent


def start(code: str, *args, new_session: bool = False) -> subprocess.Popen:
    """`code` in a child Python; `new_session`: in a process group of its own, to signal it whole."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=new_session)


def wait_for(marker: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until the paused child wrote its marker (it failed if it exited first)."""
    deadline = time.time() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the child exited ({proc.returncode}) before its pause point:\n{err[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail("the child never reached its pause point")
        time.sleep(0.05)


def run(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


# ---------------------------------------------------------------- kill -9 during training

PAUSE_IN_TRAINING_STEP = """
import sys, time
from pathlib import Path
from experts import train
marker, pause_at = Path(sys.argv[1]), int(sys.argv[2])
forward, steps = train.TrainStep.forward, []
def counting_forward(self, x, y):
    steps.append(1)
    if len(steps) == pause_at:
        marker.write_text("paused")
        time.sleep(600)
    return forward(self, x, y)
train.TrainStep.forward = counting_forward
sys.exit(train.main(sys.argv[3:]))
"""


def test_kill_9_mid_epoch_then_resume_gives_identical_weights(demo_root, tmp_path):
    """2 epochs of 4 steps (64 images, batch 16): killed at step 6, in the middle of epoch 2,
    the run resumes from the checkpoint of epoch 1 and ends bit-identical to one never killed."""
    cache = tmp_path / "cache"
    killed = tiny_overrides(tmp_path / "killed", epochs=2, experts="convnext", cache_dir=cache)
    baseline = tiny_overrides(tmp_path / "baseline", epochs=2, experts="convnext", cache_dir=cache)
    assert experts_train.main([str(demo_root)] + baseline) == 0  # never killed (in this process)

    marker = tmp_path / "paused"
    proc = start(PAUSE_IN_TRAINING_STEP, marker, 6, demo_root, *killed)
    wait_for(marker, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    checkpoint = tmp_path / "killed" / "runs" / "convnext" / "checkpoint.pt"
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 0  # epoch 1 done, epoch 2 cut short
    assert not (tmp_path / "killed" / "weights" / "convnext.safetensors").exists()

    resumed = run("-m", "experts.train", demo_root, *killed, "resume=true")
    assert "resumed from" in resumed.stderr and "at epoch 1" in resumed.stderr
    a = load_file(str(tmp_path / "baseline" / "weights" / "convnext.safetensors"))
    b = load_file(str(tmp_path / "killed" / "weights" / "convnext.safetensors"))
    assert set(a) == set(b)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    ck_a = torch.load(tmp_path / "baseline" / "runs" / "convnext" / "checkpoint.pt", weights_only=True)
    ck_b = torch.load(checkpoint, weights_only=True)
    assert [k for k in ck_a["model"] if not torch.equal(ck_a["model"][k], ck_b["model"][k])] == []
    assert all(torch.equal(x, y) for x, y in zip(ck_a["ema"]["shadow_params"], ck_b["ema"]["shadow_params"]))


# ---------------------------------------------------------------- signals during infer --csv

PAUSE_IN_INFER = """
import os, runpy, signal, sys, time
from pathlib import Path
# Ctrl-C as in a terminal, also when the tests run as a background job (whose children
# inherit SIGINT ignored, and then Python installs no KeyboardInterrupt handler)
signal.signal(signal.SIGINT, signal.default_int_handler)
marker, stage, csv_name = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
def pause():
    marker.write_text("paused")
    time.sleep(600)
if stage == "writing":  # the temp CSV is complete, not yet renamed onto the real one
    replace = os.replace
    def pausing_replace(src, dst):
        if Path(dst).name == csv_name:
            pause()
        return replace(src, dst)
    os.replace = pausing_replace
else:
    import ensemble.predictor as predictor
    score_files = predictor.score_files
    def pausing_score_files(*args, **kwargs):
        if stage == "scoring":  # no CSV written yet
            pause()
        for batch in score_files(*args, **kwargs):
            yield batch
            if stage == "decoding":  # after the first batch, with the DataLoader's workers running
                pause()
    predictor.score_files = pausing_score_files
sys.argv = ["infer.py", *sys.argv[4:]]
runpy.run_path("infer.py", run_name="__main__")
"""


@pytest.fixture(scope="module")
def untrained_detector(tmp_path_factory):
    """Weights of an untrained tiny expert (scores mean nothing; the files are what matter)
    and a folder of images to score."""
    tmp = tmp_path_factory.mktemp("interrupted_infer")
    cfg = load_config("cpu", tiny_overrides(tmp, experts="convnext"))
    torch.manual_seed(0)
    save_expert(create_expert(cfg.expert_config("convnext"), 64), cfg.out, "convnext", cfg.face, {})
    images = tmp / "images"
    images.mkdir()
    from PIL import Image
    for i in range(4):
        Image.effect_noise((64, 64), 20 + 10 * i).convert("RGB").save(images / f"img{i}.png")
    return Path(cfg.out), images


@pytest.mark.parametrize("stage, stop", [("scoring", signal.SIGTERM), ("writing", signal.SIGTERM),
                                         ("writing", signal.SIGINT)],
                         ids=["sigterm_scoring", "sigterm_writing", "sigint_writing"])
def test_signal_during_infer_csv_leaves_no_partial_file(untrained_detector, tmp_path, stage, stop):
    weights_dir, images = untrained_detector
    out = tmp_path / "out"
    out.mkdir()
    csv_path, previous = out / "submission.csv", "img_name,y_pred\nold.png,0.250000\n"
    if stage == "writing":
        csv_path.write_text(previous)
    marker = tmp_path / "paused"
    proc = start(PAUSE_IN_INFER, marker, stage, csv_path.name, images, "--csv", csv_path,
                 "--weights", weights_dir, "--workers", 0, "--device", "cpu")
    wait_for(marker, proc)
    proc.send_signal(stop)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + stop, err[-3000:]
    assert err.rstrip().splitlines()[-1].startswith(f"interrupted ({stop.name})")
    left = sorted(p.name for p in out.iterdir())
    if stage == "writing":
        assert left == ["submission.csv"]  # no temp file beside it
        assert csv_path.read_text() == previous
    else:
        assert left == []


def test_sigterm_to_the_process_group_while_workers_decode_is_one_line(untrained_detector, tmp_path):
    """As `timeout` or a scheduler stops a job: every process of the group gets SIGTERM, the
    decoding workers too. infer.py still ends with its one line, no worker traceback."""
    weights_dir, images = untrained_detector
    csv_path, marker = tmp_path / "submission.csv", tmp_path / "paused"
    proc = start(PAUSE_IN_INFER, marker, "decoding", csv_path.name, images, "--csv", csv_path,
                 "--weights", weights_dir, "--workers", 2, "--batch-size", 1, "--device", "cpu", new_session=True)
    wait_for(marker, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
    assert err.rstrip().splitlines()[-1].startswith("interrupted (SIGTERM)")
    assert not csv_path.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["paused"]


# ---------------------------------------------------------------- a full disk

def write_half_then_disk_full(path: Path, data: bytes) -> None:
    path.write_bytes(data[: len(data) // 2])
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_while_writing_the_csv_is_one_line_and_keeps_the_previous_csv(
        untrained_detector, tmp_path, monkeypatch, capsys):
    weights_dir, images = untrained_detector
    csv_path, previous = tmp_path / "submission.csv", "img_name,y_pred\nold.png,0.250000\n"
    csv_path.write_text(previous)

    class DiskFullAfterTheHeader:
        def __init__(self, handle, **_):
            self.handle = handle

        def writerow(self, row):
            self.handle.write(",".join(row) + "\n")

        def writerows(self, rows):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(infer.csv, "writer", DiskFullAfterTheHeader)
    argv = [str(images), "--csv", str(csv_path), "--weights", str(weights_dir), "--workers", "0", "--device", "cpu"]
    assert infer.main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "submission.csv: cannot write (No space left on device)" in last
    assert csv_path.read_text() == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["submission.csv"]  # no temp file left


@pytest.mark.parametrize("failing_write", [0, 1], ids=["weights_file", "manifest"])
def test_full_disk_leaves_weights_and_manifest_whole(tmp_path, monkeypatch, failing_write):
    """save_expert writes the weights, then the manifest: whichever meets the full disk, both
    files stay as they were, no temp file is left, and the error is one line."""
    cfg = load_config("cpu", tiny_overrides(tmp_path, experts="convnext"))
    folder = Path(cfg.out)
    torch.manual_seed(0)
    first = create_expert(cfg.expert_config("convnext"), 64)
    save_expert(first, folder, "convnext", cfg.face, {"note": "first"})
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert sorted(before) == ["convnext.safetensors", MANIFEST]

    real_write, writes = files._write_and_sync, []

    def write(path, data):
        writes.append(path.name)
        if len(writes) - 1 == failing_write:
            write_half_then_disk_full(path, data)
        real_write(path, data)

    monkeypatch.setattr(files, "_write_and_sync", write)
    torch.manual_seed(1)
    second = create_expert(cfg.expert_config("convnext"), 64)
    with pytest.raises(WriteError) as error:
        save_expert(second, folder, "convnext", cfg.face, {"note": "second"})
    message = str(error.value)
    assert "\n" not in message and "No space left on device" in message and "unchanged" in message
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    reloaded, entry = load_expert(folder, "convnext")
    assert entry["note"] == "first"
    assert all(torch.equal(v, first.state_dict()[k]) for k, v in reloaded.state_dict().items())


def test_full_disk_at_the_end_of_training_is_one_line(demo_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(files, "_write_and_sync", write_half_then_disk_full)
    overrides = tiny_overrides(tmp_path, epochs=1, experts="convnext")
    assert experts_train.main([str(demo_root)] + overrides) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("error: ")
    assert "convnext.safetensors: cannot write (No space left on device)" in err_lines[0]
    assert list((tmp_path / "weights").iterdir()) == []
