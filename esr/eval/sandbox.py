"""Run untrusted, model-generated Python programs (e.g. HumanEval completions plus their tests) for evaluation.

Each run is a ``python -s -S -B`` process in its own session with a scrubbed environment, a fresh
``tempfile.mkdtemp()`` as cwd and pipes drained in chunks (at most ``max_output_bytes`` kept), running this file as a
bootstrap. The setup runs in the child itself, not in a ``preexec_fn`` (unsafe when the caller has threads, e.g.
torch); ``-I`` is not used as it ignores PYTHONHASHSEED. Once the program, its atexit handlers and its non-daemon
threads are done, stdio is flushed and the process exits without the interpreter's teardown (``__del__`` of objects
still alive then is not called, as Python allows), which saves ~10 ms a program.

The layers, each recorded in ``SandboxResult.protections`` when it could be installed (a layer that cannot be
installed is skipped, never fatal):

- ``netns``, ``ipcns``, ``pidns``: new network, mount, IPC and PID namespaces (non-root callers get them inside an
  unprivileged user namespace where the kernel allows one). The network namespace has only a down loopback, so no
  TCP/UDP reaches the host or anything else; the IPC namespace keeps SysV/POSIX IPC objects private and frees them
  with the run. In the PID namespace a trusted init (pid 1, this file, never untrusted code) forks the program
  (pid 2) and exits when it exits, whereupon the kernel kills every process left in the namespace: daemons and
  setsid'd grandchildren cannot outlive the run; init dies with the bootstrap (parent-death signal) and with the
  process group the caller kills on timeout. Bootstrap and init are non-dumpable, so not ptrace-able.
- ``private_proc``: a fresh read-only /proc for the PID namespace (hidepid=2 where supported): other processes, their
  command lines, environments, fds and memory are invisible.
- ``tmpfs_workdir``, ``readonly_fs``: every mount is remounted read-only but the working directory, a private 64 MB
  tmpfs (RLIMIT_FSIZE too). Where the interpreter lies below an untraversable directory (e.g. /root of a pyenv
  install), that directory is covered by a tmpfs holding only the interpreter's prefix.
- ``rlimits``: RLIMIT_AS (memory bombs), RLIMIT_CPU, RLIMIT_NPROC (fork and thread bombs; it counts threads),
  RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_CORE=0.
- ``uid``: as root, the switch to a random private uid (or nobody): files the caller keeps private stay unreadable,
  other processes cannot be signalled or traced, and RLIMIT_NPROC counts only the run's processes.
- ``no_caps``: every capability dropped (matters where the program would keep those of its user namespace, which
  would let it unmount or remount its view of the filesystem read-write).
- ``no_new_privs``, ``seccomp``: no privileges via setuid binaries or file capabilities, and a seccomp filter
  (x86_64 and aarch64) refusing with EPERM what no evaluated program needs and what attacks start from: socket
  families but AF_UNIX (AF_VSOCK, e.g., is not isolated by a network namespace), connect/sendmsg and addressed sendto
  (host services listening on filesystem sockets), ptrace and process_vm_*, namespaces (unshare, setns, namespace
  flags of clone; clone3 answers ENOSYS so that libc falls back to clone), mount and its friends, io_uring, bpf,
  perf_event_open, userfaultfd, keyrings, kexec, modules and host-wide settings; foreign-ABI syscalls are refused.
- ``guard``: Python-level defence in depth, with readable errors: no new processes, signals or network sockets
  (``ctypes`` bypasses it; the layers above are what holds then).

On a timeout the caller SIGKILLs the process group (which holds init, and with it the PID namespace) and every process
of the private uid. The working directory is removed afterwards without following symlinks the program left.

``tests/eval/test_sandbox_escapes.py`` tries each known escape with a real hostile program and checks its effect.

What it does NOT do: it is no VM. Same kernel: a kernel bug reachable through the syscalls that stay allowed is an
escape. No cgroup: CPU, disk I/O and tmpfs memory are not accounted. The program sees the host's filesystem (read-only),
not a minimal root: world-readable files (/etc, /sys, the repository, world-readable parts of home directories and
of the caller's temporary files) can be read (the one escape test marked xfail). Without root there is no uid switch:
the program runs as the caller and can read every file the caller can (e.g. ~/.ssh), and signal the caller's
processes where no PID namespace could be made. Without namespaces (no root and no unprivileged user namespaces, or a
container's seccomp policy refusing unshare) the network is reachable and /tmp writable; without seccomp (other
architectures, kernels without it) ``ctypes`` reaches vsock, filesystem sockets and the kernel interfaces listed
above. Run hostile code in a VM.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
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
from typing import Literal, NoReturn

Status = Literal["ok", "error", "timeout", "memory", "killed"]

_CLONE_NEWNS, _CLONE_NEWIPC, _CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x20000, 1 << 27, 1 << 28, 1 << 29, 1 << 30
_CLONE_NEW_ANY = 0x7E020000  # every CLONE_NEW* flag that clone() accepts (NEWNS, NEWCGROUP, UTS, IPC, USER, PID, NET)
_MS = {"ro": 1, "nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21,
       "strictatime": 1 << 24}  # per-mount options of /proc/self/mountinfo, kept when remounting read-only
_MS_REMOUNT, _MS_BIND, _MS_MOVE, _MS_REC, _MS_PRIVATE = 32, 4096, 8192, 16384, 1 << 18
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_SET_SECCOMP, _PR_SET_NO_NEW_PRIVS = 1, 4, 22, 38
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
        _remove_workdir(workdir)


def _remove_workdir(workdir: str) -> None:
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


# ------------------------------------------------------------------ child side: ``python sandbox.py CONFIG_JSON``


def _libc() -> ctypes.CDLL:
    """The C library, through which the child makes the syscalls ``os`` does not offer (and reads errno)."""
    return ctypes.CDLL(None, use_errno=True)


def _unshare() -> list[str]:
    """New network, mount, IPC and PID namespaces for this process's children (a user namespace around them when not
    root), falling back to network and mount only (e.g. where PID namespaces are not allowed), then to none."""
    libc, uid, gid = _libc(), os.getuid(), os.getgid()
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


def _start_init(info_fd: int) -> None:
    """Fork the PID namespace's init, which forks the program; only the program process returns from this call.

    The bootstrap (outside the namespace) waits for init, then exits the way the program did. Init (pid 1, trusted:
    it runs no untrusted code) reaps orphans until the program exits, reports the program's wait status to the
    bootstrap and exits, upon which the kernel kills whatever is left in the namespace. Init dies with the bootstrap
    (PR_SET_PDEATHSIG); both are non-dumpable (PR_SET_DUMPABLE=0), so the program can neither ptrace them nor read
    their /proc entries, even where it runs under the same uid (no root)."""
    libc = _libc()
    status_r, status_w = os.pipe()
    init = os.fork()
    if init:  # the bootstrap
        os.close(status_w)
        os.close(info_fd)
        libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
        status = os.waitpid(init, 0)[1]
        with os.fdopen(status_r, "rb") as f:
            reported = f.read()
        _exit_like(int(reported) if reported else status)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # (a bootstrap killed before this line: see _kill_all)
    program = os.fork()
    if program == 0:
        os.close(status_r)
        os.close(status_w)
        return
    libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)  # after the fork: the program must stay dumpable (its own /proc/self)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Python's KeyboardInterrupt handler would make init killable
    os.close(info_fd)
    os.close(status_r)
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == program:
            os.write(status_w, str(status).encode())
            os._exit(0)


def _exit_like(status: int) -> NoReturn:
    """Exit the way a process with wait status ``status`` did: with its exit code, or killed by its signal."""
    if os.WIFSIGNALED(status):
        with contextlib.suppress(OSError, ValueError):
            signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
        os.kill(os.getpid(), os.WTERMSIG(status))
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)


def _isolate(workdir: str, fresh_proc: bool) -> list[str]:
    """Inside the mount namespace: a fresh /proc (``fresh_proc``: this process is in the new PID namespace), a tmpfs
    as the working directory, the interpreter kept reachable, every other mount read-only."""
    libc, done = _libc(), []

    def mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> bool:
        return libc.mount(*[s and s.encode() for s in (src, target, fstype)], flags, data and data.encode()) == 0

    with open(os.path.join(workdir, "program.py"), "rb") as f:
        source = f.read()
    if mount(None, "/", None, _MS_REC | _MS_PRIVATE):
        proc_flags = _MS["nosuid"] | _MS["nodev"] | _MS["noexec"]
        if fresh_proc and (mount("proc", "/proc", "proc", proc_flags, "hidepid=2")
                           or mount("proc", "/proc", "proc", proc_flags)):
            done.append("private_proc")
        if mount("tmpfs", workdir, "tmpfs", _MS["nosuid"] | _MS["nodev"], f"size={_DISK_MB}m,mode=0700"):
            with open(os.path.join(workdir, "program.py"), "wb") as f:
                f.write(source)
            _expose_interpreter(mount, os.path.join(workdir, ".stage"))
            done += ["tmpfs_workdir"] + (["readonly_fs"] if _make_readonly(mount, workdir) else [])
    os.chdir(workdir)  # the old cwd is the directory now covered by the tmpfs
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


def _drop_capabilities() -> bool:
    """Clear the effective, permitted and inheritable capability sets (capset, _LINUX_CAPABILITY_VERSION_3)."""
    header, data = (ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()
    return _libc().capset(header, data) == 0


# Numbers (x86_64, aarch64) from the kernel's unistd headers of the syscalls the seccomp filter refuses or inspects.
_SYSCALLS = {
    # inspected
    "socket": (41, 198), "socketpair": (53, 199), "sendto": (44, 206), "clone": (56, 220), "clone3": (435, 435),
    # reaching other processes
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271), "kcmp": (312, 272),
    "pidfd_getfd": (438, 438),
    # reaching services outside: filesystem sockets (other families are refused by socket() already)
    "connect": (42, 203), "sendmsg": (46, 211), "sendmmsg": (307, 269),
    # namespaces, mounts, file handles
    "unshare": (272, 97), "setns": (308, 268), "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41),
    "chroot": (161, 51), "open_tree": (428, 428), "move_mount": (429, 429), "fsopen": (430, 430),
    "fsconfig": (431, 431), "fsmount": (432, 432), "fspick": (433, 433), "mount_setattr": (442, 442),
    "name_to_handle_at": (303, 264), "open_by_handle_at": (304, 265),
    # kernel attack surface
    "bpf": (321, 280), "perf_event_open": (298, 241), "userfaultfd": (323, 282), "io_uring_setup": (425, 425),
    "io_uring_enter": (426, 426), "io_uring_register": (427, 427), "keyctl": (250, 219), "add_key": (248, 217),
    "request_key": (249, 218), "fanotify_init": (300, 262), "lookup_dcookie": (212, 18), "uselib": (134, None),
    # host-wide settings (they need capabilities anyway)
    "kexec_load": (246, 104), "kexec_file_load": (320, 294), "init_module": (175, 105), "finit_module": (313, 273),
    "delete_module": (176, 106), "acct": (163, 89), "swapon": (167, 224), "swapoff": (168, 225), "reboot": (169, 142),
    "syslog": (103, 116), "quotactl": (179, 60), "iopl": (172, None), "ioperm": (173, None),
    "settimeofday": (164, 170), "clock_settime": (227, 112), "clock_adjtime": (305, 266), "adjtimex": (159, 171),
    "sethostname": (170, 161), "setdomainname": (171, 162), "vhangup": (153, 58),
}
_AUDIT_ARCH = {"x86_64": (0, 0xC000003E), "aarch64": (1, 0xC00000B7)}  # column of _SYSCALLS, AUDIT_ARCH_* value


def _seccomp_program(machine: str) -> list[tuple[int, int, int, int]] | None:
    """The classic-BPF seccomp filter as (code, jt, jf, k) instructions, or None for an unsupported architecture.

    It checks the architecture (a 32-bit or x32 syscall would get other numbers past the list), then for each listed
    syscall ``if nr == N: <body ending in a return>``, then allows everything else. ``struct seccomp_data`` is
    {int nr; u32 arch; u64 ip; u64 args[6]}: argument i's low half is at offset 16 + 8 i (both arches little-endian).
    """
    if machine not in _AUDIT_ARCH or sys.maxsize < 2**32:
        return None
    column, audit_arch = _AUDIT_ARCH[machine]
    allow, eperm, enosys, eafnosupport = 0x7FFF0000, 0x50000 | 1, 0x50000 | 38, 0x50000 | 97  # SECCOMP_RET_*
    load = lambda offset: (0x20, 0, 0, offset)  # BPF_LD | BPF_W | BPF_ABS
    ret = lambda value: (0x06, 0, 0, value)  # BPF_RET | BPF_K
    jeq = lambda k, jt, jf: (0x15, jt, jf, k)  # BPF_JMP | BPF_JEQ | BPF_K
    arg = lambda i, high=False: 16 + 8 * i + 4 * high
    unix_only = [load(arg(0)), jeq(1, 0, 1), ret(allow), ret(eafnosupport)]  # domain == AF_UNIX
    bodies = {
        "socket": unix_only, "socketpair": unix_only,
        "sendto": [load(arg(4)), jeq(0, 0, 3), load(arg(4, True)), jeq(0, 0, 1), ret(allow), ret(eperm)],  # no addr
        "clone": [load(arg(0)), (0x45, 0, 1, _CLONE_NEW_ANY), ret(eperm), ret(allow)],  # BPF_JSET: no CLONE_NEW*
        "clone3": [ret(enosys)],  # its flags sit in memory the filter cannot read; libc falls back to clone
    }
    program = [load(4), jeq(audit_arch, 1, 0), ret(eperm), load(0)]
    if machine == "x86_64":
        program += [(0x35, 0, 1, 0x40000000), ret(eperm)]  # BPF_JGE: the x32 ABI's syscall numbers
    for name, numbers in _SYSCALLS.items():
        body = bodies.get(name, [ret(eperm)])
        if numbers[column] is not None:
            program += [jeq(numbers[column], 0, len(body))] + body
    return program + [ret(allow)]


def _install_seccomp() -> list[str]:
    """PR_SET_NO_NEW_PRIVS (setuid binaries and file capabilities cannot raise privileges; also what lets an
    unprivileged process install a filter), then the seccomp filter of ``_seccomp_program``."""

    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    libc, done, ulong = _libc(), [], ctypes.c_ulong
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, ulong(1), ulong(0), ulong(0), ulong(0)) != 0:
        return done
    done.append("no_new_privs")
    program = _seccomp_program(os.uname().machine)
    if program is not None:
        fprog = SockFprog(len(program), (SockFilter * len(program))(*program))
        if libc.prctl(_PR_SET_SECCOMP, ulong(2), ctypes.byref(fprog), ulong(0), ulong(0)) == 0:  # SECCOMP_MODE_FILTER
            done.append("seccomp")
    return done


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
    """Bootstrap in the child: namespaces (forking init and the program where a PID namespace was made), mounts,
    limits, the uid switch, capabilities, no_new_privs and seccomp, the guard, then program.py as ``__main__``."""
    import traceback
    import types

    workdir, path = config["workdir"], os.path.join(config["workdir"], "program.py")
    sys.path[:] = [workdir] + [p for p in sys.path if p != os.path.dirname(os.path.abspath(__file__))]
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    linux = sys.platform.startswith("linux")
    protections = _unshare() if linux else []
    if "pidns" in protections:
        _start_init(config["info_fd"])  # returns in the program process, pid 2 of the namespace
    if "netns" in protections:  # a mount namespace came with it
        protections += _isolate(workdir, fresh_proc="pidns" in protections)
    protections += ["rlimits"] + (["uid"] if _limit_and_drop(config) else [])
    if linux:
        protections += (["no_caps"] if _drop_capabilities() else []) + _install_seccomp()
    _install_guard()
    os.write(config["info_fd"], json.dumps(protections + ["guard"]).encode())
    os.close(config["info_fd"])
    module = types.ModuleType("__main__")
    module.__file__, sys.argv, sys.modules["__main__"] = path, [path], module
    status = [0]
    atexit.register(_exit_without_teardown, status)  # the first registered runs last, after the program's own
    try:
        with open(path, encoding="utf-8") as f:
            code = compile(f.read(), path, "exec")
        exec(code, module.__dict__)
    except SystemExit as exc:  # Python prints a non-int code to stderr and exits with 1
        status[0] = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
        raise
    except BaseException as exc:  # like ``python program.py``: the traceback starts in program.py
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != path:
            tb = tb.tb_next
        traceback.print_exception(type(exc), exc, tb)
        status[0] = 1
        sys.exit(1)


def _exit_without_teardown(status: list[int]) -> None:
    """The last atexit handler (non-daemon threads are joined by then): flush Python's and C's stdio as Python would,
    then exit at once. The interpreter's teardown frees every object, and with a heap shared copy-on-write with init
    and the bootstrap that copies most of it (about 10 ms per program); Python does not promise ``__del__`` calls for
    objects alive at exit anyway."""
    code = status[0] & 0xFF  # what the exit status keeps of Python's exit code
    for stream in (sys.stdout, sys.stderr):
        if stream is not None and not getattr(stream, "closed", False):
            try:
                stream.flush()
            except Exception:  # as Python: a failed flush of stdio at exit means exit status 120
                code = 120
    _libc().fflush(None)
    os._exit(code)


if __name__ == "__main__":
    _child_main(json.loads(sys.argv[1]))
