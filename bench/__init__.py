"""Benchmarks of the trained detector, each run from the repository root as `python -m bench.NAME`:
speed, onnx_speed, quality, precision, face_detectors, ablation, generalization."""
