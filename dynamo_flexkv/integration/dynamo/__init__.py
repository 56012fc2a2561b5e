"""Dynamo adapter: the legacy worker launcher (launcher.py), local deployments (processes.py),
OpenAI/metrics client (client.py) and the KV-event stream checker (kv_stream.py). See docs/dynamo.md."""
