"""torch.compile of a decoding step over a pruned KV cache, as one graph.

    python examples/compile_decode_step.py            # SmolLM2-135M-Instruct
    python examples/compile_decode_step.py --tiny     # a tiny random Llama

After `kvpass.optimize`, attention over the compacted cache and the eviction are `torch.library`
custom ops (`kvpass::attention`, `kvpass::select_and_compact`) with fake kernels, so a decode
step that evicts compiles with `fullgraph=True`: each op is one node of the graph, with no graph
break. The example prints the kvpass nodes dynamo captured and checks the compiled step returns
the eager step's logits.

Limitation: the step is compiled for the cache state it runs at (token counts live in Python),
so calling the compiled function at the next step recompiles it; compiling a whole decode loop
is not supported yet.
"""

from __future__ import annotations

import argparse
import copy

import torch
from transformers import DynamicCache

import kvpass
from kvpass.runtime.call_arguments import cache_keyword
from hf_generate import load


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model instead of SmolLM2")
    args = parser.parse_args(argv)

    base, _, ids = load(args.tiny)
    # TOVA evicts a token as soon as the cache is over its budget, so a step that evicts comes within a few
    # steps; the default method (paged) frees whole 16-token pages and evicts only every 16 steps or so.
    model = kvpass.optimize(copy.deepcopy(base), budget=args.budget, method="tova", sinks=4, recent=16)
    captured: list[str] = []

    def backend(graph_module: torch.fx.GraphModule, example_inputs):
        """Note the kvpass ops dynamo captured, then compile with the chosen backend."""
        captured.extend(str(node.target) for node in graph_module.graph.nodes if "kvpass" in str(node.target))
        return torch._dynamo.lookup_backend(args.backend)(graph_module, example_inputs)

    keyword = cache_keyword(model)  # resolved once, outside the compiled step

    def step(token, cache):
        return model(token, **{keyword: cache}, use_cache=True).logits

    eager_cache, compiled_cache = DynamicCache(config=model.config), DynamicCache(config=model.config)
    with torch.no_grad():
        token = model(ids, **{keyword: eager_cache}, use_cache=True).logits[:, -1:].argmax(-1)
        model(ids, **{keyword: compiled_cache}, use_cache=True)
        for index in range(4):  # until a step evicts (one in two at budget 0.5); each state compiles anew
            eager = step(token, eager_cache)
            compiled = torch.compile(step, fullgraph=True, backend=backend)(token, compiled_cache)
            torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
            assert compiled_cache.layers[0].keys.shape == eager_cache.layers[0].keys.shape
            difference = float((compiled - eager).abs().max())
            print(f"step {index}: compiled = eager (largest logit difference {difference:.1e}); layer 0 holds "
                  f"{compiled_cache.layers[0].keys.shape[-2]} of {compiled_cache.get_seq_length()} tokens")
            if "kvpass.select_and_compact.default" in captured:
                break
            token = eager[:, -1:].argmax(-1)
    print(f"kvpass nodes in the compiled steps ({args.backend}): {sorted(set(captured))}")


if __name__ == "__main__":
    main()
