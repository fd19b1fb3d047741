"""Every example runs as written, on a tiny model (`--tiny`), in this process."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

pytest_plugins = ["pytester"]


def run(monkeypatch, capsys, name: str, *args: str) -> str:
    """Run examples/`name` as a script with `args`; returns what it printed."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setattr(sys, "argv", [name, *args])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    return capsys.readouterr().out


def test_hf_generate(monkeypatch, capsys) -> None:
    out = run(monkeypatch, capsys, "hf_generate.py", "--tiny")
    assert "generated 24" in out and "KV cache held" in out


def test_compile_decode_step(monkeypatch, capsys) -> None:
    out = run(monkeypatch, capsys, "compile_decode_step.py", "--tiny", "--backend", "aot_eager")
    assert "['kvpass.attention.default', 'kvpass.select_and_compact.default']" in out


def test_onnx_serving(monkeypatch, capsys, tmp_path) -> None:
    out = run(monkeypatch, capsys, "onnx_serving.py", "--tiny", "--out", str(tmp_path / "tiny.onnx"))
    assert "same tokens as torch: True" in out


def test_explicit_cache_model(monkeypatch, capsys) -> None:
    out = run(monkeypatch, capsys, "explicit_cache_model.py", "--tiny", "--tokens", "48")
    assert "the model's cache holds 48 tokens per layer" in out and "the pruned model's 11 " in out


def test_custom_method(monkeypatch, capsys) -> None:
    out = run(monkeypatch, capsys, "custom_method.py", "--tiny")
    assert "value_aware: decoding equals the full model" in out


def test_custom_transform(monkeypatch, capsys) -> None:
    out = run(monkeypatch, capsys, "custom_transform.py", "--tiny")
    assert "KV heads kept per layer: [1, 1] of 2" in out


def test_kit_on_a_hand_written_model(pytester) -> None:
    result = pytester.runpytest_inprocess(str(EXAMPLES / "test_own_model.py"), "-p", "kvpass.testing.plugin")
    result.assert_outcomes(passed=5)
