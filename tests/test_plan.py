"""`pipeline plan` on the sample mixture (no ../shared): status, estimates, legend, usage errors."""
import subprocess
import sys

import pytest

from pipeline.build import build_mixture
from pipeline.plan import make_plan

from conftest import ROOT, SAMPLE

MIX = str(SAMPLE / "mixture.json")


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, capture_output=True,
                          text=True, env=env)


def test_plan_before_and_after_a_build(tmp_path):
    out = tmp_path / "out"
    rows, _ = make_plan(MIX, out=str(out))
    assert [r.status for r in rows] == ["to build"] * 5 and all(r.estimated for r in rows)
    assert abs(sum(r.share for r in rows) - 1) < 1e-9
    r = cli("plan", MIX, "--out", str(out))
    assert r.returncode == 0 and "~ = estimated" in r.stdout and "~" in r.stdout.split("estimated")[0]

    _, plans, _ = build_mixture(MIX, out=str(out), workers=1)
    rows, _ = make_plan(MIX, out=str(out))
    assert [r.status for r in rows] == ["built"] * 5 and not any(r.estimated for r in rows)
    # exact figures once built: the meta.json counts
    assert [(r.tokens, r.samples) for r in rows] == [(p.meta["n_tokens"], p.meta["n_samples"]) for p in plans]
    r = cli("plan", MIX, "--out", str(out), "--tokens", "1e6")
    assert r.returncode == 0, r.stderr
    assert "estimated" not in r.stdout and "~" not in r.stdout  # legend only when a row is estimated
    # another target shard size is another key: to build again
    rows, _ = make_plan(MIX, out=str(out), shard_tokens=1000)
    assert [r.status for r in rows] == ["to build"] * 5


def test_estimates_are_in_the_right_range(tmp_path):
    """The sample mixture is small: the estimate from a sample of records is near the truth."""
    out = tmp_path / "out"
    est, _ = make_plan(MIX, out=str(out))
    _, plans, _ = build_mixture(MIX, out=str(out), workers=1)
    for row, p in zip(est, plans):
        assert 0.5 < row.tokens / p.meta["n_tokens"] < 2.0, row.dataset


@pytest.mark.parametrize("args", [
    ("--steps", "10"),  # --steps needs --global-batch-tokens
    ("--tokens", "100", "--steps", "10", "--global-batch-tokens", "5"),
    ("--max-length", "0"),
    ("--shard-tokens", "-3"),
])
def test_usage_errors_exit_2(args):
    r = cli("plan", MIX, *args)
    assert r.returncode == 2 and "usage:" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_help_shows_each_default_once():
    for cmd in ("build", "plan", "inspect", "verify", "show", "cache"):
        r = cli(cmd, "--help")
        assert r.returncode == 0
        text = " ".join(r.stdout.split())
        assert "(default: None)" not in text
        for flag in ("--workers", "--on-error", "--executor", "--shard-tokens"):
            if cmd == "build":
                assert text.count(flag) >= 1
    r = cli("build", "--help")
    text = " ".join(r.stdout.split())
    assert text.count("(default: fail)") == 1 and text.count("(default: local)") == 1


def test_only_user_faults_become_one_line_errors():
    import errno

    from mixtures.transforms import TransformError
    from pipeline.cli import user_fault
    from stages.errors import BuildError
    assert user_fault(BuildError("x: bad"), "build") == "x: bad"
    assert user_fault(TransformError("t failed", "Traceback…"), "build") == "t failed\nTraceback…"
    assert user_fault(FileNotFoundError(errno.ENOENT, "No such file or directory", "m.json"),
                      "build") == "m.json: No such file or directory"
    h5 = OSError("Can't write data (file write failed: time = now\n, filename = '/c/u.h5', "
                 "errno = 28, error message = 'No space left on device')")
    msg = user_fault(h5, "build")
    assert msg.startswith("/c/u.h5: no space left on device") and "\n" not in msg
    for bug in (KeyError("k"), IndexError(3), TypeError("t"), AttributeError("a")):
        assert user_fault(bug, "build") is None  # a bug keeps its traceback
