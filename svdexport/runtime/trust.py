"""Engine signatures: Ed25519 (through `cryptography`) over the exact bytes of manifest.json.

An engine is code (AOTInductor packages are native libraries; programs are unpickled), so its manifest's
own digest only catches accidents: anyone can recompute it. A signature by a key the user trusts cannot
be recomputed. The manifest lists the sha256 of every file the backends open, so signing the manifest
signs the whole engine.

- `svdexport keygen --out KEY`: KEY (private, PKCS#8 PEM, mode 0600) and KEY.pub (public, PEM).
- `svdexport sign ENGINE --key KEY`: ENGINE/signature.json = {format, key_id, manifest_sha256, signature}.
- `svdexport.load(ENGINE, trusted_keys=[...])`, `--trusted-key PUB` or SVDEXPORT_TRUSTED_KEYS=PUB1:PUB2:
  the engine must be signed by one of these keys, or it is refused before anything else is read.

The variable fails closed: set, it requires a signature on every load; set but naming no key ("", ":"), it
refuses every load. No caller switches it off: `trusted_keys=[]` names no key, so the variable decides.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

from svdexport.errors import SvdExportError
from svdexport.files import atomic_file, read_json, remove_stale

SIGNATURE = "signature.json"
FORMAT = "svdexport.signature/1"
ENV = "SVDEXPORT_TRUSTED_KEYS"  # os.pathsep-separated public key files; when set, every load needs a signature


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise SvdExportError("signatures need the cryptography package: pip install cryptography") from None
    return serialization, ed25519


def key_id(public_key) -> str:
    serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def keygen(out: Path, force: bool = False) -> tuple[Path, Path]:
    """A new Ed25519 key pair: `out` (private, 0600) and `out.pub`."""
    serialization, ed25519 = _crypto()
    out = Path(out)
    pub = out.with_name(out.name + ".pub")
    for p in (out, pub):
        if p.exists() and not force:
            raise SvdExportError(f"{p} exists; choose another --out or pass --force")
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    # Created 0600 from the start: the private key is never readable by others, not even briefly.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(private)
        os.chmod(tmp, 0o600)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    with atomic_file(pub) as t:
        t.write_bytes(public)
    return out, pub


def load_private(path: Path):
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise SvdExportError(f"cannot read the private key {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SvdExportError(f"{path} is not an Ed25519 private key (make one with svdexport keygen)")
    return key


def load_public(path: Path):
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError, TypeError) as e:
        raise SvdExportError(f"cannot read the trusted key {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise SvdExportError(f"{path} is not an Ed25519 public key (svdexport keygen writes KEY.pub)")
    return key


def trusted_keys(given: list | None = None) -> list[Path]:
    """The public key files to trust; a load then requires a signature by one of them ([]: none required).

    `given` (the API's trusted_keys, --trusted-key) when it names a key; else (None or []) SVDEXPORT_TRUSTED_KEYS:
    unset, no key; set, its keys, and set but naming none ("", ":") refuses in one line, so that a variable
    meant to require signatures never lets an unsigned engine through."""
    if given:
        return [Path(p) for p in given]
    env = os.environ.get(ENV)
    if env is None:
        return []
    keys = [Path(p) for p in env.split(os.pathsep) if p.strip()]
    if not keys:
        raise SvdExportError(f"{ENV} is set but names no public key file ({env[:40]!r}): every load is refused; set it "
                             f"to key files joined by {os.pathsep!r}, or unset it to load unsigned engines")
    return keys


def sign(folder: Path, key_path: Path) -> dict:
    """Writes folder/signature.json over the manifest's bytes. The caller has verified the engine first."""
    from svdexport.outputs import MANIFEST  # the name alone: trust reads bytes and paths, never a manifest's fields

    key = load_private(key_path)
    remove_stale(Path(folder) / SIGNATURE)  # a killed sign's .signature.json.tmp-PID (dead processes' only)
    manifest = (Path(folder) / MANIFEST).read_bytes()
    record = {"format": FORMAT, "key_id": key_id(key.public_key()),
              "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
              "signature": base64.b64encode(key.sign(manifest)).decode()}
    with atomic_file(Path(folder) / SIGNATURE) as tmp:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def verify(folder: Path, manifest_bytes: bytes, keys: list[Path]) -> str:
    """Refuses, in one line, an engine whose manifest bytes are not signed by one of `keys`; returns the
    signing key's id."""
    from cryptography.exceptions import InvalidSignature

    publics = [load_public(k) for k in keys]
    path = Path(folder) / SIGNATURE
    if not path.is_file():
        raise SvdExportError(f"engine {folder} is not signed ({SIGNATURE} is missing) and a signature is required")
    try:
        record = read_json(path)  # not UTF-8, too deep, a huge integer: one line (SvdExportError)
        signature = base64.b64decode(record["signature"], validate=True)
        if record.get("format") != FORMAT:
            raise ValueError(f"format is not {FORMAT}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SvdExportError(f"{path} is unreadable: {str(e).splitlines()[0]}") from None
    for public in publics:
        try:
            public.verify(signature, manifest_bytes)
            return key_id(public)
        except InvalidSignature:
            continue
    raise SvdExportError(f"engine {folder}: its signature does not match its manifest under any trusted key "
                         f"({', '.join(str(k) for k in keys)}); the engine or its signature was changed, or it was "
                         "signed by another key")
