"""Write the synthetic shapes data set (COCO layout) to a folder.

Example:
    python tools/make_shapes.py --out data/shapes --train 1000 --val 200 --size 320 --seed 0
"""

from __future__ import annotations

import argparse
import time

from engine import shapes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--train", type=int, default=1000, help="number of training images")
    parser.add_argument("--val", type=int, default=200, help="number of validation images")
    parser.add_argument("--size", type=int, default=320, help="long side of each image in pixels")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    root = shapes.generate(args.out, num_train=args.train, num_val=args.val, image_size=args.size, seed=args.seed)
    elapsed = time.perf_counter() - start
    print(f"wrote {args.train} train + {args.val} val images ({args.size} px, seed {args.seed}) to {root} in {elapsed:.1f} s")
    print(f"annotations: {root / 'annotations'}")


if __name__ == "__main__":
    main()
