"""Run a trained segmenter on pictures and draw its class map over them in colour.

    python tools/infer_seg.py --checkpoint outputs/seg_shapes_semantic_fpn_r18/model_final.pth --input photo.jpg --output vis/
    python tools/infer_seg.py --checkpoint model_final.pth --input images/ --output vis/ --masks --resize 520
    python tools/infer_seg.py --checkpoint seg_int8.onnx --input images/ --output vis/                       # ONNX Runtime
    python tools/infer_seg.py --checkpoint seg.onnx --runtime openvino --precision bf16 --input images/ --output vis/

Writes one overlay PNG per input, named after the whole file name (a.jpg -> a.jpg.png), with a key
of the classes present; with --masks also the class map as a VOC-style palette PNG
(a.jpg.mask.png, pixel value = label), and segmentation.json (per image: labels present,
their pixels and share). A folder is walked with its subfolders, keeping relative paths;
photos are used upright (EXIF orientation applied). An exported file (tools/export.py; fp32 or
int8) runs on the CPU with ONNX Runtime, OpenVINO or TorchScript, with the class names it carries.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from deploy.files import add_runtime_args
from engine.cli import DEVICES, run_tool


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="model_final.pth or checkpoint.pth from tools/train_seg.py, or an exported .onnx / .pt (tools/export.py)")
    add_runtime_args(p)
    p.add_argument("--input", required=True, help="an image file or a folder of images, subfolders included")
    p.add_argument("--output", required=True, help="folder for the PNGs and segmentation.json (made when there is something to write)")
    p.add_argument("--resize", type=int, help="run the model with the short side at this many pixels (the overlay keeps the picture's size)")
    p.add_argument("--alpha", type=float, default=0.5, help="opacity of the class colours (0-1)")
    p.add_argument("--masks", action="store_true", help="also write each class map as a palette PNG (<name>.mask.png)")
    p.add_argument("--device", choices=list(DEVICES), default="auto")
    return p.parse_args(argv)


def work(args: argparse.Namespace) -> int:
    from deploy.inputs import check_output_folder, image_files, left_out_note, predict_files
    from engine.config import ConfigError
    from engine.files import atomic_write_text
    from deploy.predictor import open_predictor
    from segmentation import draw_segmentation, save_class_map
    from deploy.seg_predictor import read_image_exif

    out = Path(args.output)
    check_output_folder(out, what="--output")
    if not 0.0 <= args.alpha <= 1.0:
        raise ConfigError(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.resize is not None and args.resize < 1:
        raise ConfigError(f"--resize must be a positive integer, got {args.resize}")
    files, left_out = image_files(Path(args.input), out, what="--input")
    predictor = open_predictor(args.checkpoint, task="segmentation", runtime=args.runtime, precision=args.precision,
                               device=args.device, resize=args.resize)
    if left_out:
        print(left_out_note(args.input, len(files), left_out))

    def predict(image, name: str):
        result = predictor(image)
        if args.masks:
            save_class_map(out / f"{name}.mask.png", result.class_map)
        record = result.to_dict()
        shares = [f"{c['name']} {100 * c['fraction']:.1f}%" for c in record["classes"] if c["label"] != 0]
        picture = draw_segmentation(image, result.class_map, class_names=predictor.class_names, alpha=args.alpha)
        return picture, record, f"{name}: {', '.join(shares) or 'background only'}"

    summary = predict_files(files, out, read=read_image_exif, predict=predict, say=print, warn=lambda m: print(m, file=sys.stderr))
    if not summary:
        raise ValueError(f"none of the {len(files)} inputs could be read as an image")
    atomic_write_text(out / "segmentation.json", json.dumps(summary, indent=1, ensure_ascii=False))
    print(f"wrote {len(summary)} {'overlay' if len(summary) == 1 else 'overlays'} to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from engine.cli import USER_ERRORS

    return run_tool(lambda _: work(args), user_errors=(*USER_ERRORS, ValueError, ImportError))  # ImportError: a runtime not installed


if __name__ == "__main__":
    sys.exit(main())
