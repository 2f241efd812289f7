"""What every command shares before its work: one-line argparse errors, --force, the trust options, a peek at
an engine's manifest, and the JSON report files. Imports nothing heavy: the parser is built from here."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from svdexport.errors import SvdExportError


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as the one line `svdexport: error: ...` (exit 2) every other error has,
    instead of the usage block. Subcommand parsers inherit it (add_subparsers uses this class)."""

    def error(self, message: str):
        sub = self.prog.removeprefix("svdexport").strip()
        self.exit(2, f"svdexport: error: {sub + ': ' if sub else ''}{message} (see {self.prog} --help)\n")


class Gone(argparse.Action):
    """An option that was removed: hidden from --help, and answered with a one-line hint if given."""

    def __init__(self, option_strings, dest, hint: str = "", **kwargs):
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS, **kwargs)
        self.hint = hint

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} {self.hint}")


def gone(p: argparse.ArgumentParser, hints: dict[str, str]) -> None:
    for option, hint in hints.items():
        p.add_argument(option, action=Gone, hint=hint)


def add_force(p: argparse.ArgumentParser, what: str = "output files") -> None:
    p.add_argument("--force", action="store_true", help=f"replace existing {what} that svdexport did not write")


def add_engine(p: argparse.ArgumentParser, extra: str = "") -> None:
    p.add_argument("engine", help=f"engine folder written by build{extra}")


def int_list(text: str | None, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(i) for i in text.split(",")) if text else ()
    except ValueError:
        raise SvdExportError(f"{option} must be a comma list of integers, got {text!r}") from None


def add_trust_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("trust (engines are code: see the README's Security section)")
    g.add_argument("--require-signature", action="store_true",
                   help="refuse an engine that is not signed by a trusted key (svdexport sign)")
    g.add_argument("--trusted-key", action="append", metavar="PUB", default=None,
                   help="public key file (svdexport keygen's KEY.pub) whose signatures are trusted; repeatable; "
                        "implies --require-signature (default: the SVDEXPORT_TRUSTED_KEYS environment variable)")


def apply_trust_args(a: argparse.Namespace) -> list[Path]:
    """The keys to trust for this command, checked before any work. They go into SVDEXPORT_TRUSTED_KEYS, so
    that every load in this process and in the workers it starts (batch) requires the signature."""
    from svdexport.runtime import trust

    keys = trust.trusted_keys(a.trusted_key)
    if a.require_signature and not keys:
        raise SvdExportError(f"--require-signature needs --trusted-key PUB or {trust.ENV}")
    for k in keys:
        trust.load_public(k)
    if keys:
        os.environ[trust.ENV] = os.pathsep.join(str(Path(k).resolve()) for k in keys)
    return keys


def peek(engine: str):
    """The engine's manifest, read for the options' checks only (no hashing, any library versions): a missing
    or damaged engine fails here, before the work."""
    from svdexport.runtime import manifest

    return manifest.read(Path(engine), check_versions=False, hash_files=False)


def check_outputs(named: list[tuple[str, str | Path | None]], force: bool) -> None:
    from svdexport.outputs import check_files

    check_files(named, force)


def write_json(path: str | None, report) -> None:
    if path:
        from svdexport.media import json_text, write_text

        write_text(json_text(report), Path(path))
