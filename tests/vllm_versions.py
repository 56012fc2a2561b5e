"""Make the CPU build's engine behave as other vLLM versions do where the connector depends on it.

Each function runs in an engine process before vLLM starts (`EngineHost(child_setup=...)`).
"""

from __future__ import annotations


def no_forward_step_without_wait_for_save() -> None:
    """vLLM 0.26's model runners (V1 and V2) skip `wait_for_save` in a step that schedules no tokens:
    they call `start_load_kv` and `get_finished` only. 0.31 calls all three. A connector that starts
    saves in `wait_for_save` never starts the saves handed out in such a step."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group
    from vllm.forward_context import set_forward_context
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.worker.kv_connector_model_runner_mixin import KVConnectorModelRunnerMixin as Mixin

    def kv_connector_no_forward(scheduler_output, vllm_config):
        with set_forward_context(None, vllm_config), Mixin._get_kv_connector_output(
            scheduler_output, defer_finalize=True  # 0.31's way to skip wait_for_save
        ) as output:
            pass
        get_kv_transfer_group().clear_connector_metadata()
        return ModelRunnerOutput.with_kv_conn_output_only(output)

    Mixin.kv_connector_no_forward = staticmethod(kv_connector_no_forward)
