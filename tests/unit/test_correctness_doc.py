"""docs/correctness.md is generated from the tests' correctness markers and cannot drift from them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("gen_correctness_doc", ROOT / "scripts" / "gen_correctness_doc.py")
gen = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = gen  # dataclasses look their module up there
_spec.loader.exec_module(gen)


def test_the_matrix_is_what_the_tests_say():
    assert (ROOT / "docs" / "correctness.md").read_text(encoding="utf-8") == gen.render(), \
        "docs/correctness.md is out of date: run python scripts/gen_correctness_doc.py"


def test_every_gpu_row_points_at_the_json_its_run_wrote():
    for run in gen.GPU_RUNS:
        assert (ROOT / run.result).is_file(), run.result


def test_a_marker_naming_an_unknown_situation_is_refused(tmp_path):
    (tmp_path / "test_x.py").write_text(
        'import pytest\n@pytest.mark.correctness("a made-up row", "identical")\ndef test_y(): pass\n')
    with pytest.raises(SystemExit, match="unknown situation"):
        gen.all_rows(tmp_path)
