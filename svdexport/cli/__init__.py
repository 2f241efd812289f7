"""Command line, one module per pipeline stage: `svdexport build | calibrate` (cli/build.py, option groups in
cli/options.py), `run` (cli/run.py), `compare`, `batch`, `bench latency | lora | shapes | speedup | scaling`
(cli/bench.py), `keygen` and `sign` (cli/keys.py).

Imports are lazy: the parser of a subcommand is filled in only when that subcommand is named (or the whole
tree is asked for, `parser()`), and a command imports what its work needs when it runs, so that
`svdexport --help`, keygen and sign never import torch, diffusers or the families.

User errors (SvdExportError, bad arguments) and I/O faults (OSError) print one line and exit with status 2;
nothing else is caught, so a bug still shows its traceback. Every command checks its options and output
paths before its work."""

from __future__ import annotations

import os
import sys
from importlib import import_module

from svdexport import quiet
from svdexport.cli.common import Parser
from svdexport.errors import SvdExportError, one_line

# name -> (module under svdexport.cli, the function that fills its parser, one-line help)
COMMANDS = {
    "build": ("build", "add_build", "calibrate the bases (or take them from calibrate) and build an engine folder"),
    "calibrate": ("build", "add_calibrate", "only compute the low-rank bases (a .safetensors file for build --bases)"),
    "run": ("run", "add_run", "generate with an engine; writes the image or video and the latents"),
    "compare": ("compare", "add_compare", "quality and speed against eager, every predictor and the peer libraries, "
                "at matched full steps"),
    "batch": ("batch", "add_batch", "generate a prompt or class list across Ray workers (resumable)"),
    "bench": ("bench", "add_bench", "measure an engine: latency (bench ENGINE), lora, shapes, speedup, scaling"),
    "keygen": ("keys", "add_keygen", "make an Ed25519 key pair for signing engines"),
    "sign": ("keys", "add_sign", "sign an engine's manifest (which lists every file's sha256) with a private key"),
}
LIGHT = ("keygen", "sign")  # commands that need no model library (torch, diffusers) set up


def parser(argv: list[str] | None = None) -> Parser:
    """The parser; with `argv`, only the subcommand it names is filled in (the others stay bare)."""
    p = Parser(prog="svdexport", description="SVD-Cache DiT engines: build, calibrate, run, compare, batch, bench; "
               "keygen and sign for trusted engines.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    named = None if argv is None else next((x for x in argv if not x.startswith("-")), "")
    for name, (module, fill, text) in COMMANDS.items():
        s = sub.add_parser(name, help=text, description=text)
        if named is None or named == name:
            getattr(import_module(f"svdexport.cli.{module}"), fill)(s)
    return p


def _bench_default(argv: list[str]) -> list[str]:
    """`bench ENGINE ...` is `bench latency ENGINE ...`."""
    from svdexport.cli.bench import SUBCOMMANDS

    if argv[:1] == ["bench"] and (len(argv) == 1 or argv[1] not in (*SUBCOMMANDS, "-h", "--help")):
        return ["bench", "latency", *argv[1:]]
    return argv


def _quiet_libraries() -> None:
    import warnings

    from diffusers.utils import logging as diffusers_logging

    # torch.export's pytree emits this FutureWarning through copyreg on every save; it is not the user's concern.
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()  # loading bars; svdexport shows its own for long work
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    argv = _bench_default(list(sys.argv[1:] if argv is None else argv))
    try:
        args = parser(argv).parse_args(argv)
    except SystemExit as e:  # --help (0) or argparse's one-line error (2), already printed
        return e.code if isinstance(e.code, int) else 2
    except SvdExportError as e:  # a subcommand's parser could not be built (a family's metadata unreadable)
        print(f"svdexport: error: {one_line(e)}", file=sys.stderr)
        return 2
    if args.command not in LIGHT:
        _quiet_libraries()
    from svdexport.runtime import trust  # after the parse: --help needs nothing of the runtime

    # Options that commands pass on through the environment (to their workers) end with the command.
    saved = {k: os.environ.get(k) for k in (trust.ENV, quiet.ENV)}
    try:
        args.func(args)
    except (SvdExportError, OSError) as e:  # OSError: a full disk, EIO; the atomic writes kept the old files
        print(f"svdexport: error: {one_line(e, getattr(args, 'out', None))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("svdexport: interrupted", file=sys.stderr)
        return 130
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return 0
