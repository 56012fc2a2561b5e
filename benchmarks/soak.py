"""A bounded soak: concurrent chat sessions through a real vLLM CPU engine with FlexKV (CPU + SSD),
with faults from tests/faults injected at random in the middle third of the run.

The SSD tier lives on tests/faults/blockfs.py (a FUSE disk on the real I/O path), so the disk can
hang or fail; everything else is loopback and local files. Every completed request is compared
with the greedy tokens of an engine without any connector, computed first for the same
conversations (each turn's prompt is the previous prompt, the reference answer and new user tokens).

Faults (one at a time, between rounds of concurrent turns):
- `flip`: flip a byte in every written block of the SSD file (silent corruption);
- `hang`: the disk hangs during the next round (the tier is given up on after --io-timeout);
- `eio`: the disk fails every read and write during the next round;
- `kill`: SIGKILL of the engine (scheduler and worker) mid-batch, then a restart on the same files;
- `restart`: a clean stop and start.

A tier disabled by `hang` or `eio` comes back by itself once the disk answers (docs/ssd-tier.md,
"Recovery"); `--faults hang eio` leaves out the restarts, so only that can bring it back. "SSD up"
is the share of rounds that ended with a healthy SSD tier.

Printed: requests served, faults injected, wrong tokens, hung requests, accounting mismatches (all
three must be 0), and TTFT / throughput before, during and after the faults.

    python benchmarks/soak.py --minutes 6 --sessions 6
    python benchmarks/soak.py --minutes 4 --faults hang eio    # recovery without restarts
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the FUSE disk and the engine settings live with the tests

from dynamo_flexkv.devtools.harness import EngineError, EngineHost  # noqa: E402
from dynamo_flexkv.devtools.tiny_model import build  # noqa: E402
from tests.faults.blockfs import mounted  # noqa: E402
from tests.helpers import BLOCK, COMPAT_CONFIG, ENGINE, random_prompt  # noqa: E402

BLOCK_BYTES = 2 * 2 * BLOCK * 128 * 2  # the tiny model's bytes per block
FAULTS = ("flip", "hang", "eio", "kill", "restart")
ANSWER_TOKENS = 8
REQUEST_BOUND_S = 60.0


@dataclass
class Phase:
    name: str
    requests: int = 0
    tokens: int = 0
    wall_s: float = 0.0
    flexkv_tokens: int = 0  # prompt tokens loaded from FlexKV's tiers instead of recomputed
    prompt_tokens: int = 0
    ssd_rounds: int = 0  # rounds that ended with a healthy SSD tier
    rounds: int = 0
    ttft_ms: list[float] = field(default_factory=list)


@dataclass
class Totals:
    served: int = 0
    wrong: int = 0
    hung: int = 0
    accounting: int = 0
    faults: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAULTS, 0))


def conversations(reference: EngineHost, sessions: int, turns: int, rng: random.Random) -> list[list[tuple]]:
    """Per session, (prompt, reference answer) per turn; prompts grow by the answer and a new message."""
    out = []
    for _ in range(sessions):
        prompt, session = random_prompt(rng, 3 * BLOCK + rng.randrange(BLOCK)), []
        for _ in range(turns):
            [answer] = reference.generate([prompt], max_tokens=ANSWER_TOKENS)
            session.append((prompt, answer.token_ids))
            prompt = prompt + answer.token_ids + random_prompt(rng, BLOCK // 2 + rng.randrange(BLOCK))
            if len(prompt) + ANSWER_TOKENS > ENGINE["max_model_len"]:
                break
        out.append(session)
    return out


class Soak:
    def __init__(self, model: str, disk, args: argparse.Namespace):
        self.model, self.disk, self.args = model, disk, args
        self.env = {"FLEXKV_CPU_CACHE_GB": str(args.cpu_blocks * BLOCK_BYTES / 2**30),
                    "FLEXKV_SSD_CACHE_GB": str(args.ssd_blocks * BLOCK_BYTES / 2**30),
                    "FLEXKV_SSD_CACHE_DIR": str(disk.mountpoint), "FLEXKV_SSD_IO_TIMEOUT_S": str(args.io_timeout)}
        self.host = self._start()
        self.totals = Totals()
        self.pools: set[str] = set()  # /dev/shm names of every engine's CPU tier
        self.loaded = 0  # the current engine's loaded_tokens counter after the last round

    def _start(self) -> EngineHost:
        return EngineHost(self.model, {**ENGINE, "kv_transfer_config": COMPAT_CONFIG}, env=self.env)

    def restart(self, kill: bool) -> None:
        self.loaded = 0
        if kill:
            os.kill(self.host.process.pid, signal.SIGKILL)
            self.host.process.join(30)
        self.host.close()
        self.host = self._start()

    def round(self, batch: list[tuple], phase: Phase) -> None:
        prompts = [p for p, _ in batch]
        start = time.monotonic()
        try:
            got = self.host.generate(prompts, max_tokens=ANSWER_TOKENS, timeout_s=REQUEST_BOUND_S)
        except EngineError as exc:
            # A hang (no answer within the bound) or a dead engine: count it, start afresh.
            self.totals.hung += "no answer" in str(exc)
            print(f"  round failed: {str(exc).splitlines()[-1][:160]}", flush=True)
            self.restart(kill=False)
            return
        phase.wall_s += time.monotonic() - start
        phase.prompt_tokens += sum(len(p) for p in prompts)
        for completion, (_, want) in zip(got, batch):
            self.totals.served += 1
            self.totals.wrong += completion.token_ids != want
            phase.requests += 1
            phase.tokens += len(completion.token_ids)
            phase.ttft_ms.append(completion.ttft_s * 1000)
        state = self.host.flexkv_state()
        self.pools.add(state["pool"])
        phase.flexkv_tokens += state["loaded_tokens"] - self.loaded
        self.loaded = state["loaded_tokens"]
        phase.rounds += 1
        phase.ssd_rounds += state["ssd"]["healthy"]
        problems = state["accounting"]["problems"]
        self.totals.accounting += len(problems)
        for line in problems:
            print(f"  accounting: {line}", flush=True)

    def faulty_round(self, rng: random.Random, batch: list[tuple], phase: Phase) -> str:
        """One round with a random fault injected before (flip, kill, restart) or during it (hang, eio)."""
        fault = rng.choice(self.args.faults)
        self.totals.faults[fault] += 1
        if fault == "flip":
            flip_written_blocks(self.disk.backing)
        elif fault == "kill":
            self.host.call_async("generate", prompts=[p for p, _ in batch], max_tokens=ANSWER_TOKENS,
                                 one_at_a_time=False)
            time.sleep(rng.uniform(0.0, 2.0))  # a random moment of the batch, not a synchronisation
            self.restart(kill=True)
        elif fault == "restart":
            self.restart(kill=False)
        if fault in ("hang", "eio"):
            self.disk.set(fault)
        try:
            self.round(batch, phase)
        finally:
            self.disk.set("ok")
        return fault


def flip_written_blocks(backing: Path) -> None:
    for f in backing.glob("*.ssd"):
        data = bytearray(f.read_bytes())
        for offset in range(len(data) - BLOCK_BYTES, 0, -BLOCK_BYTES):
            if any(data[offset:offset + 64]):
                data[offset + 100] ^= 0xFF
        f.write_bytes(bytes(data))


def summary(phases: list[Phase], totals: Totals, minutes: float) -> None:
    print(f"\nsoak of {minutes:g} min: served {totals.served} requests, faults {sum(totals.faults.values())} "
          f"{totals.faults}")
    print(f"wrong tokens {totals.wrong}, hung requests {totals.hung}, accounting mismatches {totals.accounting}")
    print(f"{'phase':8} {'requests':>8} {'TTFT p50 ms':>12} {'p90 ms':>8} {'min-max ms':>12} {'tokens/s':>9} "
          f"{'from FlexKV':>12} {'SSD up':>7}")
    for p in phases:
        t = sorted(p.ttft_ms) or [0.0]
        p90 = t[min(len(t) - 1, int(0.9 * len(t)))]
        rate = p.tokens / p.wall_s if p.wall_s else 0.0
        share = p.flexkv_tokens / p.prompt_tokens if p.prompt_tokens else 0.0
        up = p.ssd_rounds / p.rounds if p.rounds else 0.0
        print(f"{p.name:8} {p.requests:8d} {statistics.median(t):12.1f} {p90:8.1f} "
              f"{f'{t[0]:.0f}-{t[-1]:.0f}':>12} {rate:9.1f} {share:11.0%} {up:7.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=6.0)
    parser.add_argument("--sessions", type=int, default=6)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--cpu-blocks", type=int, default=24)
    parser.add_argument("--ssd-blocks", type=int, default=400)
    parser.add_argument("--io-timeout", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--faults", nargs="+", choices=FAULTS, default=list(FAULTS),
                        help="the faults to draw from (default: all)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    model = Path(os.environ.get("DYNAMO_FLEXKV_MODEL_DIR", Path(__file__).resolve().parents[1] / ".cache" / "tiny-llama"))
    if not (model / "model.safetensors").exists():
        build(model)
    with EngineHost(str(model), ENGINE) as reference:
        chats = conversations(reference, args.sessions, args.turns, rng)
    print(f"{len(chats)} sessions, {sum(map(len, chats))} turns; reference tokens computed", flush=True)

    with tempfile.TemporaryDirectory(prefix="flexkv-soak-") as root, mounted(Path(root)) as disk:
        soak = Soak(str(model), disk, args)
        phases = [Phase("before"), Phase("during"), Phase("after")]
        end = time.monotonic() + args.minutes * 60
        third = args.minutes * 60 / 3
        cursor = [0] * len(chats)
        try:
            while (now := time.monotonic()) < end:
                index = min(2, int((args.minutes * 60 - (end - now)) // third))
                batch = []
                for s, session in enumerate(chats):  # every session's next turn, concurrently
                    batch.append(session[cursor[s] % len(session)])
                    cursor[s] += 1
                if index == 1 and rng.random() < 0.5:
                    print(f"  fault: {soak.faulty_round(rng, batch, phases[index])}", flush=True)
                else:
                    soak.round(batch, phases[index])
        finally:
            soak.host.close()
    summary(phases, soak.totals, args.minutes)
    leftover = [n for pool in soak.pools for n in (pool, pool + ".owner") if Path("/dev/shm", n).exists()]
    print(f"shared memory left after the clean stop (of {len(soak.pools)} engines): {leftover or 'none'}")


if __name__ == "__main__":
    main()
