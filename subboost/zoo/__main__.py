"""The zoo's command line::

    python -m subboost.zoo build  --profile P [--root DIR] [--device auto|cpu|cuda] [--workers K]
    python -m subboost.zoo report --profile P [--root DIR] [--task-counts 8 20] [--no-calibration] [--out DIR]
                                  [--compare OTHER]
    python -m subboost.zoo path   --profile P [--root DIR]
"""

from __future__ import annotations

import sys
import time

from subboost.zoo.build import PROFILES, build, get_config, zoo_dir
from subboost.zoo_common import print_build_summary, zoo_cli


def main(argv: list[str] | None = None) -> int:
    parser, sub, b = zoo_cli("python -m subboost.zoo", "Build the mini CLIP zoo.", PROFILES, None,
                             "torch CPU threads (default: torch's choice)")
    b.add_argument("--workers", type=int, default=None,
                   help="expert processes (default: one per core, at most 2, on CPU; 1 on a GPU)")
    r = sub.add_parser("report", help="measure a built zoo against its design targets (experts, interference)")
    r.add_argument("--profile", default="ci", choices=sorted(PROFILES))
    r.add_argument("--root", default=None)
    r.add_argument("--device", default="auto", help="auto | cpu | cuda")
    r.add_argument("--task-counts", type=int, nargs="+", default=[8, 20], help="merge sizes (default: 8 20)")
    r.add_argument("--no-merge", action="store_true", help="skip the merging (interference) part")
    r.add_argument("--no-calibration", action="store_true",
                   help="skip the calibration against published real task vectors")
    r.add_argument("--out", default=None,
                   help="also write the calibration table as calibration.csv and calibration.md into this folder")
    r.add_argument("--compare", default=None, choices=sorted(PROFILES),
                   help="also measure this (built) profile's zoo and show the calibration of both side by side")
    args = parser.parse_args(argv)
    if args.command == "path":
        print(zoo_dir(get_config(args.profile), args.root))
        return 0
    if args.command == "report":
        return _report(args)
    start = time.perf_counter()
    out = build(args.profile, root=args.root, device=args.device, threads=args.threads,
                progress=not args.no_progress, log=lambda m: print(m, flush=True), workers=args.workers)
    print_build_summary("zoo", out, time.perf_counter() - start)
    return 0


def _report(args) -> int:
    import pandas as pd

    from subboost.zoo import load_suite
    from subboost.zoo.report import zoo_report

    config = get_config(args.profile)
    folder = zoo_dir(config, args.root)
    try:
        suite = load_suite(config, root=args.root, device=args.device, build_if_missing=False, progress=False)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    other = None
    if args.compare and not args.no_calibration:
        try:
            other = load_suite(get_config(args.compare), root=args.root, device=args.device, build_if_missing=False,
                               progress=False)
        except FileNotFoundError as err:
            print(f"error: --compare {args.compare}: {err}", file=sys.stderr)
            return 2
    counts = sorted(set(args.task_counts))
    rep = zoo_report(suite, folder, task_counts=counts, interference=not args.no_merge,
                     progress=True, calibration=not args.no_calibration)
    with pd.option_context("display.width", 160, "display.max_columns", 20, "display.precision", 3):
        print(f"zoo: {folder}\n")
        print(rep.experts.to_string(index=False), "\n")
        if rep.interference is not None:
            print(rep.interference.to_string(index=False), "\n")
        print(rep.checks().to_string(index=False))
        if rep.calibration is not None:
            cols = ["quantity", "published", "zoo", "status", "source"]
            print("\ncalibration against published real CLIP ViT task vectors\n")
            print(rep.calibration[cols].to_string(index=False, max_colwidth=60))
    if other is not None:
        from subboost.calibration import comparison_table
        from subboost.zoo.report import calibration_measurements, suite_config

        theirs = calibration_measurements(other, suite_config(other), progress=True)
        ours = dict(zip(rep.calibration.quantity, rep.calibration.zoo))
        rep.calibration = comparison_table({args.compare: theirs, args.profile: ours})
        with pd.option_context("display.width", 200, "display.max_columns", 20, "display.precision", 3):
            print(f"\ncalibration: {args.compare} beside {args.profile}\n")
            print(rep.calibration.drop(columns=["description", "source"]).to_string(index=False, max_colwidth=50))
    if rep.calibration is not None and args.out:
        from subboost.zoo.report import write_calibration

        for path in write_calibration(rep.calibration, args.out):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
