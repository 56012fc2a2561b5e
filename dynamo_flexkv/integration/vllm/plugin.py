"""vLLM general plugin: makes `FlexKVConnectorV1` resolve to dynamo-flexkv's connector.

vLLM loads the `vllm.general_plugins` entry points in every vLLM process. vLLM itself registers
`FlexKVConnectorV1` as a wrapper that imports Tencent's `flexkv` package; when that package is not
importable we re-register the name to our connector, so Dynamo's documented
`{"kv_connector":"FlexKVConnectorV1"}` works unmodified. Our own name always resolves to us.
"""

from __future__ import annotations

import importlib.util

CONNECTOR_NAME = "DynamoFlexKVConnector"
FLEXKV_COMPAT_NAME = "FlexKVConnectorV1"
CONNECTOR_MODULE = "dynamo_flexkv.integration.vllm.connector"
CONNECTOR_CLASS = "FlexKVConnector"


def register() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    registry = KVConnectorFactory._registry  # vLLM offers no public "replace"
    # Our name, and our class name: MultiConnector looks its children's stats classes up by class name.
    for name in (CONNECTOR_NAME, CONNECTOR_CLASS):
        if name not in registry:
            KVConnectorFactory.register_connector(name, CONNECTOR_MODULE, CONNECTOR_CLASS)
    if importlib.util.find_spec("flexkv") is None:
        registry.pop(FLEXKV_COMPAT_NAME, None)
        KVConnectorFactory.register_connector(FLEXKV_COMPAT_NAME, CONNECTOR_MODULE, CONNECTOR_CLASS)
