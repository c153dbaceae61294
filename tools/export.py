"""Export a trained detector or segmenter for deployment: ONNX (fp32 or int8) or TorchScript.

    python tools/export.py --checkpoint outputs/shapes_faster_rcnn_r18/model_final.pth --output model.onnx
    python tools/export.py --checkpoint model_final.pth --output model_int8.onnx --int8 --calib-images 64
    python tools/export.py --checkpoint model_final.pth --format torchscript --output model.pt
    python tools/export.py --checkpoint model_final.pth --output model_300.onnx --proposals 300   # fewer RoIs, baked in
    python tools/export.py --checkpoint outputs/seg_shapes_semantic_fpn_r18/model_final.pth --output seg.onnx

What the checkpoint holds decides the file. A detector's ONNX file takes one float32
[3, H, W] RGB image in [0, 1] of any size (batch 1) and returns boxes in that image's
pixels, labels and scores (and masks); class names and category ids are in its metadata.
A segmenter's takes a float32 [N, 3, H, W] batch in [0, 1] of any size and returns logits
[N, K, H, W]; class names, mean and std are in its metadata. Run either with
deploy.runtime.load_exported (tools/eval_coco.py / tools/eval_seg.py --runtime ...).
The output file is written only when the export succeeded (temporary file, then rename).
"""

import argparse
import logging
import sys
from pathlib import Path

from deploy.export import DEFAULT_OPSET, EXPORT_FORMATS, INT8_METHODS, ExportError, check_export_args, export_checkpoint
from detection.postprocess import add_test_option_args, parse_test_options
from engine.cli import USER_ERRORS, run_tool


def parse_args(argv: "list[str] | None" = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="model_final.pth from tools/train_det.py or tools/train_seg.py")
    p.add_argument("--output", required=True, help="destination file (.onnx, or .pt for torchscript)")
    p.add_argument("--format", choices=list(EXPORT_FORMATS), default="onnx")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset, >= 16 (default {DEFAULT_OPSET})")
    p.add_argument("--int8", action="store_true", help="post-training static int8 quantisation of the convolutions")
    p.add_argument("--calib-images", type=int, default=64, help="training images to calibrate int8 on (default 64)")
    p.add_argument("--data-path", help="root for calibration, COCO layout (segmenters: VOC or COCO) (default: the checkpoint's training data)")
    p.add_argument("--int8-method", choices=list(INT8_METHODS), default="onnxruntime", help="quantizer (default onnxruntime)")
    p.add_argument("--int8-linear", action="store_true",
                   help="with --int8: the box head's fully connected layers int8 too (default: they stay float32)")
    p.add_argument("--export-size", type=int, nargs=2, metavar=("H", "W"), help="size of the traced sample (any size runs)")
    add_test_option_args(p)  # baked into the file
    return p.parse_args(argv)


def main(argv: "list[str] | None" = None) -> int:
    args = parse_args(argv)
    return run_tool(lambda _: _export(args), user_errors=(*USER_ERRORS, ExportError, ValueError, ImportError))


def _export(args: argparse.Namespace) -> int:
    for noisy in ("root", "nncf"):  # the quantizers' advice lines
        logging.getLogger(noisy).setLevel(logging.ERROR)
    check_export_args(format=args.format, opset=args.opset, int8=args.int8, calib_images=args.calib_images, int8_method=args.int8_method,
                      int8_linear=args.int8_linear)
    test_options = parse_test_options(args)
    if not Path(args.checkpoint).is_file():
        raise ExportError(f"checkpoint {args.checkpoint} not found: pass --checkpoint model_final.pth from tools/train_det.py or tools/train_seg.py")
    if Path(args.output).is_dir():
        raise ExportError(f"--output {args.output} is a folder; pass a file name such as model.onnx")
    output = export_checkpoint(
        args.checkpoint, args.output, format=args.format, opset=args.opset, int8=args.int8, calib_images=args.calib_images,
        data_path=args.data_path, int8_method=args.int8_method, int8_linear=args.int8_linear, export_size=tuple(args.export_size) if args.export_size else None,
        test_options=test_options,
    )
    linear = ", fully connected layers too" if args.int8_linear else ""
    what = args.format + (f" int8 ({args.int8_method}, {args.calib_images} calibration images{linear})" if args.int8 else "")
    print(f"wrote {output} ({what}, {output.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
