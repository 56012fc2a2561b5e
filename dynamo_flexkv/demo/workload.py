"""The demo's workload: recorded multi-user chat conversations, replayed turn by turn.

Shared by the demo (through Dynamo) and `benchmarks/e2e_cpu.py` (one vLLM engine), so both measure
the same prompts. A repetition is the same workload shape with its own seed: no repetition finds the
blocks of an earlier one in any cache, so every repetition starts from the same cache state.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass

BLOCK = 32  # tokens per KV block (the CPU build's block size must be a multiple of 32)


@dataclass(frozen=True)
class WorkloadShape:
    users: int = 4
    turns: int = 4
    context_tokens: int = 1536  # each user's own document / system prompt
    message_tokens: tuple[int, int] = (32, 64)  # a user message, uniform in [low, high)
    answer_tokens: int = 32  # the recorded assistant answer appended after each turn

    def longest_prompt(self) -> int:
        """An upper bound on any prompt's length, for sizing the engine's context and cache."""
        return (self.context_tokens + self.turns * self.message_tokens[1]
                + (self.turns - 1) * self.answer_tokens)


@dataclass(frozen=True)
class Turn:
    repetition: int
    user: int
    turn: int
    prompt: list[int]

    @property
    def key(self) -> tuple[int, int, int]:
        return self.repetition, self.user, self.turn


def chat_workload(shape: WorkloadShape, seed: int, repetition: int = 0) -> list[Turn]:
    """Conversations replayed turn-major across users, so caches churn between a user's turns.

    Each user owns a document; every turn appends the user's message to the history and the recorded
    answer after it, so the next turn's prompt extends the previous one.
    """
    rng = random.Random(seed * 1_000_003 + repetition)
    tokens = lambda n: [rng.randrange(3, 1000) for _ in range(n)]  # noqa: E731 (ids above the special tokens)
    history = [tokens(shape.context_tokens) for _ in range(shape.users)]
    out = []
    for turn in range(shape.turns):
        for user in range(shape.users):
            history[user] = history[user] + tokens(rng.randrange(*shape.message_tokens))
            out.append(Turn(repetition, user, turn, list(history[user])))
            history[user] = history[user] + tokens(shape.answer_tokens)
    return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass(frozen=True)
class Spread:
    """A figure measured once per repetition: its median and range over the repetitions."""

    median: float
    low: float
    high: float
    samples: tuple[float, ...]

    @classmethod
    def of(cls, samples: list[float]) -> Spread:
        if not samples:
            return cls(float("nan"), float("nan"), float("nan"), ())
        return cls(statistics.median(samples), min(samples), max(samples), tuple(samples))

    def __str__(self) -> str:
        return f"{self.median:7.0f} ({self.low:.0f}-{self.high:.0f})"
