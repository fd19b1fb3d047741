"""The pruning options `plan`, `optimize` and `export` share: a budget, and either transforms,
the eviction shorthand (`--method`, `--sinks`, ...), or a saved plan."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kvpass.budget import Budget, parse_budget
from kvpass.methods import METHODS
from kvpass.planning import ALLOCATIONS, Plan
from kvpass.transforms import Evict, Transform
from kvpass.cli.errors import UsageError
from kvpass.cli.prompts import positive_int
from kvpass.cli.transform_arg import parse_transform

EVICT_SHORTHAND = ("method", "allocation", "sinks", "recent", "evict_every")
"""Options of the default `Evict` transform that have their own flags."""


def add_pruning_arguments(parser: argparse.ArgumentParser, plan_file: bool, allocation_help: str) -> None:
    parser.add_argument("--budget", type=budget_argument,
                        help="cap on KV-cache bytes relative to the unmodified model: a fraction in (0, 1], "
                             "'2048 tokens' or a size such as '512MB' (default 0.5)")
    parser.add_argument("--transform", type=transform_argument, action="append", metavar="CALL",
                        help="a transform, repeatable: \"PruneHeads(0.1)\", \"Evict('tova', span=2)\"; "
                             "without it, Evict with the options below")
    parser.add_argument("--method", type=method_argument, help=f"eviction method: {', '.join(sorted(METHODS))} "
                                                                "(default: paged, 16-token pages)")
    parser.add_argument("--allocation", choices=ALLOCATIONS, help=allocation_help)
    parser.add_argument("--sinks", type=int, help="first tokens always kept (default 4)")
    parser.add_argument("--recent", type=int, help="latest tokens always kept (default 32)")
    parser.add_argument("--evict-every", type=positive_int,
                        help="evict at most every N steps (default 1; export: 16, the ONNX serving default)")
    if plan_file:
        parser.add_argument("--plan", type=Path, metavar="PLAN.json", help="apply a plan saved by `kvpass plan -o`")


def budget_argument(text: str) -> Budget:
    """argparse `type=` for --budget: a number is a fraction; text takes a unit."""
    try:
        return parse_budget(float(text) if _is_number(text) else text)
    except (TypeError, ValueError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def transform_argument(text: str) -> Transform:
    try:
        return parse_transform(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def method_argument(text: str) -> str:
    if text not in METHODS:
        raise argparse.ArgumentTypeError(f"unknown method {text!r}; expected one of {', '.join(sorted(METHODS))}")
    return text


def transforms_from(args: argparse.Namespace, default_allocation: str, default_evict_every: int = 1) -> list[Transform]:
    """The transforms the arguments ask for: `--transform`s as written, or one `Evict` from the shorthand."""
    given = [name for name in EVICT_SHORTHAND if getattr(args, name, None) is not None]
    if args.transform:
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise UsageError(f"{flags} {'are options' if len(given) > 1 else 'is an option'} of the default Evict "
                             "transform; with --transform, write options on an Evict transform instead, e.g. "
                             "--transform \"Evict('tova', sinks=4)\"")
        return list(args.transform)
    options: dict[str, Any] = {name: getattr(args, name) for name in given}
    options.setdefault("allocation", default_allocation)
    options.setdefault("evict_every", default_evict_every)
    return [Evict(options.pop("method", None), **options)]


def budget_and_plan(args: argparse.Namespace) -> tuple[Budget, Plan | None]:
    """The budget (0.5 unless given) and the saved plan, refusing a plan given with pruning options."""
    plan = None
    if getattr(args, "plan", None) is not None:
        chosen = [flag for flag, value in (("--budget", args.budget), ("--transform", args.transform),
                                           *(("--" + n.replace("_", "-"), getattr(args, n)) for n in EVICT_SHORTHAND))
                  if value is not None]
        if chosen:
            raise UsageError(f"--plan already records the budget and transforms; drop {', '.join(chosen)}")
        plan = Plan.load(args.plan)
    return (args.budget if args.budget is not None else parse_budget(0.5)), plan


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
