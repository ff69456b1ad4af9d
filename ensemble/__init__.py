"""Score fusion, evaluation metrics, plots and Grad-CAM for the deepfake experts."""
