"""Where the sandbox can put one cgroup v2 per tool run, to bound the memory of the whole run.

A run's cgroup is ``BASE/sod-sandbox-<launcher pid>`` (made, joined and removed by the launcher, see
:mod:`trainer.sandbox.launcher`), with ``memory.max`` and, where the ``pids`` controller is handed down too,
``pids.max``.  BASE must be a cgroup v2 directory that already hands the ``memory`` controller to its
children (the sandbox does not change the machine's cgroup configuration), that this process may write,
and in which a child can be made: the parent of the trainer's own cgroup (the trainer's cgroup itself holds
processes, and cgroup v2 gives controllers only to the children of a cgroup without processes), or the
hierarchy's root when the trainer lives there.  :func:`cgroup_base` finds one, trying it for real (make a
child, set ``memory.max``, remove it).  On a cgroup v1 or hybrid machine whose memory controller is not in
the v2 hierarchy, or in a container with a read-only cgroup filesystem, there is none; the sandbox then
bounds a run by its process count instead.
"""

from __future__ import annotations

import functools
import os

from .launcher import CGROUP_PREFIX

REQUIRED_CONTROLLER = "memory"


def _cgroup2_mount() -> tuple[str, str] | None:
    """``(mount point, root inside the hierarchy)`` of the first cgroup2 mount, from /proc/self/mountinfo."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                fields = line.split()
                if " - " in line and line.split(" - ", 1)[1].split()[0] == "cgroup2":
                    return fields[4], fields[3]
    except OSError:
        return None
    return None


def _own_cgroup() -> str | None:
    """This process's cgroup v2 path (the ``0::`` line of /proc/self/cgroup)."""
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        return None
    return None


def _read_words(path: str) -> set[str]:
    try:
        with open(path, encoding="ascii") as handle:
            return set(handle.read().split())
    except OSError:
        return set()


def _usable(base: str) -> str | None:
    """None if a run cgroup with the memory controller can be made under ``base``; else why it cannot."""
    handed_down = _read_words(os.path.join(base, "cgroup.subtree_control"))
    if REQUIRED_CONTROLLER not in handed_down:
        return (f"the cgroup v2 directory {base} hands {sorted(handed_down)} to its children, not the "
                f"{REQUIRED_CONTROLLER} controller (a cgroup v1 or hybrid machine?)")
    trial = os.path.join(base, f"{CGROUP_PREFIX}trial-{os.getpid()}")
    try:
        os.mkdir(trial)
    except FileExistsError:
        pass
    except OSError as exc:
        return f"cannot create a cgroup under {base} ({exc.strerror})"
    try:
        with open(os.path.join(trial, "memory.max"), "w", encoding="ascii") as handle:
            handle.write(str(64 * 1024 * 1024))
        return None
    except OSError as exc:
        return f"cannot set memory.max under {base} ({exc.strerror})"
    finally:
        try:
            os.rmdir(trial)
        except OSError:
            pass


@functools.lru_cache(maxsize=1)
def cgroup_base() -> tuple[str | None, str]:
    """``(base directory, how)`` for run cgroups, or ``(None, why not)``; probed once per process."""
    mount = _cgroup2_mount()
    own = _own_cgroup()
    if mount is None or own is None:
        return None, "no cgroup v2 hierarchy is mounted"
    mount_point, mount_root = mount
    relative = os.path.relpath(own, mount_root) if own.startswith(mount_root) else own.lstrip("/")
    own_dir = os.path.normpath(os.path.join(mount_point, relative))
    candidates = [os.path.dirname(own_dir)] if own_dir != os.path.normpath(mount_point) else [own_dir]
    reasons = []
    for base in candidates:
        reason = _usable(base)
        if reason is None:
            return base, f"cgroup v2 under {base}"
        reasons.append(reason)
    return None, "; ".join(reasons)
