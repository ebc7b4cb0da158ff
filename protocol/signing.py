"""Signed, hash-chained step records: the Ed25519 keys of a run's agents and what they sign.

A product's ProcessDocumentation is what a vendor or an auditor relies on once the run is over,
possibly years later and far from the plant. The run's HTTP tokens say who wrote a record *while
the run goes on*; they prove nothing afterwards. So each completed step record carries:

* ``Signature`` — the executing resource's Ed25519 signature of its execution
  (:func:`execution_payload`: product, step, resource, started, finished, outcome);
* ``SignerKey`` — that resource's public key, as it was when it signed;
* ``PreviousHash`` — the SHA-256 of the previous sealed step's link (:func:`link_payload`), or
  :data:`GENESIS` for the first: a removed, inserted or reordered step breaks the chain;
* ``Seal`` and ``SealKey`` — the product's signature of the link (so the chain itself cannot be
  recomputed by whoever edits the file) and the product's public key.

Everything signed is canonical JSON (sorted keys, no spaces, UTF-8) of lexical strings, the
values the record shows; times are normalised to their ``xs:double`` form so that a reader which
parses and re-serialises the AASX (basyx does) checks the same bytes.

Keys: a key per agent, derived from a secret of the run (``OUT/signing.secret``, mode 0600, kept
across resumes) with HMAC-SHA256 over the agent's name, so a resumed run — or another process of
the run — has the same keys without a key file per agent, and a product can check a resource's
signature the moment it arrives, without a lookup. ``OUT/keys.json`` records every public key
issued. As with the run's tokens, any process holding the run's secrets can sign as any agent:
the signatures do not separate the run's own processes from each other; they make the record
tamper-evident for everyone after the fact, checkable offline with the public keys alone (docs/security.md).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import os
import secrets
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

__all__ = [
    "GENESIS",
    "KEYS_FILE",
    "SECRET_ENV",
    "SECRET_FILE",
    "SIGNED_CHILDREN",
    "canonical",
    "execution_payload",
    "joined_signing_secret",
    "link_hash",
    "link_payload",
    "private_key",
    "public_key_text",
    "read_keys",
    "run_signing_secret",
    "sign",
    "verify_signature",
    "write_keys",
]

#: The PreviousHash of a product's first sealed step.
GENESIS = "0" * 64
#: The children of a step record this module adds (and a resource may write: Signature, SignerKey).
SIGNED_CHILDREN = ("Signature", "SignerKey", "PreviousHash", "Seal", "SealKey")
#: The public keys of a run's agents, in its output folder: ``{agent: [base64 key, ...]}``.
KEYS_FILE = "keys.json"
#: The secret the run's keys derive from, in its output folder (mode 0600), kept across resumes.
SECRET_FILE = "signing.secret"
#: A process joining a run without its folder (``vendor serve --registry URL``) takes the run's
#: signing secret from this variable, as it takes the token secret from ``TWINBID_HTTP_SECRET``.
SECRET_ENV = "TWINBID_SIGNING_SECRET"
_LABEL = b"twinbid step-record signing key v1:"


def canonical(data: dict[str, Any]) -> bytes:
    """Canonical JSON: sorted keys, no whitespace, UTF-8."""
    return orjson.dumps(data, option=orjson.OPT_SORT_KEYS)


@lru_cache(maxsize=4096)
def private_key(secret: str, agent: str) -> Ed25519PrivateKey:
    """Agent ``agent``'s signing key in the run whose secret is ``secret`` (the same in every process)."""
    seed = hmac.new(secret.encode(), _LABEL + agent.encode(), hashlib.sha256).digest()
    return Ed25519PrivateKey.from_private_bytes(seed)


@lru_cache(maxsize=4096)
def public_key_text(secret: str, agent: str) -> str:
    """The base64 of ``agent``'s raw 32-byte public key."""
    raw = private_key(secret, agent).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def sign(secret: str, agent: str, payload: dict[str, Any]) -> str:
    """Base64 Ed25519 signature of ``payload``'s canonical JSON by ``agent``."""
    return base64.b64encode(private_key(secret, agent).sign(canonical(payload))).decode()


@lru_cache(maxsize=4096)
def _public_key(key_text: str) -> Ed25519PublicKey:
    """A key parsed once: a product checks every completion of the same few resources."""
    return Ed25519PublicKey.from_public_bytes(base64.b64decode(key_text, validate=True))


def verify_signature(key_text: str, signature: str, payload: dict[str, Any]) -> str | None:
    """None when ``signature`` is ``key_text``'s signature of ``payload``; otherwise why not."""
    try:
        key = _public_key(key_text)
        sig = base64.b64decode(signature, validate=True)
    except ValueError as exc:
        return f"malformed key or signature ({exc})"
    try:
        key.verify(sig, canonical(payload))
    except InvalidSignature:
        return "the signature does not match the signed fields and the key"
    return None


def _time(text: str | None) -> str | None:
    """A time as ``xs:double`` text normalised (``12`` and ``12.0`` are one value); other text as is."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return text
    return repr(value) if math.isfinite(value) else text


def execution_payload(
    product: str,
    step: int,
    resource: str | None,
    started: str | None,
    finished: str | None,
    outcome: str | None,
) -> dict[str, Any]:
    """What the executing resource signs."""
    return {
        "product": product,
        "step": int(step),
        "resource": resource,
        "started": _time(started),
        "finished": _time(finished),
        "outcome": outcome,
    }


def link_payload(
    product: str, step: int, previous: str, signature: str, signer: str | None, signer_key: str
) -> dict[str, Any]:
    """What the product seals for a step: its place in the chain and the resource's signature."""
    return {
        "product": product,
        "step": int(step),
        "previous": previous,
        "signature": signature,
        "signer": signer,
        "signer_key": signer_key,
    }


def link_hash(link: dict[str, Any]) -> str:
    """The hex SHA-256 of a link's canonical JSON (the next step's PreviousHash)."""
    return hashlib.sha256(canonical(link)).hexdigest()


def read_keys(folder: Path) -> dict[str, set[str]] | None:
    path = folder / KEYS_FILE
    if not path.exists():
        return None
    return {agent: set(keys) for agent, keys in json.loads(path.read_text()).items()}


def write_keys(folder: Path, keys: Mapping[str, str]) -> Path:
    """Add ``keys`` (agent -> public key) to the folder's keys.json; keys recorded before stay (a resume)."""
    path = folder / KEYS_FILE
    known: dict[str, list[str]] = json.loads(path.read_text()) if path.exists() else {}
    for agent, key in keys.items():
        if key not in known.setdefault(agent, []):
            known[agent].append(key)
    path.write_text(json.dumps(known, indent=1, sort_keys=True))
    return path


def run_signing_secret(folder: Path) -> str:
    """The run's signing secret: read from ``folder`` (a resume) or made and saved there (0600)."""
    path = folder / SECRET_FILE
    if path.exists():
        return path.read_text().strip()
    folder.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret)
    return secret


def joined_signing_secret(plant: Path | None) -> str | None:
    """The signing secret of a run another process joins: ``TWINBID_SIGNING_SECRET``, else the one
    saved in its output folder (``plant`` is that folder or its ``plant.json``); None if neither."""
    given = os.environ.get(SECRET_ENV)
    if given:
        return given
    if plant is None:
        return None
    path = (plant if plant.is_dir() else plant.parent) / SECRET_FILE
    return path.read_text().strip() if path.exists() else None
