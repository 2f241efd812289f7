"""Third-party output during builds (exporter and optimizer progress, compiler warnings) is captured unless
`--verbose` (SVDEXPORT_VERBOSE=1) asks for it: the user sees svdexport's own lines and one-line errors."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import warnings
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from typing import Iterator

ENV = "SVDEXPORT_VERBOSE"


def verbose() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


def set_verbose(on: bool) -> None:
    """Also for subprocesses and Ray workers, which inherit the environment."""
    if on:
        os.environ[ENV] = "1"
    else:
        os.environ.pop(ENV, None)


@contextmanager
def quiet() -> Iterator[None]:
    """Captures what runs inside at the file-descriptor level (native code prints there too), Python's
    warnings and log records below ERROR; discarded unless verbose."""
    if verbose():
        yield
        return
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    previous_disable = logging.root.manager.disable
    with tempfile.TemporaryFile() as sink, warnings.catch_warnings(), \
            redirect_stdout(open(os.devnull, "w")) as devout, redirect_stderr(devout):
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            devout.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            logging.disable(previous_disable)
            devout.close()
