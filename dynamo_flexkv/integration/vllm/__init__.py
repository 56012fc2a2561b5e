"""vLLM KV-connector adapter (scheduler role + worker role) and plugin registration."""
