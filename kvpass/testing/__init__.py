"""kvpass.testing: assertions for regression tests that fail when a model change, a transformers upgrade
or a rewrite change breaks pruning.

    from kvpass.testing import assert_sites, assert_identity, assert_cache_within, assert_oracle

    def test_my_model_prunes(kvpass_golden):
        model = MyModel().eval()
        assert_sites(model, [dict(num_heads=8, num_kv_heads=2, head_dim=64)] * 12)
        assert_identity(model)                                   # budget 1.0 changes nothing
        assert_cache_within(model, budget=0.25, prompt_len=256, steps=32)
        assert_oracle(model, "tova", budget=0.3)                 # exact meaning of eviction
        assert_onnx_parity(model, budget=0.5)                    # torch and onnxruntime agree
        kvpass_golden(kvpass.optimize(model, budget=0.5))        # the rewritten graph, as text

Each assertion raises AssertionError with what differed, where, and by how much; each works on a
copy and leaves the model unchanged. Hugging Face causal LMs need nothing else; a model that
carries its own cache tensors passes `example_inputs=(input_ids, position_ids, *cache)` (see
`kvpass.testing.decoding`). `kvpass_golden` and `pytest --kvpass-update-golden` come from the pytest
plugin kvpass installs (`kvpass.testing.plugin`).
"""

from kvpass.testing.cache import assert_cache_within
from kvpass.testing.golden import assert_golden, graph_summary
from kvpass.testing.identity import assert_identity
from kvpass.testing.onnx import assert_onnx_parity
from kvpass.testing.oracle import assert_oracle
from kvpass.testing.sites import assert_sites

__all__ = ["assert_sites", "assert_identity", "assert_cache_within", "assert_oracle", "assert_onnx_parity",
           "graph_summary", "assert_golden"]
