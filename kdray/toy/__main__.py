"""``python -m kdray.toy [--force] [--cache-dir DIR]``: build the toy world and print its meta."""

from __future__ import annotations

import argparse
import json
import sys

from kdray.toy.world import build_toy_world, cache_root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdray.toy", description=__doc__)
    parser.add_argument("--force", action="store_true", help="rebuild even if a cached world exists")
    parser.add_argument("--cache-dir", default=None, help=f"cache root (default: {cache_root()})")
    args = parser.parse_args(argv)
    world = build_toy_world(
        args.cache_dir, force=args.force, progress=lambda msg: print(msg, file=sys.stderr, flush=True)
    )
    print(f"toy world at {world.root}", file=sys.stderr)
    print(json.dumps(world.meta, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
