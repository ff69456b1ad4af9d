"""Speed benchmark of the trained detector: start-up, end-to-end throughput, bare forward passes.

    python -m bench.speed IMAGE_DIR [--weights weights] [--batch-size 32] [--workers N] [--threads T]
                          [--repeats 3] [--limit N] [--device auto] [--precision auto|fp32|bf16]
                          [--no-cold] [--allow-contention]
                          [--train DATA_ROOT [--train-epochs 1] [--profile NAME | profile=NAME] [key=value ...]]
                          [--out BENCHMARKS_speed.json]

Measured in one process, on the images of IMAGE_DIR (the first --limit, in infer.py's order):

1. start-up: the in-process time to import torch, `infer` and `ensemble.predictor`, and to load
   the weights (`EnsembleDetector.from_weights`); and the wall time of one cold subprocess
   `python infer.py ONE_IMAGE` (interpreter start, imports, load, one image).
2. end to end: `infer.main([DIR, --csv, tmp.csv, ...])` in-process, exactly what
   `python infer.py DIR --csv out.csv` does (weights load, decode, face crop, transforms, every
   expert, stacking, CSV), `--repeats` times; images/s from the median. `scoring_images_per_s`
   leaves out the weights load and the CSV (only `infer.score_images`).
3. bare: the same detector on ready random uint8 tensors of the right sizes, in batches of
   the same sizes as the pipeline's, over the same number of images: `detector.score_crops`
   (all experts, TTA, stacker) and, per expert, `model.predict_proba(x)` alone.
4. ratio = end-to-end images/s / bare images/s: the pipeline's efficiency (target >= 0.9 on
   CPU). `ratio_scoring` uses the scoring-only throughput.
5. peak memory (ru_maxrss of this process, and of its largest child), torch threads, machine,
   library versions, git commit.
6. CPU contention: other processes' CPU use (the machine's busy time in /proc/stat minus this
   process's and its descendants' CPU time) is sampled for 1 s before and after the run, and
   over the run in 1-s windows. The run is "contended" when others used more than 0.5 core on
   average before, during or after it, or in more than 10 % of the windows; then the results
   are still written, marked `"contended": true`, and the exit status is 3 unless
   --allow-contention.
7. `--train DATA_ROOT`: training images/s per expert, from `experts.train.main` run for
   --train-epochs epochs (out/run_dir in a temp folder; `profile=` and `key=value` overrides as
   for experts.train; --threads and a non-auto --device are passed on unless overridden), read
   from `train_images_per_s` in runs/<expert>/metrics.json. Runs after the inference parts.

Prints a Markdown table and writes everything as JSON to --out.
Exit status: 0 = done; 1 = a measured run failed (see the JSON); 2 = usage error, no images or
no usable weights; 3 = contended (see 6).
"""
from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from common.cli import CommandLine, entry_point
from common.files import atomic_write

REPO = Path(__file__).resolve().parent.parent  # the repository

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONTENTION_CORES = 0.5      # other processes may use at most this many cores ...
CONTENTION_WINDOWS = 0.10   # ... on average, and in at most this fraction of the 1-s windows
SAMPLE_SECONDS = 1.0        # idle sample before and after the run
BATCH_POOL = 4              # distinct random batches the bare timing cycles through
EXIT_FAILED, EXIT_USAGE, EXIT_CONTENDED = 1, 2, 3


# ----------------------------------------------------------------------------- machine

def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def machine_info() -> dict:
    info = {"platform": platform.platform(), "machine": platform.machine(), "python": platform.python_version(),
            "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "memory_gb": memory_gb(), "hostname": platform.node()}
    try:
        import torch
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def library_versions() -> dict:
    try:
        from experts.weights import library_versions as versions
        return versions()
    except Exception as err:  # a benchmark still runs without one optional library
        return {"error": f"{type(err).__name__}: {err}"}


def git_state() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"),
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def peak_rss_mb(who=resource.RUSAGE_SELF) -> float:
    """ru_maxrss in MiB (kilobytes on Linux, bytes on macOS). RUSAGE_CHILDREN: the largest
    waited-for child (DataLoader workers, the cold subprocess)."""
    value = resource.getrusage(who).ru_maxrss
    return round(value / (2**20 if sys.platform == "darwin" else 2**10), 1)


def loadavg() -> list[float] | None:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- contention

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass
class CpuSnapshot:
    wall: float          # time.monotonic()
    busy: float | None   # CPU seconds the whole machine spent busy (None: no /proc/stat)
    own: float           # CPU seconds of this process, its reaped children and its live descendants


def machine_busy_seconds() -> float | None:
    """user + nice + system + irq + softirq + steal of the `cpu` line of /proc/stat (idle and
    iowait left out; guest time is already inside user)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        v = [int(x) for x in fields[1:9]]
        return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / CLOCK_TICKS
    except (OSError, ValueError, IndexError):
        return None


def descendants_cpu_seconds(root_pid: int) -> float:
    """utime + stime + cutime + cstime of the live descendants of root_pid (DataLoader
    workers, the cold subprocess), from /proc/<pid>/stat. Once reaped their time moves into
    their parent's cutime/cstime, so nothing is counted twice or lost."""
    parents, times = {}, {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return 0.0
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()  # the name may hold spaces and ')'
        except (OSError, IndexError):
            continue
        pid = int(entry)
        parents[pid] = int(rest[1])
        times[pid] = sum(int(x) for x in rest[11:15]) / CLOCK_TICKS
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    total, stack = 0.0, list(children.get(root_pid, []))
    while stack:
        pid = stack.pop()
        total += times.get(pid, 0.0)
        stack += children.get(pid, [])
    return total


def cpu_snapshot() -> CpuSnapshot:
    t = os.times()
    own = t.user + t.system + t.children_user + t.children_system + descendants_cpu_seconds(os.getpid())
    return CpuSnapshot(time.monotonic(), machine_busy_seconds(), own)


def others_cores(a: CpuSnapshot, b: CpuSnapshot) -> float | None:
    """Cores used on average by other processes between two snapshots."""
    if a.busy is None or b.busy is None:
        return None
    wall = max(b.wall - a.wall, 1e-6)
    return max(0.0, (b.busy - a.busy) - (b.own - a.own)) / wall


def sample_others(seconds: float = SAMPLE_SECONDS) -> float | None:
    """Others' cores while this process sleeps for `seconds`."""
    a = cpu_snapshot()
    time.sleep(seconds)
    return others_cores(a, cpu_snapshot())


class ContentionMonitor:
    """Samples others' CPU use in 1-s windows on a background thread (reads /proc only)."""

    def __init__(self, interval: float = 1.0):
        self.interval, self.windows = interval, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="contention-monitor", daemon=True)

    def _run(self):
        previous = cpu_snapshot()
        while not self._stop.wait(self.interval):
            current = cpu_snapshot()
            value = others_cores(previous, current)
            if value is not None:
                self.windows.append(value)
            previous = current

    def __enter__(self):
        self.start = cpu_snapshot()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.end = cpu_snapshot()
        return False

    @property
    def mean(self) -> float | None:
        return others_cores(self.start, self.end)


def contention_verdict(before, during, after, windows, threshold=CONTENTION_CORES,
                       window_fraction=CONTENTION_WINDOWS) -> tuple[bool | None, list[str]]:
    """(contended: True/False, or None when /proc/stat could not be read; the reasons)."""
    if before is None and during is None and after is None:
        return None, ["no /proc/stat: contention unknown"]
    reasons = [f"other processes used {v:.2f} cores {when}"
               for when, v in (("before the run", before), ("during the run", during), ("after the run", after))
               if v is not None and v > threshold]
    over = sum(v > threshold for v in windows)
    if windows and over > window_fraction * len(windows):
        reasons.append(f"other processes used > {threshold} core in {over} of {len(windows)} 1-s windows")
    return bool(reasons), reasons


# ----------------------------------------------------------------------------- measurements

def median(values):
    return statistics.median(values) if values else None


def rate(n: int, seconds) -> float | None:
    return round(n / seconds, 2) if seconds else None


def batch_sizes(n: int, batch_size: int) -> list[int]:
    """The batch sizes the DataLoader of `score_files` yields for n images."""
    return [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])


def random_batches(input_keys, batch_size: int, count: int, seed: int = 0) -> list[dict]:
    """`count` distinct {(region, size): uint8 (batch_size, 3, size, size)} batches, as
    collate_images gives."""
    import torch
    g = torch.Generator().manual_seed(seed)
    return [{(r, s): torch.randint(0, 256, (batch_size, 3, s, s), dtype=torch.uint8, generator=g)
             for r, s in input_keys} for _ in range(count)]


def batches_for(pool: list[dict], sizes: list[int]):
    for i, b in enumerate(sizes):
        yield {s: t[:b] for s, t in pool[i % len(pool)].items()}


def synchronizer(device):
    import torch
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_bare(detector, pool, sizes) -> float:
    sync = synchronizer(detector.device)
    sync()
    start = time.perf_counter()
    for batch in batches_for(pool, sizes):
        detector.score_crops(batch)
    sync()
    return time.perf_counter() - start


def time_experts(detector, pool, sizes) -> dict:
    """Seconds of `model.predict_proba(x)` alone per expert over all batches (the uint8 -> float
    conversion and the copy to the device happen outside the timer)."""
    import torch

    from common.inputs import to_unit_float
    from ensemble.predictor import input_key
    sync = synchronizer(detector.device)
    out = {}
    for name, model in detector.experts.items():
        total = 0.0
        with torch.no_grad():
            key = input_key(model)
            x = to_unit_float(pool[0][key][:1], detector.device)
            model.predict_proba(x)  # warm-up
            for batch in batches_for(pool, sizes):
                x = to_unit_float(batch[key], detector.device)
                sync()
                start = time.perf_counter()
                model.predict_proba(x)
                sync()
                total += time.perf_counter() - start
        out[name] = {"seconds": round(total, 4), "images_per_s": rate(sum(sizes), total),
                     "input_size": model.image_size}
    return out


def run_infer(infer_module, image_dir: Path, csv_path: Path, args, weights: Path) -> dict:
    """One in-process `python infer.py DIR --csv ...`: total and scoring seconds, rows, rc."""
    import torch

    spans = {}
    original = infer_module.score_images

    def timed_score_images(*a, **k):  # instrumentation only: same call, same result
        start = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            spans["scoring"] = time.perf_counter() - start

    infer_module.score_images = timed_score_images
    try:
        start = time.perf_counter()
        rc = infer_module.main([str(image_dir), "--csv", str(csv_path), "--weights", str(weights),
                                "--batch-size", str(args.batch_size), "--workers", str(args.workers),
                                "--threads", str(torch.get_num_threads()), "--device", args.device]
                               + precision_flag(args))
        total = time.perf_counter() - start
    finally:
        infer_module.score_images = original
    rows = 0
    if csv_path.is_file():
        rows = max(0, len(csv_path.read_text().splitlines()) - 1)
    errors_file = csv_path.with_name(csv_path.name + ".errors")
    unreadable = len(errors_file.read_text().splitlines()) if errors_file.is_file() else 0
    return {"rc": rc, "seconds": total, "scoring_seconds": spans.get("scoring"), "rows": rows,
            "unreadable": unreadable}


def precision_flag(args) -> list[str]:
    return ["--precision", args.precision] if args.precision else []


def cold_infer(image: Path, args, weights: Path) -> dict:
    """Wall time of a fresh `python infer.py ONE_IMAGE` (interpreter, imports, load, one image)."""
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    cmd = [sys.executable, str(REPO / "infer.py"), str(image), "--weights", str(weights),
           "--device", args.device, "--workers", "0"] + precision_flag(args)
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return {"seconds": None, "rc": None, "error": "timed out after 600 s"}
    seconds = time.perf_counter() - start
    result = {"seconds": round(seconds, 3), "rc": proc.returncode}
    if proc.returncode != 0:
        result["error"] = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    return result


def stage_images(images: list[Path], image_dir: Path, all_files: list[Path], tmp: Path) -> Path:
    """A folder holding exactly `images`: IMAGE_DIR itself when it holds nothing else that
    infer.py would score, else symlinks (copies where links fail) in a temp folder."""
    if images == all_files:
        return image_dir
    staged = tmp / "images"
    staged.mkdir()
    for path in images:
        target = staged / path.name
        try:
            target.symlink_to(path.resolve())
        except OSError:
            import shutil
            shutil.copy2(path, target)
    return staged


def bench_training(root: str, epochs: int, overrides: list[str], args, tmp: Path) -> dict:
    """Train every configured expert for `epochs` epochs into tmp; images/s per expert."""
    from experts import train

    keys = {o.split("=", 1)[0] for o in overrides}
    argv = [root]
    if args.threads and "threads" not in keys:
        argv.append(f"threads={args.threads}")
    if args.device != "auto" and "device" not in keys:
        argv.append(f"device={args.device}")
    argv += [*overrides, f"train.epochs={epochs}", f"out={tmp / 'train_weights'}", f"run_dir={tmp / 'train_runs'}"]
    start = time.perf_counter()
    rc = train.main(argv)  # a known error is one line on stderr and rc 2
    seconds = time.perf_counter() - start
    experts = {}
    for metrics in sorted((tmp / "train_runs").glob("*/metrics.json")):
        history = json.loads(metrics.read_text())
        per_epoch = [round(row["train_images_per_s"], 2) for row in history if "train_images_per_s" in row]
        experts[metrics.parent.name] = {"images_per_s": round(median(per_epoch), 2) if per_epoch else None,
                                        "per_epoch": per_epoch, "epochs": len(history)}
    return {"rc": rc, "argv": argv, "seconds": round(seconds, 1), "experts": experts,
            "note": "median over epochs of train_images_per_s (training steps only, no validation)"}


# ----------------------------------------------------------------------------- report

def _fmt(value, unit="", digits=2):
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}{unit}"
    return f"{value}{unit}"


def markdown_report(r: dict) -> str:
    m, s, e, b = r["machine"], r["startup"], r["end_to_end"], r["bare"]
    c = r["contention"]
    lines = [
        f"# Speed benchmark ({r['date']})", "",
        f"{r['n_images']} images of `{r['image_dir']}`, batch {r['batch_size']}, DataLoader workers {r['workers']}, "
        f"{r['threads']} torch threads, device {r['device']} ({r.get('precision', 'fp32')}), "
        f"{r['repeats']} repeat(s) (median); "
        f"experts {', '.join(r['experts'])} (inputs {r['input_sizes']} px), ensemble {r['ensemble']}"
        + (f", TTA {'+'.join(r['tta'])}" if r["tta"] else "") + ".",
        f"Machine: {m['cpu_model']}, {m['cpus_usable']} of {m['cpu_count']} CPUs, {m.get('gpu', 'no GPU')}, "
        f"{m['platform']}; torch {r['versions'].get('torch')}; commit {str(r['git']['commit'])[:10]}"
        + (" (dirty)" if r["git"]["dirty"] else "") + ".", "",
        "| measure | value | notes |", "|---|---:|---|",
        f"| end to end (`infer.main`, CSV) | {_fmt(e['images_per_s'], ' img/s')} | "
        f"decode, face crop, transforms, experts, stacking, CSV, weights load; {e['unreadable']} unreadable |",
        f"| end to end, scoring only | {_fmt(e['scoring_images_per_s'], ' img/s')} | without weights load and CSV |",
        f"| bare `score_crops` | {_fmt(b['images_per_s'], ' img/s')} | random ready tensors, all experts + stacker |",
    ]
    for name, x in b["experts"].items():
        lines.append(f"| bare `{name}.predict_proba` | {_fmt(x['images_per_s'], ' img/s')} | "
                     f"{x['input_size']} px, one view |")
    lines += [
        f"| ratio end to end / bare | {_fmt(r['ratio'], '', 3)} | "
        f"scoring only: {_fmt(r['ratio_scoring'], '', 3)}; target >= 0.9 on CPU |",
        f"| import (torch, infer, predictor) | {_fmt(s['import_s'], ' s')} | in-process"
        + (f"; already imported: {', '.join(s['already_imported'])}" if s["already_imported"] else "") + " |",
        f"| weights load (`EnsembleDetector.from_weights`) | {_fmt(s['load_s'], ' s')} | in-process |",
        f"| cold `python infer.py ONE_IMAGE` | {_fmt(s['cold_infer'].get('seconds'), ' s')} | "
        f"{'skipped' if s['cold_infer'].get('skipped') else 'fresh process, wall time'} |",
        f"| peak RSS | {_fmt(r['memory']['peak_rss_mb'], ' MiB', 0)} | this process (largest child: "
        f"{_fmt(r['memory']['peak_rss_children_mb'], ' MiB', 0)}) |",
    ]
    if r["memory"].get("cuda_peak_mb") is not None:
        lines.append(f"| peak CUDA memory | {_fmt(r['memory']['cuda_peak_mb'], ' MiB', 0)} | allocated |")
    if r.get("train"):
        t = r["train"]
        if "error" in t:
            lines.append(f"| training | failed | {t['error']} |")
        for name, x in t.get("experts", {}).items():
            lines.append(f"| training `{name}` | {_fmt(x['images_per_s'], ' img/s')} | "
                         f"{x['epochs']} epoch(s): {x['per_epoch']} |")
    verdict = {True: "**CONTENDED**", False: "quiet", None: "unknown"}[c["contended"]]
    lines.append(f"| other processes' CPU | {verdict} | cores before {_fmt(c['others_cores_before'])}, "
                 f"during {_fmt(c['others_cores_during'])}, after {_fmt(c['others_cores_after'])}; "
                 f"{c['windows_over']} of {c['windows']} 1-s windows > {c['threshold_cores']} |")
    if c["reasons"]:
        lines += ["", "Contention: " + "; ".join(c["reasons"]) + "."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main

def parse_args(argv):
    parser = CommandLine("python -m bench.speed", __doc__, positional="IMAGE_DIR")
    parser.add_argument("--weights", type=Path, default=REPO / "weights")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int,
                        help="as infer.py --workers (default: infer.py's for the device, once the weights are loaded)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads, of the pipeline and the bare passes alike (0 = infer.py's default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--limit", type=int, default=0, help="only the first N images (0 = all)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    # the choices of ensemble.predictor.PRECISIONS, spelled out: importing it here would import
    # torch before the start-up measurement does
    parser.add_argument("--precision", default="", choices=["", "auto", "fp32", "bf16"],
                        help="as infer.py --precision (default: its default), for the pipeline and the bare passes")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold `python infer.py` subprocess")
    parser.add_argument("--allow-contention", action="store_true",
                        help="exit 0 even when other processes competed for the CPU (still recorded)")
    parser.add_argument("--train", metavar="DATA_ROOT", help="also measure training images/s per expert")
    parser.add_argument("--train-epochs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS_speed.json"))
    args = parser.parse_args(argv)
    args.image_dir = Path(args.positional)
    if args.config_argv and not args.train:
        parser.error(f"the profile and key=value overrides {args.config_argv} only apply with --train")
    if args.batch_size < 1 or args.repeats < 1 or (args.workers or 0) < 0 or args.limit < 0 or args.threads < 0 \
            or args.train_epochs < 1:
        parser.error("--batch-size, --repeats and --train-epochs must be >= 1; --workers, --limit, --threads >= 0")
    return args


@entry_point
def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.image_dir.is_dir():
        print(f"error: {args.image_dir}: not a directory", file=sys.stderr)
        return EXIT_USAGE
    command = " ".join(shlex.quote(str(a)) for a in ["python", "-m", "bench.speed",
                                                     *(sys.argv[1:] if argv is None else argv)])
    load_before = loadavg()
    others_before = sample_others()

    with ContentionMonitor() as monitor, tempfile.TemporaryDirectory(prefix="bench_speed_") as tmp_name:
        tmp = Path(tmp_name)
        result, code = measure(args, tmp)
        if code == EXIT_USAGE:
            return code
        if args.train:
            print(f"== training for {args.train_epochs} epoch(s) on {args.train}", file=sys.stderr)
            result["train"] = bench_training(args.train, args.train_epochs, args.config_argv, args, tmp)
            result["memory"]["peak_rss_with_training_mb"] = peak_rss_mb()
            if result["train"].get("error") or result["train"].get("rc"):
                code = EXIT_FAILED
    others_after = sample_others()
    load_after = loadavg()

    during = monitor.mean
    contended, reasons = contention_verdict(others_before, during, others_after, monitor.windows)
    rnd = lambda v: None if v is None else round(v, 3)  # noqa: E731
    result["contention"] = {
        "threshold_cores": CONTENTION_CORES, "window_fraction": CONTENTION_WINDOWS,
        "loadavg_before": load_before, "loadavg_after": load_after,
        "others_cores_before": rnd(others_before), "others_cores_during": rnd(during),
        "others_cores_after": rnd(others_after), "windows": len(monitor.windows),
        "windows_over": sum(v > CONTENTION_CORES for v in monitor.windows),
        "max_window_cores": rnd(max(monitor.windows, default=None)) if monitor.windows else None,
        "contended": contended, "reasons": reasons, "allowed": args.allow_contention,
    }
    result["contended"] = contended
    result["command"] = command
    result["wall_s"] = round(time.monotonic() - monitor.start.wall, 1)

    report = markdown_report(result)
    print(report, end="")
    with atomic_write(args.out) as f:
        f.write(json.dumps(result, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)
    if contended and not args.allow_contention:
        print("error: other processes competed for the CPU during the benchmark (" + "; ".join(reasons) +
              "); the numbers are not trustworthy. Rerun on a quiet machine or pass --allow-contention.",
              file=sys.stderr)
        return EXIT_CONTENDED
    return code


def measure(args, tmp: Path) -> tuple[dict, int]:
    """Everything but training and the contention verdict: (results, exit code so far)."""
    start = time.perf_counter()
    already = [m for m in ("torch", "infer", "ensemble.predictor") if m in sys.modules]
    import torch

    import infer
    from ensemble.predictor import EnsembleDetector
    import_s = time.perf_counter() - start
    if args.threads:
        torch.set_num_threads(args.threads)
    from data_prep.video import is_video_file
    from experts.weights import WeightsError

    files, _, _ = infer.expand_inputs([str(args.image_dir)])
    all_images = [p for p in files if not is_video_file(p)]
    images = all_images[: args.limit] if args.limit else all_images
    if not images:
        print(f"error: {args.image_dir}: no images", file=sys.stderr)
        return {}, EXIT_USAGE
    n = len(images)
    image_dir = stage_images(images, args.image_dir, files, tmp)

    start = time.perf_counter()
    try:
        detector = EnsembleDetector.from_weights(args.weights, device=args.device,
                                                 **({"precision": args.precision} if args.precision else {}))
    except WeightsError as err:
        print(f"error: {err}", file=sys.stderr)
        return {}, EXIT_USAGE
    load_s = time.perf_counter() - start
    # infer.py's defaults for --workers and --threads on this device; the bare passes then run
    # on the threads the pipeline gets
    infer.set_cpu_threads(args, detector.device)
    if detector.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(detector.device)

    sizes = batch_sizes(n, args.batch_size)
    pool = random_batches(detector.input_keys, args.batch_size, min(len(sizes), BATCH_POOL))
    time_bare(detector, pool, sizes[:1])  # warm-up: first-call allocations, lazy inits
    bare_s, runs, code = [], [], 0
    for i in range(args.repeats):  # interleaved, so a drift hits both alike
        bare_s.append(time_bare(detector, pool, sizes))
        run = run_infer(infer, image_dir, tmp / f"scores_{i}.csv", args, args.weights)
        runs.append(run)
        print(f"repeat {i + 1}/{args.repeats}: bare {n / bare_s[-1]:.1f} img/s, end to end "
              f"{n / run['seconds']:.1f} img/s", file=sys.stderr)
        if run["rc"] != 0 or run["rows"] != n:
            print(f"error: infer.main returned {run['rc']} with {run['rows']} of {n} rows", file=sys.stderr)
            code = EXIT_FAILED
    per_expert = time_experts(detector, pool, sizes)
    cold = {"skipped": True} if args.no_cold else cold_infer(images[0], args, args.weights)
    if cold.get("error"):
        print(f"error: cold infer.py run failed: {cold['error']}", file=sys.stderr)
        code = EXIT_FAILED

    e2e_s = median([r["seconds"] for r in runs])
    scoring = [r["scoring_seconds"] for r in runs if r["scoring_seconds"]]
    bare_median = median(bare_s)
    e2e_rate, bare_rate = rate(n, e2e_s), rate(n, bare_median)
    scoring_rate = rate(n, median(scoring))
    stacker = detector.stacker
    result = {
        "benchmark": "speed", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "image_dir": str(args.image_dir), "n_images": n, "limit": args.limit or None,
        "batch_size": args.batch_size, "workers": args.workers, "repeats": args.repeats,
        "device": str(detector.device), "precision": detector.precision, "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "weights": str(args.weights),
        "experts": list(detector.experts), "input_sizes": sorted({s for _, s in detector.input_keys}),
        "tta": list(detector.tta),
        "ensemble": getattr(stacker, "method_", None) or ("stacker" if stacker is not None else "mean"),
        "startup": {"import_s": round(import_s, 3), "already_imported": already, "load_s": round(load_s, 3),
                    "in_process_s": round(import_s + load_s, 3), "cold_infer": cold},
        "end_to_end": {"images_per_s": e2e_rate, "seconds": [round(r["seconds"], 3) for r in runs],
                       "scoring_images_per_s": scoring_rate, "scoring_seconds": [round(s, 3) for s in scoring],
                       "rc": [r["rc"] for r in runs], "rows": runs[-1]["rows"], "unreadable": runs[-1]["unreadable"]},
        "bare": {"images_per_s": bare_rate, "seconds": [round(s, 4) for s in bare_s],
                 "batches": len(sizes), "experts": per_expert},
        "ratio": round(e2e_rate / bare_rate, 4) if e2e_rate and bare_rate else None,
        "ratio_scoring": round(scoring_rate / bare_rate, 4) if scoring_rate and bare_rate else None,
        "memory": {"peak_rss_mb": peak_rss_mb(), "peak_rss_children_mb": peak_rss_mb(resource.RUSAGE_CHILDREN),
                   "cuda_peak_mb": round(torch.cuda.max_memory_allocated(detector.device) / 2**20, 1)
                   if detector.device.type == "cuda" else None},
        "machine": machine_info(), "versions": library_versions(), "git": git_state(),
    }
    return result, code


if __name__ == "__main__":
    sys.exit(main())
