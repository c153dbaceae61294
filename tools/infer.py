"""Run a trained detector on images and draw what it sees.

    python tools/infer.py --checkpoint outputs/run/model_final.pth --input photo.jpg --output vis/
    python tools/infer.py --checkpoint model_final.pth --input images/ --output vis/ --score-thresh 0.3

Writes one PNG per image (boxes, class names, scores, masks) and detections.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from backbones.weights import WeightsError
from detection.data.coco import image_to_tensor, read_image_rgb
from detection.models import load_detector
from detection.visualize import draw_detections, save_image

EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--input", required=True, help="an image file or a folder of images")
    p.add_argument("--output", required=True, help="folder for the PNGs and detections.json")
    p.add_argument("--score-thresh", type=float, default=0.5)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--fast", action="store_true", help="BN folding + channels-last (+ --dtype) inference path")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    src = Path(args.input)
    if src.is_dir():
        paths = sorted(p for p in src.iterdir() if p.suffix.lower() in EXTENSIONS)
    elif src.is_file():
        paths = [src]
    else:
        print(f"error: input {src} does not exist", file=sys.stderr)
        return 2
    if not paths:
        print(f"error: no images ({', '.join(sorted(EXTENSIONS))}) in {src}", file=sys.stderr)
        return 2
    try:
        model = load_detector(args.checkpoint, device=args.device)
    except (WeightsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.fast:
        from detection.fast import optimize_for_inference

        model = optimize_for_inference(model, dtype=None if args.dtype == "float32" else getattr(torch, args.dtype))
    mapping = model.category_mapping or {}
    names = ["__background__"] + list(mapping.get("names", []))
    cat_ids = list(mapping.get("cat_ids", []))
    if len(names) < model.build_args["num_classes"]:
        names += [str(i) for i in range(len(names), model.build_args["num_classes"])]
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    with torch.no_grad():
        for path in paths:
            try:
                image = image_to_tensor(read_image_rgb(path))
            except Exception as e:  # PIL raises several types for corrupt files
                print(f"skipping unreadable {path}: {e}", file=sys.stderr)
                continue
            det = model([image.to(args.device)])[0]
            save_image(draw_detections(image, det, names, score_thresh=args.score_thresh), out_dir / f"{path.stem}.png")
            keep = det["scores"] >= args.score_thresh
            results[path.name] = [
                {
                    "box_xyxy": [round(v, 2) for v in box],
                    "score": round(score, 4),
                    "label": names[label] if label < len(names) else str(label),
                    **({"category_id": cat_ids[label - 1]} if 0 < label <= len(cat_ids) else {}),
                }
                for box, score, label in zip(det["boxes"][keep].tolist(), det["scores"][keep].tolist(), det["labels"][keep].tolist())
            ]
            print(f"{path.name}: {len(results[path.name])} detections")
    (out_dir / "detections.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {len(results)} images to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
