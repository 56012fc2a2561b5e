"""`python -m dynamo_flexkv.vllm`: Dynamo's vLLM worker with the legacy FlexKV flags (see
`dynamo_flexkv.integration.dynamo.launcher`)."""
