"""What every stage shares, below all of them: imports flow data_prep -> experts -> ensemble ->
scripts (infer.py, bench/, train.sh), and each of those may import from here and from `configs`.

    common.cli       the one command-line parser and the entry-point wrapper (errors -> one line)
    common.errors    the project's known-error classes
    common.runtime   device, seeds and mixed precision
    common.files     atomic_write, write_files_atomically: no reader ever sees half a file
    common.inputs    the model input convention: uint8 -> float in [0, 1], ImageNet mean/std
    common.metrics   AUC, AP, EER, TPR at FPR, ECE, Brier, thresholds, markdown tables
    common.plots     ROC, histograms, reliability, t-SNE and heat-map figures
"""
