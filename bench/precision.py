"""Is bf16 autocast or channels-last faster for an expert on this machine? Measure, don't guess.

    python -m bench.precision [--kind resnet --model resnet10t --size 128 --batch 32 --steps 10]

Times training steps (forward + backward + AdamW) and inference batches of one expert in
fp32, bf16 autocast, channels-last and both, on the CPU (or CUDA with --device cuda). The cpu
profile trains in bf16 where the CPU has bf16 units (`train.amp: auto`) and keeps
`channels_last: false` unless this says otherwise.
"""
from __future__ import annotations

import contextlib
import sys
import time

import torch

from common.cli import CommandLine, entry_point
from common.runtime import select_device
from configs import ExpertConfig, LossConfig
from experts import create_expert


def time_steps(model, x, y, steps, train: bool, dtype, channels_last: bool) -> float:
    """Median seconds per step after two warm-up steps."""
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast(x.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        if train:
            model.train()
            with autocast:
                loss, _ = model.training_loss(x, y, LossConfig())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            model.eval()
            with torch.inference_mode(), autocast:
                model.predict_proba(x)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@entry_point
def main(argv=None) -> int:
    parser = CommandLine("python -m bench.precision", __doc__, config=False)
    parser.add_argument("--kind", default="resnet")
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--input-filter", default="srm")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = select_device(args.device)
    torch.manual_seed(0)
    x = torch.rand(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, 2, (args.batch,), device=device)
    print(f"{args.kind}/{args.model} {args.size}px batch {args.batch}, {torch.get_num_threads()} threads, {device}")
    print("| mode | train step s | train img/s | inference batch s | inference img/s |")
    print("|---|---:|---:|---:|---:|")
    for label, dtype, channels_last in (("fp32", None, False), ("bf16 autocast", torch.bfloat16, False),
                                        ("fp32 channels-last", None, True),
                                        ("bf16 autocast, channels-last", torch.bfloat16, True)):
        cfg = ExpertConfig(kind=args.kind, model=args.model, input_filter=args.input_filter)
        torch.manual_seed(0)
        model = create_expert(cfg, args.size).to(device)
        train_s = time_steps(model, x, y, args.steps, True, dtype, channels_last)
        infer_s = time_steps(model, x, y, args.steps, False, dtype, channels_last)
        print(f"| {label} | {train_s:.3f} | {args.batch / train_s:.1f} | {infer_s:.3f} | {args.batch / infer_s:.1f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
