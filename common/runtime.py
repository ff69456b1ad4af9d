"""Where and how the models run: the device (and the DDP process group), the seeds, mixed precision."""
from __future__ import annotations

import dataclasses
import os
import random

import numpy as np
import torch

from common.errors import ConfigError, UsageError

AMP_MODES = ("auto", "off", "bf16", "fp16")


def select_device(name: str = "auto") -> torch.device:
    """'auto' -> the first GPU when CUDA sees one, else the CPU; 'cpu', 'cuda' or 'cuda:N' as
    named. Asking for CUDA where none is visible is an error now, not a crash later."""
    name = str(name).strip()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {name!r}: no CUDA device is visible on this machine")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UsageError(f"device {name!r}: expected auto, cpu, cuda or cuda:N") from None


@dataclasses.dataclass
class Runtime:
    """The device of this process and its place among the data-parallel processes."""
    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_runtime(device_name: str = "auto", threads: int = 0) -> Runtime:
    """Pick the device (`threads` > 0: torch's CPU threads) and, under torchrun
    (WORLD_SIZE > 1), join the process group."""
    import torch.distributed as dist

    if threads > 0:
        torch.set_num_threads(threads)
    device = select_device(device_name)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device.type == "cuda":  # one GPU per process: torchrun's LOCAL_RANK picks it
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Runtime(device, rank, world)


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (the ones libraries draw from)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def sample_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, epoch, index...), stable across runs and processes:
    every random choice about sample i of epoch e draws from its own stream, so a resumed run
    or another worker count draws exactly the same."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32)
               .astype(np.uint64).dot([1, 1 << 31])) & ((1 << 63) - 1)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 with its own kernels: a CUDA GPU that supports it, or a
    CPU on which oneDNN runs bf16 (AVX-512 or AMX, as oneDNN itself reports, else torch's CPU
    capability); on older CPUs bf16 would be emulated, slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    onednn_check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if onednn_check is not None:
        return bool(onednn_check())
    capability = torch.backends.cpu.get_cpu_capability()
    return "AVX512" in capability or "AMX" in capability


def mixed_precision(amp: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """`train.amp` on `device` -> (autocast dtype or None, needs a GradScaler).

    `auto`: bf16 where the device computes it natively (`native_bf16`), fp16 on a CUDA GPU
    without bf16, else off, as inference's `--precision auto` chooses. On the development
    CPU (avx512_bf16) bf16 trains the resnet expert 1.5x faster per epoch, and its FF++ AUC
    held (RESULTS.md); on a CPU without bf16 units it would be emulated and slower than
    fp32, so `auto` stays fp32 there. `bf16` / `fp16` force it, `off` never."""
    if amp not in AMP_MODES:
        raise ConfigError(f"train.amp must be one of {AMP_MODES}, got {amp!r}")
    if amp == "auto":
        if native_bf16(device):
            amp = "bf16"
        elif device.type == "cuda":
            amp = "fp16"
        else:
            return None, False
    if amp == "off":
        return None, False
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return dtype, (dtype == torch.float16 and device.type == "cuda")
