"""Run a trained detector on images and draw what it sees.

    python tools/infer.py --checkpoint outputs/run/model_final.pth --input photo.jpg --output vis/
    python tools/infer.py --checkpoint model_final.pth --input images/ --output vis/ --score-thresh 0.3
    python tools/infer.py --checkpoint model.onnx --input images/ --output vis/          # ONNX Runtime

Writes one PNG per input, named after the whole file name (``a.jpg`` -> ``a.jpg.png``, so
``a.jpg`` and ``a.png`` never overwrite each other), and detections.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from detection.cli import DEVICES, DTYPES, USER_ERRORS, parse_dtype
from detection.predictor import EXPORTED_SUFFIXES, RUNTIMES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="model_final.pth from train_det.py, or an exported .onnx (TorchScript .pt with --runtime torchscript)")
    p.add_argument("--runtime", choices=list(RUNTIMES), help="default: torch for .pth, onnxruntime for exported files")
    p.add_argument("--input", required=True, help="an image file or a folder of images (any format PIL reads)")
    p.add_argument("--output", required=True, help="folder for the PNGs and detections.json")
    p.add_argument("--score-thresh", type=float, default=0.5)
    p.add_argument("--device", choices=list(DEVICES), default="auto")
    p.add_argument("--fast", action="store_true", help="PyTorch: BN folding + channels-last (+ --dtype) inference path")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    return p.parse_args(argv)


def _image_files(src: Path) -> list[Path]:
    from PIL import Image

    readable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise FileNotFoundError(f"input {src} does not exist")
    paths = sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() in readable)
    if not paths:
        raise FileNotFoundError(f"no images PIL can read in {src}")
    return paths


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from detection.logs import setup_logging
    from detection.config import resolve_device
    from detection.data import image_to_tensor, read_image_rgb
    from detection.predictor import Predictor
    from detection.visualize import draw_detections, save_image

    setup_logging()
    try:
        if not 0.0 <= args.score_thresh <= 1.0:
            raise ValueError(f"--score-thresh must be in [0, 1], got {args.score_thresh}")
        paths = _image_files(Path(args.input))
        exported = args.runtime not in (None, "torch") or Path(args.checkpoint).suffix.lower() in EXPORTED_SUFFIXES
        if exported and args.device == "cuda":
            raise ValueError("exported models run on the CPU (ONNX Runtime / OpenVINO); drop --device cuda or use the .pth checkpoint")
        device = "cpu" if exported else resolve_device(args.device)
        predictor = Predictor(args.checkpoint, runtime=args.runtime, device=device, score_thresh=args.score_thresh,
                              fast=args.fast, dtype=parse_dtype(args.dtype))
    except (*USER_ERRORS, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for path in paths:
        try:
            image = image_to_tensor(read_image_rgb(path))
        except Exception as e:  # noqa: BLE001  (PIL raises several types for corrupt files)
            print(f"skipping unreadable {path}: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        prediction = predictor(image)
        picture = draw_detections(image, prediction.raw, predictor.class_names, score_thresh=args.score_thresh)
        save_image(picture, out_dir / f"{path.name}.png")
        results[path.name] = prediction.to_list()
        if len(prediction):
            print(f"{path.name}: {len(prediction)} detections")
        else:
            best = float(prediction.raw["scores"].max()) if len(prediction.raw["scores"]) else None
            hint = f"highest score {best:.3f}" if best is not None else "the model returned no candidates"
            print(f"{path.name}: 0 detections at --score-thresh {args.score_thresh} ({hint})")
    if not results:
        print(f"error: none of the {len(paths)} inputs could be read as an image", file=sys.stderr)
        return 2
    (out_dir / "detections.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {len(results)} images to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
