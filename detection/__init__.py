"""Detectors on ResNet-18/34 pyramids, COCO data, training and evaluation."""

from .checkpoint import atomic_save
from .models import ARCHS, BACKBONES, build_detector, load_detector, rebuild_detector, save_detector

__all__ = ["ARCHS", "BACKBONES", "atomic_save", "build_detector", "load_detector", "rebuild_detector", "save_detector"]
