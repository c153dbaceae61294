"""Detectors on ResNet-18/34 pyramids: builders, COCO data, training, evaluation, inference."""

from .checkpoint import atomic_save, load_detector, save_detector
from .evaluation import evaluate
from .export import ExportError, export_detector, export_onnx, export_torchscript, quantize_onnx
from .fast import optimize_for_inference
from .models import ARCHS, BACKBONES, build_detector, count_parameters, rebuild_detector
from .predictor import Prediction, Predictor, load_model
from .runtime import ExportedDetector, load_exported

__all__ = [
    "ARCHS",
    "BACKBONES",
    "ExportError",
    "ExportedDetector",
    "Prediction",
    "Predictor",
    "atomic_save",
    "build_detector",
    "count_parameters",
    "evaluate",
    "export_detector",
    "export_onnx",
    "export_torchscript",
    "load_detector",
    "load_exported",
    "load_model",
    "optimize_for_inference",
    "quantize_onnx",
    "rebuild_detector",
    "save_detector",
]
