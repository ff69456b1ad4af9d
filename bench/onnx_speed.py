"""Throughput of the experts' forward passes, torch against onnxruntime, on the CPU.

    python -m bench.onnx_speed [--batch 32] [--threads 1,2] [--repeats 5] [--out onnx_speed.json]
                               [--profile NAME | profile=NAME] [key=value ...]

Builds the profile's experts (cpu: forensic, mesonet, resnet on SRM residuals, dae) with
random weights at their profile input sizes (speed does not depend on the weights' values),
exports each as `python -m experts.export_onnx` does, and times P(fake) of one batch of random
crops (float, [0, 1]) with `Expert.predict_proba` under `torch.inference_mode` and with an
onnxruntime session, both with the same number of threads, after a warm-up; images/s from
the faster of two medians, measured alternately. "all experts" adds up each backend's times: one image through the
whole ensemble (without TTA, decoding and face crop, which are the same for both backends).
Other processes' CPU use over the run is reported (in cores), as bench/speed.py measures it:
on a shared machine it lowers both columns.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.speed import ContentionMonitor
from common.cli import CommandLine, entry_point
from common.errors import UsageError
from configs import config_from
from configs.settings import expert_settings
from experts import create_expert
from experts.export_onnx import INPUT_NAME, import_optional, onnx_bytes


def median_seconds(run, repeats: int) -> float:
    run()  # warm-up: first-call allocations, onnxruntime's graph optimisation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(experts: dict, batch: int, threads: int, repeats: int) -> list[dict]:
    ort = import_optional("onnxruntime")
    torch.set_num_threads(threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    rows = []
    for name, (expert, model) in experts.items():
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        crops = torch.rand(batch, 3, expert.image_size, expert.image_size, generator=torch.Generator().manual_seed(0))
        array = crops.numpy()

        def with_torch():
            with torch.inference_mode():
                expert.predict_proba(crops)

        def with_onnxruntime():
            session.run(None, {INPUT_NAME: array})

        torch_s, onnx_s = [], []
        for _ in range(2):  # alternate, so that a burst of load elsewhere hits both alike
            torch_s.append(median_seconds(with_torch, repeats))
            onnx_s.append(median_seconds(with_onnxruntime, repeats))
        rows.append({"expert": name, "input_size": expert.image_size, "threads": threads, "batch": batch,
                     "torch_s": min(torch_s), "onnxruntime_s": min(onnx_s)})
    rows.append({"expert": "all experts", "input_size": None, "threads": threads, "batch": batch,
                 "torch_s": sum(r["torch_s"] for r in rows), "onnxruntime_s": sum(r["onnxruntime_s"] for r in rows)})
    for row in rows:
        row["torch_img_s"] = batch / row["torch_s"]
        row["onnxruntime_img_s"] = batch / row["onnxruntime_s"]
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| expert | input | threads | torch img/s | onnxruntime img/s | onnxruntime / torch |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        size = f"{r['input_size']} px" if r["input_size"] else ""
        lines.append(f"| {r['expert']} | {size} | {r['threads']} | {r['torch_img_s']:.1f} | "
                     f"{r['onnxruntime_img_s']:.1f} | {r['onnxruntime_img_s'] / r['torch_img_s']:.2f} |")
    return "\n".join(lines)


@entry_point
def main(argv=None) -> int:
    parser = CommandLine("python -m bench.onnx_speed", __doc__)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts to measure")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    try:
        thread_counts = [int(t) for t in args.threads.split(",") if t]
    except ValueError:
        raise UsageError(f"--threads {args.threads!r}: expected numbers such as 1,2") from None
    if args.batch < 1 or args.repeats < 1 or not thread_counts or min(thread_counts) < 1:
        raise UsageError("--batch, --repeats and every --threads count must be at least 1")
    cfg = config_from(args)
    import_optional("onnx")  # torch's exporter needs it
    experts = {}
    for name in cfg.experts:
        settings = expert_settings(cfg, name)
        ecfg = dataclasses.replace(settings.expert, pretrained=False, pretrained_file="")  # random weights
        torch.manual_seed(0)
        expert = create_expert(ecfg, settings.data.image_size).eval()
        experts[name] = (expert, onnx_bytes(expert))
    with ContentionMonitor() as monitor:
        rows = [row for threads in thread_counts for row in measure(experts, args.batch, threads, args.repeats)]
    others = monitor.mean
    print(markdown(rows))
    print(f"\nprofile {cfg.profile}, batch {args.batch}, torch {torch.__version__}, "
          f"onnxruntime {import_optional('onnxruntime').__version__}; other processes used "
          f"{'?' if others is None else f'{others:.2f}'} cores on average during the run")
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "others_cores": others, "profile": cfg.profile}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
