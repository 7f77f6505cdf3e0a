"""The parent side of the sandbox: start ``bootstrap.py`` in a fresh process, drain its pipes, classify how it
ended, kill whatever it left and remove its working directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Literal

Status = Literal["ok", "error", "timeout", "memory", "killed"]

_BOOTSTRAP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bootstrap.py")
_UID_BASE = 0x60000000  # private per-run uids lie in [_UID_BASE, _UID_BASE + 2**28)
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
        proc = subprocess.Popen([python, "-s", "-S", "-B", _BOOTSTRAP, json.dumps(config)], cwd=workdir,
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
        remove_workdir(workdir)


def remove_workdir(workdir: str) -> None:
    """Remove the working directory, first undoing a ``chmod 000`` of its subdirectories (matters where the uid switch
    did not happen). Nothing follows a symlink the program left: a link to /etc must not get /etc chmod-ed."""
    for _, dirs, _, dir_fd in os.fwalk(workdir) if hasattr(os, "O_PATH") else ():
        for name in dirs:  # O_PATH opens a directory without read permission; O_NOFOLLOW|O_DIRECTORY refuse links
            with contextlib.suppress(OSError):
                fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
                try:
                    os.chmod(f"/proc/self/fd/{fd}", 0o700)
                finally:
                    os.close(fd)
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
    """SIGKILL the process group (which holds the PID namespace's init: its death kills the whole namespace), reap
    the program, then kill what still runs under the private uid (processes that left the group with setsid where
    there is no PID namespace)."""
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
