"""The GPU check: every path that needs a CUDA device, in one command, with one summary (``devtools.gpu_check``).

    python tools/check_gpu.py                          # = make check-gpu
    python tools/check_gpu.py --only latency benchmark # some steps again

Exit status: 0 when every step passed, 1 otherwise, 2 without a CUDA device (nothing is run).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from devtools.gpu_check import STEP_NAMES, build_steps, environment, measure_latency, run_checks


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="outputs/check_gpu", help="summary, logs and each step's outputs")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for the whole check (default 450: under 8 minutes)")
    p.add_argument("--only", nargs="+", choices=list(STEP_NAMES), help="run only these steps (eval needs train's model)")
    p.add_argument("--reps", type=int, default=10, help="timed forwards per latency candidate")
    p.add_argument("--measure-latency", metavar="PATH", help=argparse.SUPPRESS)  # the latency step's own process
    args = p.parse_args(argv)
    if args.budget <= 0 or args.reps < 1:
        p.error(f"--budget must be positive and --reps at least 1, got {args.budget} and {args.reps}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(f"error: no CUDA device (torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'}); "
              "make check-gpu needs one GPU; the CPU suite is make test", file=sys.stderr)
        return 2
    if args.measure_latency:
        result = measure_latency(Path(args.measure_latency), reps=args.reps)
        for r in result["rows"]:
            print(f"{r['model']:<22} {r['candidate']:<11} {r['median_ms']:8.1f} ms {r['peak_mib']:8.0f} MiB peak "
                  f"{r['proposals']} proposals {r['detections']} detections")
        return 0
    out = Path(args.output_dir).resolve()
    steps = build_steps(out)
    if args.only:
        steps = [s for s in steps if s.name in args.only]
    # The latency step is this file in its own process; it takes the repetition count along.
    for step in steps:
        if step.name == "latency":
            step.cmd += ["--reps", str(args.reps)]
    summary = run_checks(steps, out, budget_s=args.budget, environment=environment())
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
