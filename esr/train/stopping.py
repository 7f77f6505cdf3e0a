"""A graceful first stop: the first Ctrl-C (SIGINT) or SIGTERM during the step loop lets the current step finish,
checkpoint and end the run with ``RunStopped``; a second one stops at once, as without esr's handlers
(``KeyboardInterrupt`` for SIGINT, death by the signal for SIGTERM), also where the process inherited the signal as
ignored (a shell script starts ``cmd &`` with SIGINT ignored).

The handlers are installed only while the step loop runs (``StopRequests`` is a context manager; the previous
handlers come back on exit) and only in the main thread, where Python delivers signals. A signal before the loop
(models loading) or after it keeps Python's behaviour. Several processes (torchrun): each process's flag is OR-ed
over the group after every step (``esr.train.distributed.any_process``), so every process stops after the same step.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
"""The CLI's exit code after a graceful stop: 128 + the signal's number, as a shell reports a process the signal
ended (130 for Ctrl-C, 143 for SIGTERM)."""


class RunStopped(KeyboardInterrupt):
    """The run stopped on request (the first Ctrl-C or SIGTERM) after a finished, checkpointed step; the folder
    resumes with ``esr train --resume RUN``. A ``KeyboardInterrupt``, so code that stops on Ctrl-C stops here too,
    and ``except Exception`` does not swallow it."""

    def __init__(self, signum: int, step: int, run_dir: Path, checkpoint: Path | None) -> None:
        self.signum, self.step, self.run_dir, self.checkpoint = signum, step, run_dir, checkpoint
        super().__init__(f"stopped after step {step} on {signal.Signals(signum).name} (checkpoint {checkpoint}); "
                         f"continue with: esr train --resume {run_dir}")

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(signal.Signals(self.signum), 128 + self.signum)


class StopRequests:
    """While entered: the first SIGINT or SIGTERM sets ``signum`` (and prints one line saying the run will stop
    after this step); a second one is handed to the handler that was there before (module docstring)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
            # os.write, not print: a handler may run while the main thread is inside a buffered write to stderr.
            os.write(2, f"esr: {signal.Signals(signum).name} received: stopping after this step and writing a "
                        "checkpoint (send it again to stop at once)\n".encode())
            return
        previous = self._previous.get(signum, signal.SIG_DFL)
        self.__exit__(None, None, None)  # from here on, what was there before handles every signal
        if callable(previous):
            previous(signum, frame)  # SIGINT's default_int_handler raises KeyboardInterrupt
        elif signum == signal.SIGINT:  # inherited as ignored (a script's `cmd &`): a second Ctrl-C still stops
            raise KeyboardInterrupt
        else:  # the default action, even where the signal was inherited as ignored: SIGTERM ends the process
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
