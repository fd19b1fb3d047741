"""The kvpass command: each subcommand in a subprocess on a tiny model directory (tokenizer included), --json
parsed; tables for people; errors exit non-zero with one line, never a traceback; the smollm2 short name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import kvpass
from kvpass.cli import main
from kvpass.planning import Plan

ROOT = Path(__file__).resolve().parents[1]


def kvpass_command(*args: str) -> subprocess.CompletedProcess:
    """`python -m kvpass ARGS` from this checkout, on one thread."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "kvpass", *args, "--threads", "1"], capture_output=True, text=True,
                          env=env, timeout=900)


def run_json(*args: str) -> dict:
    done = kvpass_command(*args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def save_tiny_llama(folder: Path, **config) -> Path:
    """A tiny random Llama saved with `save_pretrained`, with a byte-level BPE tokenizer trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(["The grass is green. The sky is blue. The sun is yellow. Here we go."] * 4,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<eos>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<pad>")
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{
        "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
        "intermediate_size": 128, "vocab_size": len(tokenizer), "pad_token_id": 0, "eos_token_id": 1,
        "bos_token_id": 1, "max_position_embeddings": 512, **config}))
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"))


PROMPT = "The grass is green. The sky is blue. The sun is yellow. Here we go. " * 4


def test_find(tiny) -> None:
    found = run_json("find", str(tiny))
    assert [(s["name"], s["num_heads"], s["num_kv_heads"], s["head_dim"], s["causal"]) for s in found["sites"]] == [
        (f"model.layers.{i}.self_attn", 4, 2, 16, True) for i in range(2)]
    assert found["unsupported"] == [] and found["capture"] == "torch.export"


def test_plan_then_optimize_with_the_plan(tiny, tmp_path) -> None:
    planned = run_json("plan", str(tiny), "--budget", "0.25", "--transform", "PruneHeads(0.25)",
                       "--transform", "Evict('knorm', allocation='adaptive')", "-o", str(tmp_path / "plan.json"),
                       "--lengths", "256", "1024")
    plan = Plan.load(tmp_path / "plan.json")
    assert planned["plan"] == plan.to_dict() and sum(map(len, plan.pruned_heads.values())) == 1
    assert [row["seq_len"] for row in planned["lengths"]] == [256, 1024]
    assert all(row["ratio"] <= 0.25 for row in planned["lengths"])
    optimized = run_json("optimize", str(tiny), "--plan", str(tmp_path / "plan.json"), "--prompt", PROMPT,
                         "--max-new-tokens", "8")
    assert len(optimized["full"]["tokens"]) == len(optimized["pruned"]["tokens"]) == 8
    assert optimized["pruned"]["kv_bytes"] <= 0.25 * optimized["full"]["kv_bytes"]
    assert optimized["stats"]["PruneHeads"]["kv_heads_removed"] == 1
    assert 0 <= optimized["matching_tokens"] <= 8


def test_optimize_with_transforms(tiny) -> None:
    optimized = run_json("optimize", str(tiny), "--budget", "0.5", "--transform", "PruneHeads(0.25)",
                         "--transform", "Evict('knorm', sinks=2)", "--prompt", PROMPT, "--max-new-tokens", "4")
    assert [t["name"] for t in optimized["transforms"]] == ["PruneHeads", "Evict"]
    assert optimized["stats"]["PruneHeads"]["kv_heads_removed"] == 1
    assert optimized["pruned"]["kv_bytes"] <= 0.5 * optimized["full"]["kv_bytes"]


def test_export_then_serve_onnx(tiny, tmp_path) -> None:
    out = tmp_path / "tiny.onnx"
    exported = run_json("export", str(tiny), str(out), "--budget", "0.5", "--transform", "PruneHeads(0.25)",
                        "--transform", "Evict('knorm')")
    assert out.is_file() and Path(exported["tokenizer"]).is_dir()
    assert sorted(site["kv_heads"] for site in exported["kvpass"]["sites"]) == [1, 2]  # one KV head exported away
    served = run_json("serve-onnx", str(out), "--prompt", PROMPT, "--max-new-tokens", "6")
    # the budget caps bytes against the unmodified model (4 KV heads); the exported graph's full cache has 3
    assert len(served["tokens"]) == 6 and served["kv_bytes"] <= 0.5 * served["full_kv_bytes"] * 4 / 3


def test_eval(tiny, tmp_path) -> None:
    evaluated = run_json("eval", str(tiny), "--tasks", "niah", "passkey", "--methods", "default", "knorm:span=1",
                         "--budgets", "0.5", "--samples", "1", "--length", "300", "--out", str(tmp_path / "run"))
    assert evaluated["settings"] == ["full", "default@0.5", "knorm:span=1@0.5"]
    assert len(evaluated["rows"]) == 2 * 3 * 2  # tasks x settings x modes (the full cache scored once per sample)
    assert {(r["task"], r["mode"]) for r in evaluated["mean_scores"]} == {
        (task, mode) for task in ("niah", "passkey") for mode in ("query-aware", "context-only")}
    assert evaluated["files"] == [str(tmp_path / "run.jsonl"), str(tmp_path / "run_accuracy.png")]
    assert all(Path(path).stat().st_size > 0 for path in evaluated["files"])


def test_tables_for_people(tiny, capsys) -> None:
    assert main(["find", str(tiny)]) == 0
    out = capsys.readouterr().out
    assert "2 attention sites in" in out and "model.layers.1.self_attn" in out and "unsupported: none" in out
    assert main(["plan", str(tiny), "--budget", "0.5", "--allocation", "uniform"]) == 0
    out = capsys.readouterr().out
    assert "budget per attention site" in out and "uniform, paged_tova, budget 0.5" in out and "predicted KV cache" in out


@pytest.mark.parametrize("command", ["plan", "optimize", "export"])
def test_transform_calls_are_parsed_not_evaluated(tiny, command, tmp_path, capsys) -> None:
    from kvpass.cli.main import build_parser

    positional = [str(tiny), *{"export": [str(tmp_path / "out.onnx")], "optimize": ["--prompt", "hi"]}.get(command, [])]
    args = build_parser().parse_args([command, *positional, "--transform", "PruneHeads(0.1)",
                                      "--transform", "Evict('tova', span=2)"])
    assert args.transform == [kvpass.PruneHeads(0.1), kvpass.Evict("tova", span=2)]
    marker = tmp_path / "evaluated"
    assert main([command, *positional, "--transform", f"__import__('pathlib').Path({str(marker)!r}).touch()"]) == 2
    assert not marker.exists() and "must be a transform name or a call" in capsys.readouterr().err


def test_bad_argument_exits_2_with_one_line(tiny) -> None:
    done = kvpass_command("plan", str(tiny), "--budget", "3")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "kvpass plan: error: argument --budget: budget must be in (0, 1] (the fraction of KV-cache bytes kept), got "
        "3.0; write an absolute budget with its unit, e.g. '2048 tokens' or '512MB' (see kvpass plan --help)"]


@pytest.mark.parametrize("args, status, reason", [
    (["find", "no/such/model"], 2, "argument MODEL: no such file or directory 'no/such/model'"),
    (["plan", "{tiny}", "--transform", "__import__('os').system('true')"], 2, "must be a transform name or a call"),
    (["plan", "{tiny}", "--transform", "Unknown(1)"], 2, "unknown transform 'Unknown'; known:"),
    (["plan", "{tiny}", "--transform", "PruneHeads(0.1)", "--method", "h2o"], 2, "--method is an option of the default "
                                                                                 "Evict transform"),
    (["plan", "{tiny}", "--budget", "0.5", "--transform", "PruneHeads(0.25)", "--allocation", "uniform"], 2,
     "--allocation is an option"),
    (["plan", "{tiny}", "--budget", "0.5", "--transform", "PruneHeads(0.25)"], 1,
     "the transforms keep 0.750 of the KV-cache bytes and none of them evicts"),
    (["optimize", "{tiny}", "--prompt-file", "no/such/prompt.txt"], 1, "--prompt-file: no such file"),
    (["optimize", "{tiny}", "--plan", "{tiny}/config.json", "--prompt", "hi"], 1, "config.json: unknown plan fields"),
    (["optimize", "{tiny}", "--plan", "p.json", "--budget", "0.5", "--prompt", "hi"], 2, "--plan already records"),
    (["serve-onnx", "{tiny}", "--prompt", "hi"], 1, "is not an .onnx file"),
    (["eval", "{tiny}", "--methods", "tova:span=two"], 2, "option 'span=two' must be key=number"),
    (["eval", "{tiny}", "--budgets", "1.5"], 2, "argument --budgets: expected a fraction of the full cache"),
    (["eval", "{sliding}"], 1, "eval needs a tokenizer with a chat template"),
    (["export", "{sliding}", "out.onnx"], 1, "exports full-attention caches only: layers [0] keep a sliding window"),
])
def test_failures_exit_non_zero_with_one_line(tiny, tmp_path_factory, capsys, args, status, reason) -> None:
    sliding = tmp_path_factory.getbasetemp() / "sliding"
    if "{sliding}" in args and not sliding.exists():
        _save_sliding_window_model(sliding)
    assert main([a.format(tiny=tiny, sliding=sliding) for a in args]) == status
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and reason in lines[0] and "Traceback" not in captured.err, captured.err
    assert captured.out == ""


def _save_sliding_window_model(folder: Path) -> None:
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1,
                           intermediate_size=64, vocab_size=64, sliding_window=16)
    MistralForCausalLM(config).save_pretrained(folder)


def test_the_command_is_a_project_script_and_a_module() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    module, _, function = project["scripts"]["kvpass"].partition(":")
    assert getattr(__import__(module, fromlist=[function]), function) is main
    assert project["entry-points"]["pytest11"] == {"kvpass.testing.plugin": "kvpass.testing.plugin"}
    assert (ROOT / "kvpass" / "__main__.py").is_file()


@pytest.mark.slow
def test_smollm2_eval() -> None:
    """`kvpass eval` on the real model by its short name (its chat template, one short sample): the full cache
    finds the passkey. (`find` and `optimize` load it the same way; one model load keeps CI short.)"""
    evaluated = run_json("eval", "smollm2", "--tasks", "passkey", "--samples", "1", "--length", "300",
                         "--budgets", "0.5", "--modes", "context-only")
    assert evaluated["settings"] == ["full", "default@0.5"] and len(evaluated["rows"]) == 2
    assert {row["setting"]: row["score"] for row in evaluated["rows"]}["full"] == 1.0


@pytest.mark.slow
def test_smollm2_optimize() -> None:
    """`kvpass optimize smollm2` loads the model offline by its short name and generates with the full and the
    pruned model side by side, the pruned cache within the budget (`find` on it: tests/test_smollm2.py)."""
    optimized = run_json("optimize", "smollm2", "--budget", "0.5", "--prompt", "The capital of France is",
                         "--max-new-tokens", "4")
    assert optimized["pruned"]["kv_bytes"] <= 0.5 * optimized["full"]["kv_bytes"]
    assert optimized["full"]["text"] and optimized["pruned"]["text"]


@pytest.mark.slow
def test_smollm2_export_then_serve_onnx(tmp_path) -> None:
    """`kvpass export smollm2` writes a pruned ONNX graph with its tokenizer; `kvpass serve-onnx` generates with
    onnxruntime, its cache within the budget."""
    out = tmp_path / "smollm2.onnx"
    exported = run_json("export", "smollm2", str(out), "--budget", "0.5")
    assert out.is_file() and len(exported["kvpass"]["sites"]) == 30
    assert {site["schedule"]["evict_every"] for site in exported["kvpass"]["sites"]} == {16}  # the serving default
    served = run_json("serve-onnx", str(out), "--prompt", "The capital of France is", "--max-new-tokens", "4")
    assert len(served["tokens"]) == 4 and served["kv_bytes"] <= 0.5 * served["full_kv_bytes"]
