"""The ensemble, above the experts: the trained detector, the stacker, and what they report.

    predictor            EnsembleDetector: experts + stacker loaded from weights/, scoring files
    combiners, stacking  how expert scores are combined; the scikit-learn stacker choosing among them
    fit                  the command that fits the stacker on held-out scores
    evaluate, reports, visuals, gradcam   the evaluation command, its files and its figures
    onnx_backend         the experts as onnxruntime sessions (infer.py --backend onnx)
"""
