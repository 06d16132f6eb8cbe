"""The sandbox's syscall filter: a seccomp BPF program compiled by libseccomp (through ``pyseccomp``).

The filter allows everything except the kernel interfaces that ordinary Python code never needs and that
widen the attack surface for a local privilege escalation: new namespaces (``unshare``, ``setns``, ``clone``
with a ``CLONE_NEW*`` flag, ``clone3``), mounting, ``ptrace`` and cross-process memory access, ``bpf``, the
key-management syscalls, ``io_uring_*``, ``perf_event_open``, ``userfaultfd``, kernel modules, kexec and a
few administrative calls.  Denied calls fail with ``EPERM``; ``clone3`` fails with ``ENOSYS`` so that the C
library falls back to ``clone`` (whose flags a classic BPF filter can inspect, unlike ``clone3``'s
argument structure).  A syscall from a foreign architecture (e.g. 32-bit ``int 0x80`` on x86-64) kills
the process.

The program is built once per trainer process (:func:`syscall_filter_program`) and handed to the sandbox's
tool process, which installs it with ``prctl(PR_SET_SECCOMP)`` right before ``execve``, after the privilege
drop and the limits (so that the set-up itself is not constrained by it).
"""

from __future__ import annotations

import errno
import functools
import os
import tempfile

DENIED_SYSCALLS = (
    # namespaces and mounts
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "open_tree", "move_mount", "fsopen",
    "fsconfig", "fsmount", "fspick", "mount_setattr",
    # debugging other processes, reading their memory
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp",
    # large kernel attack surfaces
    "bpf", "io_uring_setup", "io_uring_enter", "io_uring_register", "perf_event_open", "userfaultfd",
    "keyctl", "add_key", "request_key",
    # administration
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load", "reboot", "swapon",
    "swapoff", "acct", "quotactl", "syslog", "open_by_handle_at", "name_to_handle_at", "fanotify_init",
)
ARCH_SPECIFIC_DENIED = ("iopl", "ioperm")  # x86 only; skipped where libseccomp does not know them
NAMESPACE_CLONE_FLAGS = {  # CLONE_NEWTIME (0x80) cannot be passed to clone(): it overlaps the exit signal
    "CLONE_NEWNS": 0x00020000, "CLONE_NEWCGROUP": 0x02000000, "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000, "CLONE_NEWUSER": 0x10000000, "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}
SUPPORTED_MACHINES = ("x86_64", "aarch64")  # clone's flags are its first argument there


class SyscallFilterUnavailable(RuntimeError):
    """The filter cannot be built on this machine (the message says why and what to install)."""


@functools.lru_cache(maxsize=1)
def syscall_filter_program() -> bytes:
    """The filter as raw ``struct sock_filter`` instructions (8 bytes each, native byte order).

    Raises:
        SyscallFilterUnavailable: libseccomp or pyseccomp is missing, or the machine is not supported.
    """
    machine = os.uname().machine
    if machine not in SUPPORTED_MACHINES:
        raise SyscallFilterUnavailable(f"the syscall filter is only built for {SUPPORTED_MACHINES}, not {machine}")
    try:
        import pyseccomp as seccomp  # noqa: PLC0415 - optional dependency, reported when missing
    except (ImportError, RuntimeError, OSError) as exc:
        raise SyscallFilterUnavailable(
            f"cannot load libseccomp through pyseccomp ({type(exc).__name__}: {exc}); install the system library "
            "libseccomp (Debian and Ubuntu: libseccomp2, Fedora: libseccomp) and the Python package pyseccomp "
            "(part of the trainer's dependencies)") from exc
    try:
        rules = seccomp.SyscallFilter(seccomp.ALLOW)
        rules.set_attr(seccomp.Attr.ACT_BADARCH, seccomp.KILL_PROCESS)
        rules.set_attr(seccomp.Attr.CTL_NNP, 0)  # the sandbox sets no_new_privs itself
        for name in DENIED_SYSCALLS:
            rules.add_rule(seccomp.ERRNO(errno.EPERM), name)
        for name in ARCH_SPECIFIC_DENIED:
            if seccomp.resolve_syscall(seccomp.Arch.NATIVE, name) >= 0:
                rules.add_rule(seccomp.ERRNO(errno.EPERM), name)
        rules.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
        for flag in NAMESPACE_CLONE_FLAGS.values():
            rules.add_rule(seccomp.ERRNO(errno.EPERM), "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
        with tempfile.TemporaryFile() as handle:
            rules.export_bpf(handle)
            handle.seek(0)
            program = handle.read()
    except (OSError, ValueError, RuntimeError) as exc:
        raise SyscallFilterUnavailable(f"libseccomp could not build the filter: {type(exc).__name__}: {exc}") from exc
    if not program or len(program) % 8:
        raise SyscallFilterUnavailable(f"libseccomp exported a malformed program ({len(program)} bytes)")
    return program
