"""Tests of the Python-tool sandbox (trainer/sandbox.py): hostile code is contained and reported as text.

Every hostile test states the protections it relies on.  Where the machine lacks one of them, the test
asserts that :func:`run_python` refuses (naming the protection) instead of running the code; the other
missing protections, irrelevant to the test, are allowed explicitly so that the test still exercises its
own protection.  Floods are linear and bounded, and limits are always in place before hostile code runs.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from trainer.sandbox import (
    FILESYSTEM_ISOLATION,
    KEY_SPEC_SESSION_KEYRING,
    KEYCTL_GET_KEYRING_ID,
    NETWORK_ISOLATION,
    PRIVILEGE_DROP,
    PROCESS_ISOLATION,
    PROTECTIONS,
    RESOURCE_LIMITS,
    Protection,
    SandboxCapabilities,
    SandboxPolicy,
    SandboxUnavailableError,
    SYS_KEYCTL,
    ToolResult,
    _session_keyring_id,
    check_policy,
    run_python,
    sandbox_capabilities,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
FLOOD_ATTEMPTS = 400  # linear fork loop: at most this many processes even if the limit were broken
FLOOD_LIMIT = 16
SMALL_MEMORY_BYTES = 128 * 1024 * 1024
SMALL_OUTPUT_BYTES = 4096
HUGE_PRINT_BYTES = 100_000_000
RSS_GROWTH_LIMIT_KB = 50 * 1024  # the test process may not buffer the 100 MB print
SHORT_TIMEOUT_S = 1.5
SLOW_MARGIN_S = 3.0  # start-up and kill overhead allowed on a loaded 2-core machine
GENEROUS_TIMEOUT_S = 30.0  # for runs that must end by themselves (limits), even on a loaded machine
SECRET_ENV = "SOD_SANDBOX_TEST_SECRET"


def run_requiring(needed: tuple[str, ...], code: str, policy: SandboxPolicy | None = None,
                  **kwargs) -> ToolResult | None:
    """Run ``code`` if the protections in ``needed`` are available; otherwise assert the refusal.

    Missing protections that the test does not rely on are allowed explicitly.  Returns None after
    asserting a refusal, so callers stop there.
    """
    caps = sandbox_capabilities()
    missing = set(caps.missing())
    base = policy or SandboxPolicy()
    allowed = SandboxPolicy(**{**{f: getattr(base, f) for f in base.__dataclass_fields__},
                               "allow_missing": frozenset(missing - set(needed)) | base.allow_missing})
    lacking = [name for name in needed if name in missing]
    if lacking:
        with pytest.raises(SandboxUnavailableError) as info:
            run_python(code, policy=allowed, **kwargs)
        for name in lacking:
            assert name in str(info.value) and caps.get(name).detail in str(info.value)
        assert set(info.value.missing) == set(lacking)
        return None
    return run_python(code, policy=allowed, **kwargs)


def processes_of_uid(uid: int) -> list[int]:
    """Pids of live (not yet dead: zombies excluded) processes whose real uid is ``uid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                status = Path(f"/proc/{entry}/status").read_text()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            if int(fields["Uid"].split()[0]) == uid and fields["State"].split()[0] not in ("Z", "X"):
                pids.append(int(entry))
    return pids


def assert_nothing_left(result: ToolResult) -> None:
    """No process of the run's dedicated uid survives the run."""
    assert result.sandbox_uid is not None
    assert processes_of_uid(result.sandbox_uid) == []


def all_available(interpreter: str = sys.executable) -> SandboxCapabilities:
    """Capabilities of an imaginary machine on which every protection is available."""
    return SandboxCapabilities(tuple(Protection(n, True, "test") for n in PROTECTIONS), interpreter)


# --- capability probe and refusal --------------------------------------------------------------------------
def test_capability_probe_reports_every_protection_and_is_cached():
    caps = sandbox_capabilities()
    assert caps is sandbox_capabilities()
    assert tuple(p.name for p in caps.protections) == PROTECTIONS
    assert os.path.isfile(caps.interpreter)
    text = caps.describe()
    for protection in caps.protections:
        assert protection.detail
        assert f"{protection.name}: {protection.detail}" in text
    if os.geteuid() != 0:
        assert not caps.available(PRIVILEGE_DROP) and "root" in caps.get(PRIVILEGE_DROP).detail


def test_missing_protection_is_refused_and_named():
    caps = all_available().without(NETWORK_ISOLATION, "no network namespaces on this test machine")
    with pytest.raises(SandboxUnavailableError) as info:
        run_python("print('must not run')", capabilities=caps)
    message = str(info.value)
    assert "network_isolation" in message and "no network namespaces on this test machine" in message
    assert "allow_missing" in message
    assert info.value.missing == {NETWORK_ISOLATION: "no network namespaces on this test machine"}
    with pytest.raises(SandboxUnavailableError):
        check_policy(SandboxPolicy(allow_missing=(PRIVILEGE_DROP,)), caps)
    assert check_policy(SandboxPolicy(allow_missing=(NETWORK_ISOLATION,)), caps) is caps


def test_several_missing_protections_are_all_named():
    caps = all_available().without(PRIVILEGE_DROP, "not root").without(PROCESS_ISOLATION, "no pid ns")
    with pytest.raises(SandboxUnavailableError) as info:
        run_python("pass", capabilities=caps, policy=SandboxPolicy(allow_missing=(NETWORK_ISOLATION,)))
    assert set(info.value.missing) == {PRIVILEGE_DROP, PROCESS_ISOLATION}
    assert "not root" in str(info.value) and "no pid ns" in str(info.value)


def test_policy_and_arguments_are_validated():
    with pytest.raises(ValueError, match="unknown protection"):
        SandboxPolicy(allow_missing=("netwrok",))
    with pytest.raises(ValueError, match="memory_bytes"):
        SandboxPolicy(memory_bytes=0)
    with pytest.raises(ValueError, match="capabilities must list"):
        SandboxCapabilities((Protection(NETWORK_ISOLATION, True, "x"),), sys.executable)
    with pytest.raises(ValueError, match="timeout_s"):
        run_python("pass", timeout_s=0)
    with pytest.raises(TypeError):
        run_python(b"print(1)")  # type: ignore[arg-type]
    assert SandboxPolicy(allow_missing=NETWORK_ISOLATION).allow_missing == frozenset({NETWORK_ISOLATION})


# --- normal code -------------------------------------------------------------------------------------------
def test_normal_code_runs_and_prints():
    result = run_requiring((), "import math\nprint(sum(range(10)), math.sqrt(16))\nprint('é✓')")
    assert result.ok and result.exit_code == 0 and not result.timed_out and not result.truncated
    assert result.output == "45 4.0\né✓\n"
    assert result.killed_by_signal is None and result.sandbox_error is None


def test_exception_is_reported_with_traceback():
    result = run_requiring((), "def f(x):\n    return 1 / x\n\nprint('before')\nf(0)\n")
    assert not result.ok and result.exit_code == 1
    assert result.output.startswith("before\n")
    assert "Traceback (most recent call last)" in result.output
    assert "return 1 / x" in result.output and "ZeroDivisionError: division by zero" in result.output
    assert "[sandbox: exit code 1]" in result.output


def test_exit_status_and_stderr_are_reported():
    result = run_requiring((), "import sys\nprint('out')\nprint('err', file=sys.stderr)\nsys.exit(3)")
    assert not result.ok and result.exit_code == 3
    assert "out\n" in result.output and "err\n" in result.output and "[sandbox: exit code 3]" in result.output


def test_crash_by_signal_is_reported():
    result = run_requiring((PROCESS_ISOLATION,), "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)")
    assert not result.ok and result.killed_by_signal == signal.SIGSEGV and result.exit_code is None
    assert "SIGSEGV" in result.output and "segmentation fault" in result.output


def test_working_directory_is_private_and_writable_and_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    code = "import os\nopen('note.txt', 'w').write('hi')\nprint(sorted(os.listdir('.')))"
    result = run_requiring((), code)
    assert result.ok and "'note.txt'" in result.output
    assert list(tmp_path.iterdir()) == []


def test_concurrent_runs_stay_separate():
    results: dict[int, ToolResult] = {}

    def worker(index: int) -> None:
        results[index] = run_requiring((), f"import os\nprint({index}, os.getcwd())")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index in range(4):
        assert results[index].ok and results[index].output.split()[0] == str(index)
    uids = {r.sandbox_uid for r in results.values()}
    assert None in uids or len(uids) == 4


# --- hostile code ------------------------------------------------------------------------------------------
def test_infinite_loop_times_out_and_partial_output_is_kept():
    code = "import os\nprint('started', flush=True)\nif os.fork() == 0:\n    while True: pass\nwhile True: pass"
    start = time.monotonic()
    result = run_requiring((), code, timeout_s=SHORT_TIMEOUT_S)
    assert time.monotonic() - start < SHORT_TIMEOUT_S + SLOW_MARGIN_S
    assert result.timed_out and not result.ok and result.exit_code is None
    assert result.output.startswith("started\n") and "timed out after 1.5 s" in result.output
    if result.sandbox_uid is not None:
        assert_nothing_left(result)


def test_cpu_time_limit_kills_busy_code():
    result = run_requiring((RESOURCE_LIMITS,), "while True: pass", timeout_s=GENEROUS_TIMEOUT_S,
                           policy=SandboxPolicy(cpu_time_s=1))
    if result is None:
        return
    assert not result.timed_out and result.killed_by_signal == signal.SIGXCPU
    assert "CPU time limit exceeded" in result.output


def test_memory_bomb_is_stopped_and_reported():
    code = "chunks = []\nwhile True:\n    chunks.append(bytearray(8 * 1024 * 1024))"
    result = run_requiring((RESOURCE_LIMITS,), code, policy=SandboxPolicy(memory_bytes=SMALL_MEMORY_BYTES))
    if result is None:
        return
    assert not result.ok and not result.timed_out
    assert "MemoryError" in result.output or result.killed_by_signal == signal.SIGKILL
    huge = run_requiring((RESOURCE_LIMITS,), "x = bytearray(10 ** 11)",
                         policy=SandboxPolicy(memory_bytes=SMALL_MEMORY_BYTES))
    assert "MemoryError" in huge.output and huge.exit_code == 1


def test_process_flood_is_stopped_by_the_process_limit():
    code = f"""
import os, time
started = 0
try:
    for _ in range({FLOOD_ATTEMPTS}):
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        started += 1
except OSError as exc:
    print("fork failed:", type(exc).__name__, exc.errno)
print("started", started)
"""
    result = run_requiring((RESOURCE_LIMITS, PRIVILEGE_DROP), code,
                           policy=SandboxPolicy(max_processes=FLOOD_LIMIT), timeout_s=GENEROUS_TIMEOUT_S)
    if result is None:
        return
    assert result.ok and not result.timed_out, result.output
    assert "fork failed: BlockingIOError 11" in result.output
    started = int(result.output.split("started")[-1])
    assert 0 < started < FLOOD_LIMIT
    assert_nothing_left(result)


def test_huge_print_is_truncated_and_memory_stays_bounded():
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = run_requiring((), f"print('x' * {HUGE_PRINT_BYTES})",
                           policy=SandboxPolicy(max_output_bytes=SMALL_OUTPUT_BYTES))
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert result.truncated and not result.ok and not result.timed_out
    assert result.output.startswith("x" * SMALL_OUTPUT_BYTES + "\n[sandbox: output truncated at 4096 bytes")
    assert len(result.output) < SMALL_OUTPUT_BYTES + 200
    assert rss_growth < RSS_GROWTH_LIMIT_KB


def test_endless_writer_is_truncated():
    result = run_requiring((), "import sys\nwhile True:\n    sys.stdout.write('y' * 1000)",
                           policy=SandboxPolicy(max_output_bytes=SMALL_OUTPUT_BYTES),
                           timeout_s=GENEROUS_TIMEOUT_S)
    assert result.truncated and not result.timed_out
    assert result.output.split("\n[sandbox:")[0] == "y" * SMALL_OUTPUT_BYTES


def test_writes_outside_the_working_directory_fail(tmp_path):
    host_dir = Path(tempfile.mkdtemp(prefix="sod-sandbox-test-"))
    try:
        existing = host_dir / "world-writable.txt"
        existing.write_text("original")
        existing.chmod(0o666)
        targets = [host_dir / "x", REPO_ROOT / f"sandbox-escape-{uuid.uuid4().hex}.txt", existing]
        code = "import sys\n" + "".join(
            f"try:\n    open({str(t)!r}, 'a').write('pwned')\n    print('WROTE', {str(t)!r})\n"
            f"except OSError as exc:\n    print('blocked', type(exc).__name__)\n" for t in targets)
        result = run_requiring((FILESYSTEM_ISOLATION, PRIVILEGE_DROP), code)
        if result is None:
            return
        assert result.ok and "WROTE" not in result.output
        assert result.output.count("blocked") == len(targets)
        assert not targets[0].exists() and not targets[1].exists()
        assert existing.read_text() == "original"
    finally:
        for leftover in host_dir.iterdir():
            leftover.unlink()
        host_dir.rmdir()


def test_environment_of_the_trainer_is_not_visible(monkeypatch):
    secret = f"secret-{uuid.uuid4().hex}"
    monkeypatch.setenv(SECRET_ENV, secret)
    result = run_requiring((), "import os\nprint(sorted(os.environ))\nprint(open('/proc/self/environ').read())")
    assert result.ok
    assert secret not in result.output and SECRET_ENV not in result.output
    assert "PATH" not in result.output and "HOME" not in result.output


def _loopback_server() -> socket.socket:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    return server


_CONNECT_CODE = """
import socket
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=2).sendall(b"hello")
    print("connected")
except OSError as exc:
    print("blocked", exc)
"""


def _accepted(server: socket.socket) -> bool:
    try:
        connection, _ = server.accept()
    except socket.timeout:
        return False
    connection.close()
    return True


def test_network_is_unreachable():
    with _loopback_server() as server:
        result = run_requiring((NETWORK_ISOLATION,), _CONNECT_CODE.format(port=server.getsockname()[1]))
        if result is None:
            return
        assert result.ok and "blocked" in result.output and "connected" not in result.output
        assert not _accepted(server)


def test_network_test_can_fail_when_isolation_is_explicitly_waived():
    """The flag really runs without the protection: the same code then reaches the loopback server."""
    caps = sandbox_capabilities().without(NETWORK_ISOLATION, "waived by the test")
    allowed = frozenset(caps.missing())
    with _loopback_server() as server:
        result = run_python(_CONNECT_CODE.format(port=server.getsockname()[1]), capabilities=caps,
                            policy=SandboxPolicy(allow_missing=allowed))
        assert result.ok and "connected" in result.output, result.output
        assert _accepted(server)


def test_killing_the_parent_and_others_fails():
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        code = f"""
import os, signal
for pid in (os.getppid(), {os.getpid()}, {bystander.pid}, 1):
    try:
        os.kill(pid, signal.SIGKILL)
        print("killed", pid)
    except OSError as exc:
        print("refused", pid, type(exc).__name__)
try:
    os.kill(-1, signal.SIGKILL)  # every process this uid may signal: none besides itself
    print("survived kill(-1)")
except OSError as exc:
    print("survived kill(-1):", type(exc).__name__)
"""
        result = run_requiring((PRIVILEGE_DROP,), code)
        if result is None:
            return
        assert "killed" not in result.output, result.output
        assert result.output.count("refused") == 4 and "survived kill(-1)" in result.output
        assert bystander.poll() is None
        assert_nothing_left(result)
    finally:
        bystander.kill()
        bystander.wait()


_DAEMON_CODE = """
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(60)
        os._exit(0)
    os._exit(0)
print("daemon started")
"""


def test_trainer_keyring_and_host_run_dir_are_out_of_reach():
    code = ("import ctypes, os\n"
            f"print('keyring', ctypes.CDLL(None).syscall({SYS_KEYCTL.get(os.uname().machine)}, "
            f"{KEYCTL_GET_KEYRING_ID}, {KEY_SPEC_SESSION_KEYRING}, 0))\n"
            "print('run', os.listdir('/run') if os.path.isdir('/run') else [])\n")
    result = run_requiring((PRIVILEGE_DROP, FILESYSTEM_ISOLATION), code)
    if result is None:
        return
    assert result.ok, result.output
    own_keyring = _session_keyring_id()
    child_keyring = int(result.output.split("keyring")[1].split()[0])
    assert own_keyring is not None and (own_keyring <= 0 or child_keyring != own_keyring)
    assert "run []" in result.output


def test_escaping_daemon_is_killed():
    result = run_requiring((PRIVILEGE_DROP,), _DAEMON_CODE, timeout_s=GENEROUS_TIMEOUT_S)
    if result is None:
        return
    assert result.ok and not result.timed_out, result.output
    assert_nothing_left(result)


def test_escaping_daemon_is_killed_without_pid_namespace():
    """Backstop without a pid namespace: every process of the run's dedicated uid is killed."""
    caps = sandbox_capabilities()
    if not caps.available(PRIVILEGE_DROP):
        with pytest.raises(SandboxUnavailableError, match=PRIVILEGE_DROP):
            run_python(_DAEMON_CODE, capabilities=caps.without(PROCESS_ISOLATION, "waived"),
                       policy=SandboxPolicy(allow_missing=frozenset(caps.missing()) - {PRIVILEGE_DROP}
                                            | {PROCESS_ISOLATION}))
        return
    reduced = caps.without(PROCESS_ISOLATION, "waived by the test")
    result = run_python(_DAEMON_CODE, capabilities=reduced, timeout_s=GENEROUS_TIMEOUT_S,
                        policy=SandboxPolicy(allow_missing=frozenset(reduced.missing())))
    assert result.ok and not result.timed_out, result.output
    assert_nothing_left(result)


_REPORT_CODE = """
import dataclasses
import os
print("uid", os.getuid())
print("cwd", os.getcwd())
print("net", os.readlink("/proc/self/ns/net"))
print("pid", os.getpid())
open("scratch.txt", "w").write("ok")
"""


@pytest.mark.parametrize("waived", PROTECTIONS)
def test_explicitly_waived_protection_runs_without_it(waived):
    """With ``allow_missing``, code still runs correctly without the waived protection, which is not faked."""
    caps = sandbox_capabilities().without(waived, "waived by the test")
    allowed = set(caps.missing())
    try:
        result = run_python(_REPORT_CODE, capabilities=caps, policy=SandboxPolicy(allow_missing=allowed))
    except SandboxUnavailableError as refusal:
        # Only one dependency exists: an interpreter behind an untraversable directory needs the mount
        # namespace to be started by the unprivileged uid.
        assert waived == FILESYSTEM_ISOLATION and set(refusal.missing) == {PRIVILEGE_DROP}, refusal
        assert "cannot traverse" in str(refusal) and caps.interpreter in str(refusal)
        result = run_python(_REPORT_CODE, capabilities=caps,
                            policy=SandboxPolicy(allow_missing=allowed | {PRIVILEGE_DROP}))
    assert result.ok, result.output
    lines = dict(line.split(" ", 1) for line in result.output.splitlines())
    if waived == PRIVILEGE_DROP:
        assert result.sandbox_uid is None and int(lines["uid"]) == os.getuid()
    if waived == NETWORK_ISOLATION:
        assert lines["net"] == os.readlink("/proc/self/ns/net")
    if waived == FILESYSTEM_ISOLATION:
        assert lines["cwd"] != "/tmp" and lines["cwd"].endswith("/work")
        assert not Path(lines["cwd"]).exists()  # the host work directory is removed afterwards
    if waived == PROCESS_ISOLATION:
        assert int(lines["pid"]) > 2


def test_sandbox_set_up_failure_is_reported_not_raised():
    """A sandbox that cannot be set up reports it in the result (training goes on); the code never runs."""
    marker = Path(tempfile.gettempdir()) / f"sod-sandbox-ran-{uuid.uuid4().hex}"
    code = f"open({str(marker)!r}, 'w').write('ran')\nprint('ran')"
    impossible = SandboxPolicy(max_open_files=2 ** 40)  # above the kernel's nr_open: setrlimit must fail
    result = run_requiring((RESOURCE_LIMITS,), code, policy=impossible)
    if result is not None:
        assert not result.ok and result.exit_code is None and "ran" not in result.output.split("[sandbox")[0]
        assert result.sandbox_error and "resource_limits" in result.sandbox_error
        assert "[sandbox error: resource_limits" in result.output
        assert not marker.exists()
    broken = dataclasses.replace(sandbox_capabilities(), interpreter="/nonexistent/bin/python3")
    result = run_python(code, capabilities=broken, policy=SandboxPolicy(allow_missing=broken.missing()))
    assert not result.ok and result.sandbox_error and "could not start" in result.output
    assert not marker.exists()


HIGH_FD_COUNT = 1100  # past select()'s FD_SETSIZE of 1024: the pipes to the sandbox get high numbers


def test_works_when_the_trainer_has_many_open_files():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = HIGH_FD_COUNT + 100
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(hard, wanted)))
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(HIGH_FD_COUNT)]
    try:
        result = run_requiring((), "print('fine')")
        assert result.ok and result.output == "fine\n"
        slow = run_requiring((), "import time\nprint('start', flush=True)\ntime.sleep(60)", timeout_s=1.0)
        assert slow.timed_out and slow.output.startswith("start\n")
    finally:
        for fd in fds:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
