"""Drive a real vLLM engine in a child process: used by the demo and the integration tests.

Each `EngineHost` spawns one process that builds `vllm.LLM` with the engine core in-process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so the child can also read the FlexKV connector's state.
The parent talks to it over a pipe with plain dicts; every wait has a timeout.
"""

from __future__ import annotations

import importlib
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
    ttft_s: float  # from the batch's submission to this request's first token
    finish_s: float  # from the batch's submission to this request's last token


class EngineError(RuntimeError):
    pass


class InPlaceWeights:
    """vLLM worker extension (`worker_extension_cls`): hand the running model new weights as tensors, as
    an RL loop does after a training step; call with `llm.collective_rpc("load_weights_from", ...)`."""

    def load_weights_from(self, model_dir: str) -> None:
        from safetensors.torch import load_file

        tensors = load_file(os.path.join(model_dir, "model.safetensors"))
        # vLLM's in-place reload: loading into the parameters alone misses the CPU kernels' repacked copies
        self.reload_weights(weights_iterator=iter(tensors.items()))


WEIGHT_SWAP = f"{__name__}.{InPlaceWeights.__qualname__}"  # the engine argument worker_extension_cls to pass


class EngineHost:
    """`child_setup` ("module:function") runs in the engine process before vLLM starts, e.g. to make
    the engine behave as another vLLM version does (tests/vllm_versions.py). `netns`: the name of a
    network namespace (`ip netns add`) the engine runs in, as on its own node. An `env` value of None
    unsets that variable in the engine's process."""

    def __init__(self, model: str, engine_kwargs: dict[str, Any], env: dict[str, str | None] | None = None,
                 start_timeout_s: float = 600, netns: str | None = None, child_setup: str | None = None):
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        env = {**DEFAULT_ENV, **(env or {})}
        self.process = ctx.Process(target=_serve, args=(child, model, engine_kwargs, env, netns, child_setup),
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

    def generate(self, prompts: list[list[int]], max_tokens: int | list[int] = 8, one_at_a_time: bool = False,
                 timeout_s: float = 600) -> list[Completion]:
        """Greedy completions; `max_tokens` for every prompt or one per prompt."""
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

    def generate_across_weight_update(self, prompts: list[list[int]], max_tokens: int, steps_before: int,
                                      weights: str, timeout_s: float = 600) -> dict[str, Any]:
        """Greedy completions of `prompts`, submitted together. After `steps_before` engine steps the
        weights are replaced in place by the model in directory `weights` (the engine needs
        `worker_extension_cls=WEIGHT_SWAP`) and the cache is reset as RL loops do, running requests and
        connector included. Returns `token_ids` per prompt, `before_reset` (tokens each had then),
        `saves_in_flight` (FlexKV's pending stores' blocks then, `heads`: those that start a prompt),
        `lower_tier_jobs` (spills and stagings in flight then), and `hit_blocks` (FlexKV's hits per tier)
        and `loaded_tokens` counted after the reset."""
        return self.call("generate_across_weight_update", timeout_s, prompts=prompts, max_tokens=max_tokens,
                         steps_before=steps_before, weights=weights)

    def drain(self) -> None:
        """Step the engine until its connector (FlexKV or another) has no load or save in flight."""
        self.call("drain")

    def reset_gpu_prefix_cache(self) -> None:
        """Drop every cached block from vLLM's own (GPU) prefix cache; the connector keeps its tiers."""
        self.call("reset_gpu_prefix_cache")

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

def _enter_netns(name: str) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
            raise OSError(ctypes.get_errno(), f"setns into network namespace {name}")
    finally:
        os.close(fd)


def _serve(conn, model: str, engine_kwargs: dict[str, Any], env: dict[str, str | None], netns: str | None,
           child_setup: str | None) -> None:
    for name, value in env.items():  # None: the variable is unset in the engine's process
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    try:
        if netns is not None:
            _enter_netns(netns)
        if child_setup:
            module, function = child_setup.split(":")
            getattr(importlib.import_module(module), function)()
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
                result = _flexkv_state(scheduler, side)
            elif command == "cpu_resident_blocks":
                result = [side.engine.lookup(_block_hashes(engine, p)) for p in message["prompts"]]
            elif command == "drain":
                result = _drain(engine, side)
            elif command == "reset_gpu_prefix_cache":
                _drain(engine, side)
                result = engine.reset_prefix_cache()
                if not result:
                    raise RuntimeError("vLLM refused to reset its prefix cache (requests still running?)")
            elif command == "reset_cache":  # what vLLM does e.g. after a weight update
                result = engine.reset_prefix_cache(reset_connector=True)
            elif command == "generate_across_weight_update":
                result = _generate_across_weight_update(llm, side, **message)
            else:
                raise ValueError(f"unknown command {command!r}")
            conn.send({"result": result})
        except BaseException:
            conn.send({"error": traceback.format_exc()})


def _generate(engine, side, prompts: list[list[int]], max_tokens: int | list[int], one_at_a_time: bool) -> list[dict[str, Any]]:
    from vllm import SamplingParams

    limits = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in limits]
    batches = [[i] for i in range(len(prompts))] if one_at_a_time else [list(range(len(prompts)))]
    results: dict[int, dict[str, Any]] = {}
    for batch in batches:
        loaded_before = side.loaded_tokens if side else 0
        start = time.perf_counter()
        first_token: dict[int, float] = {}
        for i in batch:
            engine.add_request(str(i), {"prompt_token_ids": prompts[i]}, params[i])
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
                        "finish_s": time.perf_counter() - start,
                    }
        loaded = (side.loaded_tokens if side else 0) - loaded_before
        for i in batch:
            results[i]["flexkv_tokens"] = loaded if len(batch) == 1 else 0
        _drain(engine, side)
    return [results[i] for i in range(len(prompts))]


def _generate_across_weight_update(llm, side, prompts: list[list[int]], max_tokens: int, steps_before: int,
                                   weights: str) -> dict[str, Any]:
    from vllm import SamplingParams

    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": prompt}, params)
    tokens: dict[int, list[int]] = {i: [] for i in range(len(prompts))}

    def step() -> None:
        for out in engine.step():
            tokens[int(out.request_id)] = list(out.outputs[0].token_ids)

    for _ in range(steps_before):
        step()
    before = [len(tokens[i]) for i in range(len(prompts))]
    heads = {_block_hashes(engine, p)[0] for p in prompts}
    pending = [plan.keys for plan in side.engine.pending_stores().values()]
    lower_tier_jobs = side.tiers.num_pending
    llm.collective_rpc("load_weights_from", args=(weights,))
    if not engine.reset_prefix_cache(reset_running_requests=True, reset_connector=True):
        raise RuntimeError("vLLM refused the cache reset")
    hits, loaded = dict(side.engine.snapshot().hit_blocks), side.loaded_tokens
    while engine.has_unfinished_requests():
        step()
    _drain(engine, side)
    return {
        "token_ids": [tokens[i] for i in range(len(prompts))],
        "before_reset": before,
        "saves_in_flight": {"blocks": sum(map(len, pending)), "heads": sum(keys[0] in heads for keys in pending)},
        "lower_tier_jobs": lower_tier_jobs,
        "hit_blocks": {tier: n - hits[tier] for tier, n in side.engine.snapshot().hit_blocks.items()},
        "loaded_tokens": side.loaded_tokens - loaded,
    }


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
    """Step until no transfer is in flight: FlexKV's own count, or vLLM's view for other connectors
    (finished requests whose blocks a connector still holds keep the scheduler busy)."""
    scheduler = engine.engine_core.engine_core.scheduler
    deadline = time.monotonic() + timeout_s
    while side.num_inflight if side is not None else scheduler.has_requests():
        if time.monotonic() > deadline:
            raise TimeoutError(f"connector transfers still in flight after {timeout_s}s")
        engine.step()


def _flexkv_state(scheduler, side) -> dict[str, Any]:
    connector = scheduler.connector
    engine = {  # vLLM's own view: whether its hybrid KV cache manager is on, and its KV-cache groups
        "connector": type(connector).__module__ + "." + type(connector).__name__ if connector else None,
        "hybrid_manager": not scheduler.vllm_config.scheduler_config.disable_hybrid_kv_cache_manager,
        "kv_cache_groups": [type(g.kv_cache_spec).__name__ for g in scheduler.kv_cache_config.kv_cache_groups],
    }
    if side is None:
        return engine
    tier = side.engine.tiers[0]
    state = {
        **engine,
        "flexkv_groups": [g.kind for g in side.groups],
        "pool": side.identity,  # the /dev/shm name of its CPU tier
        "cpu_slots": tier.num_slots,
        "cpu_used": tier.num_used,
        "loaded_tokens": side.loaded_tokens,
        "computed_tokens": side.computed_tokens,
        "preemptions": side.preemptions,
        "engine_stats": vars(side.engine.snapshot()),
        "inflight": side.num_inflight,  # loads, saves and lower-tier work not yet answered
        "held_slots": side.tiers.num_held,  # CPU slots kept from reads answered at their deadline
    }
    for backend in side.tiers.backends:
        tier = {"healthy": backend.healthy, "reason": backend.degraded_reason}
        state[backend.name.lower()] = {**tier, **vars(backend.stats)}
    state["accounting"] = _accounting(side)
    return state


def _accounting(side) -> dict[str, Any]:
    """Whether the index agrees with itself and with what each healthy local lower tier holds."""
    problems = []
    for tier in side.engine.tiers:
        try:
            tier.verify()
        except AssertionError as exc:
            problems.append(f"{tier.name}: {exc}")
    indexes = {tier.name: tier for tier in side.engine.tiers}
    for backend in side.tiers.backends:
        if backend.shared or not backend.healthy:
            continue  # a shared tier's index is a cache of what the store holds, never the truth
        # Every block the index holds must be in the tier at its address (its newest record); the tier
        # may hold more (freed SSD slots keep their valid records until rewritten: see storage/ssd.py).
        index = indexes[backend.name]
        newest = {b.key: b.addr for b in backend.recover()}  # oldest write first: the newest wins
        indexed = [(key, addr) for key, addr in newest.items() if index.is_ready(key)]
        moved = [key.hex()[:16] for key, addr in indexed if int(index.slot_of(key)) != addr]
        if moved or len(indexed) != index.num_used:
            problems.append(f"{backend.name}: the index holds {index.num_used} blocks, {len(indexed)} of them "
                            f"in the tier at their address (elsewhere: {moved[:4]})")
    return {"problems": problems}
