"""The way out: export (ONNX, TorchScript, int8), runtimes (ONNX Runtime, OpenVINO), the fast PyTorch path, Predictor.

``open_model`` opens any model file this project writes (checkpoint or exported, detector or
segmenter) and ``open_predictor`` gives its task's predictor; ``Predictor`` runs any detector file this project writes behind one call; ``deploy.files``
says what a file is from its bytes; ``load_exported`` runs an exported file behind a
PyTorch detector's call, so evaluation and inference take either.
"""

from .export import ExportError, export_detector, export_onnx, export_torchscript, quantize_onnx
from .fast import optimize_for_inference
from .opening import OpenedModel, load_model, open_model
from .predictor import Prediction, Predictor, open_predictor
from .seg_predictor import SegmentationPredictor, SegmentationResult
from .runtime import ExportedDetector, load_exported

__all__ = [
    "ExportError",
    "ExportedDetector",
    "OpenedModel",
    "Prediction",
    "Predictor",
    "SegmentationPredictor",
    "SegmentationResult",
    "export_detector",
    "export_onnx",
    "export_torchscript",
    "load_exported",
    "load_model",
    "open_model",
    "open_predictor",
    "optimize_for_inference",
    "quantize_onnx",
]
