"""Data plane: executes plans by moving block bytes between vLLM's KV cache and the tiers."""
