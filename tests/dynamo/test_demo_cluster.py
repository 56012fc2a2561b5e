"""`python -m dynamo_flexkv.demo --cluster` on the tests' tiny model: a user moving between workers keeps
their cache through the cluster tier.

Every returning turn is sent to the worker that did not serve the user's previous turn, once without
and once with a Mooncake Store (a real mooncake_master started by the demo) shared by both workers.
With the store, each returning turn loads the blocks the other worker computed from it; without it,
it cannot. Answers are identical either way.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from dynamo_flexkv.devtools import processes
from dynamo_flexkv.devtools.processes import REPO

pytestmark = pytest.mark.dynamo

SMALL = ["--users", "4", "--turns", "3", "--repetitions", "1", "--context-tokens", "384", "--cluster-cache-gb", "0.05"]
STARTED = re.compile(r"started service=(\S+) pid=(\d+)")


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory, tiny_model):
    workdir = tmp_path_factory.mktemp("demo_cluster")
    result = subprocess.run(
        [sys.executable, "-m", "dynamo_flexkv.demo", "--cluster", *SMALL, "--model", tiny_model,
         "--workdir", str(workdir / "run"), "--results", str(workdir / "results")],
        cwd=REPO, capture_output=True, text=True, timeout=900, start_new_session=True)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    figures = json.loads((workdir / "results" / "demo.json").read_text())
    return result, {p["name"]: p["records"] for p in figures["passes"]}, figures


def test_returning_turns_land_on_the_other_worker(cluster_run):
    _, passes, _ = cluster_run
    assert set(passes) == {"flexkv", "cluster"}
    for records in passes.values():
        worker = {(r["user"], r["turn"]): r["worker"] for r in records}
        returning = [r for r in records if r["turn"] > 0]
        assert len(returning) == 4 * 2
        assert all(r["worker"] != worker[(r["user"], r["turn"] - 1)] for r in returning), returning


def test_cross_worker_returning_turns_are_served_from_the_store(cluster_run):
    out, passes, _ = cluster_run
    returning = [r for r in passes["cluster"] if r["turn"] > 0]
    assert all(r["tier_hit_tokens"].get("MOONCAKE", 0) >= 32 for r in returning), returning
    assert not any("MOONCAKE" in r["tier_hit_tokens"] for r in passes["flexkv"]), "store hits without a store"
    recomputed = lambda records: sum(  # noqa: E731
        r["prompt_tokens"] - r["gpu_hit_tokens"] - sum(r["tier_hit_tokens"].values()) for r in records if r["turn"])
    assert recomputed(passes["cluster"]) < recomputed(passes["flexkv"])
    assert re.search(r"^cluster\s+w[01]\s+\d+\s+\d+\s+\d+\s+\d+\s+\d+\s+[1-9]\d*\s", out.stdout, re.M), \
        "no store tokens in the table's cluster column"
    assert re.search(r"returning-turn TTFT p50, cluster tier / without: [\d.]+x", out.stdout)


def test_answers_are_identical_with_and_without_the_cluster_tier(cluster_run):
    out, passes, figures = cluster_run
    answers = [{(r["user"], r["turn"]): r["text"] for r in passes[name]} for name in ("flexkv", "cluster")]
    assert answers[0] == answers[1]
    assert "answers identical with and without the cluster tier: 12/12" in out.stdout
    assert all(p["problems"] == [] for p in figures["passes"]), [p["problems"] for p in figures["passes"]]
    assert "PROBLEM" not in out.stdout


def test_the_store_is_stopped_with_the_demo(cluster_run):
    out, _, _ = cluster_run
    sessions = STARTED.findall(out.stderr)
    assert sorted(name for name, _ in sessions).count("mooncake-master") == 1
    assert all(processes.session_members(int(sid)) == [] for _, sid in sessions)
