"""`python -m dynamo_flexkv.demo`: both passes through a real Dynamo deployment, on the tests' tiny model.

What it must show: returning turns are served from FlexKV's CPU tier (vLLM's own cache has churned,
and the router sent each turn back to the worker holding its blocks), answers are identical with and
without FlexKV, the router applies every KV event the workers publish, and the demo writes its PNG
and JSON and leaves no engine process behind — also when stopped.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

import pytest

from dynamo_flexkv.devtools import client, processes
from dynamo_flexkv.devtools.processes import REPO, Service

pytestmark = pytest.mark.dynamo

STARTED = re.compile(r"started service=(\S+) pid=(\d+)")
# 4 users over 2 workers (first turns pinned to worker user % 2): each worker alternates between two
# users, and a cache of one conversation can't hold two, so every returning turn lost blocks.
SMALL = ["--users", "4", "--turns", "3", "--repetitions", "2", "--context-tokens", "384"]


def started_sessions(log: str) -> dict[str, int]:
    return {name: int(pid) for name, pid in STARTED.findall(log)}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, tiny_model):
    workdir = tmp_path_factory.mktemp("demo")
    result = subprocess.run(
        [sys.executable, "-m", "dynamo_flexkv.demo", *SMALL, "--model", tiny_model,
         "--workdir", str(workdir / "run"), "--results", str(workdir / "results")],
        cwd=REPO, capture_output=True, text=True, timeout=900, start_new_session=True)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    figures = json.loads((workdir / "results" / "demo.json").read_text())
    return result, {p["name"]: p for p in figures["passes"]}, workdir / "results"


def test_returning_turns_come_from_the_cpu_tier(demo_run):
    _, passes, _ = demo_run
    baseline, flexkv = passes["baseline"]["records"], passes["flexkv"]["records"]
    returning = [r for r in flexkv if r["turn"] > 0]
    assert len(returning) == 2 * 4 * 2
    assert all(r["tier_hit_tokens"].get("CPU", 0) > 0 for r in returning), returning
    assert not any(r["tier_hit_tokens"] for r in baseline), "FlexKV hits without FlexKV"
    recomputed = lambda records: sum(  # noqa: E731
        r["prompt_tokens"] - r["gpu_hit_tokens"] - sum(r["tier_hit_tokens"].values()) for r in records if r["turn"])
    assert recomputed(flexkv) < recomputed(baseline) / 2


def test_answers_are_identical_with_and_without_flexkv(demo_run):
    out, passes, _ = demo_run
    answers = [{(r["repetition"], r["user"], r["turn"]): r["text"] for r in passes[name]["records"]}
               for name in ("baseline", "flexkv")]
    assert answers[0] == answers[1]
    assert "answers identical with and without FlexKV: 24/24" in out.stdout


def test_router_applies_every_published_event(demo_run):
    out, passes, _ = demo_run
    for name, figures in passes.items():
        applied = figures["router_applied"]
        assert sum(applied.values()) == figures["router_expected"] > 0, (name, applied)
        assert all(status.endswith("/ok") for status, n in applied.items() if n), (name, applied)
        assert figures["problems"] == [], figures["problems"]
    assert sum(n for k, n in passes["flexkv"]["router_applied"].items() if k.startswith("stored")) > \
        sum(n for k, n in passes["baseline"]["router_applied"].items() if k.startswith("stored")), \
        "the CPU tier's BlockStored events did not reach the router"
    assert "PROBLEM" not in out.stdout and "REJECTED" not in out.stdout


def test_reports_figures_and_writes_the_picture(demo_run):
    out, _, results = demo_run
    for n in range(1, 8):
        assert f"[{n}/7]" in out.stdout
    png = results / "demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert str(png.resolve()) in out.stdout
    assert re.search(r"prefill cost measured here: [\d.]+ ms per prompt token", out.stdout)
    assert re.search(r"demo model: Llama \d+ layers .* \d+M parameters", out.stdout)
    assert re.search(r"returning-turn TTFT p50, FlexKV / without: [\d.]+x \(min-max over repetitions", out.stdout)


def test_demo_leaves_no_process(demo_run):
    out, _, _ = demo_run
    sessions = STARTED.findall(out.stderr)  # both passes: (service, session id)
    assert sorted(name for name, _ in sessions) == ["frontend", "frontend", "worker0", "worker0", "worker1", "worker1"]
    assert all(processes.session_members(int(sid)) == [] for _, sid in sessions)


def test_sigterm_stops_every_service(tmp_path, tiny_model):
    """Stopped while its workers start, the demo still stops every service's whole session."""
    demo = Service("demo", [sys.executable, "-m", "dynamo_flexkv.demo", "--only", "flexkv", "--model", tiny_model,
                            *SMALL, "--workdir", str(tmp_path / "run"), "--results", str(tmp_path / "results")],
                   processes.local_env(tmp_path), tmp_path / "demo.log")
    demo.start()
    try:
        client.wait_until(lambda: demo.check() or "started service=worker1" in demo.log_text(), 120,
                          "demo started its workers")
        demo.process.send_signal(signal.SIGTERM)  # the demo alone, not its process group
        demo.process.wait(120)
        sessions = started_sessions(demo.log_text())
        assert set(sessions) == {"frontend", "worker0", "worker1"}
        assert {name: processes.session_members(sid) for name, sid in sessions.items()} == \
               {name: [] for name in sessions}
    finally:
        demo.stop()
