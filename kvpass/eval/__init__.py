"""Quality evaluation on real models: model loading, passkey retrieval, budget sweeps."""
