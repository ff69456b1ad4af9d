"""The detector with its experts run by onnxruntime (`infer.py --backend onnx`).

    detector = onnx_detector("onnx")             # the folder (or manifest .json) experts.export_onnx wrote
    p_fake, per_expert = detector.score_crops({size: uint8 tensor (B, 3, size, size)})

Only the experts' forward passes change: each exported expert is wrapped in `OnnxExpert`,
which offers what `ensemble.predictor.EnsembleDetector` uses of a torch expert (`image_size`,
`region`, `predict_proba`), so decoding, face crop,
resizing, TTA views, the stacker and the CSV are the torch backend's own code, and the two
backends score alike (tests/test_onnx.py).
onnxruntime is imported only here, so the torch backend never needs it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from configs import FaceConfig, without_removed
from ensemble.predictor import EnsembleDetector
from experts.export_onnx import OUTPUT_NAME, import_optional, read_onnx_manifest, verified_onnx_file
from experts.weights import WeightsError


class OnnxExpert:
    """An exported expert in an onnxruntime session, on the CPU with `threads` threads."""

    def __init__(self, path: Path, image_size: int, threads: int, region: str = "face"):
        ort = import_optional("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1  # one graph at a time; its operators use the threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime's own exception types: not an ONNX model, bad graph
            reason = str(err).strip().splitlines()[0][:200]
            raise WeightsError(f"{path}: onnxruntime cannot load it: {reason}") from None
        self.input_name = self.session.get_inputs()[0].name
        self.image_size, self.region = image_size, region

    def predict_proba(self, crops: torch.Tensor) -> torch.Tensor:
        """P(fake) (B,) of a float crop batch in [0, 1], as `Expert.predict_proba`: the output
        named p_fake (any other output of an older export is not computed)."""
        (p_fake,) = self.session.run([OUTPUT_NAME], {self.input_name: crops.float().cpu().numpy()})
        return torch.from_numpy(p_fake)


def onnx_detector(location, experts: list[str] | None = None, tta: list[str] | None = None,
                  threads: int | None = None) -> EnsembleDetector:
    """Like `EnsembleDetector.from_weights`, from an ONNX export: the stacker's experts (else all,
    or `experts`), the stacker when they are exactly its experts (else their plain mean),
    its TTA views unless `tta` says otherwise. `threads`: onnxruntime's threads per expert,
    by default torch's, so that both backends get the same share of the CPU."""
    folder, manifest = read_onnx_manifest(location)
    available = list(manifest.get("experts", {}))
    ensemble = manifest.get("ensemble")
    names = experts or (ensemble["experts"] if ensemble else available)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise WeightsError(f"{folder}: no exported expert(s) {unknown}; available: {available}")
    threads = threads or torch.get_num_threads()
    loaded = {}
    for name in names:
        entry = manifest["experts"][name]
        loaded[name] = OnnxExpert(verified_onnx_file(folder, entry, f"expert {name!r}"), entry["input_size"], threads,
                                  entry.get("region", "face"))
    stacker = None
    if ensemble and list(ensemble["experts"]) == list(names):  # a subset falls back to the plain mean
        from ensemble.stacking import StackingEnsemble
        without_removed(ensemble, "ensemble.", str(location))  # one fitted on removed inputs: an error
        stacker = StackingEnsemble.from_state(json.loads(verified_onnx_file(folder, ensemble, "ensemble").read_text()))
        tta = ensemble.get("tta", []) if tta is None else tta
    return EnsembleDetector(loaded, FaceConfig(**manifest["face"]), torch.device("cpu"), list(tta or []), stacker)
