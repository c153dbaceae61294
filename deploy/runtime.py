"""Run an exported detector behind the call of an eval-mode torchvision detector.

``load_exported(path)`` returns an object that is called as ``model(images)`` with a
list of float32 ``[3, H, W]`` tensors in [0, 1] and returns one dict per image with
``boxes`` (float32 ``[N, 4]`` xyxy in that image's pixels), ``labels`` (int64
contiguous labels 1..K), ``scores`` and, for Mask R-CNN, ``masks`` (``[N, 1, H, W]``
probabilities), exactly as the PyTorch model does, so ``detection.evaluation.evaluate``
and the tools take it unchanged. It reads the class names and category ids from the
file (``category_mapping``) and says what actually ran (``runtime``, ``precision``).

ONNX files run with ONNX Runtime (default) or OpenVINO; OpenVINO's CPU plugin would
run in bf16 on CPUs with AVX-512 bf16 unless told otherwise, so the precision is
always set explicitly (``INFERENCE_PRECISION_HINT``) and named. TorchScript files
(``tools/export.py --format torchscript``) run with ``torch.jit.load``.

An exported segmenter (``deploy.segmenter``) loads, by the same call, as an
``ExportedSegmenter``: called as the eager segmenter is, ``model(images)`` with an
ImageNet-normalised float32 ``[N, 3, H, W]`` batch, it returns ``{"out": logits}``
(``[N, num_classes, H, W]``), so ``segmentation.evaluation.evaluate_segmenter`` and
``segmentation.SegmentationPredictor`` take it unchanged; it carries ``class_names``,
``build_args`` and ``train_config`` from the file.
"""

import functools
import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import paste_masks_in_image

from .files import EXPORTED_RUNTIMES, NMS_WITHOUT_BRANCH, TASKS, FileFormatError, read_exported_metadata, resolve_runtime

__all__ = ["EXPORTED_RUNTIMES", "ExportedDetector", "ExportedSegmenter", "RuntimeUnavailableError", "load_exported", "openvino_core"]

log = logging.getLogger(__name__)

_OPENVINO_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}


class RuntimeUnavailableError(ImportError):
    """The runtime asked for is not installed; the message names the package."""


def _import(module: str, package: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise RuntimeUnavailableError(f"runtime {package!r} is not installed: pip install {package} (or pip install -e '.[deploy]')") from None


class ExportedDetector:
    """An exported detector with a PyTorch detector's inference call (CPU only).

    Build it with ``load_exported``.

    Args:
        run: one image as a float32 ``[3, H, W]`` array -> the file's outputs in order.
        output_names: names of those outputs (``boxes``, ``labels``, ``scores`` [, ``mask_probs``,
            pasted here into ``masks`` as torchvision pastes them, or ``masks``]).
        metadata: the file's ``resfpn.*`` metadata (decoded).
        runtime: what runs it, e.g. ``"onnxruntime"``.
        precision: what precision actually runs, e.g. ``"fp32"``, ``"int8"``, ``"bf16"``.
        path: the file.

    Attributes:
        category_mapping: ``{"cat_ids": [...], "names": [...]}`` from the file, or ``None``.
        train_config: the checkpoint's training config recorded in the file, or ``None``.
        has_masks: whether it predicts masks (Mask R-CNN).
        runtime: ``"<runtime> <precision>"``, e.g. ``"openvino int8"``.
        precision: the precision part alone.
        inference_precision: OpenVINO only: the compiled model's own
            ``INFERENCE_PRECISION_HINT`` read back (``"f32"``, ``"bf16"``), what its CPU
            plugin really runs; ``None`` for the other runtimes.
        openvino_model: OpenVINO only: the compiled model (``Predictor.stream`` makes several
            inference requests on it); ``None`` for the other runtimes.
        openvino_config: OpenVINO only: the properties it was compiled with.
        metadata: everything the file records (``deploy.files.read_exported_metadata``).
    """

    def __init__(
        self, run: Callable[[np.ndarray], Sequence[np.ndarray]], output_names: Sequence[str], *,
        metadata: Mapping[str, Any], runtime: str, precision: str, path: "str | os.PathLike[str]",
    ) -> None:
        self._run = run
        self.output_names = list(output_names)
        self.metadata = dict(metadata)
        self.category_mapping: Optional[dict[str, Any]] = self.metadata.get("category_mapping")
        self.train_config: Optional[dict[str, Any]] = self.metadata.get("train_config")
        self.has_masks = "masks" in self.output_names or "mask_probs" in self.output_names
        self.precision = precision
        self.inference_precision: Optional[str] = None
        self.openvino_model: Any = None
        self.openvino_config: Optional[dict[str, Any]] = None
        self.runtime = f"{runtime} {precision}"
        self.path = Path(path)
        self.training = False

    def __call__(self, images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        if isinstance(images, Tensor):
            raise TypeError(f"expected a list of [3, H, W] image tensors, got one tensor of shape {tuple(images.shape)}")
        return [self._result(self._run(self._array(image)), tuple(image.shape[-2:])) for image in images]

    # The two halves of a call, apart so that deploy.predictor can keep several OpenVINO requests in flight between them.
    def _array(self, image: Tensor) -> np.ndarray:
        """``image`` checked, as the float32 ``[3, H, W]`` array the file takes."""
        if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3:
            shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise ValueError(f"expected float32 [3, H, W] RGB images in [0, 1], got {shape}")
        if image.device.type != "cpu":
            raise ValueError(f"exported detectors run on the CPU; got an image on {image.device}")
        return image.detach().to(torch.float32).contiguous().numpy()

    def _result(self, outputs: Sequence[np.ndarray], size: tuple[int, int]) -> dict[str, Tensor]:
        """The file's outputs for an image of ``size`` (height, width) as the PyTorch model's dict."""
        result = {name: torch.from_numpy(np.asarray(value)) for name, value in zip(self.output_names, outputs)}
        result["labels"] = result["labels"].to(torch.int64)
        if "mask_probs" in result:
            result["masks"] = paste_masks_in_image(result.pop("mask_probs"), result["boxes"], size, padding=1)
        return result

    forward = __call__

    def eval(self) -> "ExportedDetector":
        """No-op (exported files are inference-only); returns self."""
        return self

    def train(self, mode: bool = True) -> "ExportedDetector":
        """``train(False)`` is a no-op; an exported file cannot be trained."""
        if mode:
            raise ValueError(f"{self.path} is an exported inference file; train the PyTorch checkpoint instead")
        return self

    def to(self, device: "str | torch.device" = "cpu", *args: Any, **kwargs: Any) -> "ExportedDetector":
        """CPU only: returns self for ``"cpu"``, raises for any other device."""
        if torch.device(device).type != "cpu":
            raise ValueError(f"{self.runtime} runs on the CPU; got device {str(device)!r} (use the PyTorch checkpoint on GPUs)")
        return self

    def __repr__(self) -> str:
        return f"ExportedDetector({str(self.path)!r}, runtime={self.runtime!r}, arch={self.metadata.get('arch')!r})"


class ExportedSegmenter(nn.Module):
    """An exported segmenter with the eager segmenter's call (CPU only): normalised batch in, ``{"out": logits}`` out.

    Build it with ``load_exported``. It is an ``nn.Module`` without parameters, so code
    written for the eager model (``model.to("cpu").eval()``, ``model(x)["out"]``) runs
    it unchanged; the file itself takes pixels in [0, 1] and normalises inside, so the
    normalisation the caller applied is undone here with the file's own mean and std.

    Args:
        run: a float32 ``[N, 3, H, W]`` array in [0, 1] -> ``[logits]``.
        metadata: the file's ``resfpn.*`` metadata (decoded).
        runtime: what runs it, e.g. ``"onnxruntime"``.
        precision: what precision actually runs, e.g. ``"fp32"``, ``"int8"``, ``"bf16"``.
        path: the file.

    Attributes:
        class_names: one name per label, from the file.
        build_args: the segmenter's build arguments (``arch``, ``backbone``, ``num_classes``, ...).
        train_config: the checkpoint's training config recorded in the file, or ``None``.
        runtime: ``"<runtime> <precision>"``, e.g. ``"openvino int8"``.
        precision: the precision part alone.
        inference_precision: OpenVINO only: the compiled model's ``INFERENCE_PRECISION_HINT``.
        metadata: everything the file records.
    """

    def __init__(
        self, run: Callable[[np.ndarray], Sequence[np.ndarray]], *, metadata: Mapping[str, Any], runtime: str, precision: str,
        path: "str | os.PathLike[str]",
    ) -> None:
        super().__init__()
        self._run = run
        self.metadata = dict(metadata)
        self.build_args: dict[str, Any] = dict(self.metadata.get("build_args") or {})
        self.class_names: list[str] = [str(n) for n in self.metadata.get("class_names") or []]
        self.train_config: Optional[dict[str, Any]] = self.metadata.get("train_config")
        normalize = self.metadata.get("normalize")
        if not isinstance(normalize, Mapping) or len(normalize.get("mean", ())) != 3 or len(normalize.get("std", ())) != 3:
            raise FileFormatError(f"{path} is an exported segmenter without its input normalisation (resfpn.normalize): export it again with tools/export.py")
        self._mean = torch.tensor(normalize["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(normalize["std"], dtype=torch.float32).view(1, 3, 1, 1)
        self.precision = precision
        self.inference_precision: Optional[str] = None
        self.runtime = f"{runtime} {precision}"
        self.path = Path(path)
        self.training = False

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"expected an ImageNet-normalised float [N, 3, H, W] batch, as the eager segmenter takes, got {shape}")
        if images.device.type != "cpu":
            raise ValueError(f"exported segmenters run on the CPU; got a batch on {images.device}")
        pixels = images.detach().to(torch.float32) * self._std + self._mean
        logits = self._run(pixels.contiguous().numpy())[0]
        return {"out": torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))}

    def train(self, mode: bool = True) -> "ExportedSegmenter":
        """``train(False)`` (and ``eval()``) is a no-op; an exported file cannot be trained."""
        if mode:
            raise ValueError(f"{self.path} is an exported inference file; train the PyTorch checkpoint instead")
        return self

    def to(self, *args: Any, **kwargs: Any) -> "ExportedSegmenter":
        """CPU only: returns self for ``"cpu"`` (or no device), raises for any other device."""
        device = kwargs.get("device", args[0] if args else None)
        if isinstance(device, (str, torch.device)) and torch.device(device).type != "cpu":
            raise ValueError(f"{self.runtime} runs on the CPU; got device {str(device)!r} (use the PyTorch checkpoint on GPUs)")
        return self

    def cuda(self, device: Any = None) -> "ExportedSegmenter":
        """Refused: an exported file runs on the CPU."""
        raise ValueError(f"{self.runtime} runs on the CPU (use the PyTorch checkpoint on GPUs)")

    def extra_repr(self) -> str:
        return f"{str(self.path)!r}, runtime={self.runtime!r}, arch={self.build_args.get('arch')!r}"


def _exported(run: Callable[[np.ndarray], Sequence[np.ndarray]], output_names: Sequence[str], *, metadata: Mapping[str, Any],
              runtime: str, precision: str, path: Path) -> "ExportedDetector | ExportedSegmenter":
    """The wrapper for the file's task."""
    if metadata.get("task") == "segmentation":
        return ExportedSegmenter(run, metadata=metadata, runtime=runtime, precision=precision, path=path)
    return ExportedDetector(run, output_names, metadata=metadata, runtime=runtime, precision=precision, path=path)


def _read(path: Path, reader: str, read: Callable[[], Any]) -> Any:
    """Run ``read()``, which hands ``path``'s bytes to a runtime; whatever it raises means they are not a model it runs."""
    try:
        return read()
    except Exception as e:  # noqa: BLE001  (each runtime raises its own types for bytes it cannot use)
        raise FileFormatError(f"{reader} could not read {path} as an exported detector ({type(e).__name__}: {str(e)[:300]})") from None


def _load_onnxruntime(path: Path, meta: dict[str, Any], precision: Optional[str], num_threads: Optional[int]) -> "ExportedDetector | ExportedSegmenter":
    ort = _import("onnxruntime", "onnxruntime")
    stored = meta.get("precision", "fp32")
    if precision not in (None, stored):
        raise ValueError(f"onnxruntime runs {path} as written ({stored}); precision={precision!r} is for runtime='openvino' (fp32 or bf16)")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if num_threads is not None:
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = _read(path, "ONNX Runtime", lambda: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]))
    names = [o.name for o in session.get_outputs()]
    input_name = session.get_inputs()[0].name  # "image" for detectors, "images" for segmenters
    return _exported(lambda x: session.run(None, {input_name: x}), names, metadata=meta, runtime="onnxruntime", precision=stored, path=path)


# OpenVINO's element types as this project names precisions.
_PRECISION_NAMES = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}


@functools.lru_cache(maxsize=1)
def openvino_core() -> Any:
    """One ``openvino.Core`` for the process, never freed before exit.

    Each Core's CPU plugin installs its own alternate signal stack on the calling thread
    and, when freed, puts back the one it found; two Cores freed in the order they were
    made leave the thread pointing at an unmapped stack, and the next signal handled there
    (Ctrl-C, a DataLoader's SIGCHLD handler) kills the process with SIGSEGV.
    """
    return _import("openvino", "openvino").Core()


def _load_openvino(path: Path, meta: dict[str, Any], precision: Optional[str], num_threads: Optional[int]) -> "ExportedDetector | ExportedSegmenter":
    ov = _import("openvino", "openvino")
    precision = precision or "fp32"
    if precision not in _OPENVINO_PRECISIONS:
        raise ValueError(f"openvino precision must be one of {list(_OPENVINO_PRECISIONS)}, got {precision!r}")
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": _OPENVINO_PRECISIONS[precision], "PERFORMANCE_HINT": "LATENCY"}
    if num_threads is not None:
        config["INFERENCE_NUM_THREADS"] = int(num_threads)
    if meta.get("task") == "detection" and meta.get("nms") != NMS_WITHOUT_BRANCH:
        log.warning("%s was exported before its NMS was made safe for OpenVINO: on an image where the model finds nothing, "
                    "OpenVINO returns one invented detection; export it again with tools/export.py", path)
    core = openvino_core()
    compiled = _read(path, "OpenVINO", lambda: core.compile_model(core.read_model(str(path)), "CPU", config))
    # What the CPU plugin will actually run (it may differ from the hint, e.g. bf16 where the CPU lacks it).
    hint = compiled.get_property("INFERENCE_PRECISION_HINT")
    inference_precision = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
    request = compiled.create_infer_request()
    outputs = list(compiled.outputs)
    names = [o.get_any_name() for o in outputs]
    run = _openvino_run(request, compiled.inputs[0].get_any_name(), outputs)
    ran = _PRECISION_NAMES.get(inference_precision, inference_precision)
    label = f"int8+{ran}" if meta.get("precision") == "int8" and ran != "fp32" else ("int8" if meta.get("precision") == "int8" else ran)
    exported = _exported(run, names, metadata=meta, runtime="openvino", precision=label, path=path)
    exported.inference_precision = inference_precision
    if isinstance(exported, ExportedDetector):
        exported.openvino_model, exported.openvino_config = compiled, dict(config)
    return exported


def _load_torchscript(path: Path, meta: dict[str, Any], precision: Optional[str], num_threads: Optional[int]) -> "ExportedDetector | ExportedSegmenter":
    if precision not in (None, "fp32"):
        raise ValueError(f"torchscript files run in fp32; got precision={precision!r}")
    if num_threads is not None:
        log.info("num_threads is process-wide for TorchScript; leaving torch's setting (%d)", torch.get_num_threads())

    def load() -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
            return torch.jit.load(str(path), map_location="cpu")

    scripted = _read(path, "torch.jit.load", load)
    scripted.eval()
    names = list(meta["outputs"])

    def run(x: np.ndarray) -> list[np.ndarray]:
        with torch.no_grad():
            if meta["task"] == "segmentation":  # a DeployedSegmenter: pixels in, logits out
                return [scripted(torch.from_numpy(x)).numpy()]
            _, detections = scripted([torch.from_numpy(x)])
        return [detections[0][n].numpy() for n in names]

    return _exported(run, names, metadata=meta, runtime="torchscript", precision="fp32", path=path)


def _openvino_run(request: Any, input_name: str, outputs: Sequence[Any]) -> Callable[[np.ndarray], list[np.ndarray]]:
    def run(x: np.ndarray) -> list[np.ndarray]:
        result = request.infer({input_name: x})
        return [np.array(result[o]) for o in outputs]

    return run


_NOUNS = {"detection": "detector", "segmentation": "segmenter"}
_TOOLS = {"detection": "score it with tools/eval_coco.py, draw with tools/infer.py",
          "segmentation": "score it with tools/eval_seg.py (in Python: deploy.runtime.load_exported)"}
_LOADERS = {"onnxruntime": _load_onnxruntime, "openvino": _load_openvino, "torchscript": _load_torchscript}


def load_exported(
    path: "str | os.PathLike[str]",
    *,
    runtime: Optional[str] = None,
    precision: Optional[str] = None,
    num_threads: Optional[int] = None,
    task: Optional[str] = None,
) -> "ExportedDetector | ExportedSegmenter":
    """Load an exported detector behind a PyTorch detector's call, or an exported segmenter behind a segmenter's.

    Args:
        path: a file from ``tools/export.py``: ONNX (fp32 or int8) or TorchScript; what
            it is comes from its bytes (``deploy.files``), not its name; whether it is a
            detector or a segmenter from its metadata.
        runtime: ``"onnxruntime"`` or ``"openvino"`` for ONNX files, ``"torchscript"``
            for TorchScript ones; default: ``onnxruntime`` for ONNX, ``torchscript`` for TorchScript.
        precision: OpenVINO only: ``"fp32"`` (default) or ``"bf16"`` for what is not
            int8. ONNX Runtime runs the file as written (fp32, or int8 convolutions).
        num_threads: intra-op threads (default: the runtime's own choice, all cores).
        task: ``"detection"`` or ``"segmentation"`` to refuse a file of the other task
            (``None``: either).

    Returns:
        An ``ExportedDetector`` (``model(images) -> list of dicts``, with
        ``category_mapping``, ``has_masks``, ``runtime`` and ``precision``) or an
        ``ExportedSegmenter`` (``model(batch) -> {"out": logits}``, with
        ``class_names``, ``build_args``, ``runtime`` and ``precision``).

    Raises:
        FileNotFoundError: no such file.
        FileFormatError: the bytes are not an exported detector or segmenter (junk,
            truncated, a checkpoint, an ONNX file without resfpn's metadata), whatever the
            runtime, or the file is of the other ``task``.
        ValueError: a runtime or precision that does not run this file.
        RuntimeUnavailableError: the runtime is not installed.
    """
    path = Path(path)
    if runtime is not None and runtime not in EXPORTED_RUNTIMES:
        raise ValueError(f"runtime must be one of {list(EXPORTED_RUNTIMES)}, got {runtime!r}")
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)} or None, got {task!r}")
    if not path.is_file():
        raise FileNotFoundError(f"exported model {path} not found (write one with tools/export.py)")
    if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
        raise ValueError(f"num_threads must be a positive integer or None, got {num_threads!r}")
    meta = read_exported_metadata(path)  # FileFormatError for a checkpoint, junk, or a foreign ONNX file
    if task is not None and meta["task"] != task:
        raise FileFormatError(f"{path} is an exported {_NOUNS[meta['task']]} ({meta.get('arch')}), not a {_NOUNS[task]}: {_TOOLS[meta['task']]}")
    runtime = resolve_runtime(path, runtime)
    return _LOADERS[runtime](path, meta, precision, num_threads)
