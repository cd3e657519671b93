"""``kdray repro``'s command line: its options, checked and handed to
:func:`kdray.repro.harness.run_repro`; errors name the options, not the spec fields they fill."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

from kdray.errors import ConfigError, SpecError
from kdray.repro.harness import BUDGETS, EXTRA_METHODS, METHODS, ReproSize, run_repro
from kdray.repro.language import WORLDS

#: The job spec fields ``kdray repro`` fills from its options.
SPEC_FIELD_OPTIONS = {"data.train": "--data", "data.heldout": "--heldout"}


def cmd_repro(args: argparse.Namespace) -> int:
    from rich.console import Console

    size = replace(ReproSize.quick() if args.quick else ReproSize.default(), budget=args.budget)
    if args.seeds is not None:
        size = replace(size, seeds=args.seeds)
    methods = args.methods or list(METHODS)
    unknown = [m for m in methods if m not in METHODS + EXTRA_METHODS]
    if unknown:
        raise ConfigError(f"kdray repro --methods: unknown method(s) {', '.join(unknown)}; choose from "
                          f"{', '.join(METHODS + EXTRA_METHODS)}")
    if (args.data is not None or args.heldout is not None) and WORLDS[args.world].language:
        raise ConfigError(f"kdray repro --data/--heldout: the {args.world} world scores every run against its own "
                          "language, so it runs on its own data; drop --data and --heldout, or use --world toy")
    if (args.data is None) != (args.heldout is None):
        raise ConfigError("kdray repro --data/--heldout: give both the training and the held-out dataset, or "
                          "neither (the toy world's toy:train / toy:heldout)")
    methods = list(dict.fromkeys(methods))
    try:
        run_repro(size, methods, Path(args.out), world=args.world, train=args.data, heldout=args.heldout,
                  address=args.address, console=Console())
    except SpecError as e:  # a method's spec: the fields the options filled, named as the options
        raise SpecError([(SPEC_FIELD_OPTIONS.get(f, f), msg) for f, msg in e.errors], e.source) from None
    return 0


def add_parsers(subparsers: Any) -> None:
    p = subparsers.add_parser("repro", help="run a grid of KD methods over seeds and check the POCL and "
                                            "DistiLLM-2 papers' orderings")
    p.add_argument("--quick", action="store_true", help="the small CI size (a few minutes on 2 cores)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per method (default: 3, --quick: 2)")
    p.add_argument("--budget", choices=BUDGETS, default="equal-steps",
                   help="equal-steps: every method the same optimizer steps; paper: the released scripts' "
                        "shapes (POCL's epochs per stage, DistiLLM-2's one epoch per round)")
    p.add_argument("--world", choices=sorted(WORLDS), default="toy",
                   help="toy: the demo's models and data, scored by ROUGE-L; grammar: a language with a known "
                        "answer distribution per prompt, trained on its samples, each run also scored against "
                        "it (KL, validity, coverage; kdray.repro.language)")
    p.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                   help=f"methods to run (default: all of {', '.join(METHODS)}; also {', '.join(EXTRA_METHODS)})")
    p.add_argument("--data", help="toy world: training prompts with gold responses, fields id, prompt, response "
                                  "(.jsonl, .parquet; default toy:train; prompts up to 64 tokens; the toy models)")
    p.add_argument("--heldout", help="toy world: held-out prompts with gold responses (default toy:heldout)")
    p.add_argument("--out", default="runs/repro", help="output directory (default runs/repro)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: a local Ray)")
    p.set_defaults(fn=cmd_repro)
