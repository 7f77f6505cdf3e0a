"""Run untrusted, model-generated Python programs (e.g. HumanEval completions plus their tests) for evaluation.

Protects against what generated code does by accident or cheaply: endless loops (wall-clock timeout, RLIMIT_CPU,
then SIGKILL to the process group and to every process of the run's private uid), memory bombs (RLIMIT_AS), fork and
subprocess storms (a Python-level guard, plus RLIMIT_NPROC under the private uid), output floods (pipes are drained
in chunks, keeping at most ``max_output_bytes``), the network (a private network namespace with a down loopback, plus
a socket guard), writes outside the working directory (a private mount namespace where every mount is read-only but
the working directory, a 64 MB tmpfs; RLIMIT_FSIZE), the parent's environment (scrubbed), signals to other processes
(guard, private uid) and leftovers (the temporary directory is removed, also after a timeout).

Each run is a ``python -s -S -B`` process in its own session, with a fresh ``tempfile.mkdtemp()`` as cwd, running this
file as a bootstrap: still privileged, it unshares the namespaces, remounts, sets the rlimits and (as root) switches
to a random private uid, then installs the guard and runs ``program.py``. The setup runs in the child itself, not in
a ``preexec_fn`` (unsafe when the caller has threads, e.g. torch); ``-I`` is not used as it ignores PYTHONHASHSEED.
Non-root callers get the namespaces from an unprivileged user namespace where the kernel allows one.
``SandboxResult.protections`` lists what was in force; ``max_processes`` counts threads too.

What it does NOT do: it is no security boundary against a determined attacker. Same kernel, no seccomp, no PID
namespace or cgroup; ``ctypes`` bypasses the Python-level guard (only the kernel-level measures that could be
installed remain); world-readable files can be read; without namespaces the network is reachable and /tmp writable;
CPU, disk I/O and tmpfs memory are not accounted. Run hostile code in a VM.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import resource
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Status = Literal["ok", "error", "timeout", "memory", "killed"]

_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
_MS = {"ro": 1, "nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21,
       "strictatime": 1 << 24}  # per-mount options of /proc/self/mountinfo, kept when remounting read-only
_MS_REMOUNT, _MS_BIND, _MS_MOVE, _MS_REC, _MS_PRIVATE = 32, 4096, 8192, 16384, 1 << 18
_DISK_MB = 64  # size of the tmpfs working directory, and RLIMIT_FSIZE
_NOBODY, _UID_BASE = 65534, 0x60000000  # private per-run uids lie in [_UID_BASE, _UID_BASE + 2**28)
_GRACE_S = 0.2  # how long to keep reading once the program exited (stray children may hold the pipes)


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run; ``stdout``/``stderr`` hold at most ``max_output_bytes`` bytes each."""

    status: Status
    returncode: int
    stdout: str
    stderr: str
    truncated: bool
    seconds: float
    protections: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        """True when the program exited with status 0 within its limits."""
        return self.status == "ok"


def run_program(code: str, *, timeout_s: float = 10.0, memory_mb: int = 1024, max_output_bytes: int = 65536,
                max_processes: int = 0, python: str = sys.executable) -> SandboxResult:
    """Run ``code`` as ``program.py`` in a fresh sandboxed process and report how it ended."""
    workdir = tempfile.mkdtemp(prefix="esr_sandbox_")
    uid = _UID_BASE + secrets.randbelow(1 << 28) if os.geteuid() == 0 else None
    info_r, info_w = os.pipe()
    try:
        with open(os.path.join(workdir, "program.py"), "w", encoding="utf-8") as f:
            f.write(code)
        config = {"workdir": workdir, "uid": uid, "timeout_s": timeout_s, "memory_mb": memory_mb,
                  "max_processes": max_processes, "info_fd": info_w}
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": workdir,
               "TMPDIR": workdir, "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}  # nothing inherited
        start = time.monotonic()
        proc = subprocess.Popen([python, "-s", "-S", "-B", os.path.abspath(__file__), json.dumps(config)], cwd=workdir,
                                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                pass_fds=(info_w,), start_new_session=True)
        os.close(info_w)
        info_w = -1
        try:
            out, err, info, truncated, timed_out = _collect(proc, info_r, start + timeout_s, max_output_bytes)
        finally:
            _kill_all(proc, uid)
        stdout, stderr = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
        return SandboxResult(_status(proc.returncode, timed_out, stderr), proc.returncode, stdout, stderr, truncated,
                             time.monotonic() - start, tuple(json.loads(info or b"[]")))
    finally:
        for fd in (info_r, info_w):
            if fd >= 0:
                os.close(fd)
        for root, dirs, _ in os.walk(workdir):  # undo chmod 000 (matters where the uid switch did not happen)
            for name in dirs:
                with contextlib.suppress(OSError):
                    os.chmod(os.path.join(root, name), 0o700)
        shutil.rmtree(workdir, ignore_errors=True)


def _collect(proc: subprocess.Popen, info_fd: int, deadline: float, cap: int) -> tuple[bytes, bytes, bytes, bool, bool]:
    """Drain stdout, stderr and the info pipe, keeping at most ``cap`` bytes of each stream (a flood never reaches
    the parent's memory), until EOF, ``_GRACE_S`` after the exit or ``deadline``: (out, err, info, truncated, timed
    out)."""
    fds = [proc.stdout.fileno(), proc.stderr.fileno(), info_fd]  # type: ignore[union-attr]
    buffers, limits = {fd: bytearray() for fd in fds}, {fds[0]: cap, fds[1]: cap, info_fd: 4096}
    truncated, exited_at, timed_out = False, None, False
    with selectors.DefaultSelector() as selector:
        for fd in fds:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            now = time.monotonic()
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and (now - exited_at > _GRACE_S or now >= deadline):
                break  # the program is done; whatever still holds its pipes gets killed
            if now >= deadline:
                timed_out = True
                break
            for key, _ in selector.select(min(deadline - now, 0.1)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fd)
                room = max(limits[key.fd] - len(buffers[key.fd]), 0)
                truncated = truncated or (len(chunk) > room and key.fd != info_fd)
                buffers[key.fd] += chunk[:room]
    if not timed_out:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            timed_out = True
    return bytes(buffers[fds[0]]), bytes(buffers[fds[1]]), bytes(buffers[fds[2]]), truncated, timed_out


def _status(returncode: int, timed_out: bool, stderr: str) -> Status:
    """Classify an exit: a MemoryError as the last stderr line means the memory limit was hit."""
    if timed_out or returncode <= 0:
        return "timeout" if timed_out else "ok" if returncode == 0 else "killed"
    return "memory" if stderr.rstrip().rsplit("\n", 1)[-1].startswith("MemoryError") else "error"


def _kill_all(proc: subprocess.Popen, uid: int | None) -> None:
    """SIGKILL the process group, reap the program, then kill what still runs under the private uid (processes that
    left the group with setsid)."""
    for kill in (lambda: os.killpg(proc.pid, signal.SIGKILL), proc.kill):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            kill()
    proc.wait()
    for stream in (proc.stdout, proc.stderr):
        stream.close()  # type: ignore[union-attr]
    for _ in range(20 if uid is not None else 0):
        victims = [pid for pid, (owner, state) in _processes().items() if owner == uid and state != "Z"]
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if not victims:
            break
        time.sleep(0.01)


def _processes() -> dict[int, tuple[int, str]]:
    """Map pid -> (real uid, state letter), read from /proc."""
    table = {}
    for name in filter(str.isdigit, os.listdir("/proc") if os.path.isdir("/proc") else ()):
        with contextlib.suppress(ValueError, OSError, KeyError), open(f"/proc/{name}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
            table[int(name)] = (int(fields["Uid"].split()[0]), fields["State"].split()[0])
    return table


# ------------------------------------------------------------------ child side: ``python sandbox.py CONFIG_JSON``


def _isolate(workdir: str) -> list[str]:
    """Private network and mount namespaces: every mount read-only, a fresh tmpfs as the working directory."""
    import ctypes

    libc, done, uid, gid = ctypes.CDLL(None, use_errno=True), [], os.getuid(), os.getgid()

    def mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> bool:
        return libc.mount(*[s and s.encode() for s in (src, target, fstype)], flags, data and data.encode()) == 0

    if libc.unshare(_CLONE_NEWNET | _CLONE_NEWNS | (_CLONE_NEWUSER if uid else 0)) == 0:
        if uid:  # unprivileged user namespace: map ourselves to ourselves
            for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
        done.append("netns")
        with open(os.path.join(workdir, "program.py"), "rb") as f:
            source = f.read()
        if mount(None, "/", None, _MS_REC | _MS_PRIVATE) and mount(
                "tmpfs", workdir, "tmpfs", _MS["nosuid"] | _MS["nodev"], f"size={_DISK_MB}m,mode=0700"):
            with open(os.path.join(workdir, "program.py"), "wb") as f:
                f.write(source)
            _expose_interpreter(mount, os.path.join(workdir, ".stage"))
            done += ["tmpfs_workdir"] + (["readonly_fs"] if _make_readonly(mount, workdir) else [])
        os.chdir(workdir)  # the old cwd is the directory now covered by the tmpfs
    if libc.prctl(38, 1, 0, 0, 0) == 0:  # PR_SET_NO_NEW_PRIVS: setuid binaries cannot regain privileges
        done.append("no_new_privs")
    return done


def _blocker(path: str) -> str | None:
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
            blocker = _blocker(prefix)
            if blocker and not any(prefix.startswith(other + "/") for other in prefixes):
                os.mkdir(f"{stage}{i}")
                if mount(prefix, f"{stage}{i}", None, _MS_BIND | _MS_REC):
                    moves.append((blocker, prefix, f"{stage}{i}"))
        for blocker in sorted({blocker for blocker, _, _ in moves}):
            mount("tmpfs", blocker, "tmpfs", _MS["nosuid"] | _MS["nodev"], "mode=0755,size=1m")
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


def _limit_and_drop(config: dict) -> bool:
    """Kernel resource limits, then (as root) the switch to the run's private uid, or nobody where that uid cannot be
    mapped; not when the stdlib would become unreadable. Returns whether the uid was switched."""
    limits = {resource.RLIMIT_AS: config["memory_mb"] << 20, resource.RLIMIT_CPU: math.ceil(config["timeout_s"]) + 1,
              resource.RLIMIT_FSIZE: _DISK_MB << 20, resource.RLIMIT_CORE: 0, resource.RLIMIT_NOFILE: 64,
              resource.RLIMIT_NPROC: 1 + config["max_processes"]}
    for which, value in limits.items():
        hard = resource.getrlimit(which)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(which, (value, value))
    if config["uid"] is None or os.geteuid() != 0 or _blocker(sys.base_prefix) or _blocker(sys.base_exec_prefix):
        return False
    for uid in (config["uid"], _NOBODY):
        with contextlib.suppress(OSError):
            os.chown(config["workdir"], uid, uid)
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            return True
    return False


def _install_guard() -> None:
    """Python-level defence in depth: no new processes, signals or network sockets (``ctypes`` bypasses it)."""
    import _posixsubprocess
    import _socket
    import socket

    def refuse(what: str) -> Callable[..., None]:
        def refused(*args: object, **kwargs: object) -> None:
            raise PermissionError(f"{what} is disabled in the sandbox")
        return refused

    def wrap_only(base: type) -> type:  # sockets may wrap existing fds (socketpair, used by asyncio), not open new ones
        def init(self: object, family: int = -1, type: int = -1, proto: int = -1, fileno: int | None = None) -> None:
            if fileno is None:
                refuse("network access")()
            base.__init__(self, family, type, proto, fileno)
        return type("socket", (base,), {"__init__": init})

    for name in ["fork", "forkpty", "system", "popen", "posix_spawn", "posix_spawnp", "kill", "killpg"] + [
            name for name in dir(os) if name.startswith(("exec", "spawn"))]:
        if hasattr(os, name):
            setattr(os, name, refuse(f"os.{name}"))
    _posixsubprocess.fork_exec = subprocess._fork_exec = refuse("subprocess")  # type: ignore[attr-defined]
    socket.socket = socket.SocketType = wrap_only(socket.socket)  # type: ignore[misc]
    _socket.socket = _socket.SocketType = wrap_only(_socket.socket)  # type: ignore[misc]


def _child_main(config: dict) -> None:
    """Bootstrap in the child: isolate, limit, drop privileges, guard, then run program.py as ``__main__``."""
    import traceback
    import types

    workdir, path = config["workdir"], os.path.join(config["workdir"], "program.py")
    sys.path[:] = [workdir] + [p for p in sys.path if p != os.path.dirname(os.path.abspath(__file__))]
    protections = _isolate(workdir) if sys.platform.startswith("linux") else []
    protections += ["rlimits"] + (["uid"] if _limit_and_drop(config) else [])
    _install_guard()
    os.write(config["info_fd"], json.dumps(protections + ["guard"]).encode())
    os.close(config["info_fd"])
    module = types.ModuleType("__main__")
    module.__file__, sys.argv, sys.modules["__main__"] = path, [path], module
    try:
        with open(path, encoding="utf-8") as f:
            code = compile(f.read(), path, "exec")
        exec(code, module.__dict__)
    except SystemExit:
        raise
    except BaseException as exc:  # like ``python program.py``: the traceback starts in program.py
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != path:
            tb = tb.tb_next
        traceback.print_exception(type(exc), exc, tb)
        sys.exit(1)


if __name__ == "__main__":
    _child_main(json.loads(sys.argv[1]))
