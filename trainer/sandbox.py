"""Sandbox for the Python tool: run untrusted, model-written code and turn whatever happens into text.

Entry point: :func:`run_python`.  It never raises because of what the code does (timeouts, crashes,
``MemoryError``, signals, floods of output all become :class:`ToolResult` text the model sees); it raises
:class:`SandboxUnavailableError` only when a protection the :class:`SandboxPolicy` requires is missing on
this machine, so that a misconfigured machine stops the trainer at once instead of running code unprotected.

Process layout (every run)::

    trainer ──Popen(env={}, new session)──▶ launcher L   root; fresh ``python -I -S sandbox.py``
                                              │ unshare(net, mount, pid+ipc); backstop deadline
                                              └─fork──▶ init C   pid 1 of the new pid namespace, root
                                                          │ private mounts: read-only /, tmpfs /tmp,
                                                          │ own /proc, interpreter made reachable
                                                          └─fork──▶ tool G   rlimits, setgroups([]),
                                                                     setresgid/setresuid(dedicated uid),
                                                                     no_new_privs, execve(python -I -S …)

The launcher is a freshly exec'd, single-threaded interpreter, so namespace, mount and credential calls
never run in a ``fork`` of the (multi-threaded) trainer.  Protections, as named in :data:`PROTECTIONS`:

* ``privilege_drop``: the code runs as a dedicated uid/gid (``SANDBOX_UID_BASE`` + the launcher's pid,
  unique among live runs, so RLIMIT_NPROC counts only this run and runs cannot signal each other), with no
  supplementary groups, a new session keyring (not the trainer's) and ``PR_SET_NO_NEW_PRIVS``.  Needs root.
* ``network_isolation``: a new, empty network namespace (not even loopback is up).
* ``filesystem_isolation``: a private mount namespace in which every mount is read-only and nosuid
  (``mount_setattr(AT_RECURSIVE)``), ``/tmp`` is a fresh size-limited tmpfs that is the code's working
  directory, ``/run`` (host unix sockets) is hidden, ``/dev/shm`` is private, and a directory that hides
  the interpreter from the unprivileged uid (e.g. ``/root`` with mode 700 around a pyenv install) is
  replaced by a tmpfs exposing only the interpreter's prefix.
* ``process_isolation``: new pid and IPC namespaces; the code cannot see or signal outside processes,
  and when the init process dies the kernel kills everything left inside (daemons that called setsid too).
* ``resource_limits``: RLIMIT_AS, RLIMIT_CPU, RLIMIT_NPROC, RLIMIT_NOFILE, RLIMIT_FSIZE, RLIMIT_CORE=0.

Always on: a separate process in its own session/process group, an empty environment, a fresh temporary
directory removed afterwards, a wall-clock timeout after which the whole group is SIGKILLed and reaped, and
a cap on the bytes read from the combined stdout/stderr pipe (the group is killed when the code exceeds it).

:func:`sandbox_capabilities` probes once per process (cached) by launching a trial sandbox and verifying,
from inside it, what actually took effect (uids, namespace ids, read-only root, rlimits).

The code runs with ``-I -S -u -X utf8``: standard library only (no site-packages, no script directory
on ``sys.path``), unbuffered output so that a timed-out run still shows what it printed.  Memory is bounded
per process (RLIMIT_AS) and the number of processes per run (RLIMIT_NPROC), so one run can use at most
``max_processes * memory_bytes`` of address space; no cgroup caps the run as a whole.

This module only imports the standard library: the launcher runs it as a script with ``-I -S``.
"""

from __future__ import annotations

# The launcher process runs this file as a script and stops at the ``__main__`` block below, before the
# heavier imports the trainer side needs (dataclasses, subprocess, ...): only these light modules load there.
import ctypes
import errno
import json
import math
import os
import resource
import select
import signal
import stat
import sys
import time

# --- protections -------------------------------------------------------------------------------------------
PRIVILEGE_DROP = "privilege_drop"
NETWORK_ISOLATION = "network_isolation"
FILESYSTEM_ISOLATION = "filesystem_isolation"
PROCESS_ISOLATION = "process_isolation"
RESOURCE_LIMITS = "resource_limits"
PROTECTIONS = (PRIVILEGE_DROP, NETWORK_ISOLATION, FILESYSTEM_ISOLATION, PROCESS_ISOLATION, RESOURCE_LIMITS)

# --- defaults ----------------------------------------------------------------------------------------------
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MEMORY_BYTES = 512 * 1024 * 1024
DEFAULT_MAX_PROCESSES = 16  # with RLIMIT_AS per process, bounds one run to 16 x memory_bytes of address space
DEFAULT_MAX_OPEN_FILES = 256
DEFAULT_MAX_FILE_BYTES = 16 * 1024 * 1024
DEFAULT_WORKDIR_BYTES = 64 * 1024 * 1024
DEFAULT_WORKDIR_INODES = 4096
DEFAULT_MAX_OUTPUT_BYTES = 64 * 1024
CPU_LIMIT_SLACK_S = 1  # RLIMIT_CPU soft limit = ceil(timeout) + this; the hard limit one second later
PROBE_TIMEOUT_S = 20.0

# --- layout and plumbing -----------------------------------------------------------------------------------
SANDBOX_UID_BASE = 1_600_000_000  # dedicated uid/gid = base + launcher pid; far above any system/user range
CODE_FILENAME = "main.py"
ISOLATED_WORKDIR = "/tmp"  # the code's working directory inside the private mount namespace
RUN_DIR_PREFIX = "sod-sandbox-"
CONFIG_FILENAME = "config.json"
HOST_WORKDIR_NAME = "work"
INTERPRETER_STAGE_NAME = "interpreter"
HIDING_TMPFS_OPTIONS = "mode=0755,size=64k,nr_inodes=256"
HIDDEN_HOST_DIRS = ("/run",)  # host rendezvous points (unix sockets, pid files) replaced by an empty tmpfs
PRIVATE_SHM_DIR = "/dev/shm"  # replaced by a small private tmpfs, so that multiprocessing's semaphores work
PRIVATE_SHM_OPTIONS = "mode=1777,size=16m,nr_inodes=1024"
SETUP_FAILED_EXIT = 121  # launcher/init exit status when the sandbox could not be set up
LAUNCHER_GRACE_S = 5.0  # the launcher kills its init this long after the wall timeout (trainer gone?)
POST_EXIT_DRAIN_S = 0.2  # after the launcher exits, read what is left in the pipe for at most this long
STATUS_READ_TIMEOUT_S = 1.0
READ_CHUNK_BYTES = 64 * 1024
UID_SWEEP_ROUNDS = 200
UID_SWEEP_PAUSE_S = 0.005
DEAD_STATES = ("Z", "X")  # /proc/PID/status states of processes that are already dead (zombie, dead)
PROBE_MARKER = "SOD-SANDBOX-PROBE:"
TOOL_ARGV = ("-I", "-S", "-u", "-X", "utf8", CODE_FILENAME)

# --- Linux ABI ---------------------------------------------------------------------------------------------
CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
SYS_MOUNT_SETATTR = 442  # same number on every architecture (new-style syscall table)
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
SYS_KEYCTL = {"x86_64": 250, "aarch64": 219}  # keyctl(2) has no libc wrapper; numbers differ per machine
KEYCTL_GET_KEYRING_ID = 0
KEYCTL_JOIN_SESSION_KEYRING = 1
KEY_SPEC_SESSION_KEYRING = -3

SIGNAL_HINTS = {
    signal.SIGKILL: "killed (memory exhausted, CPU hard limit, or killed from outside)",
    signal.SIGXCPU: "CPU time limit exceeded",
    signal.SIGXFSZ: "file size limit exceeded",
    signal.SIGSEGV: "crashed (segmentation fault)",
    signal.SIGABRT: "aborted",
    signal.SIGBUS: "crashed (bus error)",
}


def _wait_readable(fd: int, timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for ``fd`` to be readable (or hung up); poll(2), so any fd number works."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0, math.ceil(timeout_s * 1000))))


# ===========================================================================================================
# Launcher side: runs as ``python -I -S sandbox.py CONFIG`` (root, single-threaded, empty environment)
# ===========================================================================================================
class _MountAttr(ctypes.Structure):
    """``struct mount_attr`` for mount_setattr(2)."""

    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


class _SetupError(Exception):
    """A sandbox set-up step failed; ``protection`` names the protection it belonged to."""

    def __init__(self, protection: str, message: str):
        super().__init__(message)
        self.protection = protection


class _Launcher:
    """The launcher, init and tool-process steps; one instance per launcher process."""

    def __init__(self, config: dict):
        self.config = config
        self.strict = config["mode"] == "run"
        self.use = dict(config["use"])
        self.status_fd = config["status_fd"]
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.uid = SANDBOX_UID_BASE + os.getpid() if self.use[PRIVILEGE_DROP] else os.getuid()
        self.gid = self.uid if self.use[PRIVILEGE_DROP] else os.getgid()

    # --- reporting ---
    def report(self, **event) -> None:
        """Write one JSON status event for the trainer."""
        data = (json.dumps(event) + "\n").encode()
        try:
            os.write(self.status_fd, data)
        except OSError:
            pass

    def step(self, protection: str, action, *args) -> bool:
        """Run set-up ``action``; on failure report it and abort (run mode) or turn the protection off (probe)."""
        try:
            action(*args)
            return True
        except (OSError, ValueError, _SetupError) as exc:
            self.report(event="step_failed", protection=protection, error=str(exc))
            if self.strict:
                os._exit(SETUP_FAILED_EXIT)
            self.use[protection] = False
            return False

    # --- syscalls ---
    def _check(self, result: int, what: str) -> None:
        if result != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what} failed: {os.strerror(err)}")

    def unshare(self, flags: int, names: str) -> None:
        """unshare(2) with ``flags`` (spelled ``names`` in messages)."""
        self._check(self.libc.unshare(ctypes.c_int(flags)), f"unshare({names})")

    def mount(self, source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None):
        """mount(2)."""
        enc = lambda s: None if s is None else os.fsencode(s)  # noqa: E731 - local helper
        self._check(self.libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
                    f"mount {source} on {target} ({fstype}, flags {flags:#x})")

    def make_tree_readonly(self, path: str) -> None:
        """mount_setattr(path, AT_RECURSIVE, ro+nosuid): every mount at or under ``path`` becomes read-only."""
        attr = _MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, 0, 0)
        self.libc.syscall.restype = ctypes.c_long
        result = self.libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(AT_FDCWD),
                                   os.fsencode(path), ctypes.c_uint(AT_RECURSIVE), ctypes.byref(attr),
                                   ctypes.c_size_t(ctypes.sizeof(attr)))
        self._check(result, f"mount_setattr({path}, read-only, recursive)")

    def prctl(self, option: int, value: int) -> None:
        """prctl(2) with one argument."""
        self._check(self.libc.prctl(ctypes.c_int(option), ctypes.c_ulong(value), ctypes.c_ulong(0),
                                    ctypes.c_ulong(0), ctypes.c_ulong(0)), f"prctl({option})")

    # --- launcher (L) ---
    def run_launcher(self) -> int:
        """Enter the namespaces, fork the init process, wait for it (killing it after the deadline)."""
        os.umask(0o022)
        if self.use[PRIVILEGE_DROP]:  # needed if the private /tmp is unavailable or fails (probe mode)
            self.step(PRIVILEGE_DROP, self.share_host_workdir)
        if self.use[NETWORK_ISOLATION]:
            self.step(NETWORK_ISOLATION, self.unshare, CLONE_NEWNET, "CLONE_NEWNET")
        if self.use[FILESYSTEM_ISOLATION]:
            self.step(FILESYSTEM_ISOLATION, self.unshare, CLONE_NEWNS, "CLONE_NEWNS")
        if self.use[PROCESS_ISOLATION]:
            self.step(PROCESS_ISOLATION, self.unshare, CLONE_NEWPID | CLONE_NEWIPC, "CLONE_NEWPID|CLONE_NEWIPC")
        init_pid = os.fork()
        if init_pid == 0:
            self._child_guard(self.run_init)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):  # only the code should hold the output pipe open
            os.dup2(devnull, fd)
        os.close(devnull)
        pidfd = os.pidfd_open(init_pid)
        if not _wait_readable(pidfd, self.config["deadline_s"]):
            self.report(event="launcher_deadline")
            os.kill(init_pid, signal.SIGKILL)
        _, status = os.waitpid(init_pid, 0)
        return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else SETUP_FAILED_EXIT

    def share_host_workdir(self) -> None:
        """Give the dedicated uid the host work directory and a way into it (the config stays 0600)."""
        os.chmod(self.config["run_dir"], 0o711)
        os.chown(self.config["host_workdir"], self.uid, self.gid)
        os.chmod(os.path.join(self.config["host_workdir"], CODE_FILENAME), 0o644)

    def _child_guard(self, body) -> None:
        """Run ``body`` in a forked child; never return into the parent's code path."""
        try:
            body()
        except BaseException as exc:  # noqa: BLE001 - report anything, then leave without unwinding
            self.report(event="setup_failed", error=f"{type(exc).__name__}: {exc}")
        os._exit(SETUP_FAILED_EXIT)

    # --- init (C) ---
    def run_init(self) -> None:
        """Set up mounts, fork the tool process, reap until it exits, report its status."""
        self.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        workdir = self.config["host_workdir"]
        if self.use[FILESYSTEM_ISOLATION]:
            with open(os.path.join(workdir, CODE_FILENAME), "rb") as handle:
                code = handle.read()
            if self.step(FILESYSTEM_ISOLATION, self.isolate_filesystem, code):
                workdir = ISOLATED_WORKDIR
        tool_pid = os.fork()
        if tool_pid == 0:
            self._child_guard(lambda: self.exec_tool(workdir))
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                self.report(event="setup_failed", error="the tool process vanished")
                os._exit(SETUP_FAILED_EXIT)
            if pid == tool_pid:
                break
        if os.WIFSIGNALED(status):
            self.report(event="exit", signal=os.WTERMSIG(status))
        else:
            self.report(event="exit", exit_code=os.WEXITSTATUS(status))
        os._exit(0)

    def isolate_filesystem(self, code: bytes) -> None:
        """Private mounts: interpreter reachable, own /proc, everything read-only, fresh tmpfs work dir."""
        self.mount(None, "/", None, MS_REC | MS_PRIVATE)
        hidden = self.config["hidden_ancestor"]
        if hidden and self.use[PRIVILEGE_DROP]:
            prefix = self.config["interpreter_prefix"]
            stage = os.path.join(self.config["run_dir"], INTERPRETER_STAGE_NAME)
            os.mkdir(stage, 0o700)
            self.mount(prefix, stage, None, MS_BIND | MS_REC)
            self.mount("tmpfs", hidden, "tmpfs", MS_NOSUID | MS_NODEV, HIDING_TMPFS_OPTIONS)
            os.makedirs(prefix, mode=0o755, exist_ok=True)
            self.mount(stage, prefix, None, MS_MOVE)
        if self.use[PROCESS_ISOLATION]:
            self.mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        for path in HIDDEN_HOST_DIRS:
            if os.path.isdir(path) and not os.path.islink(path):
                self.mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, HIDING_TMPFS_OPTIONS)
        self.make_tree_readonly("/")
        if os.path.isdir(PRIVATE_SHM_DIR) and not os.path.islink(PRIVATE_SHM_DIR):
            self.mount("tmpfs", PRIVATE_SHM_DIR, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, PRIVATE_SHM_OPTIONS)
        options = (f"mode=0700,uid={self.uid},gid={self.gid},size={self.config['workdir_bytes']},"
                   f"nr_inodes={self.config['workdir_inodes']}")
        self.mount("tmpfs", ISOLATED_WORKDIR, "tmpfs", MS_NOSUID | MS_NODEV, options)
        path = os.path.join(ISOLATED_WORKDIR, CODE_FILENAME)
        with open(path, "wb") as handle:
            handle.write(code)
        os.chown(path, self.uid, self.gid)

    # --- tool process (G) ---
    def exec_tool(self, workdir: str) -> None:
        """Apply limits, drop privileges, and exec the interpreter on the code (never returns)."""
        if self.use[RESOURCE_LIMITS]:
            self.step(RESOURCE_LIMITS, self.set_limits)
        if self.use[PRIVILEGE_DROP]:
            self.step(PRIVILEGE_DROP, self.drop_privileges)
        self.prctl(PR_SET_NO_NEW_PRIVS, 1)
        self.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # after the uid change, which would clear it
        os.chdir(workdir)
        os.umask(0o077)
        for signum in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT):
            signal.signal(signum, signal.SIG_DFL)
        argv = self.config["argv"]
        try:
            os.execve(argv[0], argv, {})
        except OSError as exc:
            self.report(event="setup_failed", protection=PRIVILEGE_DROP if self.use[PRIVILEGE_DROP] else "",
                        error=f"cannot execute {argv[0]}: {exc}")
            os._exit(SETUP_FAILED_EXIT)

    def set_limits(self) -> None:
        """setrlimit for each configured limit (soft = hard, except CPU: hard one second later)."""
        for name, value in self.config["limits"].items():
            hard = value + 1 if name == "RLIMIT_CPU" else value
            resource.setrlimit(getattr(resource, name), (value, hard))

    def drop_privileges(self) -> None:
        """Become the dedicated uid/gid with no supplementary groups, irrevocably."""
        os.setgroups([])
        os.setresgid(self.gid, self.gid, self.gid)
        os.setresuid(self.uid, self.uid, self.uid)
        if os.getresuid() != (self.uid,) * 3 or os.getgroups():
            raise _SetupError(PRIVILEGE_DROP, "credentials did not change")
        self.new_session_keyring()

    def new_session_keyring(self) -> None:
        """Leave the trainer's session keyring (still possessed after the uid change) for a new, empty one."""
        machine = os.uname().machine
        if machine not in SYS_KEYCTL:
            raise _SetupError(PRIVILEGE_DROP, f"keyctl syscall number unknown on {machine}: cannot leave the "
                                              "trainer's session keyring")
        self.libc.syscall.restype = ctypes.c_long
        result = self.libc.syscall(ctypes.c_long(SYS_KEYCTL[machine]), ctypes.c_int(KEYCTL_JOIN_SESSION_KEYRING),
                                   ctypes.c_char_p(None))
        if result < 0 and ctypes.get_errno() != errno.ENOSYS:  # ENOSYS: kernel without keyrings, nothing to leak
            err = ctypes.get_errno()
            raise OSError(err, f"keyctl(JOIN_SESSION_KEYRING): {os.strerror(err)}")


def _launcher_main(argv: list[str]) -> int:
    """Entry point of the launcher process: ``python -I -S sandbox.py CONFIG``."""
    with open(argv[0], encoding="utf-8") as handle:
        config = json.load(handle)
    os.set_inheritable(config["status_fd"], False)  # closed on exec of the code; kept across forks
    return _Launcher(config).run_launcher()


if __name__ == "__main__":
    sys.exit(_launcher_main(sys.argv[1:]))

# --- trainer side (not reached in the launcher process) -----------------------------------------------------
import dataclasses  # noqa: E402
import functools  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402


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
    ``cpu_time_s=None`` derives the CPU limit from the wall timeout.
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
    return _probe_capabilities(_interpreter_path(), tempfile.gettempdir())


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
    ``ValueError`` for bad arguments; everything the code itself does is reported in the result.
    """
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"timeout_s must be a positive finite number, got {timeout_s!r}")
    policy = policy or SandboxPolicy()
    caps = check_policy(policy, capabilities)
    plan = _plan(caps, policy, timeout_s, probe=False)
    try:
        raw = _launch(plan, code, timeout_s, policy.max_output_bytes)
    except OSError as exc:  # the machine could not start a process (e.g. out of pids): not the code's fault
        error = f"could not start the sandbox: {exc}"
        return ToolResult(output=f"[sandbox error: {error}]", ok=False, timed_out=False, exit_code=None,
                          killed_by_signal=None, truncated=False, duration_s=0.0, sandbox_error=error)
    return _tool_result(raw, timeout_s, policy.max_output_bytes)


# ===========================================================================================================
# Trainer side: planning, launching, reading, reporting
# ===========================================================================================================
def _interpreter_path() -> str:
    """The real path of the base interpreter (not a venv shim: the code runs with ``-I -S`` anyway)."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _interpreter_prefix(interpreter: str) -> str:
    """The installation prefix containing ``interpreter`` (its ``bin``'s parent)."""
    prefix = os.path.realpath(sys.base_exec_prefix)
    if os.path.commonpath([prefix, interpreter]) == prefix:
        return prefix
    return os.path.dirname(os.path.dirname(interpreter))


def _first_hidden_ancestor(path: str) -> str | None:
    """The first proper ancestor of ``path`` that users other than its owner and group cannot traverse."""
    current = os.sep
    for part in [p for p in os.path.dirname(path).split(os.sep) if p]:
        current = os.path.join(current, part)
        try:
            mode = os.stat(current).st_mode
        except OSError:  # missing: starting the interpreter will fail and be reported then
            return None
        if not mode & stat.S_IXOTH:
            return current
    return None


def _plan(caps: SandboxCapabilities, policy: SandboxPolicy, timeout_s: float, *, probe: bool,
          use: dict[str, bool] | None = None, temp_root: str | None = None) -> dict:
    """The launcher's configuration: which protections to apply and the limits (JSON-serialisable)."""
    use = use if use is not None else {name: caps.available(name) for name in PROTECTIONS}
    prefix = _interpreter_prefix(caps.interpreter)
    return {
        "mode": "probe" if probe else "run",
        "temp_root": temp_root or tempfile.gettempdir(),
        "interpreter": caps.interpreter,
        "argv": [caps.interpreter, "-I", "-S", "-c", _PROBE_SCRIPT] if probe else [caps.interpreter, *TOOL_ARGV],
        "use": use,
        "interpreter_prefix": prefix,
        "hidden_ancestor": _first_hidden_ancestor(prefix),
        "deadline_s": timeout_s + LAUNCHER_GRACE_S,
        "limits": {
            "RLIMIT_AS": policy.memory_bytes,
            "RLIMIT_CPU": policy.cpu_limit_s(timeout_s),
            "RLIMIT_NPROC": policy.max_processes,
            "RLIMIT_NOFILE": policy.max_open_files,
            "RLIMIT_FSIZE": policy.max_file_bytes,
            "RLIMIT_CORE": 0,
        },
        "workdir_bytes": policy.workdir_bytes,
        "workdir_inodes": policy.workdir_inodes,
    }


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


def _launch(plan: dict, code: str, timeout_s: float, max_output_bytes: int) -> _RawOutcome:
    """Start the launcher on ``code``, read its output under the time and size caps, then kill and clean up."""
    run_dir = tempfile.mkdtemp(prefix=RUN_DIR_PREFIX, dir=plan["temp_root"])
    status_read, status_write = os.pipe()
    proc = None
    pidfd = None
    start = time.monotonic()
    try:
        workdir = os.path.join(run_dir, HOST_WORKDIR_NAME)
        os.mkdir(workdir, 0o700)
        with open(os.path.join(workdir, CODE_FILENAME), "w", encoding="utf-8") as handle:
            handle.write(code)
        config = dict(plan, run_dir=run_dir, host_workdir=workdir, status_fd=status_write)
        config_path = os.path.join(run_dir, CONFIG_FILENAME)
        with open(os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w",
                  encoding="utf-8") as handle:
            json.dump(config, handle)
        proc = subprocess.Popen([plan["interpreter"], "-I", "-S", os.path.abspath(__file__), config_path],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env={}, close_fds=True, pass_fds=(status_write,), start_new_session=True,
                                cwd=run_dir)
        os.close(status_write)
        status_write = None
        pidfd = os.pidfd_open(proc.pid)
        output, truncated, timed_out = _read_output(proc.stdout.fileno(), pidfd, start + timeout_s,
                                                    max_output_bytes)
    finally:
        try:
            if status_write is not None:
                os.close(status_write)
            if proc is not None:
                # Kill the group before reaping the launcher, so that its pid (the group id) is not reused.
                _kill_group(proc.pid)
                if plan["use"][PRIVILEGE_DROP]:
                    _kill_uid(SANDBOX_UID_BASE + proc.pid)
                launcher_status = proc.wait()
                proc.stdout.close()
            events = _read_status(status_read)
        finally:
            if pidfd is not None:
                os.close(pidfd)
            os.close(status_read)
            shutil.rmtree(run_dir, ignore_errors=True)
    return _RawOutcome(output=bytes(output), truncated=truncated, timed_out=timed_out, events=events,
                       duration_s=time.monotonic() - start, launcher_pid=proc.pid,
                       launcher_status=launcher_status,
                       sandbox_uid=SANDBOX_UID_BASE + proc.pid if plan["use"][PRIVILEGE_DROP] else None)


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


def _processes_of_uid(uid: int) -> list[int]:
    """Pids of the live (not zombie) processes whose real uid is ``uid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status", encoding="ascii", errors="replace") as handle:
                fields = dict(line.split(":", 1) for line in handle if ":" in line)
            if int(fields["Uid"].split()[0]) == uid and fields["State"].split()[0] not in DEAD_STATES:
                pids.append(int(entry))
        except (OSError, ValueError, KeyError, IndexError):
            continue
    return pids


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of the run's dedicated ``uid`` until none is left (or the rounds run out).

    The pid namespace already makes this a no-op in the normal case; it is the backstop for processes
    that left the process group when pid namespaces are unavailable.
    """
    for _ in range(UID_SWEEP_ROUNDS):
        pids = _processes_of_uid(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(UID_SWEEP_PAUSE_S)


def _read_status(fd: int) -> list[dict]:
    """The JSON status events the launcher, init and tool processes wrote before exiting."""
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
        except json.JSONDecodeError:
            events.append({"event": "setup_failed", "error": f"unreadable status line {line!r}"})
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


# --- capability probe --------------------------------------------------------------------------------------
_PROBE_SCRIPT = f"""
import json, os, resource
info = {{"resuid": os.getresuid(), "resgid": os.getresgid(), "groups": os.getgroups(), "cwd": os.getcwd(),
        "root_readonly": bool(os.statvfs("/").f_flag & os.ST_RDONLY),
        "rlimits": {{name: resource.getrlimit(getattr(resource, name))[0]
                    for name in ("RLIMIT_AS", "RLIMIT_NPROC", "RLIMIT_NOFILE", "RLIMIT_FSIZE", "RLIMIT_CORE")}}}}
info["ns"] = {{}}
for kind in ("net", "mnt", "pid"):
    try:
        info["ns"][kind] = os.readlink("/proc/self/ns/" + kind)
    except OSError:
        info["ns"][kind] = None
try:
    with open("probe.txt", "w") as handle:
        handle.write("ok")
    info["cwd_writable"] = True
except OSError:
    info["cwd_writable"] = False
info["hidden_dirs_empty"] = all(not os.path.isdir(d) or not os.listdir(d) for d in {list(HIDDEN_HOST_DIRS)!r})
info["session_keyring"] = None
if {SYS_KEYCTL.get(os.uname().machine)!r} is not None:
    import ctypes
    info["session_keyring"] = ctypes.CDLL(None).syscall({SYS_KEYCTL.get(os.uname().machine)!r},
                                                        {KEYCTL_GET_KEYRING_ID}, {KEY_SPEC_SESSION_KEYRING}, 0)
print({PROBE_MARKER!r} + json.dumps(info), flush=True)
"""


def _session_keyring_id() -> int | None:
    """This process's session keyring id (None where keyctl's number is unknown; -1 without keyrings)."""
    number = SYS_KEYCTL.get(os.uname().machine)
    if number is None:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc.syscall(ctypes.c_long(number), ctypes.c_int(KEYCTL_GET_KEYRING_ID),
                        ctypes.c_int(KEY_SPEC_SESSION_KEYRING), ctypes.c_int(0))


def _own_namespaces() -> dict[str, str | None]:
    """This process's namespace ids (``net:[4026531840]``-style), by kind."""
    ids = {}
    for kind in ("net", "mnt", "pid"):
        try:
            ids[kind] = os.readlink(f"/proc/self/ns/{kind}")
        except OSError:
            ids[kind] = None
    return ids


def _probe_once(interpreter: str, temp_root: str, use: dict[str, bool]) -> tuple[dict | None, _RawOutcome]:
    """Launch a trial sandbox with the protections in ``use``; return what it saw from inside, if it ran."""
    caps = SandboxCapabilities(tuple(Protection(n, use[n], "probing") for n in PROTECTIONS), interpreter)
    plan = _plan(caps, SandboxPolicy(), PROBE_TIMEOUT_S, probe=True, use=use, temp_root=temp_root)
    raw = _launch(plan, "", PROBE_TIMEOUT_S, DEFAULT_MAX_OUTPUT_BYTES)
    for line in raw.output.decode("utf-8", "replace").splitlines():
        if line.startswith(PROBE_MARKER):
            return json.loads(line[len(PROBE_MARKER):]), raw
    return None, raw


def _step_errors(raw: _RawOutcome) -> dict[str, str]:
    """Errors the trial sandbox reported, keyed by protection ("" for errors not tied to one)."""
    errors: dict[str, str] = {}
    for event in raw.events:
        if event.get("event") in ("setup_failed", "step_failed"):
            key = event.get("protection", "")
            errors[key] = "; ".join(filter(None, [errors.get(key), event.get("error", "")]))
    return errors


@functools.lru_cache(maxsize=None)
def _probe_capabilities(interpreter: str, temp_root: str) -> SandboxCapabilities:
    """Probe which protections work, by launching trial sandboxes and verifying from inside them.

    Pure in its arguments (the interpreter and the temporary-directory root); cached per process.
    """
    is_root = os.geteuid() == 0
    use = {name: True for name in PROTECTIONS}
    use[PRIVILEGE_DROP] = is_root
    info, raw = _probe_once(interpreter, temp_root, use)
    drop_failure = None
    if info is None and is_root:
        errors = _step_errors(raw)
        drop_failure = ("the interpreter could not start as an unprivileged uid: "
                        + ("; ".join(errors.values()) or raw.output.decode("utf-8", "replace")[-500:]))
        use[PRIVILEGE_DROP] = False
        info, raw = _probe_once(interpreter, temp_root, use)
    errors = _step_errors(raw)
    if info is None:
        reason = ("the trial sandbox did not run: "
                  + ("; ".join(errors.values()) or raw.output.decode("utf-8", "replace")[-500:]))
        return SandboxCapabilities(tuple(Protection(n, False, reason) for n in PROTECTIONS), interpreter)
    own = _own_namespaces()
    policy = SandboxPolicy()
    uid = SANDBOX_UID_BASE + raw.launcher_pid

    def verdict(name: str, ok: bool, how: str, failure: str) -> Protection:
        if ok:
            return Protection(name, True, how)
        return Protection(name, False, errors.get(name) or failure)

    def new_ns(kind: str) -> bool:
        return info["ns"].get(kind) is not None and info["ns"][kind] != own[kind]

    if drop_failure is not None:
        drop = Protection(PRIVILEGE_DROP, False, drop_failure)
    elif not is_root:
        drop = Protection(PRIVILEGE_DROP, False, f"not running as root (euid {os.geteuid()}): cannot change uid")
    else:
        own_keyring = _session_keyring_id()
        keyring_left = own_keyring is not None and (own_keyring <= 0 or info["session_keyring"] != own_keyring)
        drop = verdict(PRIVILEGE_DROP,
                       list(info["resuid"]) == [uid] * 3 and list(info["resgid"]) == [uid] * 3
                       and not info["groups"] and keyring_left,
                       f"dedicated uid/gid {SANDBOX_UID_BASE}+launcher pid, no supplementary groups, "
                       "own session keyring, no_new_privs",
                       f"code ran with uids {info['resuid']} gids {info['resgid']} groups {info['groups']}, "
                       f"session keyring {info['session_keyring']} (trainer's: {own_keyring})")
    limits = info["rlimits"]
    expected = {"RLIMIT_AS": policy.memory_bytes, "RLIMIT_NPROC": policy.max_processes,
                "RLIMIT_NOFILE": policy.max_open_files, "RLIMIT_FSIZE": policy.max_file_bytes, "RLIMIT_CORE": 0}
    protections = (
        drop,
        verdict(NETWORK_ISOLATION, new_ns("net"), "new network namespace (no interfaces up)",
                "the code shared the trainer's network namespace"),
        verdict(FILESYSTEM_ISOLATION,
                new_ns("mnt") and info["root_readonly"] and info["cwd_writable"] and info["cwd"] == ISOLATED_WORKDIR
                and info["hidden_dirs_empty"],
                f"private mount namespace: read-only nosuid /, fresh tmpfs at {ISOLATED_WORKDIR} as working dir, "
                f"{', '.join(HIDDEN_HOST_DIRS)} hidden, private {PRIVATE_SHM_DIR}",
                f"mount namespace new={new_ns('mnt')}, root read-only={info['root_readonly']}, "
                f"cwd {info['cwd']} writable={info['cwd_writable']}"),
        verdict(PROCESS_ISOLATION, new_ns("pid"), "new pid and IPC namespaces (init kills all on exit)",
                "the code shared the trainer's pid namespace"),
        verdict(RESOURCE_LIMITS, all(limits.get(k) == v for k, v in expected.items()),
                "rlimits AS, CPU, NPROC, NOFILE, FSIZE, CORE=0",
                f"rlimits seen inside: {limits}"),
    )
    return SandboxCapabilities(protections, interpreter)
