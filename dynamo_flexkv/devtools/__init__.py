"""Development and test tooling shipped beside the runtime: the engine harness, offline tiny
models, process management for Dynamo deployments, an HTTP client and a KV-event reader. Nothing
under dynamo_flexkv.storage, .index, .transfer, .tiers or .integration imports it.
"""
