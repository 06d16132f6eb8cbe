"""The sandbox as an ordinary user: the probe and every case of tests/trainer/sandbox/test_sandbox.py and
test_sandbox_cleanup.py, run under an unprivileged uid.

Run as root (CI), these tests start a child as a fresh unprivileged uid (no supplementary groups, no
capabilities) and check that it gets the same protections as root, through user namespaces, and passes
the same sandbox tests.  Nothing is created on the machine: the uid needs no account, its home and pytest
folder are a temporary directory, and where the interpreter lies under a directory other users cannot
traverse (``/root/.pyenv``), the child runs in a private mount namespace in which that directory is an
empty tmpfs holding only what the child needs.  Run as an ordinary user, tests/trainer/sandbox/test_sandbox.py already
runs unprivileged, and these tests are skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from trainer.sandbox import PROTECTIONS, _first_hidden_ancestor, find_bwrap, sandbox_capabilities

REPO_ROOT = Path(__file__).resolve().parents[3]
UNPRIVILEGED_UID = 1_599_900_000 + os.getpid() % 90_000  # no account, unused, below the sandbox's own uids
CHILD_TIMEOUT_S = 900

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="already an ordinary user: tests/trainer/sandbox/test_sandbox.py "
                                                           "runs unprivileged as it is")

_DROP_AND_EXEC = """
import os, sys
uid = int(sys.argv[1])
os.setgroups([])
os.setresgid(uid, uid, uid)
os.setresuid(uid, uid, uid)
os.chdir(sys.argv[2])
os.execve(sys.argv[3], sys.argv[3:], {key: value for key, value in os.environ.items()})
"""

_PROBE = """
import json
from trainer.sandbox import sandbox_capabilities
caps = sandbox_capabilities()
print(json.dumps({p.name: [p.available, p.detail] for p in caps.protections}))
"""


def _needed_paths() -> list[str]:
    """What the child must reach: the interpreter's installation, the virtual environment, the checkout."""
    return sorted({os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, REPO_ROOT)})


def _mount_namespace_prefix() -> list[str]:
    """bubblewrap options (as root: a mount namespace only) exposing the needed paths under hidden folders."""
    covered: dict[str, list[str]] = {}
    for path in _needed_paths():
        hidden = _first_hidden_ancestor(path + "/x")  # the path itself included
        if hidden is not None:
            covered.setdefault(hidden, []).append(path)
    if not covered:
        return []
    bwrap, where = find_bwrap()
    assert bwrap is not None, where
    args = [bwrap, "--dev-bind", "/", "/"]
    for hidden, paths in covered.items():
        args += ["--perms", "0755", "--tmpfs", hidden]
        for path in paths:
            parent = os.path.dirname(path)
            chain = []
            while parent != hidden and parent.startswith(hidden + "/"):
                chain.append(parent)
                parent = os.path.dirname(parent)
            for directory in reversed(chain):
                args += ["--perms", "0755", "--dir", directory]
            args += ["--ro-bind", path, path]
    return [*args, "--"]


def run_unprivileged(argv: list[str], home: Path) -> subprocess.CompletedProcess:
    """Run ``python argv...`` (this interpreter) from the checkout as :data:`UNPRIVILEGED_UID`."""
    env = {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONDONTWRITEBYTECODE": "1",
           "HYPOTHESIS_PROFILE": os.environ.get("HYPOTHESIS_PROFILE", "default")}
    command = [*_mount_namespace_prefix(), sys.executable, "-c", _DROP_AND_EXEC, str(UNPRIVILEGED_UID),
               str(REPO_ROOT), sys.executable, *argv]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
                          stdin=subprocess.DEVNULL)


@pytest.fixture
def unprivileged_home():
    """A temporary home folder owned by the unprivileged uid (removed afterwards)."""
    home = Path(tempfile.mkdtemp(prefix="sod-unprivileged-", dir="/tmp"))
    os.chown(home, UNPRIVILEGED_UID, UNPRIVILEGED_UID)
    yield home
    shutil.rmtree(home, ignore_errors=True)


def test_an_ordinary_user_gets_every_protection_root_gets(unprivileged_home):
    done = run_unprivileged(["-c", f"import os; assert os.geteuid() == {UNPRIVILEGED_UID}\n" + _PROBE],
                            unprivileged_home)
    assert done.returncode == 0, done.stdout + done.stderr
    unprivileged = json.loads(done.stdout.strip().splitlines()[-1])
    as_root = sandbox_capabilities()
    assert list(unprivileged) == list(PROTECTIONS)
    for name in PROTECTIONS:
        available, detail = unprivileged[name]
        if as_root.available(name) and not available:
            # The one case in which an ordinary user may lack what root has: no user namespaces for it.
            assert "user namespace" in detail, (name, detail)
    if unprivileged["privilege_drop"][0]:
        assert "own user namespace" in unprivileged["privilege_drop"][1]


def test_the_sandbox_tests_pass_as_an_ordinary_user(unprivileged_home):
    done = run_unprivileged(["-m", "pytest", "-p", "no:cacheprovider", "-q", "-x",
                             f"--basetemp={unprivileged_home / 'pytest'}", "tests/trainer/sandbox/test_sandbox.py",
                             "tests/trainer/sandbox/test_sandbox_cleanup.py"],
                            unprivileged_home)
    tail = (done.stdout + done.stderr)[-4000:]
    assert done.returncode == 0 and " passed" in tail and "failed" not in tail, tail
