"""dynamo-flexkv: FlexKV-compatible multi-tier KV-cache offload for vLLM + NVIDIA Dynamo.

Kept deliberately tiny: importing the package must not import torch or vllm.
"""

__version__ = "0.1.0"
