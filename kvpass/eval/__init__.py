"""Quality evaluation on real models.

corpus (shipped public-domain text) -> tasks (seeded prompts, scoring) -> runner (one shared
prefill per sample: sweep) -> report (tables, retention) and plots; perplexity on held-out
text; models loads SmolLM2 offline; passkey is DESIGN.md's original protocol.
"""
