"""What the sandbox shows of the host's files: the interpreter, its standard library and the shared libraries
they load, read-only, and nothing else.

:func:`interpreter_files` runs the interpreter once (per trainer process) with an empty environment, imports
every extension module of its standard library, and asks the dynamic loader which objects it loaded
(``dl_iterate_phdr``: the paths as the loader opened them, including the program interpreter
``ld-linux``).  Each of those paths, the interpreter itself, its standard-library directory and the loader's
cache ``/etc/ld.so.cache`` are then recreated inside bubblewrap's empty root: every symlink met on the way
(``/lib -> usr/lib``, ``libz.so.1 -> libz.so.1.2.13``) as the same symlink, every real file or directory as a
read-only bind mount at its real path.  The standard library's ``site-packages`` is covered by an empty
read-only tmpfs (the code runs with ``-I -S`` and may only use the standard library).

:func:`bwrap_arguments` turns a plan into bubblewrap's command line.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess

CLOSURE_TIMEOUT_S = 120.0
LOADER_CACHE = "/etc/ld.so.cache"
MAX_SYMLINK_DEPTH = 40

_CLOSURE_SCRIPT = r"""
import ctypes, importlib, json, os, sysconfig
stdlib = sysconfig.get_path("stdlib")
dynload = os.path.join(sysconfig.get_path("platstdlib"), "lib-dynload")
imported = []
for name in sorted(os.listdir(dynload)) if os.path.isdir(dynload) else []:
    module = name.split(".")[0]
    try:
        importlib.import_module(module)
        imported.append(module)
    except Exception:
        pass
class Info(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_void_p), ("name", ctypes.c_char_p)]
loaded = []
@ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(Info), ctypes.c_size_t, ctypes.c_void_p)
def collect(info, size, data):
    loaded.append(os.fsdecode(info.contents.name or b""))
    return 0
ctypes.CDLL(None).dl_iterate_phdr(collect, None)
print(json.dumps({"stdlib": stdlib, "site": sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}),
                  "loaded": [path for path in loaded if path.startswith("/")], "modules": imported}))
"""


@dataclasses.dataclass(frozen=True)
class InterpreterFiles:
    """The host files the interpreter needs, as bubblewrap operations.

    ``binds``: real paths (files or directories) bound read-only at the same path; ``symlinks``:
    ``(target, path)`` pairs recreated as they are on the host; ``hidden``: directories inside a bound one
    that are covered by an empty tmpfs; ``modules``: the extension modules that imported on the host (the
    capability probe imports them inside the sandbox to check that nothing is missing).
    """

    binds: tuple[str, ...]
    symlinks: tuple[tuple[str, str], ...]
    hidden: tuple[str, ...]
    modules: tuple[str, ...]


class InterpreterUnusable(OSError):
    """The interpreter could not be run to find the files it needs."""


@functools.lru_cache(maxsize=None)
def interpreter_files(interpreter: str) -> InterpreterFiles:
    """The files ``interpreter`` (an absolute path) needs to run the standard library; cached per process.

    Raises:
        InterpreterUnusable: the interpreter did not start or did not answer.
    """
    try:
        done = subprocess.run([interpreter, "-I", "-S", "-c", _CLOSURE_SCRIPT], env={}, capture_output=True,
                              timeout=CLOSURE_TIMEOUT_S, stdin=subprocess.DEVNULL, cwd="/")
        info = json.loads(done.stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        raise InterpreterUnusable(f"cannot list the files {interpreter} needs: {type(exc).__name__}: {exc}") from exc
    paths = [interpreter, info["stdlib"], *info["loaded"]]
    if os.path.exists(LOADER_CACHE):
        paths.append(LOADER_CACHE)
    binds: list[str] = []
    symlinks: dict[str, str] = {}
    for path in paths:
        real = _expose(path, symlinks)
        if real is not None and real not in binds:
            binds.append(real)
    binds = [b for b in binds if not any(_inside(b, other) for other in binds if other != b)]
    symlinks = {path: target for path, target in symlinks.items() if not any(_inside(path, b) for b in binds)}
    stdlib = os.path.realpath(info["stdlib"])
    hidden = tuple(sorted(real for real in (os.path.realpath(p) for p in info["site"])
                          if _inside(real, stdlib) and real != stdlib and os.path.isdir(real)))
    return InterpreterFiles(binds=tuple(sorted(binds)), symlinks=tuple(sorted((t, p) for p, t in symlinks.items())),
                            hidden=hidden, modules=tuple(info["modules"]))


def _inside(path: str, directory: str) -> bool:
    """Whether ``path`` is ``directory`` or lies under it (both real, absolute)."""
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _expose(path: str, symlinks: dict[str, str], depth: int = 0) -> str | None:
    """Walk ``path`` component by component, recording each symlink met; return the real path reached.

    None if the path does not exist (nothing to expose) or the symlinks loop.
    """
    if depth > MAX_SYMLINK_DEPTH:
        return None
    parts = [p for p in path.split("/") if p]
    current = "/"
    for index, part in enumerate(parts):
        if part in (".", ".."):
            current = os.path.dirname(current) if part == ".." else current
            continue
        candidate = os.path.join(current, part)
        if os.path.islink(candidate):
            target = os.readlink(candidate)
            symlinks[candidate] = target
            rest = os.path.normpath(os.path.join(current, target, *parts[index + 1:]))
            return _expose(rest, symlinks, depth + 1)
        if not os.path.lexists(candidate):
            return None
        current = candidate
    return current


def _ancestors(paths: list[str]) -> list[str]:
    """The proper ancestor directories of ``paths`` (not ``/``), parents before children."""
    found = set()
    for path in paths:
        parent = os.path.dirname(path)
        while parent not in ("/", ""):
            found.add(parent)
            parent = os.path.dirname(parent)
    return sorted(found, key=lambda p: (p.count("/"), p))


def bwrap_arguments(bwrap: str, use: dict[str, bool], files: InterpreterFiles | None, *, as_root: bool,
                    net: str, fs: str, proc: str) -> list[str]:
    """Bubblewrap's options (before ``--`` and the command) for the protections switched on in ``use``.

    ``net``/``fs``/``proc`` are the protection names (passed in to keep this module free of the sandbox's
    constants); ``files`` is required when filesystem isolation is on.
    """
    args = [bwrap, "--die-with-parent", "--new-session"]
    if not as_root:  # unprivileged: bubblewrap needs a user namespace; the init process is root inside it
        args += ["--unshare-user", "--uid", "0", "--gid", "0"]
        if use[proc]:
            # The code's uid maps to the same user as the init process: as the pid namespace's first process,
            # init ignores the signals the code may send it (the kernel's rule for a namespace's pid 1).
            args += ["--as-pid-1"]
    args += ["--cap-drop", "ALL"]
    caps = ["CAP_SYS_ADMIN", "CAP_SETUID", "CAP_SETGID"]  # init: mount /tmp; tool process: drop to its uid
    if not as_root:  # the tool process's own user namespace maps uid 0 here: the kernel asks for CAP_SETFCAP
        caps.append("CAP_SETFCAP")
    for cap in caps:
        args += ["--cap-add", cap]
    if use[net]:
        args += ["--unshare-net", "--unshare-uts"]
    if use[proc]:
        args += ["--unshare-pid", "--unshare-ipc"]
    if use[fs]:
        assert files is not None
        for directory in _ancestors([*files.binds, *(path for _, path in files.symlinks)]):
            args += ["--perms", "0755", "--dir", directory]  # bubblewrap would make them 0700
        for target, path in files.symlinks:
            args += ["--symlink", target, path]
        for path in files.binds:
            args += ["--ro-bind", path, path]
        for path in files.hidden:
            args += ["--tmpfs", path, "--remount-ro", path]
        args += ["--proc", "/proc", "--dev", "/dev", "--dir", "/tmp", "--remount-ro", "/"]
    else:
        args += ["--dev-bind", "/", "/"]
        if use[proc]:
            args += ["--proc", "/proc"]
    return args + ["--chdir", "/"]
