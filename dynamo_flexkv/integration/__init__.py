"""Thin adapters to vLLM and Dynamo; their types never leak below this package."""
