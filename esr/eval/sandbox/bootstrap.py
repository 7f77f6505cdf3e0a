"""The sandbox child: ``python -s -S -B bootstrap.py CONFIG_JSON``, started by ``runner.run_program``.

This file runs as a script, without site-packages and without esr: it and the three files it imports from its own
folder (``isolation``, ``seccomp``, ``guard``) use the standard library only. It installs the layers on itself in
order (namespaces, forking the PID namespace's init where one was made, mounts, limits and the uid switch,
capabilities, no_new_privs and seccomp, the guard), reports them on the info pipe, then runs ``program.py`` as
``__main__`` and exits without the interpreter's teardown.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import resource
import signal
import sys
from typing import NoReturn

# Run as a script, this folder is sys.path[0]: the layers are plain neighbour modules (never imported through esr).
import guard  # noqa: E402
import isolation  # noqa: E402
import seccomp  # noqa: E402

for _name in ("guard", "isolation", "seccomp"):
    del sys.modules[_name]  # so that the program's own ``import guard`` does not find these

_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE = 1, 4


def _libc() -> ctypes.CDLL:
    """The C library, through which the child makes the syscalls ``os`` does not offer (and reads errno)."""
    return ctypes.CDLL(None, use_errno=True)


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


def _child_main(config: dict) -> None:
    """Bootstrap in the child: namespaces (forking init and the program where a PID namespace was made), mounts,
    limits, the uid switch, capabilities, no_new_privs and seccomp, the guard, then program.py as ``__main__``."""
    import traceback
    import types

    workdir, path = config["workdir"], os.path.join(config["workdir"], "program.py")
    sys.path[:] = [workdir] + [p for p in sys.path if p != os.path.dirname(os.path.abspath(__file__))]
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    linux = sys.platform.startswith("linux")
    libc = _libc()
    protections = isolation.unshare(libc) if linux else []
    if "pidns" in protections:
        _start_init(config["info_fd"])  # returns in the program process, pid 2 of the namespace
    if "netns" in protections:  # a mount namespace came with it
        protections += isolation.isolate(libc, workdir, fresh_proc="pidns" in protections)
    protections += ["rlimits"] + (["uid"] if isolation.limit_and_drop(config) else [])
    if linux:
        protections += (["no_caps"] if isolation.drop_capabilities(libc) else []) + seccomp.install_seccomp(libc)
    guard.install_guard()
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
