"""Reading a model output's cache under the name the installed transformers stored it by, without the
deprecation warning transformers 5.24 logs for the old name."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from kvpass.runtime.call_arguments import cache_argument, output_cache


@pytest.mark.parametrize("use_cache", [True, False])
def test_output_cache_reads_the_stored_field_and_logs_nothing(use_cache: bool, caplog) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1,
                         intermediate_size=64, vocab_size=64)
    model = LlamaForCausalLM(config).eval()
    cache = DynamicCache(config=config)
    given = cache_argument(model, cache) if use_cache else {}  # without: an output that holds no cache
    with torch.no_grad():
        output = model(torch.ones(1, 3, dtype=torch.long), **given, use_cache=use_cache)
    getattr(logging.Logger.warning_once, "cache_clear", lambda: None)()  # transformers logs it once per process
    with caplog.at_level(logging.WARNING, logger="transformers"):
        found = output_cache(output)
    assert (found is cache) if use_cache else found is None
    assert not [record for record in caplog.records if "deprecated" in record.getMessage()]
