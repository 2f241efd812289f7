"""A line per long phase of the work (a torch.export, a compile, the ONNX checker and optimizer), with its
elapsed time, on stderr: `exporting the full graph (torch.export) ... 12.3 s`.

On a terminal the line counts up every second while the phase runs; elsewhere (a log, a pipe, a test's
capture) and under `--verbose` (whose third-party output a self-rewriting line would garble) the phase
prints one final line when it ends. A phase that fails prints nothing, and clears its terminal line, so that
the one-line error is the last line and stands alone. Phases are opened outside `quiet()`, whose capture
would swallow their lines; the terminal line is written to its own duplicate of the terminal's descriptor,
so `quiet()` inside a phase cannot swallow the updates either.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import IO, Iterator

from svdexport import quiet

ENV = "SVDEXPORT_PROGRESS"  # "0": no phase lines (a library caller that wants stderr for itself)
TICK_SECONDS = 1.0


def enabled() -> bool:
    return os.environ.get(ENV, "") != "0"


def line(what: str, seconds: float) -> str:
    return f"{what} ... {seconds:.1f} s"


@contextmanager
def phase(what: str, shown_from: float = 0.0) -> Iterator[None]:
    """Announces the work inside as `what`, with its elapsed time (see the module's docstring). A phase that is
    long only for large models (hashing, writing weights) gives `shown_from`: its final line is left out when
    it took less than that many seconds."""
    stream = sys.stderr
    if not enabled() or stream is None:
        yield
        return
    start = time.perf_counter()
    ticker = _Ticker(what, stream, start) if _live(stream) else None
    done = False
    try:
        yield
        done = True
    finally:
        seconds = time.perf_counter() - start
        final = line(what, seconds) if done and seconds >= shown_from else None
        if ticker is not None:
            ticker.stop(final)
        elif final is not None:
            print(final, file=stream, flush=True)


def _live(stream: IO[str]) -> bool:
    """A terminal, not verbose, and no other phase already counting on it (nested phases end in lines)."""
    try:
        return stream.isatty() and not quiet.verbose() and not _Ticker.running
    except (AttributeError, ValueError, OSError):  # a closed or replaced stream
        return False


class _Ticker:
    """Rewrites `what ... N s` in place every TICK_SECONDS from a daemon thread, on its own descriptor."""

    running = False

    def __init__(self, what: str, stream: IO[str], start: float):
        stream.flush()
        self.fd = os.dup(stream.fileno())
        self.what, self.start = what, start
        self.stopped = threading.Event()
        _Ticker.running = True
        self.thread = threading.Thread(target=self._tick, name="svdexport-progress", daemon=True)
        self.thread.start()

    def _write(self, text: str) -> None:
        try:
            os.write(self.fd, text.encode("utf-8", "replace"))
        except OSError:  # the terminal went away: the work goes on without its line
            pass

    def _tick(self) -> None:
        while True:
            self._write(f"\r{self.what} ... {time.perf_counter() - self.start:.0f} s\x1b[K")
            if self.stopped.wait(TICK_SECONDS):
                return

    def stop(self, final: str | None) -> None:
        self.stopped.set()
        self.thread.join()
        self._write("\r\x1b[K" + (final + "\n" if final is not None else ""))
        os.close(self.fd)
        _Ticker.running = False
