"""tests/helpers.py: a tool run in a forked child reports what a new interpreter would."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from helpers import REPO, random_statistics, run_tool, tool_env

SCRIPT = '''
import os, sys, warnings
print("argv", sys.argv[1:], "cwd", os.getcwd(), "cache", os.environ.get("RESFPN_CACHE"))
print("to stderr", file=sys.stderr)
warnings.warn("a warning")
mode = sys.argv[1]
if mode == "code":
    sys.exit(3)
if mode == "message":
    sys.exit("error: a message")
if mode == "raise":
    raise ValueError("boom")
if mode == "main":
    def main():
        return 2
    if __name__ == "__main__":
        sys.exit(main())
'''


@pytest.mark.parametrize("mode", ["plain", "code", "message", "raise", "main"])
@pytest.mark.parametrize("warn", ["ignore", "default"])
def test_forked_run_matches_a_new_interpreter(tmp_path: Path, mode: str, warn: str) -> None:
    script = tmp_path / "tool.py"
    script.write_text(SCRIPT)
    env = tool_env(tmp_path / "cache")
    if warn == "default":
        del env["PYTHONWARNINGS"]
    forked = run_tool([str(script), mode, "x y"], env=env, fresh=False)
    fresh = run_tool([str(script), mode, "x y"], env=env, fresh=True)
    assert forked.returncode == fresh.returncode == {"plain": 0, "code": 3, "message": 1, "raise": 1, "main": 2}[mode]
    assert forked.stdout == fresh.stdout == f"argv ['{mode}', 'x y'] cwd {REPO} cache {tmp_path / 'cache'}\n"
    # Tracebacks name the frames differently (runpy's); everything else on stderr is the same.
    assert forked.stderr.splitlines()[0] == fresh.stderr.splitlines()[0] == "to stderr"
    assert ("UserWarning: a warning" in forked.stderr) == ("UserWarning: a warning" in fresh.stderr) == (warn == "default")
    assert forked.stderr.splitlines()[-1] == fresh.stderr.splitlines()[-1]
    if mode == "raise":
        assert fresh.stderr.splitlines()[-1] == "ValueError: boom"


def test_forked_run_times_out_and_leaves_no_child(tmp_path: Path) -> None:
    script = tmp_path / "slow.py"
    script.write_text(f"import os, time\nopen({str(tmp_path / 'pid')!r}, 'w').write(str(os.getpid()))\ntime.sleep(60)\n")
    with pytest.raises(subprocess.TimeoutExpired):
        run_tool([str(script)], timeout=1, fresh=False)
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(int((tmp_path / "pid").read_text()), 0)


def test_random_statistics_are_seeded_and_affine_only_when_asked() -> None:
    from backbones import resnet18

    a, b = random_statistics(resnet18(), seed=1), random_statistics(resnet18(), seed=1)
    assert all(abs(float(m.running_var.mean()) - 1.0) < 0.1 for m in a.modules() if hasattr(m, "running_var"))
    stats = [k for k in a.state_dict() if k.endswith(("running_mean", "running_var"))]
    assert len(stats) == 2 * 20 and all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in stats)
    assert float(a.bn1.weight.detach().min()) == 1.0  # BatchNorm's initial scale, untouched
    assert float(random_statistics(resnet18(), affine=True).bn1.weight.detach().max()) < 1.0
