"""The `kvpass` command: argument parsing, dispatch to one module per subcommand, and exit codes.

Exit status: 0 on success; 2 for bad arguments (a one-line reason and where to read the usage);
1 with a one-line reason when a file is missing, a model cannot be loaded, or kvpass refuses
it (`--debug` shows the traceback). Library output that would land on stdout is sent to stderr
while a subcommand runs, so stdout holds only the result (`--json`: exactly one JSON object).
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, redirect_stdout
from typing import NoReturn

from kvpass.cli import evaluate, export, find, optimize, plan, serve_onnx
from kvpass.cli.errors import UsageError
from kvpass.cli.prompts import positive_int
from kvpass.cli.ui import UI

SUBCOMMANDS = {module.NAME: module for module in (find, plan, optimize, export, serve_onnx, evaluate)}
EXPECTED_FAILURES = (OSError, ValueError, TypeError, NotImplementedError, ImportError, RuntimeError)
"""What a bad model, file or setting raises (kvpass's own errors are ValueError/NotImplementedError)."""


class Parser(argparse.ArgumentParser):
    """argparse, with errors as one line that points at --help."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> Parser:
    parser = Parser(prog="kvpass", description="Find attention in a model's graph and rewrite it onto a physically "
                                                "pruned KV cache.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    common.add_argument("--threads", type=positive_int, help="CPU threads for torch and onnxruntime")
    common.add_argument("--debug", action="store_true", help="show the traceback when a command fails")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)
    for name, module in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=module.HELP, description=module.__doc__.splitlines()[0],
                                  parents=[common])
        module.add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `kvpass ARGS`; returns the exit status.

    Example:
        >>> main(["plan", "smollm2", "--budget", "3"])   # doctest: +SKIP
        kvpass plan: error: argument --budget: budget must be in (0, 1] ... (see kvpass plan --help)
        2
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse's --help (0) and usage errors (2)
        return int(exit_.code or 0)
    prog = f"kvpass {args.command}"
    ui = UI(json_output=args.json)
    try:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        module = SUBCOMMANDS[args.command]
        with redirect_stdout(sys.stderr), _library_chatter(shown=args.debug):
            result = module.run(args, ui)
        ui.emit(result, module.render)
        return 0
    except UsageError as error:
        print(f"{prog}: error: {error} (see {prog} --help)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - every failure is reported as one line
        if args.debug:
            traceback.print_exc()
        expected = isinstance(error, EXPECTED_FAILURES)
        kind = "error" if expected else f"internal error ({type(error).__name__})"
        hint = "" if expected or args.debug else "; rerun with --debug for the traceback"
        print(f"{prog}: {kind}: {_one_line(error)}{hint}", file=sys.stderr)
        return 1


@contextmanager
def _library_chatter(shown: bool) -> Iterator[None]:
    """Hide the warnings torch, transformers and the ONNX exporter print while they work (shown with --debug)."""
    if shown:
        yield
        return
    loggers = [logging.getLogger(name) for name in ("torch", "transformers", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return " ".join(lines[:1]) or type(error).__name__
