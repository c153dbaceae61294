"""Apply listed one-line slips one at a time to a copy of the repository and see which tests catch them.

    python tools/mutation_check.py [--only NAME ...] [--markdown]   # tests/mutations.yaml, or some of its entries

An entry names a file, its exact original text (found exactly once), the replacement and the
tests (pytest arguments; default every test file naming the module). The tracked files, as on
disk, are copied once to a temporary folder; each entry changes its file there, runs its tests
there (``PYTHONPATH`` the copy, ``pytest -x``) and puts the file back: caught when a test fails
(the first is named). An original text missing or not unique is exit 2: the list is stale.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
KEYS = {"name", "file", "original", "mutated", "tests"}


def load_mutations(path: Path) -> list[dict[str, Any]]:
    """The entries of a mutation list, checked for their keys (``ValueError`` naming a bad one).

    Args:
        path: a YAML list of ``{name, file, original, mutated[, tests]}``.
    """
    entries = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a list of mutations")
    for i, entry in enumerate(entries):
        missing = {"name", "file", "original", "mutated"} - set(entry or {})
        if missing or set(entry) - KEYS or entry["original"] == entry["mutated"]:
            raise ValueError(f"{path}: entry {i} ({(entry or {}).get('name')}) needs {sorted(KEYS - {'tests'})} "
                             f"(and optional tests), a mutated text that differs, and nothing else")
    names = [e["name"] for e in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: names repeat: {sorted({n for n in names if names.count(n) > 1})}")
    return entries


def tests_for(entry: dict[str, Any], root: Path) -> list[str]:
    """The entry's tests, or every ``tests/**/test_*.py`` that names its module (``a/b.py`` -> ``a.b``).

    Args:
        entry: one mutation.
        root: the repository (or its copy).
    """
    if entry.get("tests"):
        return list(entry["tests"])
    module = entry["file"].removesuffix(".py").replace("/", ".")
    return sorted(str(p.relative_to(root)) for p in (root / "tests").rglob("test_*.py") if module in p.read_text(encoding="utf-8"))


def check_entry(entry: dict[str, Any], root: Path) -> str:
    """Raise ``ValueError`` unless the entry's original text occurs exactly once in its file; return the file's text.

    Args:
        entry: one mutation.
        root: the repository (or its copy).
    """
    text = (root / entry["file"]).read_text(encoding="utf-8")
    count = text.count(entry["original"])
    if count != 1:
        raise ValueError(f"mutation {entry['name']}: its original text occurs {count} times in {entry['file']} (expected once): "
                         "the list is stale")
    return text


def run_one(entry: dict[str, Any], copy: Path, timeout: int) -> tuple[bool, str]:
    """Apply one mutation in ``copy``, run its tests, restore the file; ``(caught, by which test or why not)``.

    Args:
        entry: one mutation.
        copy: the repository's copy.
        timeout: seconds for its tests.
    """
    path, original, tests = copy / entry["file"], check_entry(entry, copy), tests_for(entry, copy)
    if not tests:
        raise ValueError(f"mutation {entry['name']}: no test names {entry['file']}; list its tests")
    path.write_text(original.replace(entry["original"], entry["mutated"]), encoding="utf-8")
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-rfE", "-p", "no:cacheprovider", *tests], cwd=copy,
                              env={**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"},
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:  # a hang is noticed too
        return True, f"timed out after {timeout} s"
    finally:
        path.write_text(original, encoding="utf-8")
    if proc.returncode == 0:
        return False, "missed"
    if proc.returncode not in (1, 2):  # 3 internal error, 4 usage, 5 no tests collected
        raise RuntimeError(f"mutation {entry['name']}: pytest exited {proc.returncode}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    failed = re.findall(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", proc.stdout, re.M)
    return True, failed[0] if failed else "an error collecting the tests"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mutations", type=Path, default=REPO / "tests" / "mutations.yaml", help="the list (default %(default)s)")
    parser.add_argument("--only", action="append", default=[], metavar="NAME", help="run this entry only (repeatable)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds for one entry's tests (a timeout counts as caught)")
    parser.add_argument("--markdown", action="store_true", help="print the table in Markdown")
    args = parser.parse_args(argv)
    try:
        entries = load_mutations(args.mutations)
        unknown = set(args.only) - {e["name"] for e in entries}
        if unknown:
            raise ValueError(f"--only {sorted(unknown)}: no such mutation in {args.mutations}")
        for entry in entries:
            check_entry(entry, REPO)  # a stale list fails before anything runs
    except (OSError, ValueError, yaml.YAMLError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    chosen = [e for e in entries if not args.only or e["name"] in args.only]
    results = []
    with tempfile.TemporaryDirectory(prefix="mutation_check_") as tmp:
        copy = Path(tmp)
        files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split("\0")
        for name in (n for n in files if n and (REPO / n).is_file()):
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name)
        for entry in chosen:
            try:
                caught, how = run_one(entry, copy, args.timeout)
            except (ValueError, RuntimeError) as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            results.append((entry, caught, how))
            print(f"{'caught' if caught else 'MISSED'}  {entry['name']}: {how}", file=sys.stderr, flush=True)
    caught = sum(c for _, c, _ in results)
    print("| mutation | file | caught by |\n|---|---|---|" if args.markdown else "")
    for entry, ok, how in results:
        print(f"| {entry['name']} | `{entry['file']}` | {f'`{how}`' if ok else '**missed**'} |" if args.markdown else
              f"{'caught' if ok else 'MISSED':<7} {entry['name']:<40} {entry['file']:<28} {how}")
    print(f"\n{caught} of {len(results)} caught ({100 * caught / max(len(results), 1):.0f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
