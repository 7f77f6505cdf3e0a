"""The sandbox child's last, Python-level layer, stdlib only (it runs under ``python -s -S``): readable errors for
what the layers below refuse anyway (new processes, signals, network sockets). ``ctypes`` bypasses it.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable


def install_guard() -> None:
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
