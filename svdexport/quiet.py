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


# Loggers whose import-time warnings say nothing to an svdexport user once torchao (the quantize extra) is
# installed: diffusers imports it with its models; torchao logs the CUDA kernels it cannot load on a CPU and
# torch its enums' pytree deprecation, and diffusers that torchao 0.18 moved tensor classes it looks for.
IMPORT_NOISE = ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer")


def hush_import_noise() -> None:
    """Raises IMPORT_NOISE's loggers to ERROR unless verbose (before anything imports them: levels stay set)."""
    for name in IMPORT_NOISE:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose() else logging.ERROR)


def verbose() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


def set_verbose(on: bool) -> None:
    """Also for subprocesses and Ray workers, which inherit the environment."""
    if on:
        os.environ[ENV] = "1"
    else:
        os.environ.pop(ENV, None)
    hush_import_noise()


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
