"""Two-process data-parallel training on the CPU (gloo) through torchrun."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from helpers import tiny_overrides

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_on_cpu(demo_root, tmp_path):
    overrides = tiny_overrides(tmp_path, epochs=2, experts="convnext")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           "-m", "experts.train", str(demo_root)] + overrides
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", NO_ALBUMENTATIONS_UPDATE="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("FORCE_TQDM", None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]

    weights = tmp_path / "weights"
    manifest = json.loads((weights / "manifest.json").read_text())
    assert list(manifest["experts"]) == ["convnext"]
    assert (weights / "convnext.safetensors").is_file()
    training = manifest["experts"]["convnext"]["training"]
    assert [row["epoch"] for row in training["history"]] == [1, 2]
    assert training["data"]["trainset"]["n"] == 64
    assert (tmp_path / "runs" / "convnext" / "checkpoint.pt").is_file()

    # rank 0 alone logs: each per-epoch line appears exactly once
    for epoch in (1, 2):
        lines = [line for line in log.splitlines() if f"convnext epoch {epoch}/2" in line]
        assert len(lines) == 1, lines
    assert sum("best epoch" in line for line in log.splitlines()) == 1
