"""tools/mutation_check.py: the shipped list is current, a slip is caught or missed in a copy, a stale list is exit 2."""

from pathlib import Path

import pytest

from helpers import REPO, load_tool, one_error_line

tool = load_tool("mutation_check")


def test_every_listed_original_text_is_in_its_file_once():
    # The list goes stale when the code it mutates changes: this says which entry, in the ordinary test run.
    entries = tool.load_mutations(REPO / "tests" / "mutations.yaml")
    assert len(entries) >= 25
    for entry in entries:
        tool.check_entry(entry, REPO)
        assert tool.tests_for(entry, REPO), entry["name"]


def _toy_repo(root: Path) -> None:
    (root / "tests").mkdir()
    (root / "toy.py").write_text("def double(x):\n    return 2 * x\n\n\ndef half(x):\n    return x / 2\n")
    (root / "tests" / "test_toy.py").write_text("from toy import double, half\n\n\ndef test_double():\n    assert double(3) == 6\n\n\n"
                                                "def test_half_runs():\n    half(3)\n")


def test_a_slip_is_caught_by_the_failing_test_and_the_file_is_restored(tmp_path):
    _toy_repo(tmp_path)
    before = (tmp_path / "toy.py").read_text()
    caught = {"name": "double-adds", "file": "toy.py", "original": "return 2 * x", "mutated": "return 2 + x"}
    assert tool.tests_for(caught, tmp_path) == ["tests/test_toy.py"]  # found by the module's name
    assert tool.run_one(caught, tmp_path, timeout=120) == (True, "tests/test_toy.py::test_double")
    missed = {"name": "half-floors", "file": "toy.py", "original": "return x / 2", "mutated": "return x // 2"}
    assert tool.run_one(missed, tmp_path, timeout=120) == (False, "missed")
    assert (tmp_path / "toy.py").read_text() == before


def test_a_stale_or_malformed_list_is_one_error_line(tmp_path, capsys):
    stale = tmp_path / "stale.yaml"
    stale.write_text("- {name: gone, file: engine/timing.py, original: 'no such text', mutated: 'x'}\n")
    assert tool.main(["--mutations", str(stale)]) == 2
    assert "mutation gone: its original text occurs 0 times in engine/timing.py (expected once): the list is stale" in \
        one_error_line(capsys.readouterr().err)
    same = tmp_path / "same.yaml"
    same.write_text("- {name: noop, file: engine/timing.py, original: 'import time', mutated: 'import time'}\n")
    assert tool.main(["--mutations", str(same)]) == 2
    assert "a mutated text that differs" in one_error_line(capsys.readouterr().err)
    assert tool.main(["--only", "no-such-entry"]) == 2
    assert "--only ['no-such-entry']: no such mutation" in one_error_line(capsys.readouterr().err)
    with pytest.raises(SystemExit):
        tool.main(["--no-such-flag"])
