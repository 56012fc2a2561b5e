"""`python -m dynamo_flexkv.demo`: runs, reports, and leaves no engine process behind — also when stopped."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import pytest

from dynamo_flexkv.integration.dynamo import client, processes
from dynamo_flexkv.integration.dynamo.processes import REPO, Service

pytestmark = pytest.mark.dynamo

STARTED = re.compile(r"started service=(\S+) pid=(\d+)")


def started_sessions(log: str) -> dict[str, int]:
    return {name: int(pid) for name, pid in STARTED.findall(log)}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, tiny_model):
    """The FlexKV pass on a small workload (the baseline pass runs the same code without --connector)."""
    workdir = tmp_path_factory.mktemp("demo")
    result = subprocess.run(
        [sys.executable, "-m", "dynamo_flexkv.demo", "--only", "flexkv", "--users", "3", "--turns", "3",
         "--gpu-blocks", "16", "--workdir", str(workdir)],
        cwd=REPO, capture_output=True, text=True, timeout=900, start_new_session=True)
    return result


def test_demo_reports_per_worker_and_tier(demo_run):
    out = demo_run.stdout
    assert demo_run.returncode == 0, demo_run.stdout + demo_run.stderr[-3000:]
    for n in (1, 4, 5, 6, 7):
        assert f"[{n}/7]" in out
    # worker, requests, prompt tokens, GPU hits, FlexKV hits, recomputed, GPU blocks, CPU blocks, events
    rows = re.findall(r"^flexkv\s+w(\d)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)/(\d+)$",
                      out, re.M)
    assert [r[0] for r in rows] == ["0", "1"], out
    assert sum(int(r[1]) for r in rows) == 9  # 3 users x 3 turns
    assert sum(int(r[4]) for r in rows) > 0, "no prompt token came from FlexKV's CPU tier"
    # Hits are vLLM's own counters, prompt tokens the client's: vLLM always computes at least the last
    # prompt token of every request, so hits can never reach the prompt (a double count would).
    assert all(int(r[3]) + int(r[4]) <= int(r[2]) - int(r[1]) for r in rows), "more hits than cacheable tokens"
    assert all(int(r[9]) > 0 for r in rows if int(r[1])), "a worker that served requests published no CPU events"
    applied = re.search(r"flexkv\s+applied (\d+)/(\d+) updates", out)
    assert applied and applied.group(1) == applied.group(2), out
    assert "REJECTED" not in out and "EVENT RULE VIOLATION" not in out
    assert re.search(r"^flexkv\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+$", out, re.M), "TTFT line missing"


def test_demo_leaves_no_process(demo_run):
    sessions = started_sessions(demo_run.stderr)
    assert set(sessions) == {"frontend", "worker0", "worker1"}
    assert {name: processes.session_members(sid) for name, sid in sessions.items()} == \
           {name: [] for name in sessions}


def test_sigterm_stops_every_service(tmp_path, tiny_model):
    """Stopped while its workers start, the demo still stops every service's whole session."""
    demo = Service("demo", [sys.executable, "-m", "dynamo_flexkv.demo", "--only", "flexkv",
                            "--workdir", str(tmp_path / "run")], processes.local_env(tmp_path), tmp_path / "demo.log")
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
