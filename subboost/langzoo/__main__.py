"""``python -m subboost.langzoo build --profile P [--root DIR] [--device auto|cpu|cuda]``."""

from __future__ import annotations

import sys
import time

from subboost.langzoo.build import PROFILES, build, get_config, zoo_dir
from subboost.zoo_common import print_build_summary, zoo_cli


def main(argv: list[str] | None = None) -> int:
    parser, _, _ = zoo_cli("python -m subboost.langzoo", "Build the language mini zoo.", PROFILES, 1,
                           "torch CPU threads during the build (default 1)")
    args = parser.parse_args(argv)
    if args.command == "path":
        print(zoo_dir(get_config(args.profile), args.root))
        return 0
    start = time.perf_counter()
    out = build(args.profile, root=args.root, device=args.device, threads=args.threads,
                progress=not args.no_progress, step_progress=not args.no_progress,
                log=lambda m: print(m, flush=True))
    print_build_summary("language zoo", out, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
