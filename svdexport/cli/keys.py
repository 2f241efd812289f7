"""`svdexport keygen` (an Ed25519 key pair) and `svdexport sign ENGINE` (a signature over its manifest, which
lists every file's sha256): see the README's Security section."""

from __future__ import annotations

import argparse
from pathlib import Path

from svdexport.cli.common import add_engine, add_force


def add_keygen(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="private key file (mode 0600); the public key goes to OUT.pub")
    add_force(p, "key files")
    p.set_defaults(func=cmd_keygen)


def add_sign(p: argparse.ArgumentParser) -> None:
    add_engine(p)
    p.add_argument("--key", required=True, help="private key file from svdexport keygen")
    p.set_defaults(func=cmd_sign)


def cmd_keygen(a: argparse.Namespace) -> None:
    from svdexport.runtime import trust

    private, public = trust.keygen(Path(a.out), force=a.force)
    print(f"wrote {private} (private key, keep it secret) and {public} (public key, for --trusted-key)")


def cmd_sign(a: argparse.Namespace) -> None:
    from svdexport.runtime import trust

    verify_files(Path(a.engine))  # never sign an engine whose files fail their hashes
    record = trust.sign(Path(a.engine), Path(a.key))
    print(f"signed {a.engine} with key {record['key_id']} ({trust.SIGNATURE}, manifest sha256 "
          f"{record['manifest_sha256'][:16]}...)")


def verify_files(folder: Path) -> None:
    """Every file the engine's manifest lists, hashed against it (one line naming a missing or changed one).

    Signing covers the manifest's bytes and the files they name by sha256; nothing in the engine runs, so this
    reads the manifest as JSON (its format and its own digest checked), not as the typed record a load reads
    (whose field types import torch and the families): a load also checks every field, signed or not."""
    from svdexport.errors import SvdExportError
    from svdexport.files import parse_json
    from svdexport.outputs import MANIFEST, manifest_digest
    from svdexport.verified import VerifiedSet

    path = folder / MANIFEST
    if not folder.is_dir():
        raise SvdExportError(f"engine folder not found: {folder}")
    if not path.is_file():
        raise SvdExportError(f"{folder} is not an svdexport engine: {MANIFEST} is missing")
    data = parse_json(path.read_bytes(), path)
    if not isinstance(data, dict) or not str(data.get("format", "")).startswith("svdexport.engine"):
        raise SvdExportError(f"{path} is not an svdexport engine manifest")
    if data.get("manifest_sha256") != manifest_digest(data):
        raise SvdExportError(f"{path} was edited after the build (its digest does not match); rebuild the engine")
    files = data.get("files")
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise SvdExportError(f"{path} is not an svdexport engine manifest (no list of files and their sha256)")
    VerifiedSet(folder, files, what="engine file", against="the manifest").close()
