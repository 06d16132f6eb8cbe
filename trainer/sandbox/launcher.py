"""The sandbox's own processes: the launcher on the host, and the init process and tool set-up inside.

Standard library only: the launcher runs this file as ``python -I -S launcher.py MEMFD`` and the init
process runs its text as ``python -I -S -c TEXT init MEMFD UID GID WORKDIR`` inside bubblewrap, where no
file of the project is visible.  The trainer side (:mod:`trainer.sandbox`) plans a run and writes its
configuration and the code into a memfd (:func:`write_payload`); nothing of a run is stored on the host
unless filesystem isolation is waived.  See :mod:`trainer.sandbox` for the process layout.
"""

from __future__ import annotations

import ctypes
import errno
import marshal
import math
import os
import resource
import select
import signal
import struct
import sys
import time

# --- protections -------------------------------------------------------------------------------------------
PRIVILEGE_DROP = "privilege_drop"
NETWORK_ISOLATION = "network_isolation"
FILESYSTEM_ISOLATION = "filesystem_isolation"
PROCESS_ISOLATION = "process_isolation"
RESOURCE_LIMITS = "resource_limits"
SYSCALL_FILTER = "syscall_filter"
PROTECTIONS = (PRIVILEGE_DROP, NETWORK_ISOLATION, FILESYSTEM_ISOLATION, PROCESS_ISOLATION, RESOURCE_LIMITS,
               SYSCALL_FILTER)
BWRAP_PROTECTIONS = (NETWORK_ISOLATION, FILESYSTEM_ISOLATION, PROCESS_ISOLATION)  # need bubblewrap

# --- layout and plumbing -----------------------------------------------------------------------------------
SANDBOX_UID_BASE = 1_600_000_000  # dedicated uid/gid = base + launcher pid; far above any system/user range
CODE_FILENAME = "main.py"
ISOLATED_WORKDIR = "/tmp"  # the code's working directory inside the private mount namespace
PRIVATE_SHM_DIR = "/dev/shm"
PRIVATE_SHM_OPTIONS = "mode=1777,size=16m,nr_inodes=1024"
RUN_DIR_PREFIX = "sod-sandbox-"  # host run folder (only without filesystem isolation): PREFIX + launcher pid
HOST_WORKDIR_NAME = "work"
CGROUP_PREFIX = "sod-sandbox-"  # cgroup of one run: PREFIX + launcher pid
SETUP_FAILED_EXIT = 121  # exit status of a sandbox process whose set-up failed
CGROUP_DRAIN_S = 1.0  # after cgroup.kill, wait this long for the cgroup to empty before removing it
UID_SWEEP_ROUNDS = 200
UID_SWEEP_PAUSE_S = 0.005
DEAD_STATES = ("Z", "X")  # /proc/PID/status states of processes that are already dead (zombie, dead)
HEADER = struct.Struct("<Q")  # payload: config length, config (marshal), then the code's bytes

# --- Linux ABI ---------------------------------------------------------------------------------------------
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
PR_SET_PDEATHSIG = 1
PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_MODE_FILTER = 2
BPF_INSTRUCTION_BYTES = 8  # sizeof(struct sock_filter)
SYS_KEYCTL = {"x86_64": 250, "aarch64": 219}  # keyctl(2) has no libc wrapper; numbers differ per machine
KEYCTL_GET_KEYRING_ID = 0
KEYCTL_JOIN_SESSION_KEYRING = 1
KEY_SPEC_SESSION_KEYRING = -3
CLONE_NEWUSER = 0x10000000


class _SockFprog(ctypes.Structure):
    """``struct sock_fprog`` for PR_SET_SECCOMP."""

    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class _SetupError(Exception):
    """A sandbox set-up step failed; ``protection`` names the protection it belonged to."""

    def __init__(self, protection: str, message: str):
        super().__init__(message)
        self.protection = protection


class _CallerGone(Exception):
    """The trainer that started this launcher died (SIGTERM from PR_SET_PDEATHSIG)."""


def write_payload(fd: int, config: dict, code: bytes) -> None:
    """Write ``config`` and ``code`` to ``fd`` (a memfd) in the layout :func:`read_payload` reads.

    The config is marshalled, not JSON: the launcher and init processes run the trainer's own interpreter,
    and importing ``json`` (which imports ``re``) would cost each of them more than the rest of their start.
    """
    header = marshal.dumps(config)
    data = HEADER.pack(len(header)) + header + code
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _json_object(event: dict) -> str:
    """A flat dict of str keys and str/int/None values as one line of JSON (without importing ``json``)."""
    def value(item) -> str:
        if item is None:
            return "null"
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, int):
            return str(item)
        return '"' + "".join(f"\\u{ord(c):04x}" if c in '"\\' or c < " " or "\ud800" <= c <= "\udfff" else c
                             for c in str(item)) + '"'
    return "{" + ", ".join(f"{value(key)}: {value(item)}" for key, item in event.items()) + "}"


def read_payload(fd: int) -> tuple[dict, bytes]:
    """The ``(config, code)`` written by :func:`write_payload` (read with pread: the offset is shared)."""
    size = os.fstat(fd).st_size
    data = bytearray()
    while len(data) < size:
        chunk = os.pread(fd, size - len(data), len(data))
        if not chunk:
            break
        data += chunk
    (length,) = HEADER.unpack_from(data)
    config = marshal.loads(bytes(data[HEADER.size:HEADER.size + length]))
    return config, bytes(data[HEADER.size + length:])


# --- cleanup helpers shared with the trainer ---------------------------------------------------------------
def processes_of_uid(uid: int) -> list[int]:
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


def kill_uid(uid: int) -> bool:
    """SIGKILL every process of the run's dedicated ``uid`` until none is left (or the rounds run out).

    The pid namespace and the cgroup already make this a no-op in the normal case; it is the backstop for
    processes that left the process group when neither is available.  False if some survived.
    """
    return _kill_until_gone(processes_of_uid, uid)


def processes_in_user_namespace(uid: int) -> list[int]:
    """Pids of the live processes in a user namespace whose uid map starts at ``uid`` (an ordinary user's runs).

    As an ordinary user the run's dedicated uid exists only inside the tool's own user namespace (the host
    sees the user's own uid), so the namespace's uid map, not the real uid, tells the run's processes apart.
    """
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/uid_map", encoding="ascii") as handle:
                first = handle.read().split()[:1]
            if first != [str(uid)]:
                continue
            with open(f"/proc/{entry}/status", encoding="ascii", errors="replace") as handle:
                state = next(line for line in handle if line.startswith("State:")).split()[1]
            if state not in DEAD_STATES:
                pids.append(int(entry))
        except (OSError, ValueError, StopIteration, IndexError):
            continue
    return pids


def kill_user_namespace(uid: int) -> bool:
    """SIGKILL every process of the run's user namespace (uid map starting at ``uid``) until none is left.

    Killing the launcher ends the sandbox's pid namespace (bubblewrap's ``--die-with-parent``), but the
    kernel tears it down after the launcher is reaped; this waits for that (and kills whatever it finds) so
    that nothing of a timed-out or truncated run still runs when the call returns.  False if something was
    still alive when the rounds ran out.
    """
    return _kill_until_gone(processes_in_user_namespace, uid)


def _kill_until_gone(find, uid: int) -> bool:
    """SIGKILL the pids ``find(uid)`` returns, in rounds, until it returns none; False if the rounds run out."""
    for _ in range(UID_SWEEP_ROUNDS):
        pids = find(uid)
        if not pids:
            return True
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(UID_SWEEP_PAUSE_S)
    return not find(uid)


def remove_cgroup(path: str) -> None:
    """Kill every process in cgroup ``path`` and remove it (a no-op if it does not exist)."""
    if not os.path.isdir(path):
        return
    try:
        with open(os.path.join(path, "cgroup.kill"), "w") as handle:  # Linux 5.14+
            handle.write("1")
    except OSError:
        _kill_cgroup_members(path)
    until = time.monotonic() + CGROUP_DRAIN_S
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > until:
                return
            _kill_cgroup_members(path)
            time.sleep(UID_SWEEP_PAUSE_S)


def _kill_cgroup_members(path: str) -> None:
    try:
        with open(os.path.join(path, "cgroup.procs")) as handle:
            pids = [int(line) for line in handle if line.strip()]
    except OSError:
        return
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def remove_tree(path: str) -> None:
    """``shutil.rmtree(path, ignore_errors=True)`` without importing shutil into the launcher."""
    try:
        entries = list(os.scandir(path))
    except NotADirectoryError:
        entries = None
    except OSError:
        return
    if entries is None:
        try:
            os.unlink(path)
        except OSError:
            pass
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            remove_tree(entry.path)
        else:
            try:
                os.unlink(entry.path)
            except OSError:
                pass
    try:
        os.rmdir(path)
    except OSError:
        pass


def host_run_dirs(temp_root: str, launcher_pid: int) -> list[str]:
    """The host run folders a launcher with pid ``launcher_pid`` may have created under ``temp_root``."""
    prefix = f"{RUN_DIR_PREFIX}{launcher_pid}-"
    try:
        return [os.path.join(temp_root, name) for name in os.listdir(temp_root) if name.startswith(prefix)]
    except OSError:
        return []


# ===========================================================================================================
# Common to the launcher and the init process
# ===========================================================================================================
class _Process:
    """Reporting, step handling and syscalls shared by the launcher, init and tool-set-up processes."""

    def __init__(self, config: dict, uid: int, gid: int):
        self.config = config
        self.strict = config["mode"] == "run"
        self.use = dict(config["use"])
        self.status_fd = config["status_fd"]
        # As an ordinary user the dedicated uid/gid exist only inside the tool's own user namespace.
        self.unprivileged = config["unprivileged"]
        self.uid = uid
        self.gid = gid
        self.libc = ctypes.CDLL(None, use_errno=True)

    def report(self, **event) -> None:
        """Write one JSON status event for the trainer."""
        try:
            os.write(self.status_fd, (_json_object(event) + "\n").encode("utf-8"))
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

    def check(self, result: int, what: str) -> None:
        """Raise OSError (with errno's text) if a libc call returned non-zero."""
        if result != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what} failed: {os.strerror(err)}")

    def prctl(self, option: int, value: int, pointer=None) -> None:
        """prctl(2) with an integer argument and, optionally, a pointer as the third."""
        third = pointer if pointer is not None else ctypes.c_ulong(0)
        self.check(self.libc.prctl(ctypes.c_int(option), ctypes.c_ulong(value), third, ctypes.c_ulong(0),
                                   ctypes.c_ulong(0)), f"prctl({option})")

    def quiet_stdio(self) -> None:
        """Point fds 0-2 at /dev/null, so that only the code holds the output pipe open."""
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)


# ===========================================================================================================
# Launcher (host, root, single-threaded): cgroup, host run folder, bubblewrap, cleanup
# ===========================================================================================================
class _Launcher(_Process):
    """Starts the sandbox (bubblewrap or, without it, the init process directly) and cleans up after it."""

    def __init__(self, config: dict, memfd: int):
        uid = SANDBOX_UID_BASE + os.getpid() if config["use"][PRIVILEGE_DROP] else os.getuid()
        super().__init__(config, uid, uid if config["use"][PRIVILEGE_DROP] else os.getgid())
        self.memfd = memfd
        self.child = None
        self.run_dir = None
        self.cgroup = None
        self.caller_gone = False

    def run(self) -> int:
        """Set up, start the sandbox, wait for it (or the deadline, or the caller's death), clean up."""
        signal.signal(signal.SIGTERM, _raise_caller_gone)
        self.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        try:
            if os.getppid() != self.config["trainer_pid"]:
                raise _CallerGone()
            os.umask(0o022)
            self.set_up()
            self.child = os.fork()
            if self.child == 0:
                self.exec_sandbox()
            self.quiet_stdio()
            self.wait()
        except _CallerGone:
            self.caller_gone = True
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            self.clean_up()
        return 0

    def set_up(self) -> None:
        """The host run folder (only without filesystem isolation) and the run's cgroup."""
        if not self.use[FILESYSTEM_ISOLATION]:
            self.step("", self.make_host_workdir)
        if self.use[RESOURCE_LIMITS] and self.config["cgroup"]:
            self.step(RESOURCE_LIMITS, self.make_cgroup)

    def make_host_workdir(self) -> None:
        """``TEMP/sod-sandbox-PID-<random>/work``, owned by the dedicated uid; removed by :meth:`clean_up`."""
        import tempfile  # noqa: PLC0415 - only this path needs it

        self.run_dir = tempfile.mkdtemp(prefix=f"{RUN_DIR_PREFIX}{os.getpid()}-", dir=self.config["temp_root"])
        os.chmod(self.run_dir, 0o711)
        workdir = os.path.join(self.run_dir, HOST_WORKDIR_NAME)
        os.mkdir(workdir, 0o700)
        if self.use[PRIVILEGE_DROP] and self.unprivileged:
            return  # the user's own folder: the tool's user namespace maps its uid to this user
        if self.use[PRIVILEGE_DROP]:
            blocked = untraversable_ancestor(self.run_dir)
            if blocked is not None:
                raise _SetupError("", f"the host run folder {self.run_dir} lies under {blocked}, which the "
                                      "dedicated uid cannot traverse: point TMPDIR at a directory it can")
        os.chown(workdir, self.uid, self.gid)

    def make_cgroup(self) -> None:
        """A cgroup v2 for the whole run: memory.max, memory.swap.max = 0 and pids.max where they exist."""
        spec = self.config["cgroup"]
        path = os.path.join(spec["base"], f"{CGROUP_PREFIX}{os.getpid()}")
        remove_cgroup(path)  # a stale one from a dead launcher that had this pid
        os.mkdir(path)
        self.cgroup = path
        settings = [("memory.max", spec["memory_max"])]
        for name, value in (("memory.swap.max", 0), ("pids.max", spec["pids_max"])):
            if os.path.exists(os.path.join(path, name)):  # no swap accounting / no pids controller handed down
                settings.append((name, value))
        for name, value in settings:
            with open(os.path.join(path, name), "w") as handle:
                handle.write(str(value))

    def exec_sandbox(self) -> None:
        """In the forked child: join the cgroup, then exec bubblewrap (or the init process without it)."""
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            if self.cgroup:
                with open(os.path.join(self.cgroup, "cgroup.procs"), "w") as handle:
                    handle.write("0")
            os.set_inheritable(self.memfd, True)
            os.set_inheritable(self.status_fd, True)
            workdir = os.path.join(self.run_dir, HOST_WORKDIR_NAME) if self.run_dir else ""
            init = [self.config["interpreter"], "-I", "-S", "-c", _own_source(), "init", str(self.memfd),
                    str(self.uid), str(self.gid), workdir]
            argv = init
            if self.config["bwrap_argv"]:
                os.dup2(self.status_fd, 2)  # bubblewrap's own complaints become status lines, not output
                argv = [*self.config["bwrap_argv"], "--", *init]
            os.execv(argv[0], argv)
        except BaseException as exc:  # noqa: BLE001 - report anything, never return into the launcher
            self.report(event="setup_failed", error=f"cannot start the sandbox: {type(exc).__name__}: {exc}")
        os._exit(SETUP_FAILED_EXIT)

    def wait(self) -> None:
        """Wait for the sandbox; kill it past the deadline (a backstop: the trainer normally kills first)."""
        pidfd = os.pidfd_open(self.child)
        try:
            if not _wait_readable(pidfd, self.config["deadline_s"]):
                self.report(event="launcher_deadline")
                os.kill(self.child, signal.SIGKILL)
            os.waitpid(self.child, 0)
            self.child = None
        finally:
            os.close(pidfd)

    def clean_up(self) -> None:
        """Kill whatever is left of the run, remove its cgroup and host run folder."""
        if self.child:
            try:
                os.kill(self.child, signal.SIGKILL)
                os.waitpid(self.child, 0)
            except OSError:
                pass
        if self.cgroup:
            remove_cgroup(self.cgroup)
        # With a pid namespace, the sandbox's end (bubblewrap waits for its pid 1) is the end of everything
        # in it, except when the caller died and the sandbox was killed from here just now.
        if self.use[PRIVILEGE_DROP] and not self.unprivileged and (self.caller_gone or
                                                                  not self.use[PROCESS_ISOLATION]):
            kill_uid(self.uid)
        if self.run_dir:
            remove_tree(self.run_dir)


def untraversable_ancestor(path: str) -> str | None:
    """The first proper ancestor of ``path`` that users other than its owner and group cannot traverse."""
    current = "/"
    for part in [p for p in os.path.dirname(path).split("/") if p]:
        current = os.path.join(current, part)
        try:
            mode = os.stat(current).st_mode
        except OSError:  # missing: whatever needs it fails and is reported then
            return None
        if not mode & 0o001:
            return current
    return None


def _raise_caller_gone(signum, frame) -> None:
    raise _CallerGone()


def _wait_readable(fd: int, timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for ``fd`` to be readable (or hung up); poll(2), so any fd number works."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0, math.ceil(timeout_s * 1000))))


def _own_source() -> str:
    """This file's text: the init process runs it with ``-c`` (no project file is visible in the sandbox)."""
    with open(os.path.abspath(__file__), encoding="utf-8") as handle:
        return handle.read()


# ===========================================================================================================
# Init (inside the sandbox; pid 2 under bubblewrap's reaper) and the tool process's set-up
# ===========================================================================================================
class _Init(_Process):
    """Mounts the private work directories, forks the tool process, reports how it ended."""

    def run(self, code: bytes, host_workdir: str) -> None:
        """Set up, fork the tool process, reap until it exits, report its status (never returns)."""
        self.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        workdir = host_workdir
        if self.use[FILESYSTEM_ISOLATION]:
            if self.step(FILESYSTEM_ISOLATION, self.mount_private_dirs):
                workdir = ISOLATED_WORKDIR
        tool_pid = os.fork()
        if tool_pid == 0:
            try:
                self.exec_tool(workdir, code)
            except _SetupError as exc:
                self.report(event="setup_failed", protection=exc.protection, error=str(exc))
            except BaseException as exc:  # noqa: BLE001 - report anything, never return into init's code
                self.report(event="setup_failed", error=f"{type(exc).__name__}: {exc}")
            os._exit(SETUP_FAILED_EXIT)
        self.quiet_stdio()
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                self.report(event="setup_failed", error="the tool process vanished")
                os._exit(SETUP_FAILED_EXIT)
            if pid == tool_pid and (os.WIFEXITED(status) or os.WIFSIGNALED(status)):
                break  # not on a stop (a tool that made itself traced by init): it is not over
        if os.WIFSIGNALED(status):
            self.report(event="exit", signal=os.WTERMSIG(status))
        else:
            self.report(event="exit", exit_code=os.WEXITSTATUS(status))
        os._exit(0)

    def mount(self, target: str, options: str, flags: int) -> None:
        """mount(2) a fresh tmpfs on ``target``."""
        self.check(self.libc.mount(b"tmpfs", os.fsencode(target), b"tmpfs", ctypes.c_ulong(flags),
                                   options.encode()), f"mount tmpfs on {target} ({options})")

    def mount_private_dirs(self) -> None:
        """A size- and inode-limited tmpfs as the code's working directory, and a private /dev/shm.

        The working directory belongs to the uid the code runs as: the dedicated uid when root drops to it,
        else this process's own uid (as an ordinary user, bubblewrap's namespace maps the user to 0 here, and
        the tool's own namespace maps the dedicated uid to that 0).
        """
        owner = (self.uid, self.gid) if self.use[PRIVILEGE_DROP] and not self.unprivileged \
            else (os.getuid(), os.getgid())
        self.mount(ISOLATED_WORKDIR, f"mode=0700,uid={owner[0]},gid={owner[1]},size={self.config['workdir_bytes']},"
                                     f"nr_inodes={self.config['workdir_inodes']}", MS_NOSUID | MS_NODEV)
        self.mount(PRIVATE_SHM_DIR, PRIVATE_SHM_OPTIONS, MS_NOSUID | MS_NODEV | MS_NOEXEC)

    # --- tool process ---
    def exec_tool(self, workdir: str, code: bytes) -> None:
        """Drop privileges, write the code, apply limits and the syscall filter, exec the interpreter."""
        if self.use[PRIVILEGE_DROP]:
            self.step(PRIVILEGE_DROP, self.drop_privileges)
        self.write_code(os.path.join(workdir, CODE_FILENAME), code)
        if self.use[RESOURCE_LIMITS]:
            self.step(RESOURCE_LIMITS, self.set_limits)
        self.prctl(PR_SET_NO_NEW_PRIVS, 1)
        self.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # after the uid change, which would clear it
        os.chdir(workdir)
        os.umask(0o077)
        for signum in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT):
            signal.signal(signum, signal.SIG_DFL)
        argv = self.config["argv"]
        if self.use[SYSCALL_FILTER]:  # last: nothing after it but execve
            self.step(SYSCALL_FILTER, self.load_syscall_filter)
        try:
            os.execve(argv[0], argv, {})
        except OSError as exc:
            self.report(event="setup_failed", protection=PRIVILEGE_DROP if self.use[PRIVILEGE_DROP] else "",
                        error=f"cannot execute {argv[0]}: {exc}")
            os._exit(SETUP_FAILED_EXIT)

    def write_code(self, path: str, code: bytes) -> None:
        """The code as ``main.py`` in the working directory (as the dedicated uid: it owns the directory)."""
        if self.config["mode"] != "run":
            return
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(code)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
        except OSError as exc:
            raise _SetupError("", f"cannot write the code ({len(code)} bytes) to {path}: {exc.strerror} (the "
                                  f"working directory holds {self.config['workdir_bytes']} bytes)") from exc

    def set_limits(self) -> None:
        """setrlimit for each configured limit (soft = hard, except CPU: hard one second later)."""
        for name, value in self.config["limits"].items():
            hard = value + 1 if name == "RLIMIT_CPU" else value
            resource.setrlimit(getattr(resource, name), (value, hard))

    def drop_privileges(self) -> None:
        """Become the dedicated uid/gid, irrevocably, and leave the session keyring.

        As root: the dedicated uid/gid on the host, no supplementary groups.  As an ordinary user: a new user
        namespace in which the dedicated uid/gid are the only ids, mapped to this (already unprivileged) user,
        with no capability left after ``execve``; the user's supplementary groups stay (the kernel lets no
        user namespace drop them) and show as the overflow gid.
        """
        if self.unprivileged:
            self.enter_user_namespace()
        else:
            os.setgroups([])
        os.setresgid(self.gid, self.gid, self.gid)
        os.setresuid(self.uid, self.uid, self.uid)
        if os.getresuid() != (self.uid,) * 3 or (os.getgroups() and not self.unprivileged):
            raise _SetupError(PRIVILEGE_DROP, "credentials did not change")
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

    def enter_user_namespace(self) -> None:
        """A new user namespace whose only uid/gid, the dedicated ones, map to this process's own ids."""
        outer_uid, outer_gid = os.geteuid(), os.getegid()
        self.check(self.libc.unshare(ctypes.c_int(CLONE_NEWUSER)),
                   "unshare(CLONE_NEWUSER) (user namespaces for ordinary users)")
        for name, text in (("setgroups", "deny"), ("uid_map", f"{self.uid} {outer_uid} 1"),
                           ("gid_map", f"{self.gid} {outer_gid} 1")):
            with open(f"/proc/self/{name}", "w", encoding="ascii") as handle:
                handle.write(text)

    def load_syscall_filter(self) -> None:
        """Install the seccomp BPF program that libseccomp compiled on the trainer side."""
        program = bytes.fromhex(self.config["seccomp_bpf"])
        if not program or len(program) % BPF_INSTRUCTION_BYTES:
            raise _SetupError(SYSCALL_FILTER, f"malformed seccomp program ({len(program)} bytes)")
        buffer = ctypes.create_string_buffer(program, len(program))
        fprog = _SockFprog(len(program) // BPF_INSTRUCTION_BYTES, ctypes.addressof(buffer))
        self.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog))


def _launcher_main(memfd: int) -> int:
    """Entry point of the launcher: ``python -I -S launcher.py MEMFD``."""
    config, _ = read_payload(memfd)
    os.set_inheritable(config["status_fd"], False)  # handed on explicitly to the sandbox only
    return _Launcher(config, memfd).run()


def _init_main(memfd: int, uid: int, gid: int, host_workdir: str) -> None:
    """Entry point of the init process: ``python -I -S -c TEXT init MEMFD UID GID WORKDIR``."""
    config, code = read_payload(memfd)
    os.close(memfd)
    os.set_inheritable(config["status_fd"], False)  # closed on the tool's exec; kept across fork
    if config["bwrap_argv"]:
        os.dup2(1, 2)  # the launcher pointed stderr at the status pipe for bubblewrap; the code's goes to output
    _Init(config, uid, gid).run(code, host_workdir)


if __name__ == "__main__":
    if sys.argv[1:2] == ["init"]:
        _init_main(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    else:
        sys.exit(_launcher_main(int(sys.argv[1])))
