"""The sandbox's capability probe: launch trial sandboxes and verify, from inside, what took effect.

:func:`probe_capabilities` (cached per process; :func:`trainer.sandbox.sandbox_capabilities` calls it)
first rules out what cannot work here (bubblewrap or libseccomp missing, an ordinary user on a machine
that gives ordinary users no user namespaces), then runs one
trial sandbox with everything else.  If the trial does not start, it retries without the privilege drop,
then without bubblewrap, so that the remaining protections are still reported.  Each protection is
claimed only when the trial code saw its effect: ids, namespaces, a read-only root without the host's
files but with every extension module importable, rlimits and cgroup membership, an active seccomp
filter that denies ``unshare``.
"""

from __future__ import annotations

import ctypes.util
import errno
import functools
import json
import os
import stat
import subprocess

from . import core as sb
from .fs import InterpreterUnusable, interpreter_files
from .seccomp import SyscallFilterUnavailable, syscall_filter_program

PROBE_TIMEOUT_S = 20.0
PROBE_MARKER = "SOD-SANDBOX-PROBE:"
HIDDEN_HOST_DIRS = ("/run",)  # host rendezvous points (unix sockets, pid files): must not exist inside
USERNS_CHECK_TIMEOUT_S = 20.0
_USERNS_CHECK = "import ctypes, sys; sys.exit(ctypes.CDLL(None, use_errno=True).unshare({flag}) and ctypes.get_errno())"

_PROBE_SCRIPT = """
import ctypes, errno, importlib, json, os, resource
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
info["hidden_dirs_empty"] = all(not os.path.isdir(d) or not os.listdir(d) for d in {hidden!r})
info["host_visible"] = [path for path in {host_paths!r} if os.path.exists(path)]
info["failed_imports"] = []
for module in {modules!r}:
    try:
        importlib.import_module(module)
    except Exception as exc:
        info["failed_imports"].append(module + ": " + repr(exc))
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
info["capabilities"] = [int(status[name], 16) for name in ("CapPrm", "CapEff", "CapAmb")]
info["overflow_gid"] = int(open("/proc/sys/kernel/overflowgid").read()) if os.path.exists(
    "/proc/sys/kernel/overflowgid") else 65534
info["seccomp_filters"] = int(status.get("Seccomp_filters", "0").strip() or 0)
libc = ctypes.CDLL(None, use_errno=True)
info["unshare_errno"] = 0 if libc.unshare(0) == 0 else ctypes.get_errno()
info["cgroup"] = next((line[3:].strip() for line in open("/proc/self/cgroup") if line.startswith("0::")), None)
info["session_keyring"] = None
if {keyctl!r} is not None:
    info["session_keyring"] = libc.syscall({keyctl!r}, {get_id}, {session}, 0)
print({marker!r} + json.dumps(info), flush=True)
"""


def _own_seccomp_filters() -> int:
    """How many seccomp filters this process already runs under (a container's, typically 0 or 1)."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Seccomp_filters:"):
                    return int(line.split(":")[1])
    except (OSError, ValueError):
        pass
    return 0


def _host_paths(interpreter: str) -> list[str]:
    """Host paths that filesystem isolation must hide: this project's source and the home directory."""
    prefix = os.path.realpath(sb._interpreter_prefix(interpreter))
    home = os.path.realpath(os.path.expanduser("~"))
    paths = [os.path.abspath(sb.__file__)]
    if not prefix.startswith(home.rstrip("/") + "/") and home not in ("/", sb.ISOLATED_WORKDIR, "/dev", "/proc"):
        paths.append(home)
    return paths


def _probe_once(interpreter: str, temp_root: str, use: dict[str, bool]) -> tuple[dict | None, object, str]:
    """Launch a trial sandbox with the protections in ``use``: ``(what it saw or None, raw outcome, error)``."""
    caps = sb.SandboxCapabilities(tuple(sb.Protection(n, use[n], "probing") for n in sb.PROTECTIONS), interpreter)
    modules = interpreter_files(interpreter).modules if use[sb.FILESYSTEM_ISOLATION] else ()
    keyctl = sb.SYS_KEYCTL.get(os.uname().machine)
    script = _PROBE_SCRIPT.format(hidden=list(HIDDEN_HOST_DIRS), host_paths=_host_paths(interpreter),
                                  modules=list(modules), keyctl=keyctl, get_id=sb.KEYCTL_GET_KEYRING_ID,
                                  session=sb.KEY_SPEC_SESSION_KEYRING, marker=PROBE_MARKER)
    try:
        plan = sb._plan(caps, sb.SandboxPolicy(), PROBE_TIMEOUT_S, probe_script=script, use=use,
                        temp_root=temp_root)
        raw = sb._launch(plan, b"", PROBE_TIMEOUT_S, sb.DEFAULT_MAX_OUTPUT_BYTES)
    except (OSError, sb._PlanError) as exc:
        return None, None, f"{type(exc).__name__}: {exc}"
    for line in raw.output.decode("utf-8", "replace").splitlines():
        if line.startswith(PROBE_MARKER):
            return json.loads(line[len(PROBE_MARKER):]), raw, ""
    errors = "; ".join(_step_errors(raw).values())
    return None, raw, errors or raw.output.decode("utf-8", "replace")[-500:]


def _step_errors(raw) -> dict[str, str]:
    """Errors the trial sandbox reported, keyed by protection ("" for errors not tied to one)."""
    errors: dict[str, str] = {}
    for event in raw.events if raw is not None else ():
        if event.get("event") in ("setup_failed", "step_failed"):
            key = event.get("protection", "")
            errors[key] = "; ".join(filter(None, [errors.get(key), event.get("error", "")]))
    return errors


def _user_namespaces_refused(interpreter: str) -> str | None:
    """None if this (unprivileged) process may create a user namespace, else the error, tried in a child."""
    try:
        done = subprocess.run([interpreter, "-I", "-S", "-c", _USERNS_CHECK.format(flag=sb.CLONE_NEWUSER)],
                              env={}, stdin=subprocess.DEVNULL, capture_output=True, cwd="/",
                              timeout=USERNS_CHECK_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{type(exc).__name__}: {exc}"
    if done.returncode == 0:
        return None
    return os.strerror(done.returncode) if 0 < done.returncode < 256 else f"status {done.returncode}"


def _setuid_root(path: str) -> bool:
    """Whether ``path`` is a set-user-ID-root executable (a system bubblewrap that needs no user namespace)."""
    try:
        info = os.stat(path)
    except OSError:
        return False
    return info.st_uid == 0 and bool(info.st_mode & stat.S_ISUID)


def _ruled_out(interpreter: str) -> dict[str, str]:
    """Protections that cannot work here whatever a trial shows, with the reason."""
    reasons = {}
    bwrap, where = sb.find_bwrap()
    if bwrap is None:
        for name in sb.BWRAP_PROTECTIONS:
            reasons[name] = where
        if sb.unprivileged():
            reasons[sb.PRIVILEGE_DROP] = (f"as an ordinary user (uid {os.geteuid()}) the privilege drop relies on "
                                          f"bubblewrap's pid namespace, and {where}")
    else:
        try:
            interpreter_files(interpreter)
        except InterpreterUnusable as exc:
            reasons[sb.FILESYSTEM_ISOLATION] = str(exc)
    if sb.unprivileged():
        refused = _user_namespaces_refused(interpreter)
        if refused is not None:
            why = (f"this machine lets no ordinary user (here uid {os.geteuid()}) create a user namespace "
                   f"({refused}): run as root, or allow them (sysctl user.max_user_namespaces, "
                   "kernel.unprivileged_userns_clone, or the AppArmor restriction on unprivileged user namespaces)")
            reasons[sb.PRIVILEGE_DROP] = why
            if bwrap is not None and not _setuid_root(bwrap):
                for name in sb.BWRAP_PROTECTIONS:
                    reasons.setdefault(name, why)
    try:
        syscall_filter_program()
    except SyscallFilterUnavailable as exc:
        reasons[sb.SYSCALL_FILTER] = str(exc)
    return reasons


def _tools() -> str:
    """Which bubblewrap and libseccomp the sandbox uses, for the report."""
    bwrap, where = sb.find_bwrap()
    libseccomp = ctypes.util.find_library("seccomp")
    return (f"bubblewrap {bwrap} ({where})" if bwrap else "no bubblewrap") + "; " + \
        (f"libseccomp ({libseccomp})" if libseccomp else "no libseccomp")


@functools.lru_cache(maxsize=None)
def probe_capabilities(interpreter: str, temp_root: str) -> sb.SandboxCapabilities:
    """Probe which protections work, by launching trial sandboxes and verifying from inside them.

    Pure in its arguments (the interpreter and the temporary-directory root); cached per process.
    """
    reasons = _ruled_out(interpreter)
    use = {name: name not in reasons for name in sb.PROTECTIONS}
    tools = _tools()
    info, raw, error = _probe_once(interpreter, temp_root, use)
    if info is None and use[sb.PRIVILEGE_DROP]:
        reasons[sb.PRIVILEGE_DROP] = f"the interpreter could not start as the sandbox's dedicated uid: {error}"
        use[sb.PRIVILEGE_DROP] = False
        info, raw, error = _probe_once(interpreter, temp_root, use)
    if info is None and any(use[name] for name in sb.BWRAP_PROTECTIONS):
        for name in sb.BWRAP_PROTECTIONS:
            if use[name]:
                reasons[name] = f"bubblewrap could not set up the sandbox: {error}"
                use[name] = False
        info, raw, error = _probe_once(interpreter, temp_root, use)
    if info is None:
        reason = f"the trial sandbox did not run: {error}"
        return sb.SandboxCapabilities(tuple(sb.Protection(n, False, reasons.get(n, reason))
                                            for n in sb.PROTECTIONS), interpreter, tools)
    return sb.SandboxCapabilities(_verdicts(info, raw, reasons), interpreter, tools)


def _verdicts(info: dict, raw, reasons: dict[str, str]) -> tuple:
    """One :class:`~trainer.sandbox.Protection` per protection, from what the trial sandbox saw."""
    errors = _step_errors(raw)
    own = {kind: _readlink(f"/proc/self/ns/{kind}") for kind in ("net", "mnt", "pid")}
    uid = sb.SANDBOX_UID_BASE + raw.launcher_pid

    def verdict(name: str, ok: bool, how: str, failure: str) -> sb.Protection:
        if name in reasons:
            return sb.Protection(name, False, reasons[name])
        return sb.Protection(name, True, how) if ok else sb.Protection(name, False, errors.get(name) or failure)

    def new_ns(kind: str) -> bool:
        return info["ns"].get(kind) is not None and info["ns"][kind] != own[kind]

    own_keyring = sb._session_keyring_id()
    keyring_left = own_keyring is not None and (own_keyring <= 0 or info["session_keyring"] != own_keyring)
    cgroup, why_not = sb.cgroup_base()
    processes, address_space, _ = sb.memory_plan(sb.SandboxPolicy(), cgroup)
    policy = sb.SandboxPolicy()
    expected = {"RLIMIT_AS": address_space, "RLIMIT_NPROC": processes, "RLIMIT_NOFILE": policy.max_open_files,
                "RLIMIT_FSIZE": policy.max_file_bytes, "RLIMIT_CORE": 0}
    in_cgroup = cgroup is None or str(info["cgroup"]).endswith(f"/{sb.CGROUP_PREFIX}{raw.launcher_pid}")
    if sb.unprivileged():
        groups_ok = all(gid == info["overflow_gid"] for gid in info["groups"])
        how = (f"dedicated uid/gid {sb.SANDBOX_UID_BASE}+launcher pid in the code's own user namespace, mapped to "
               f"this ordinary user (uid {os.geteuid()}); no capabilities, own session keyring, no_new_privs")
    else:
        groups_ok = not info["groups"]
        how = (f"dedicated uid/gid {sb.SANDBOX_UID_BASE}+launcher pid, no supplementary groups or capabilities, "
               "own session keyring, no_new_privs")
    mib = 1024 * 1024
    bound = (f"whole run in its own cgroup v2 under {cgroup} (memory.max = memory_bytes, swap 0, pids.max)"
             if cgroup is not None else
             f"no usable cgroup v2 ({why_not}), so the whole run is bounded by its process count: "
             f"{processes} processes x {address_space // mib} MiB address space for the default "
             f"{policy.memory_bytes // mib} MiB")
    fs_ok = (new_ns("mnt") and info["root_readonly"] and info["cwd_writable"] and info["cwd"] == sb.ISOLATED_WORKDIR
             and info["hidden_dirs_empty"] and not info["host_visible"] and not info["failed_imports"])
    return (
        verdict(sb.PRIVILEGE_DROP,
                list(info["resuid"]) == [uid] * 3 and list(info["resgid"]) == [uid] * 3 and keyring_left
                and not any(info["capabilities"]) and groups_ok,
                how, f"code ran with uids {info['resuid']} gids {info['resgid']} groups {info['groups']}, "
                     f"capabilities {info['capabilities']}, session keyring {info['session_keyring']} "
                     f"(trainer's: {own_keyring})"),
        verdict(sb.NETWORK_ISOLATION, new_ns("net"), "new network and UTS namespaces (bubblewrap)",
                "the code shared the trainer's network namespace"),
        verdict(sb.FILESYSTEM_ISOLATION, fs_ok,
                "bubblewrap: empty read-only root with only the interpreter, its standard library and shared "
                f"libraries (read-only), fresh /proc and /dev, private /dev/shm, size- and inode-limited tmpfs "
                f"at {sb.ISOLATED_WORKDIR} as working directory",
                f"mount namespace new={new_ns('mnt')}, root read-only={info['root_readonly']}, cwd {info['cwd']} "
                f"writable={info['cwd_writable']}, host paths visible {info['host_visible']}, "
                f"modules failing to import {info['failed_imports'][:5]}"),
        verdict(sb.PROCESS_ISOLATION, new_ns("pid"),
                "new pid and IPC namespaces (bubblewrap; all killed when its pid 1 exits)",
                "the code shared the trainer's pid namespace"),
        verdict(sb.RESOURCE_LIMITS, in_cgroup and all(info["rlimits"].get(k) == v for k, v in expected.items()),
                f"{bound}; rlimits AS, CPU, NPROC, NOFILE, FSIZE, CORE=0",
                f"rlimits seen inside: {info['rlimits']}, cgroup {info['cgroup']}"),
        verdict(sb.SYSCALL_FILTER,
                info["seccomp_filters"] == _own_seccomp_filters() + 1 and info["unshare_errno"] == errno.EPERM,
                "seccomp filter compiled by libseccomp: no namespaces, mounts, ptrace, bpf, keyctl, io_uring, "
                "perf_event_open, userfaultfd, modules",
                f"seccomp filters inside: {info['seccomp_filters']}, unshare(0) errno {info['unshare_errno']}"),
    )


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None
