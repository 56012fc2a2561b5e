"""Drive a real vLLM engine in a child process: used by the demo and the integration tests.

Each `EngineHost` spawns one process that builds `vllm.LLM` with the engine core in-process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so the child can also read the FlexKV connector's state.
The parent talks to it over a pipe with plain dicts; every wait has a timeout.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback
from dataclasses import dataclass
from typing import Any

DEFAULT_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "PYTHONHASHSEED": "0",
}


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]
    num_cached_tokens: int  # GPU prefix cache + FlexKV, as vLLM reports it
    flexkv_tokens: int  # of those, loaded from FlexKV (meaningful when requests ran one at a time)
    ttft_s: float


class EngineError(RuntimeError):
    pass


class EngineHost:
    def __init__(self, model: str, engine_kwargs: dict[str, Any], env: dict[str, str] | None = None,
                 start_timeout_s: float = 600):
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, model, engine_kwargs, {**DEFAULT_ENV, **(env or {})}),
                                   daemon=False)  # vLLM may spawn TP workers from it
        self.process.start()
        child.close()
        reply = self._receive(start_timeout_s)
        if "error" in reply:
            self.process.join(10)
            raise EngineError(reply["error"])

    def _receive(self, timeout_s: float) -> dict[str, Any]:
        if not self._conn.poll(timeout_s):
            self.close()
            raise EngineError(f"engine process gave no answer within {timeout_s:.0f}s")
        try:
            return self._conn.recv()
        except EOFError:
            raise EngineError(f"engine process died (exit code {self.process.exitcode})") from None

    def call(self, command: str, timeout_s: float = 600, **args: Any) -> Any:
        self._conn.send({"command": command, **args})
        reply = self._receive(timeout_s)
        if "error" in reply:
            raise EngineError(reply["error"])
        return reply["result"]

    def generate(self, prompts: list[list[int]], max_tokens: int = 8, one_at_a_time: bool = False,
                 timeout_s: float = 600) -> list[Completion]:
        raw = self.call("generate", timeout_s, prompts=prompts, max_tokens=max_tokens, one_at_a_time=one_at_a_time)
        return [Completion(**r) for r in raw]

    def call_async(self, command: str, **args: Any) -> None:
        """Send a command without waiting for its answer (e.g. to kill the engine while it runs)."""
        self._conn.send({"command": command, **args})

    def flexkv_state(self) -> dict[str, Any]:
        return self.call("flexkv_state")

    def cpu_resident_blocks(self, prompts: list[list[int]]) -> list[int]:
        """For each prompt, how many of its leading full blocks the FlexKV CPU tier holds ready."""
        return self.call("cpu_resident_blocks", prompts=prompts)

    def reset_cache(self) -> bool:
        """vLLM's prefix-cache reset, connectors included."""
        return self.call("reset_cache")

    def drain(self) -> None:
        """Step the engine until FlexKV has no load or save in flight."""
        self.call("drain")

    def close(self) -> None:
        if self.process.is_alive():
            try:
                self._conn.send({"command": "exit"})
            except (BrokenPipeError, OSError):
                pass
            self.process.join(30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(10)

    def __enter__(self) -> EngineHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- child process -------------------------------------------------------------------------------

def _serve(conn, model: str, engine_kwargs: dict[str, Any], env: dict[str, str]) -> None:
    os.environ.update(env)
    try:
        from vllm import LLM

        llm = LLM(model=model, **engine_kwargs)
    except BaseException:
        conn.send({"error": traceback.format_exc()})
        return
    conn.send({"ready": True})
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    connector = scheduler.connector
    # FlexKV's scheduler side, also when it is a child of a MultiConnector/PdConnector.
    children = getattr(connector, "sub_connectors", None) or getattr(connector, "_connectors", None) or [connector]
    side = next((c._scheduler for c in children if getattr(c, "_scheduler", None) is not None), None)
    while True:
        message = conn.recv()
        command = message.pop("command")
        if command == "exit":
            engine.engine_core.shutdown()  # runs the connectors' shutdown: SSD writes land
            return
        try:
            if command == "generate":
                result = _generate(engine, side, **message)
            elif command == "flexkv_state":
                result = _flexkv_state(connector, side)
            elif command == "cpu_resident_blocks":
                result = [side.engine.lookup(_block_hashes(engine, p)) for p in message["prompts"]]
            elif command == "drain":
                result = _drain(engine, side)
            elif command == "reset_cache":  # what vLLM does e.g. after a weight update
                result = engine.reset_prefix_cache(reset_connector=True)
            else:
                raise ValueError(f"unknown command {command!r}")
            conn.send({"result": result})
        except BaseException:
            conn.send({"error": traceback.format_exc()})


def _generate(engine, side, prompts: list[list[int]], max_tokens: int, one_at_a_time: bool) -> list[dict[str, Any]]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    batches = [[i] for i in range(len(prompts))] if one_at_a_time else [list(range(len(prompts)))]
    results: dict[int, dict[str, Any]] = {}
    for batch in batches:
        loaded_before = side.loaded_tokens if side else 0
        start = time.perf_counter()
        first_token: dict[int, float] = {}
        for i in batch:
            engine.add_request(str(i), {"prompt_token_ids": prompts[i]}, params)
        while engine.has_unfinished_requests():
            for out in engine.step():
                i = int(out.request_id)
                if out.outputs and out.outputs[0].token_ids and i not in first_token:
                    first_token[i] = time.perf_counter() - start
                if out.finished:
                    results[i] = {
                        "token_ids": list(out.outputs[0].token_ids),
                        "num_cached_tokens": out.num_cached_tokens or 0,
                        "ttft_s": first_token.get(i, 0.0),
                    }
        loaded = (side.loaded_tokens if side else 0) - loaded_before
        for i in batch:
            results[i]["flexkv_tokens"] = loaded if len(batch) == 1 else 0
        if side:
            _drain(engine, side)
    return [results[i] for i in range(len(prompts))]


def _block_hashes(engine, prompt: list[int]) -> list[bytes]:
    """vLLM's own block hashes of a prompt, computed by the engine's hasher (as for a request)."""
    from types import SimpleNamespace

    hasher = engine.engine_core.engine_core.request_block_hasher
    request = SimpleNamespace(
        block_hashes=[], num_tokens=len(prompt), all_token_ids=prompt, mm_features=[],
        lora_request=None, cache_salt=None, prompt_embeds=None, _prompt_embeds_per_block_hashes={},
    )
    return hasher(request)


def _drain(engine, side, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while side is not None and side.num_inflight:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{side.num_inflight} FlexKV transfers still in flight after {timeout_s}s")
        engine.step()


def _flexkv_state(connector, side) -> dict[str, Any]:
    if side is None:
        return {"connector": type(connector).__module__ + "." + type(connector).__name__ if connector else None}
    tier = side.engine.tiers[0]
    state = {
        "connector": type(connector).__module__ + "." + type(connector).__name__,
        "pool": side.identity,  # the /dev/shm name of its CPU tier
        "cpu_slots": tier.num_slots,
        "cpu_used": tier.num_used,
        "loaded_tokens": side.loaded_tokens,
        "engine_stats": vars(side.engine.snapshot()),
    }
    if side.lower_io is not None:
        store = side.lower_io.store
        state["ssd"] = {"healthy": store.healthy, "reason": store.degraded_reason, **vars(store.stats)}
    state["accounting"] = _accounting(side)
    return state


def _accounting(side) -> dict[str, Any]:
    """Whether the index agrees with itself and with what the SSD store holds (when it is healthy)."""
    problems = []
    for tier in side.engine.tiers:
        try:
            tier.verify()
        except AssertionError as exc:
            problems.append(f"{tier.name}: {exc}")
    if side.lower_io is not None and side.lower_io.store.healthy:
        # Every block the index has on SSD must be on disk at its slot (its newest record); the store
        # may hold more (freed slots keep their valid records until rewritten: see storage/ssd.py).
        ssd = side.engine.tiers[1]
        newest = dict(side.lower_io.store.recover())  # oldest write first: the newest record wins
        indexed = [(key, slot) for key, slot in newest.items() if ssd.is_ready(key)]
        moved = [key.hex()[:16] for key, slot in indexed if int(ssd.slot_of(key)) != slot]
        if moved or len(indexed) != ssd.num_used:
            problems.append(f"SSD: the index holds {ssd.num_used} blocks, {len(indexed)} of them on disk "
                            f"at their slot (elsewhere: {moved[:4]})")
    return {"problems": problems}
