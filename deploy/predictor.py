"""Run a trained model on pictures: ``open_predictor`` for any model file, ``Predictor`` for detectors.

``open_predictor`` gives the task's predictor for any file ``deploy.opening.open_model`` opens
(``Predictor`` for detectors, ``SegmentationPredictor`` for segmenters).

``Predictor``: paths, PIL images or numpy arrays in; pixels, names and ids out. One call for every way a model ships: a PyTorch checkpoint (``model_final.pth``), the
same model on the fast inference path, or an exported file run by ONNX Runtime or
OpenVINO (``deploy.runtime``). The data set's category ids and names travel with the
model, so users never map labels back by hand.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Sequence, TypeVar, Union

import numpy as np
import torch
from torch import nn

from engine.images import image_to_tensor, read_image_rgb
from .files import RUNTIMES
from .opening import TASK_NOUNS, TASK_TOOLS, OpenedModel, load_model, open_model

__all__ = ["EXPORTED_SUFFIXES", "RUNTIMES", "Prediction", "Predictor", "as_image_tensor", "open_predictor"]

# Kept for callers that guess by name; what a file is comes from its bytes (deploy.files).
EXPORTED_SUFFIXES = (".onnx",)

ImageInput = Union[str, os.PathLike, np.ndarray, torch.Tensor, Any]  # Any: a PIL image

log = logging.getLogger(__name__)
_T = TypeVar("_T")


@dataclass
class Prediction:
    """Detections on one image, in that image's pixels.

    Attributes:
        boxes: float32 N x 4, ``x0, y0, x1, y1``.
        scores: float32 N.
        labels: int64 N, the model's contiguous labels (1..K).
        names: class name per detection.
        category_ids: the data set's original category id per detection (``None``
            when the model carries no mapping).
        masks: bool N x H x W (Mask R-CNN), else ``None``.
        image_size: ``(height, width)``.
        raw: the model's own output dict (tensors), e.g. for ``visualize.draw_detections``.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    names: list[str]
    category_ids: list[int] | None
    masks: np.ndarray | None
    image_size: tuple[int, int]
    raw: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)

    def __len__(self) -> int:
        return len(self.scores)

    def to_list(self) -> list[dict[str, Any]]:
        """JSON-ready detections: ``box_xyxy``, ``score``, ``label``, ``name`` and ``category_id``."""
        out = []
        for i in range(len(self)):
            item: dict[str, Any] = {
                "box_xyxy": [round(float(v), 2) for v in self.boxes[i]], "score": round(float(self.scores[i]), 4),
                "label": int(self.labels[i]), "name": self.names[i],
            }
            if self.category_ids is not None:
                item["category_id"] = self.category_ids[i]
            out.append(item)
        return out


def open_predictor(
    source: str | os.PathLike,
    *,
    task: str | None = None,
    runtime: str | None = None,
    device: str = "auto",
    precision: str | None = None,
    fast: bool = False,
    dtype: torch.dtype | None = None,
    score_thresh: float = 0.5,
    resize: int | None = None,
) -> Any:
    """The predictor for any model file: a :class:`Predictor` for detectors, a ``SegmentationPredictor`` for segmenters.

    Args:
        source: a checkpoint or an exported file (see :func:`open_model`).
        task: ``"detection"`` or ``"segmentation"`` to refuse the other task's files.
        runtime: see :func:`open_model`.
        device: see :func:`open_model`.
        precision: OpenVINO only: ``"fp32"`` or ``"bf16"``.
        fast: detectors in PyTorch only: the fast inference path.
        dtype: with ``fast``, the trunk's reduced precision.
        score_thresh: detectors: detections below it are dropped.
        resize: segmenters: run the model with the short side at this many pixels.

    Returns:
        A ``Predictor`` or a ``segmentation.SegmentationPredictor``.
    """
    opened = open_model(source, task=task, runtime=runtime, device=device, precision=precision)
    if opened.task == "detection":
        return Predictor(opened, score_thresh=score_thresh, fast=fast, dtype=dtype)
    if fast or dtype is not None:
        raise ValueError("fast and dtype (--fast, --dtype) are for detectors; a segmenter checkpoint runs as trained (eval_seg.py: --amp)")
    from .seg_predictor import SegmentationPredictor

    return SegmentationPredictor(opened.model, device=str(opened.device), resize=resize)


def as_image_tensor(image: ImageInput) -> torch.Tensor:
    """An image as ``Predictor`` takes it (path, PIL image, H x W x 3 uint8 RGB array, CHW float tensor) as a CHW float tensor in [0, 1].

    Args:
        image: a path or a PIL image (read upright, EXIF orientation applied), an RGB array, or a tensor (returned as is).

    Raises:
        ValueError: an array or tensor of the wrong shape or type.
        TypeError: something that is not an image.
    """
    if isinstance(image, (str, os.PathLike)):
        return image_to_tensor(read_image_rgb(image))
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
            raise ValueError(f"a tensor image must be float CHW with 3 channels in [0, 1], got {image.dtype} {tuple(image.shape)}")
        return image
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
        from PIL import ImageOps

        # Upright, as a path is read: Image.open keeps the EXIF orientation tag unapplied.
        return image_to_tensor(np.asarray(ImageOps.exif_transpose(image).convert("RGB")))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"a numpy image must be H x W x 3 uint8 RGB, got {image.dtype} {image.shape}")
        return image_to_tensor(np.ascontiguousarray(image))
    raise TypeError(f"expected an image path, PIL image, H x W x 3 uint8 array or CHW float tensor, got {type(image).__name__}")


class Predictor:
    """A trained detector behind one call: images in, :class:`Prediction` out.

    >>> predictor = Predictor("outputs/run/model_final.pth", score_thresh=0.5)
    >>> prediction = predictor("photo.jpg")           # or a PIL image, an H x W x 3 uint8 array
    >>> prediction.boxes, prediction.names, prediction.category_ids
    >>> for prediction in predictor.stream(frames):   # a video's frames, a camera's: in order, as they come
    ...     ...

    Args:
        model: a checkpoint, an exported file, an :class:`OpenedModel` or a built model (see ``open_model``).
        runtime: ``"torch"``, ``"onnxruntime"`` or ``"openvino"`` (default from the file).
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``; exported files
            run on the CPU.
        score_thresh: detections below this score are dropped.
        mask_threshold: mask probability that counts as inside the object.
        fast: PyTorch only: the fast inference path (BN folding, channels-last).
        dtype: with ``fast``, the trunk's reduced precision.
        precision: OpenVINO only: ``"fp32"`` (default) or ``"bf16"``.
    """

    def __init__(
        self,
        model: str | os.PathLike | nn.Module | OpenedModel,
        *,
        runtime: str | None = None,
        device: str = "auto",
        score_thresh: float = 0.5,
        mask_threshold: float = 0.5,
        fast: bool = False,
        dtype: torch.dtype | None = None,
        precision: str | None = None,
    ) -> None:
        if not 0.0 <= score_thresh <= 1.0:
            raise ValueError(f"score_thresh must be in [0, 1], got {score_thresh}")
        if isinstance(model, nn.Module):
            if device == "auto":
                device = "cuda" if torch.cuda.is_available() else "cpu"
            self.device = torch.device(device)
            self.model = load_model(model, device=self.device, fast=fast, dtype=dtype, precision=precision)
        else:
            opened = model if isinstance(model, OpenedModel) else open_model(
                model, task="detection", runtime=runtime, device=device, precision=precision)
            if opened.task != "detection":
                raise ValueError(f"{opened.path} is a {TASK_NOUNS[opened.task]}: {TASK_TOOLS[opened.task]} (in Python: deploy.open_predictor)")
            self.device = opened.device
            self.model = opened.model if opened.exported else load_model(opened.model, device=self.device, fast=fast, dtype=dtype)
        self.score_thresh = score_thresh
        self.mask_threshold = mask_threshold
        mapping = self.model.category_mapping or {}
        self.class_names: list[str] = ["__background__"] + [str(n) for n in mapping.get("names", [])]
        self.category_ids: list[int] | None = [int(c) for c in mapping["cat_ids"]] if mapping.get("cat_ids") else None
        self._openvino_streaming_models: dict[int, Any] = {}  # stream(streams=N): the file compiled again, once per N

    @property
    def category_mapping(self) -> dict[str, list[Any]] | None:
        """The model's ``{"cat_ids", "names"}``, or ``None``."""
        return self.model.category_mapping

    @property
    def label_to_cat_id(self) -> dict[int, int] | None:
        """Contiguous label -> the data set's category id, or ``None`` without a mapping."""
        return {i + 1: c for i, c in enumerate(self.category_ids)} if self.category_ids else None

    def name(self, label: int) -> str:
        """Class name of a contiguous label (its number as text when unknown)."""
        return self.class_names[label] if 0 < label < len(self.class_names) else str(label)

    @torch.no_grad()
    def predict_tensors(self, images: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """The model's raw detection dicts for CHW float images in [0, 1]."""
        return self.model([img.to(self.device) for img in images])

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> Prediction | list[Prediction]:
        """Detect objects.

        Paths and PIL images are turned upright by their EXIF orientation tag (as
        phones save photos), so boxes are in the picture as viewers show it; arrays
        and tensors are taken as given (``np.asarray(Image.open(p))`` keeps the stored
        frame: read with ``detection.data.read_image_rgb(p)`` to get it upright).

        Args:
            images: one image (a path, a PIL image, an H x W x 3 uint8 RGB array or a
                CHW float tensor in [0, 1]) or a list of them.

        Returns:
            A :class:`Prediction` for one image, a list of them for a list.
        """
        single = not isinstance(images, (list, tuple))
        batch = [as_image_tensor(img) for img in ([images] if single else images)]
        if not batch:
            return []
        outputs = self.predict_tensors(batch)
        results = [self._convert(out, tuple(img.shape[-2:])) for out, img in zip(outputs, batch)]
        return results[0] if single else results

    def stream(
        self, frames: Iterable[ImageInput], *, requests: int = 1, streams: int | None = None, prefetch: int = 2,
    ) -> Iterator[Prediction]:
        """Detect objects in a sequence of images, one :class:`Prediction` per image, in their order, lazily.

        Returns a generator that reads ``frames`` as it goes (at most ``prefetch + requests + 1``
        images ahead of what it has yielded), so a camera or an endless iterator works. When
        ``frames`` raises, the predictions of the images before are yielded first, then the
        error is raised.

        >>> for prediction in predictor.stream(camera_frames()):   # H x W x 3 uint8 RGB arrays
        ...     print(prediction.names)

        Args:
            frames: any iterable of images, each as :meth:`__call__` takes one (a path, a
                PIL image, an H x W x 3 uint8 RGB array or a CHW float tensor).
            requests: OpenVINO only: inference requests kept in flight at once (1: one at a
                time, synchronous); their results are yielded in input order. Other runtimes
                run one image at a time and take only 1.
            streams: OpenVINO only: compile the file again for this stream with this many CPU
                streams (``NUM_STREAMS``, throughput hint) so that requests run side by side;
                ``None`` keeps the model as loaded (one stream, latency hint: requests queue,
                and only the decoding and drawing around them overlap).
            prefetch: images read and converted by a background thread ahead of the model
                (0: in the caller's thread), so decoding overlaps inference.

        Yields:
            A :class:`Prediction` per image.

        Raises:
            ValueError: ``requests`` or ``streams`` out of range or for a model not run by OpenVINO.
        """
        if not isinstance(requests, int) or requests < 1:
            raise ValueError(f"requests must be a positive integer, got {requests!r}")
        if streams is not None and (not isinstance(streams, int) or streams < 1):
            raise ValueError(f"streams must be a positive integer or None, got {streams!r}")
        if not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError(f"prefetch must be a non-negative integer, got {prefetch!r}")
        compiled = getattr(self.model, "openvino_model", None)
        if (requests > 1 or streams is not None) and compiled is None:
            runtime = getattr(self.model, "runtime", "torch")
            raise ValueError(f"requests and streams are for exported files run by OpenVINO; this model runs on {runtime}: leave them at 1 and None")
        return self._stream(frames, requests=requests, streams=streams, prefetch=prefetch)

    def _stream(self, frames: Iterable[ImageInput], *, requests: int, streams: int | None, prefetch: int) -> Iterator[Prediction]:
        # A generator apart from stream(), so that stream() checks its arguments when called, not at the first next().
        images = (as_image_tensor(frame) for frame in frames)
        tensors = _background(images, prefetch) if prefetch else images
        try:
            if requests == 1 and streams is None:
                for image in tensors:
                    yield self._convert(self.predict_tensors([image])[0], tuple(image.shape[-2:]))
            else:
                yield from self._stream_openvino(tensors, requests, streams)
        finally:
            close = getattr(tensors, "close", None)
            if close is not None:
                close()

    def _stream_openvino(self, images: Iterator[torch.Tensor], requests: int, streams: int | None) -> Iterator[Prediction]:
        """Up to ``requests`` OpenVINO inferences in flight; results collected oldest first, so in input order."""
        model = self.model
        compiled = model.openvino_model if streams is None else self._openvino_streaming(streams)
        input_name = compiled.inputs[0].get_any_name()
        outputs = list(compiled.outputs)
        idle = collections.deque(compiled.create_infer_request() for _ in range(requests))
        in_flight: collections.deque[tuple[Any, tuple[int, int]]] = collections.deque()

        def collect() -> Prediction:
            request, size = in_flight[0]
            request.wait()
            # Copies: the request's output memory is reused by its next inference.
            arrays = [np.array(request.get_tensor(output).data) for output in outputs]
            in_flight.popleft()
            idle.append(request)
            return self._convert(model._result(arrays, size), size)

        try:
            while True:
                try:
                    image = next(images)
                except StopIteration:
                    break
                except Exception:
                    while in_flight:  # what came before the failing image is still answered, in order
                        yield collect()
                    raise
                if not idle:
                    yield collect()
                request = idle.popleft()
                request.start_async({input_name: model._array(image)})  # copies the input (share_inputs=False)
                in_flight.append((request, tuple(image.shape[-2:])))
            while in_flight:
                yield collect()
        finally:
            for request, _ in in_flight:  # closed early: let the runtime finish with the requests before they go
                request.wait()

    def _openvino_streaming(self, streams: int) -> Any:
        """The OpenVINO file compiled again with ``streams`` CPU streams (kept for later streams)."""
        cache = self._openvino_streaming_models
        if streams not in cache:
            from .runtime import openvino_core

            core = openvino_core()
            config = {**self.model.openvino_config, "PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": int(streams)}
            cache[streams] = core.compile_model(core.read_model(str(self.model.path)), "CPU", config)
            log.info("%s compiled with %d CPU streams (%s requests in flight is what keeps them busy)", self.model.path, streams,
                     cache[streams].get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        return cache[streams]

    def _convert(self, out: dict[str, torch.Tensor], size: tuple[int, int]) -> Prediction:
        keep = out["scores"].detach().cpu() >= self.score_thresh
        raw = {k: v.detach().cpu() for k, v in out.items()}
        labels = raw["labels"][keep].numpy().astype(np.int64)
        masks = (raw["masks"][keep][:, 0] > self.mask_threshold).numpy() if "masks" in raw else None
        cat_ids = [self.category_ids[label - 1] if 0 < label <= len(self.category_ids) else -1 for label in labels] if self.category_ids else None
        return Prediction(
            boxes=raw["boxes"][keep].numpy().astype(np.float32), scores=raw["scores"][keep].numpy().astype(np.float32),
            labels=labels, names=[self.name(int(label)) for label in labels], category_ids=cat_ids, masks=masks,
            image_size=(int(size[0]), int(size[1])), raw=raw,
        )


def _background(items: Iterable[_T], size: int, *, join_timeout: float = 10.0) -> Iterator[_T]:
    """``items`` in order, produced by a daemon thread at most ``size`` ahead of the consumer.

    An exception raised by ``items`` is raised here in its place. Closing this generator
    stops the thread (and waits up to ``join_timeout`` seconds for the item it is producing).

    Args:
        items: any iterable; iterated in the background thread only.
        size: how many produced items may wait for the consumer.
        join_timeout: seconds to wait for the thread when closed early.
    """
    ready: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def put(entry: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
            put(("end", None))
        except BaseException as e:  # noqa: BLE001  (handed to the consumer, raised there)
            put(("error", e))

    thread = threading.Thread(target=produce, name="resfpn-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = ready.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join(join_timeout)
        if thread.is_alive():
            log.warning("the thread reading the images did not stop within %.0f s; left running in the background", join_timeout)
