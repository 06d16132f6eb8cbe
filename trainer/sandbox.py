"""Sandbox for the Python tool: run untrusted, model-written code and turn whatever happens into text.

Entry point: :func:`run_python`.  It never raises because of the code (any ``str``, even one that is not
valid UTF-8 text: what it does, timeouts, crashes, ``MemoryError``, signals, floods of output all become
:class:`ToolResult` text the model sees); it raises :class:`SandboxUnavailableError` only when a protection
the :class:`SandboxPolicy` requires is missing on this machine, so that a misconfigured machine stops the
trainer at once instead of running code unprotected.

Process layout (every run)::

    trainer ──Popen(env={}, new session; config + code in a memfd)──▶ launcher L   root, on the host
              │ makes the run's cgroup (memory.max, pids.max) where cgroup v2 allows it,
              │ a host run folder only without filesystem isolation
              └─fork, join the cgroup, exec──▶ bwrap: new net/uts/pid/ipc/mount namespaces, empty root
                   └─▶ bwrap's reaper (pid 1) ──▶ init W   pid 2, root, only CAP_SYS_ADMIN/SETUID/SETGID
                         │ tmpfs /tmp (size and inode limits, the code's working directory), private /dev/shm
                         └─fork──▶ tool G   setgroups([]), setresgid/setresuid(dedicated uid), new session
                                    keyring, writes main.py, rlimits, no_new_privs, seccomp filter,
                                    execve(python -I -S -u -X utf8 main.py)

The launcher is a freshly exec'd, single-threaded interpreter (:mod:`trainer.sandbox_launcher`), so
nothing runs in a ``fork`` of the multi-threaded trainer.  It dies with the trainer (PR_SET_PDEATHSIG), and
then kills the run and removes what the run left (cgroup, host run folder) within milliseconds.
Protections, as named in :data:`PROTECTIONS`:

* ``privilege_drop``: the code runs as a dedicated uid/gid (``SANDBOX_UID_BASE`` + the launcher's pid,
  unique among live runs, so RLIMIT_NPROC counts only this run and runs cannot signal each other), with no
  supplementary groups, no capabilities, a new session keyring (not the trainer's) and
  ``PR_SET_NO_NEW_PRIVS``.  Needs root.
* ``network_isolation``: new network and UTS namespaces (only the namespace's own loopback exists).
* ``filesystem_isolation``: a mount namespace whose root is an empty read-only tmpfs holding only what the
  interpreter needs, read-only (:mod:`trainer.sandbox_fs`: the interpreter, its standard library without
  ``site-packages``, the shared libraries it loads, the loader cache), a fresh ``/proc`` and minimal
  ``/dev``, a private ``/dev/shm``, and a fresh size- and inode-limited tmpfs at ``/tmp`` as the working
  directory.  Nothing else of the host (home directories, /var, /opt, the project, other checkouts).
* ``process_isolation``: new pid and IPC namespaces; the code cannot see or signal outside processes,
  and when the namespace's first process dies the kernel kills everything left inside (daemons too).
* ``resource_limits``: the run's memory and task count as a whole (below), RLIMIT_AS, RLIMIT_CPU,
  RLIMIT_NPROC, RLIMIT_NOFILE, RLIMIT_FSIZE, RLIMIT_CORE=0.
* ``syscall_filter``: a seccomp filter compiled by libseccomp (:mod:`trainer.sandbox_seccomp`) that denies
  new namespaces, mounts, ptrace, bpf, keyctl, io_uring, perf_event_open, userfaultfd, module loading, ...

Memory bound of one call: ``SandboxPolicy.memory_bytes`` bounds the whole call, not each process.  Where a
cgroup v2 with the memory controller can be made (:mod:`trainer.sandbox_cgroup`), the run's cgroup has
``memory.max = memory_bytes`` (``memory.swap.max = 0``; the sandbox's own init and the tmpfs pages the code
writes are charged to it too; the kernel OOM-kills a process of the run when it is exceeded) and, where
the pids controller is handed down too, ``pids.max = max_processes`` plus the sandbox's own 3 tasks; each
process also has ``RLIMIT_AS = memory_bytes`` and ``RLIMIT_NPROC = max_processes``.  Elsewhere (cgroup
v1, read-only cgroupfs) the run gets fewer processes: ``n = min(max_processes, memory_bytes // 256 MiB)``
(at least 1) processes or threads (``RLIMIT_NPROC = n``; 2 for the default 512 MiB) of ``RLIMIT_AS =
memory_bytes // n`` each, so that their address spaces add up to at most ``memory_bytes``; the tmpfs work
directory (``workdir_bytes``) and ``/dev/shm`` (16 MiB) come on top of that.

Why bubblewrap and libseccomp, and what is still written here: namespaces, the minimal root, ``/proc``,
``/dev``, the reaper and the parent-death chain are bubblewrap's (Debian ``bubblewrap``; run as root it
needs no user namespace); the filter is compiled by libseccomp (Debian ``libseccomp2`` through PyPI
``pyseccomp``).  Hand-written are only the parts neither tool offers: the dedicated per-run uid (bubblewrap
maps ids only through a user namespace, which would leave the code's processes as root on the host), the
init process that reports the code's exact exit status or signal, loading the compiled filter after the
privilege drop (``prctl``), the cgroup, and the rlimits.  Without bubblewrap the namespace protections are
unavailable, and the sandbox refuses to run unless they are explicitly waived.

Always on: a separate process in its own session/process group, an empty environment, a wall-clock
timeout after which everything is SIGKILLed and reaped, and a cap on the bytes read from the combined
stdout/stderr pipe (everything is killed when the code exceeds it).

:func:`sandbox_capabilities` probes once per process (cached, :mod:`trainer.sandbox_probe`) by launching a
trial sandbox and verifying, from inside it, what actually took effect.
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
from dataclasses import dataclass, field

from . import sandbox_launcher as _launcher
from .sandbox_cgroup import cgroup_base
from .sandbox_fs import bwrap_arguments, interpreter_files
from .sandbox_launcher import (  # noqa: F401 - re-exported: part of this module's interface
    BWRAP_PROTECTIONS,
    CGROUP_PREFIX,
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
from .sandbox_seccomp import SyscallFilterUnavailable, syscall_filter_program

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

    ``missing`` maps each missing protection's name to the reason the probe gave.
    """

    def __init__(self, missing: dict[str, str]):
        self.missing = dict(missing)
        lines = [f"  - {name}: {reason}" for name, reason in self.missing.items()]
        names = ", ".join(repr(name) for name in self.missing)
        super().__init__(
            "refusing to run model-written code: the sandbox lacks required protection(s) "
            f"{names}:\n" + "\n".join(lines)
            + f"\nTo run without them anyway, pass SandboxPolicy(allow_missing=({names},)) "
              "(trainer config: sandbox_allow_missing).")


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


def sandbox_capabilities() -> SandboxCapabilities:
    """Protections available on this machine, probed on first call and cached for the process."""
    from .sandbox_probe import probe_capabilities  # noqa: PLC0415 - the probe module imports this one

    return probe_capabilities(_interpreter_path(), tempfile.gettempdir())


def check_policy(policy: SandboxPolicy | None = None,
                 capabilities: SandboxCapabilities | None = None) -> SandboxCapabilities:
    """Return the capabilities if ``policy`` can be honoured, else raise :class:`SandboxUnavailableError`.

    The trainer can call this at start to fail fast (and print ``describe()`` of the result).
    """
    policy = policy or SandboxPolicy()
    caps = _consistent(capabilities if capabilities is not None else sandbox_capabilities())
    missing = {name: caps.get(name).detail for name in caps.missing() if name not in policy.allow_missing}
    if missing:
        raise SandboxUnavailableError(missing)
    return caps


def _consistent(caps: SandboxCapabilities) -> SandboxCapabilities:
    """``caps`` with the dependencies between protections applied.

    The unprivileged uid can only start an interpreter hidden behind an untraversable directory (e.g.
    ``/root``) through the private mount namespace; without filesystem isolation, privilege drop is then
    unavailable too.
    """
    if caps.available(PRIVILEGE_DROP) and not caps.available(FILESYSTEM_ISOLATION):
        hidden = _first_hidden_ancestor(_interpreter_prefix(caps.interpreter))
        if hidden is not None:
            return caps.without(PRIVILEGE_DROP, f"the interpreter {caps.interpreter} lies under {hidden}, which "
                                                "an unprivileged uid cannot traverse, and filesystem isolation "
                                                "(which would expose it) is unavailable")
    return caps


def run_python(code: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, policy: SandboxPolicy | None = None,
               capabilities: SandboxCapabilities | None = None) -> ToolResult:
    """Run ``code`` with the sandbox's interpreter (``python -I -S -u``) and report what happened.

    Raises :class:`SandboxUnavailableError` if the policy requires a missing protection, ``TypeError`` /
    ``ValueError`` for bad arguments; everything about the code itself is reported in the result (a string
    that is not valid UTF-8, e.g. with lone surrogates, is passed on as is and fails to compile there).
    """
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"timeout_s must be a positive finite number, got {timeout_s!r}")
    policy = policy or SandboxPolicy()
    caps = check_policy(policy, capabilities)
    try:
        plan = _plan(caps, policy, timeout_s)
        raw = _launch(plan, code.encode("utf-8", "surrogatepass"), timeout_s, policy.max_output_bytes)
    except (OSError, _PlanError) as exc:  # the machine could not start the sandbox: not the code's fault
        error = f"could not start the sandbox: {exc}"
        return ToolResult(output=f"[sandbox error: {error}]", ok=False, timed_out=False, exit_code=None,
                          killed_by_signal=None, truncated=False, duration_s=0.0, sandbox_error=error)
    return _tool_result(raw, timeout_s, policy.max_output_bytes)


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


def bwrap_path() -> str | None:
    """bubblewrap's absolute path, or None if it is not installed."""
    return shutil.which("bwrap") or next((p for p in ("/usr/bin/bwrap", "/bin/bwrap") if os.access(p, os.X_OK)),
                                         None)


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
        bwrap = bwrap_path()
        if bwrap is None:
            raise _PlanError("bubblewrap (bwrap) is not installed")
        files = interpreter_files(caps.interpreter) if use[FILESYSTEM_ISOLATION] else None
        bwrap_argv = bwrap_arguments(bwrap, use, files, as_root=os.geteuid() == 0, net=NETWORK_ISOLATION,
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
                _kill_group(proc.pid)
                _clean_up_after(plan, proc.pid)
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


def _clean_up_after(plan: dict, launcher_pid: int) -> None:
    """What a launcher killed before its own cleanup may have left: processes, its cgroup, its run folder."""
    if plan["cgroup"]:
        _launcher.remove_cgroup(os.path.join(plan["cgroup"]["base"], f"{CGROUP_PREFIX}{launcher_pid}"))
    if plan["use"][PRIVILEGE_DROP]:
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
