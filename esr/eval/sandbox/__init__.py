"""Run untrusted, model-generated Python programs (e.g. HumanEval completions plus their tests) for evaluation.

Each run is a ``python -s -S -B`` process in its own session with a scrubbed environment, a fresh
``tempfile.mkdtemp()`` as cwd and pipes drained in chunks (at most ``max_output_bytes`` kept), running
``bootstrap.py`` of this package as a script (stdlib only: it imports neither esr nor site-packages). The setup
runs in the child itself, not in a ``preexec_fn`` (unsafe when the caller has threads, e.g. torch); ``-I`` is not
used as it ignores PYTHONHASHSEED. Once the program, its atexit handlers and its non-daemon
threads are done, stdio is flushed and the process exits without the interpreter's teardown (``__del__`` of objects
still alive then is not called, as Python allows), which saves ~10 ms a program.

The layers, each recorded in ``SandboxResult.protections`` when it could be installed (a layer that cannot be
installed is skipped, never fatal):

- ``netns``, ``ipcns``, ``pidns``: new network, mount, IPC and PID namespaces (non-root callers get them inside an
  unprivileged user namespace where the kernel allows one). The network namespace has only a down loopback, so no
  TCP/UDP reaches the host or anything else; the IPC namespace keeps SysV/POSIX IPC objects private and frees them
  with the run. In the PID namespace a trusted init (pid 1, the bootstrap, never untrusted code) forks the program
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

The package, by noun: ``runner`` (the parent side: start, drain, classify, kill, clean up), ``bootstrap`` (the child's
script), ``isolation`` (namespaces, mounts, limits, uid, capabilities), ``seccomp`` (the syscall table and its
filter), ``guard`` (the Python-level layer).
"""

from esr.eval.sandbox.isolation import blocker as _blocker  # noqa: F401  (the names of the single-module days)
from esr.eval.sandbox.runner import SandboxResult, Status, run_program
from esr.eval.sandbox.runner import remove_workdir as _remove_workdir  # noqa: F401
from esr.eval.sandbox.seccomp import SYSCALLS as _SYSCALLS  # noqa: F401

__all__ = ["SandboxResult", "Status", "run_program"]
