"""``python -m subboost.langzoo build --profile P [--root DIR] [--device auto|cpu|cuda]``."""

from __future__ import annotations

import argparse
import json
import sys
import time

from subboost.langzoo.build import PROFILES, build, get_config, zoo_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m subboost.langzoo", description="Build the language mini zoo.")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build (or find) a language zoo in the cache")
    b.add_argument("--profile", default="ci", choices=sorted(PROFILES))
    b.add_argument("--root", default=None, help="cache root (default: $SUBBOOST_ZOO_ROOT or ./zoo_cache)")
    b.add_argument("--device", default="auto", help="auto | cpu | cuda")
    b.add_argument("--threads", type=int, default=1, help="torch CPU threads during the build (default 1)")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    p = sub.add_parser("path", help="print the folder a profile builds into")
    p.add_argument("--profile", default="ci", choices=sorted(PROFILES))
    p.add_argument("--root", default=None)
    args = parser.parse_args(argv)
    if args.command == "path":
        print(zoo_dir(get_config(args.profile), args.root))
        return 0
    start = time.perf_counter()
    out = build(args.profile, root=args.root, device=args.device, threads=args.threads,
                progress=not args.no_progress, step_progress=not args.no_progress,
                log=lambda m: print(m, flush=True))
    summary = json.loads((out / "build.json").read_text())
    print(f"language zoo: {out}")
    print(f"mean zero-shot {summary['mean_zeroshot_test']:.3f}, mean fine-tuned {summary['mean_finetuned_test']:.3f}; "
          f"build {summary['timings']['total_s']:.0f}s (this call {time.perf_counter() - start:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
