"""The sandbox's cleanup after a run it killed: nothing of the run's user namespace survives the call.

As an ordinary user a run's processes live in the tool's own user namespace (uid map starting at the run's
dedicated uid) and die with its pid namespace after the launcher is killed, asynchronously.  These tests
build such a namespace by hand (no bubblewrap needed), check that the sweep finds and ends every process of
it and nothing else, and that the trainer side sweeps exactly when it killed the launcher.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from trainer.sandbox import PRIVILEGE_DROP, SANDBOX_UID_BASE
from trainer.sandbox import core as sandbox_core
from trainer.sandbox import launcher as sandbox_launcher

# A process that enters a new user namespace whose only uid is UID (mapped to its own), then forks: both
# wait in pause() (no CPU), the parent after printing "ready".
_NAMESPACE_PAIR = """
import ctypes, os, signal, sys
uid, outer = int(sys.argv[1]), os.geteuid()
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER
    print("unshare-failed", ctypes.get_errno(), flush=True)
    sys.exit(3)
with open("/proc/self/uid_map", "w") as handle:
    handle.write(f"{uid} {outer} 1")
if os.fork() == 0:
    signal.pause()
print("ready", flush=True)
signal.pause()
"""


def _namespace_pids(uid: int) -> list[int]:
    """Live pids whose user namespace's uid map starts at ``uid``: read here, independently of the library."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/uid_map") as handle:
                first = handle.read().split()[:1]
            with open(f"/proc/{entry}/stat") as handle:
                state = handle.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if first == [str(uid)] and state not in ("Z", "X"):
            found.append(int(entry))
    return sorted(found)


@pytest.fixture
def namespace_pair():
    """(uid, Popen) of a live two-process user namespace; killed and reaped afterwards whatever happens."""
    uid = SANDBOX_UID_BASE - 1_000_000 + os.getpid() % 500_000  # below every run's uid: never a real run's
    proc = subprocess.Popen([sys.executable, "-I", "-c", _NAMESPACE_PAIR, str(uid)], stdout=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline().strip()
        if line.startswith("unshare-failed"):
            proc.wait()
            pytest.skip(f"this machine refuses user namespaces to this user ({line}): the sandbox then refuses "
                        "privilege drop as an ordinary user, and there is nothing to sweep")
        assert line == "ready"
        deadline = time.monotonic() + 10
        while len(_namespace_pids(uid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(_namespace_pids(uid)) == 2
        yield uid, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for pid in _namespace_pids(uid):
            os.kill(pid, 9)


def test_processes_in_user_namespace_finds_exactly_the_namespace(namespace_pair):
    uid, proc = namespace_pair
    found = sandbox_launcher.processes_in_user_namespace(uid)
    assert sorted(found) == _namespace_pids(uid) and proc.pid in found and len(found) == 2
    assert sandbox_launcher.processes_in_user_namespace(uid + 1) == []
    assert os.getpid() not in found


def test_kill_user_namespace_ends_every_process_before_returning(namespace_pair):
    uid, proc = namespace_pair
    assert sandbox_launcher.kill_user_namespace(uid) is True
    assert _namespace_pids(uid) == []  # checked at once: no teardown left in flight
    assert proc.wait(timeout=10) == -9
    assert sandbox_launcher.kill_user_namespace(uid) is True  # nothing to do: returns at once


def _plan(tmp_path, *, unprivileged: bool) -> dict:
    return {"cgroup": None, "use": {PRIVILEGE_DROP: True}, "unprivileged": unprivileged,
            "temp_root": str(tmp_path)}


@pytest.mark.parametrize("killed", [True, False])
@pytest.mark.parametrize("unprivileged", [True, False])
def test_the_trainer_sweeps_the_namespace_only_after_killing_an_ordinary_users_run(monkeypatch, tmp_path,
                                                                                 killed, unprivileged):
    swept = []
    monkeypatch.setattr(sandbox_launcher, "kill_user_namespace", lambda uid: swept.append(uid) or True)
    monkeypatch.setattr(sandbox_launcher, "kill_uid", lambda uid: None)
    sandbox_core._clean_up_after(_plan(tmp_path, unprivileged=unprivileged), 4242, killed=killed)
    assert swept == ([SANDBOX_UID_BASE + 4242] if killed and unprivileged else [])


def test_a_namespace_that_survives_the_sweep_is_reported(monkeypatch, tmp_path):
    monkeypatch.setattr(sandbox_launcher, "kill_user_namespace", lambda uid: False)
    monkeypatch.setattr(sandbox_launcher, "processes_in_user_namespace", lambda uid: [123])
    with pytest.warns(RuntimeWarning, match=r"survived SIGKILL: \[123\]"):
        sandbox_core._clean_up_after(_plan(tmp_path, unprivileged=True), 4242, killed=True)


def test_a_timed_out_run_leaves_no_process_when_the_call_returns():
    """End to end, as whichever user runs the tests, several times: the race showed up one run in hundreds."""
    from trainer.sandbox import SandboxPolicy, run_python, sandbox_capabilities

    caps = sandbox_capabilities()
    policy = SandboxPolicy(allow_missing=frozenset(caps.missing()))
    code = ("import os\nprint('up', flush=True)\nfor _ in range(3):\n    try:\n        os.fork()\n"
            "    except OSError:\n        pass\nwhile True: pass")
    for _ in range(3):
        result = run_python(code, policy=policy, timeout_s=2.0)
        assert result.timed_out
        if result.sandbox_uid is not None:
            assert _namespace_pids(result.sandbox_uid) == []
            assert sandbox_launcher.processes_of_uid(result.sandbox_uid) == []
