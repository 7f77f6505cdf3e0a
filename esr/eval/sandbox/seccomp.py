"""The seccomp table of the sandbox child, stdlib only (it runs under ``python -s -S``): which syscalls are refused
or inspected (``SYSCALLS``), the classic-BPF filter built from them (``seccomp_program``), and its installation with
PR_SET_NO_NEW_PRIVS (``install_seccomp``).
"""

from __future__ import annotations

import ctypes
import os
import sys

_CLONE_NEW_ANY = 0x7E020000  # every CLONE_NEW* flag that clone() accepts (NEWNS, NEWCGROUP, UTS, IPC, USER, PID, NET)
_PR_SET_SECCOMP, _PR_SET_NO_NEW_PRIVS = 22, 38

# Numbers (x86_64, aarch64) from the kernel's unistd headers of the syscalls the seccomp filter refuses or inspects.
SYSCALLS = {
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
AUDIT_ARCH = {"x86_64": (0, 0xC000003E), "aarch64": (1, 0xC00000B7)}  # column of SYSCALLS, AUDIT_ARCH_* value


def seccomp_program(machine: str) -> list[tuple[int, int, int, int]] | None:
    """The classic-BPF seccomp filter as (code, jt, jf, k) instructions, or None for an unsupported architecture.

    It checks the architecture (a 32-bit or x32 syscall would get other numbers past the list), then for each listed
    syscall ``if nr == N: <body ending in a return>``, then allows everything else. ``struct seccomp_data`` is
    {int nr; u32 arch; u64 ip; u64 args[6]}: argument i's low half is at offset 16 + 8 i (both arches little-endian).
    """
    if machine not in AUDIT_ARCH or sys.maxsize < 2**32:
        return None
    column, audit_arch = AUDIT_ARCH[machine]
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
    for name, numbers in SYSCALLS.items():
        body = bodies.get(name, [ret(eperm)])
        if numbers[column] is not None:
            program += [jeq(numbers[column], 0, len(body))] + body
    return program + [ret(allow)]


def install_seccomp(libc: ctypes.CDLL) -> list[str]:
    """PR_SET_NO_NEW_PRIVS (setuid binaries and file capabilities cannot raise privileges; also what lets an
    unprivileged process install a filter), then the seccomp filter of ``seccomp_program``."""

    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    done: list[str] = []
    ulong = ctypes.c_ulong
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, ulong(1), ulong(0), ulong(0), ulong(0)) != 0:
        return done
    done.append("no_new_privs")
    program = seccomp_program(os.uname().machine)
    if program is not None:
        fprog = SockFprog(len(program), (SockFilter * len(program))(*program))
        if libc.prctl(_PR_SET_SECCOMP, ulong(2), ctypes.byref(fprog), ulong(0), ulong(0)) == 0:  # SECCOMP_MODE_FILTER
            done.append("seccomp")
    return done
