"""Command line: `python -m vlmfix.toy build --out DIR [--fast] [--seed N] [--quiet]`, and
`python -m vlmfix.toy bench --out DIR [--fast] [--seed N]` (the AMBER / MME / HallusionBench miniatures of the
toy's val split, in their upstream formats)."""

from __future__ import annotations

import argparse
import sys

from .build import build_toy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlmfix.toy", description="The vlmfix toy VLM.")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="generate the scenes, train the model, save both (cached)")
    build.add_argument("--out", default=None, help="target directory (default: $VLMFIX_CACHE/toy)")
    build.add_argument("--fast", action="store_true", help="the ~1 minute build used by the tests")
    build.add_argument("--seed", type=int, default=0, help="seed of scenes and training (default 0)")
    build.add_argument("--quiet", action="store_true", help="no progress bars")
    bench = commands.add_parser("bench", help="write the benchmark miniatures of the (cached) toy's val split")
    bench.add_argument("--out", required=True, help="target directory")
    bench.add_argument("--fast", action="store_true", help="from the fast toy build")
    bench.add_argument("--seed", type=int, default=0, help="seed of the questions' random choices (default 0)")
    args = parser.parse_args(argv)
    try:
        if args.command == "bench":
            from .bench import write_miniatures

            paths = build_toy(fast=args.fast, progress=True)
            print(f"miniatures: {write_miniatures(paths.data_dir, args.out, seed=args.seed)}")
            return 0
        paths = build_toy(args.out, fast=args.fast, seed=args.seed, progress=not args.quiet)
    except ValueError as error:
        parser.error(str(error))
    print(f"model: {paths.model_dir}\ndata: {paths.data_dir}\npreference: {paths.preference_file}\n"
          f"settings hash: {paths.settings_hash}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
