"""Export the trained experts to ONNX, to score with onnxruntime (`infer.py --backend onnx`).

    python -m experts.export_onnx --weights weights --out onnx              # a folder
    python -m experts.export_onnx --weights weights --out deploy/detector.json
    python infer.py DIR --csv out.csv --weights onnx --backend onnx

Each expert becomes `<name>.onnx`: its forward pass from a float32 batch of face crops in
[0, 1] (B, 3, S, S), S its input size, the batch axis dynamic, to P(fake) (B,), with its
normalisation and fixed filters (SRM residuals, forensic statistics) inside, so a caller
decodes, crops and resizes as `infer.py` does and nothing more. Float rather than uint8
input, because the test-time augmentation views (a zoom) are not whole numbers. The stacker
stays the JSON it is (`ensemble.json`, copied beside them). The ONNX manifest
(`onnx_manifest.json` in the folder, or the .json named by --out) records the sha256 of every
file it lists, the sha256 of the .safetensors each expert came from, the experts' names,
kinds and input sizes, the face-crop settings, the TTA views and the opset; loading checks
the hashes, as for the torch weights.

The experts exported by default are the ones `infer.py` would use: the stacker's, else all
(`--experts` picks others). Every expert kind of the project exports (the forensic spectrum
is a matrix product rather than an FFT for this). One that does not is named, with the
reason, on one line, and left out; the stacker, fitted on all of them, is then left out too
and the exported experts are averaged, as `infer.py --experts` does with a subset. Each
export is checked before it is written: onnxruntime's P(fake) on a random batch must equal
torch's within `TOLERANCE`.
"""
from __future__ import annotations

import hashlib
import io
import json
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from common.cli import CommandLine, entry_point
from common.errors import UsageError, UserError
from common.files import write_files_atomically
from configs import without_removed
from experts.weights import (
    MANIFEST,
    WeightsError,
    library_versions,
    load_expert,
    read_manifest,
    sha256_file,
    verified_file,
)

ONNX_MANIFEST = "onnx_manifest.json"
FORMAT_VERSION = 1
OPSET = 17            # run by onnxruntime 1.13 and later; fully covered by torch's TorchScript exporter
TOLERANCE = 1e-4      # largest |P(fake) difference| accepted between onnxruntime and torch
INPUT_NAME, OUTPUT_NAME = "crops", "p_fake"


class OnnxUnavailable(UserError, ImportError):
    """onnx or onnxruntime is not installed (they are needed only to export or run ONNX)."""


def import_optional(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise OnnxUnavailable(f"the {module} package is not installed; `pip install -r requirements.txt` "
                              f"installs it (it is only needed for ONNX)") from None


class ProbabilityOfFake(nn.Module):
    """The graph that is exported: an expert's P(fake) from a float crop batch in [0, 1]."""

    def __init__(self, expert: nn.Module):
        super().__init__()
        self.expert = expert

    def forward(self, crops: torch.Tensor):
        return self.expert.predict_proba(crops)


def onnx_bytes(expert: nn.Module) -> bytes:
    """The expert as an ONNX model. The TorchScript-based exporter (dynamo=False): a second
    per expert where torch.export's takes 3-6 (measured on the cpu experts), and it needs no
    onnxscript. Its deprecation notice and its tracer warnings (shapes that are constant
    because every expert has one input size) are silenced."""
    graph = ProbabilityOfFake(expert).eval()  # the exporter restores the top module's mode to all
    example = torch.rand(2, 3, expert.image_size, expert.image_size, generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, (example,), buffer, dynamo=False, opset_version=OPSET,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, OUTPUT_NAME)})
    return buffer.getvalue()


def largest_difference(expert: nn.Module, model: bytes) -> float:
    """max |difference| between onnxruntime's and torch's P(fake) on a random batch of 4 crops."""
    ort = import_optional("onnxruntime")
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    crops = torch.rand(4, 3, expert.image_size, expert.image_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = ProbabilityOfFake(expert)(crops)
    (got,) = session.run(None, {INPUT_NAME: crops.numpy()})
    return float(abs(got - expected.float().numpy()).max())


def output_paths(out: Path) -> tuple[Path, Path]:
    """(folder, manifest path) for --out: a folder, or the manifest's .json path."""
    if out.suffix == ".onnx":
        raise UsageError(f"--out {out}: one .onnx file is written per expert; give a folder or "
                         f"the .json path of the ONNX manifest")
    if out.suffix != ".json":
        return out, out / ONNX_MANIFEST
    if out.name in (MANIFEST, "ensemble.json"):
        raise UsageError(f"--out {out}: that name belongs to the torch weights; choose another")
    return out.parent, out


def select_experts(weights: Path, manifest: dict, requested: list[str] | None) -> list[str]:
    """The experts `infer.py` would use (see `EnsembleDetector.from_weights`), checked."""
    available = list(manifest.get("experts", {}))
    stacker = manifest.get("ensemble", {}).get("stacker")
    names = requested or (stacker["experts"] if stacker else available)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise WeightsError(f"{weights}: no expert(s) {unknown}; available: {available}")
    faces = {json.dumps(manifest["experts"][n]["face"], sort_keys=True) for n in names}
    if len(faces) > 1:
        raise WeightsError(f"{weights}: experts {names} were trained with different face-crop "
                           f"settings; export them separately")
    return names


def export(weights: Path, out: Path, requested: list[str] | None = None) -> Path:
    """Export, verify and write the experts and the manifest; return the manifest's path."""
    import_optional("onnx")  # torch's exporter needs it, and would fail per expert without it
    ort = import_optional("onnxruntime")
    folder, manifest_path = output_paths(out)
    manifest = read_manifest(weights)
    names = select_experts(weights, manifest, requested)
    exported, files, not_exported = {}, {}, {}
    for name in names:
        expert, entry = load_expert(weights, name, "cpu")
        try:
            model = onnx_bytes(expert)
            difference = largest_difference(expert, model)
        except Exception as err:  # an operator ONNX has no equivalent for, a tracing failure
            not_exported[name] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"
        else:
            if difference > TOLERANCE:
                not_exported[name] = f"onnxruntime's P(fake) differs from torch's by {difference:.2g}"
        if name in not_exported:
            print(f"warning: expert {name!r} ({entry['kind']}) cannot be exported to ONNX; left out: "
                  f"{not_exported[name]}", file=sys.stderr)
            continue
        path = folder / f"{name}.onnx"
        files[path] = model
        exported[name] = {"file": path.name, "sha256": hashlib.sha256(model).hexdigest(), "kind": entry["kind"],
                          "input_size": expert.image_size, "region": expert.region, "outputs": [OUTPUT_NAME],
                          "source_file": entry["file"],
                          "source_sha256": entry["sha256"], "max_difference_from_torch": difference}
        print(f"{name}: {path} ({len(model) / 1e6:.2f} MB), max |P(fake) onnxruntime - torch| "
              f"{difference:.1e}", file=sys.stderr)
    if not exported:
        raise WeightsError(f"{weights}: none of the experts {names} could be exported to ONNX")

    onnx_manifest = {
        "format": FORMAT_VERSION, "opset": OPSET, "input": INPUT_NAME, "output": OUTPUT_NAME,
        "input_description": "float32 face crops (batch, 3, input_size, input_size), RGB in [0, 1]",
        "output_description": "P(fake) (batch,)",
        "experts": exported, "face": manifest["experts"][names[0]]["face"],
        "source": {"weights": str(weights.resolve()), "manifest_sha256": sha256_file(weights / MANIFEST)},
        "versions": {**library_versions(), "onnx": import_optional("onnx").__version__,
                     "onnxruntime": ort.__version__},
        "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if not_exported:
        onnx_manifest["not_exported"] = not_exported
    stacker = manifest.get("ensemble", {}).get("stacker")
    if stacker and list(stacker["experts"]) == list(exported):
        without_removed(stacker, "ensemble.", str(weights / MANIFEST))  # one fitted on removed inputs: an error
        source = verified_file(weights, stacker, "ensemble")
        files[folder / source.name] = source.read_bytes()
        onnx_manifest["ensemble"] = {"file": source.name, "sha256": stacker["sha256"],
                                     "experts": list(stacker["experts"]), "tta": stacker.get("tta", [])}
    elif stacker:
        print(f"warning: the stacker combines {stacker['experts']}, not the exported {list(exported)}: "
              f"it is left out and the ONNX ensemble averages them", file=sys.stderr)
    # The manifest last: a failed write leaves the previous export whole, and a reader never
    # sees a manifest naming files that are not there yet.
    files[manifest_path] = json.dumps(onnx_manifest, indent=2).encode()
    write_files_atomically(files)
    return manifest_path


def read_onnx_manifest(location) -> tuple[Path, dict]:
    """(folder, manifest) from an export's folder or its manifest .json, checked."""
    location = Path(location)
    path = location if location.suffix == ".json" else location / ONNX_MANIFEST
    if not path.is_file():
        hint = " (these are torch weights)" if (location / MANIFEST).is_file() else ""
        raise WeightsError(f"{path}: no ONNX export here{hint}; run `python -m experts.export_onnx "
                           f"--weights WEIGHTS --out {location}` first")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WeightsError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        raise WeightsError(f"{path}: not an ONNX manifest of format {FORMAT_VERSION}")
    return path.parent, manifest


def verified_onnx_file(folder: Path, entry: dict, what: str) -> Path:
    """The file an ONNX manifest entry names, which must be a plain name in its folder and
    have the recorded sha256 (a changed or corrupt file is refused)."""
    name = entry.get("file")
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise WeightsError(f"{folder / ONNX_MANIFEST}: {what} file {name!r} is not a file name in {folder}")
    path = folder / name
    if not path.is_file():
        raise WeightsError(f"{path}: {what} file is missing")
    if sha256_file(path) != entry.get("sha256"):
        raise WeightsError(f"{path}: sha256 does not match the ONNX manifest (file changed or corrupt); "
                           f"export again")
    return path


@entry_point
def main(argv=None) -> int:
    parser = CommandLine("python -m experts.export_onnx", __doc__, config=False)
    parser.add_argument("--weights", type=Path, default=Path("weights"), help="trained weights folder")
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder, or the .json path of the ONNX manifest (the .onnx files go beside it)")
    parser.add_argument("--experts", help="comma-separated experts to export (default: the stacker's, else all)")
    args = parser.parse_args(argv)
    path = export(args.weights, args.out, args.experts.split(",") if args.experts else None)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
