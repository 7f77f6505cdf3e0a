"""Isolation layers the sandbox child installs on itself, stdlib only (it runs under ``python -s -S``): new
namespaces (``unshare``), a private /proc, a tmpfs working directory and a read-only view of every other mount
(``isolate``), resource limits and the switch to a private uid (``limit_and_drop``), and no capabilities
(``drop_capabilities``). Each returns whether (or which) layers it could install; none is fatal. The C library is
passed in by the bootstrap (``ctypes.CDLL(None, use_errno=True)``): ``os`` does not offer these syscalls.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import re
import resource
import sys
from collections.abc import Callable

_CLONE_NEWNS, _CLONE_NEWIPC, _CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x20000, 1 << 27, 1 << 28, 1 << 29, 1 << 30
_MS = {"ro": 1, "nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21,
       "strictatime": 1 << 24}  # per-mount options of /proc/self/mountinfo, kept when remounting read-only
_MS_REMOUNT, _MS_BIND, _MS_MOVE, _MS_REC, _MS_PRIVATE = 32, 4096, 8192, 16384, 1 << 18
DISK_MB = 64
"""Size of the tmpfs working directory, and RLIMIT_FSIZE."""
_NOBODY = 65534


def unshare(libc: ctypes.CDLL) -> list[str]:
    """New network, mount, IPC and PID namespaces for this process's children (a user namespace around them when not
    root), falling back to network and mount only (e.g. where PID namespaces are not allowed), then to none."""
    uid, gid = os.getuid(), os.getgid()
    for flags, names in ((_CLONE_NEWNET | _CLONE_NEWNS | _CLONE_NEWIPC | _CLONE_NEWPID, ["netns", "ipcns", "pidns"]),
                         (_CLONE_NEWNET | _CLONE_NEWNS, ["netns"])):
        if libc.unshare(flags | (_CLONE_NEWUSER if uid else 0)) == 0:
            if uid:  # unprivileged user namespace: map ourselves to ourselves
                for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                                   ("gid_map", f"{gid} {gid} 1")):
                    with open(f"/proc/self/{name}", "w") as f:
                        f.write(text)
            return names
    return []


def isolate(libc: ctypes.CDLL, workdir: str, fresh_proc: bool) -> list[str]:
    """Inside the mount namespace: a fresh /proc (``fresh_proc``: this process is in the new PID namespace), a tmpfs
    as the working directory, the interpreter kept reachable, every other mount read-only."""
    done: list[str] = []

    def mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> bool:
        return libc.mount(*[s and s.encode() for s in (src, target, fstype)], flags, data and data.encode()) == 0

    with open(os.path.join(workdir, "program.py"), "rb") as f:
        source = f.read()
    if mount(None, "/", None, _MS_REC | _MS_PRIVATE):
        proc_flags = _MS["nosuid"] | _MS["nodev"] | _MS["noexec"]
        if fresh_proc and (mount("proc", "/proc", "proc", proc_flags, "hidepid=2")
                           or mount("proc", "/proc", "proc", proc_flags)):
            done.append("private_proc")
        if mount("tmpfs", workdir, "tmpfs", _MS["nosuid"] | _MS["nodev"], f"size={DISK_MB}m,mode=0700"):
            with open(os.path.join(workdir, "program.py"), "wb") as f:
                f.write(source)
            _expose_interpreter(mount, os.path.join(workdir, ".stage"))
            done += ["tmpfs_workdir"] + (["readonly_fs"] if _make_readonly(mount, workdir) else [])
    os.chdir(workdir)  # the old cwd is the directory now covered by the tmpfs
    return done


def blocker(path: str) -> str | None:
    """The topmost directory on ``path`` that other users may not traverse, or None."""
    parts = os.path.realpath(path).strip("/").split("/")
    return next((p for p in ("/" + "/".join(parts[: i + 1]) for i in range(len(parts))) if not os.stat(p).st_mode & 1),
                None)


def _expose_interpreter(mount: Callable[..., bool], stage: str) -> None:
    """Cover an untraversable ancestor of the interpreter (e.g. /root of a pyenv install) with a tmpfs holding only
    the interpreter's prefix, so that the stdlib stays importable after the uid switch (the rest stays hidden)."""
    prefixes = sorted({os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix)})
    moves = []
    with contextlib.suppress(OSError):
        for i, prefix in enumerate(prefixes):
            top = blocker(prefix)
            if top and not any(prefix.startswith(other + "/") for other in prefixes):
                os.mkdir(f"{stage}{i}")
                if mount(prefix, f"{stage}{i}", None, _MS_BIND | _MS_REC):
                    moves.append((top, prefix, f"{stage}{i}"))
        for top in sorted({top for top, _, _ in moves}):
            mount("tmpfs", top, "tmpfs", _MS["nosuid"] | _MS["nodev"], "mode=0755,size=1m")
        for _, prefix, staged in moves:
            os.makedirs(prefix, exist_ok=True)
            mount(staged, prefix, None, _MS_MOVE)
            os.rmdir(staged)


def _make_readonly(mount: Callable[..., bool], workdir: str) -> bool:
    """Remount every mount but the working directory read-only, keeping its other (possibly locked) flags."""
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4:6] for line in f]
    ok = True
    for point, options in mounts:
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), point)
        flags = sum(_MS.get(option, 0) for option in set(options.split(",")))
        if point != workdir and os.path.exists(point):
            ok = mount(None, point, None, _MS_REMOUNT | _MS_BIND | _MS["ro"] | flags) and ok
    return ok


def limit_and_drop(config: dict) -> bool:
    """Kernel resource limits, then (as root) the switch to the run's private uid, or nobody where that uid cannot be
    mapped; not when the stdlib would become unreadable. Returns whether the uid was switched."""
    limits = {resource.RLIMIT_AS: config["memory_mb"] << 20, resource.RLIMIT_CPU: math.ceil(config["timeout_s"]) + 1,
              resource.RLIMIT_FSIZE: DISK_MB << 20, resource.RLIMIT_CORE: 0, resource.RLIMIT_NOFILE: 64,
              resource.RLIMIT_NPROC: 1 + config["max_processes"]}
    for which, value in limits.items():
        hard = resource.getrlimit(which)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(which, (value, value))
    if config["uid"] is None or os.geteuid() != 0 or blocker(sys.base_prefix) or blocker(sys.base_exec_prefix):
        return False
    for uid in (config["uid"], _NOBODY):
        with contextlib.suppress(OSError):
            os.chown(config["workdir"], uid, uid)
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            return True
    return False


def drop_capabilities(libc: ctypes.CDLL) -> bool:
    """Clear the effective, permitted and inheritable capability sets (capset, _LINUX_CAPABILITY_VERSION_3)."""
    header, data = (ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()
    return libc.capset(header, data) == 0
