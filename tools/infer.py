"""Run a trained detector on images and draw what it sees.

    python tools/infer.py --checkpoint outputs/run/model_final.pth --input photo.jpg --output vis/
    python tools/infer.py --checkpoint model_final.pth --input images/ --output vis/ --score-thresh 0.3
    python tools/infer.py --checkpoint model.onnx --input images/ --output vis/          # ONNX Runtime

Writes one PNG per input, named after the whole file name (``a.jpg`` -> ``a.jpg.png``, so
``a.jpg`` and ``a.png`` never overwrite each other), and detections.json. A folder is walked
with its subfolders; outputs keep the relative path (``images/batch1/x.jpg`` ->
``vis/batch1/x.jpg.png``, key ``batch1/x.jpg`` in detections.json). Photos are drawn upright
(their EXIF orientation tag is applied) and boxes are in that frame.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engine.cli import DEVICES, DTYPES, USER_ERRORS, fail, parse_dtype, run_tool
from deploy.files import RUNTIMES, is_exported
from deploy.inputs import check_output_folder, image_files


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="model_final.pth from train_det.py, or an exported .onnx (TorchScript .pt with --runtime torchscript)")
    p.add_argument("--runtime", choices=list(RUNTIMES), help="default: torch for .pth, onnxruntime for exported files")
    p.add_argument("--input", required=True, help="an image file or a folder of images, subfolders included (any format PIL reads)")
    p.add_argument("--output", required=True, help="folder for the PNGs and detections.json (made when there is something to write)")
    p.add_argument("--score-thresh", type=float, default=0.5)
    p.add_argument("--device", choices=list(DEVICES), default="auto")
    p.add_argument("--fast", action="store_true", help="PyTorch: BN folding + channels-last (+ --dtype) inference path")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_tool(lambda _: _infer(args))


def _infer(args: argparse.Namespace) -> int:
    from engine.config import resolve_device
    from engine.files import atomic_write_text
    from engine.images import image_to_tensor, read_image_rgb
    from deploy.predictor import Predictor
    from detection.visualize import draw_detections
    from engine.plots import save_image

    out_dir = Path(args.output)
    try:
        if not 0.0 <= args.score_thresh <= 1.0:
            raise ValueError(f"--score-thresh must be in [0, 1], got {args.score_thresh}")
        check_output_folder(out_dir, what="--output")
        paths, left_out = image_files(Path(args.input), out_dir, what="--input")
        exported = is_exported(args.checkpoint, args.runtime)
        if exported and args.device == "cuda":
            raise ValueError("exported models run on the CPU (ONNX Runtime / OpenVINO); drop --device cuda or use the .pth checkpoint")
        device = "cpu" if exported else resolve_device(args.device)
        predictor = Predictor(args.checkpoint, runtime=args.runtime, device=device, score_thresh=args.score_thresh,
                              fast=args.fast, dtype=parse_dtype(args.dtype))
    except (*USER_ERRORS, ValueError, ImportError) as e:
        return fail(e)
    if left_out:
        shown = ", ".join(left_out[:5]) + (", ..." if len(left_out) > 5 else "")
        print(f"{args.input}: {len(paths)} images; left out {len(left_out)} entries that are not images by their "
              f"extension, hidden, or the output folder: {shown}")
    results = {}
    for path, name in paths:
        try:
            image = image_to_tensor(read_image_rgb(path))
        except Exception as e:  # noqa: BLE001  (PIL raises several types for corrupt files)
            print(f"skipping unreadable {path}: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        prediction = predictor(image)
        picture = draw_detections(image, prediction.raw, predictor.class_names, score_thresh=args.score_thresh)
        save_image(picture, out_dir / f"{name}.png")  # makes the folders it needs
        results[name] = prediction.to_list()
        if len(prediction):
            print(f"{name}: {len(prediction)} detections")
        else:
            best = float(prediction.raw["scores"].max()) if len(prediction.raw["scores"]) else None
            hint = f"highest score {best:.3f}" if best is not None else "the model returned no candidates"
            print(f"{name}: 0 detections at --score-thresh {args.score_thresh} ({hint})")
    if not results:
        return fail(f"none of the {len(paths)} inputs could be read as an image")
    atomic_write_text(out_dir / "detections.json", json.dumps(results, indent=1, ensure_ascii=False))
    print(f"wrote {len(results)} images to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
