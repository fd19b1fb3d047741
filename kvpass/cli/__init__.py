"""The `kvpass` command line: find, plan, optimize, export, serve-onnx, eval.

    kvpass find smollm2
    kvpass plan smollm2 --budget 0.25 -o plan.json
    kvpass optimize smollm2 --plan plan.json --prompt-file prompt.txt --chat
    kvpass export smollm2 smollm2.onnx --budget 0.5
    kvpass serve-onnx smollm2.onnx --prompt-file prompt.txt --chat
    kvpass eval smollm2 --tasks niah passkey --methods default tova --budgets 0.5 0.25 --out results/smollm2

Tables on a terminal, `--json` for programs; see `kvpass.cli.main` for exit codes.
"""

from kvpass.cli.main import main

__all__ = ["main"]
