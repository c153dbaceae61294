"""The way out: export (ONNX, TorchScript, int8), runtimes (ONNX Runtime, OpenVINO), the fast PyTorch path, Predictor.

``Predictor`` runs any model file this project writes behind one call; ``deploy.files``
says what a file is from its bytes; ``load_exported`` runs an exported file behind a
PyTorch detector's call, so evaluation and inference take either.
"""

from .export import ExportError, export_detector, export_onnx, export_torchscript, quantize_onnx
from .fast import optimize_for_inference
from .predictor import Prediction, Predictor, load_model
from .runtime import ExportedDetector, load_exported

__all__ = [
    "ExportError",
    "ExportedDetector",
    "Prediction",
    "Predictor",
    "export_detector",
    "export_onnx",
    "export_torchscript",
    "load_exported",
    "load_model",
    "optimize_for_inference",
    "quantize_onnx",
]
