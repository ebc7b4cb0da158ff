"""Vendors, their API keys, and per-vendor rate limits.

* **Keys are stored hashed.** ``hash_api_key`` gives ``scrypt:<n>:<r>:<p>:<salt>:<hash>`` (salted, memory-hard;
  the default), ``pbkdf2_sha256:<iterations>:<salt>:<hash>`` is accepted too, and so is the scenario format
  ``sha256:<hex>`` (unsalted — fine only for long random keys such as those ``generate_api_key`` makes).
  Comparisons are constant-time (``hmac.compare_digest``).
* **Finding the vendor of a key**: keys made by ``generate_api_key`` carry the vendor name
  (``tbk_<vendor>_<random>``), so only that vendor's hash is tried; other keys are tried against every vendor.
  A verified key is remembered (by a keyed digest, never the key itself) so the slow hash runs once per key
  and process.
* **Vendors** come from a vendors file (YAML or JSON, see docs/vendors.md) or from a scenario's ``vendors``
  list. ``api_key_env`` names an environment variable holding the key, read when the directory is built.
* **Rate limits** are token buckets per vendor and kind of request (``submit``: new orders; ``read``: status
  queries), and one per client address for failed logins; an empty bucket answers 429 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "Authenticator",
    "Rate",
    "RateLimiter",
    "TokenBucket",
    "VendorConfig",
    "VendorDirectory",
    "VendorFileError",
    "derive_webhook_secret",
    "generate_api_key",
    "hash_api_key",
    "verify_api_key",
]

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
PBKDF2_ITERATIONS = 600_000
_KEY_CHARS = re.compile(r"^[\x21-\x7e]{8,512}$")  # printable ASCII, no spaces
_SHORT_NAME = re.compile(r"^[a-z0-9-]+$")


# ---------------------------------------------------------------------------------------------------------------------
# key hashing
# ---------------------------------------------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def generate_api_key(vendor: str) -> str:
    """A new random key that names its vendor: ``tbk_<vendor>_<43 random characters>`` (256 bits)."""
    if not _SHORT_NAME.match(vendor):
        raise ValueError(f"invalid vendor name {vendor!r}: expected [a-z0-9-]+")
    return f"tbk_{vendor}_{secrets.token_urlsafe(32)}"


def key_vendor(key: str) -> str | None:
    """The vendor a ``generate_api_key`` key names (None for other keys)."""
    if key.startswith("tbk_"):
        parts = key.split("_", 2)
        if len(parts) == 3 and _SHORT_NAME.match(parts[1]):
            return parts[1]
    return None


def hash_api_key(key: str, *, method: str = "scrypt", salt: bytes | None = None) -> str:
    """Salted hash of an API key for the vendors file (``scrypt`` by default, or ``pbkdf2_sha256``)."""
    salt = salt if salt is not None else os.urandom(16)
    if method == "scrypt":
        dk = hashlib.scrypt(key.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
        return f"scrypt:{SCRYPT_N}:{SCRYPT_R}:{SCRYPT_P}:{_b64(salt)}:{_b64(dk)}"
    if method == "pbkdf2_sha256":
        dk = hashlib.pbkdf2_hmac("sha256", key.encode(), salt, PBKDF2_ITERATIONS)
        return f"pbkdf2_sha256:{PBKDF2_ITERATIONS}:{_b64(salt)}:{_b64(dk)}"
    if method == "sha256":  # the scenario file's format (unsalted): only for long random keys
        return "sha256:" + hashlib.sha256(key.encode()).hexdigest()
    raise ValueError(f"unknown hash method {method!r} (scrypt, pbkdf2_sha256 or sha256)")


_HASH_FORMATS = (
    re.compile(r"^scrypt:(\d+):(\d+):(\d+):([A-Za-z0-9_-]+):([A-Za-z0-9_-]+)$"),
    re.compile(r"^pbkdf2_sha256:(\d+):([A-Za-z0-9_-]+):([A-Za-z0-9_-]+)$"),
    re.compile(r"^sha256:[0-9a-f]{64}$"),
)


def check_hash_format(stored: str) -> str:
    """Raise ValueError unless ``stored`` is a supported hash with sane cost parameters."""
    m = _HASH_FORMATS[0].match(stored)
    if m:
        n, r, p = (int(m.group(i)) for i in (1, 2, 3))
        if n < 2**10 or n > 2**20 or n & (n - 1) or not 1 <= r <= 32 or not 1 <= p <= 16:
            raise ValueError("scrypt parameters out of range (n a power of two 2^10..2^20, r 1..32, p 1..16)")
        return stored
    m = _HASH_FORMATS[1].match(stored)
    if m:
        if not 10_000 <= int(m.group(1)) <= 10_000_000:
            raise ValueError("pbkdf2_sha256 iterations must be 10,000..10,000,000")
        return stored
    if _HASH_FORMATS[2].match(stored):
        return stored
    raise ValueError(
        "expected scrypt:<n>:<r>:<p>:<salt>:<hash>, pbkdf2_sha256:<iterations>:<salt>:<hash> or sha256:<64 hex> "
        "(make one with `twinbid vendor hash-key`)"
    )


def verify_api_key(key: str, stored: str) -> bool:
    """Constant-time check of ``key`` against a stored hash (CPU-heavy for scrypt/pbkdf2: run in a thread)."""
    m = _HASH_FORMATS[0].match(stored)
    if m:
        n, r, p = (int(m.group(i)) for i in (1, 2, 3))
        expected = _unb64(m.group(5))
        dk = hashlib.scrypt(
            key.encode(),
            salt=_unb64(m.group(4)),
            n=n,
            r=r,
            p=p,
            dklen=len(expected),
            maxmem=256 * n * r * p + 2**20,
        )
        return hmac.compare_digest(dk, expected)
    m = _HASH_FORMATS[1].match(stored)
    if m:
        expected = _unb64(m.group(3))
        dk = hashlib.pbkdf2_hmac("sha256", key.encode(), _unb64(m.group(2)), int(m.group(1)), len(expected))
        return hmac.compare_digest(dk, expected)
    if stored.startswith("sha256:"):
        return hmac.compare_digest(hashlib.sha256(key.encode()).hexdigest(), stored[7:])
    return False


def derive_webhook_secret(api_key: str) -> str:
    """The webhook signing secret of a vendor without a configured one: HMAC-SHA256(api key, label), hex.

    The vendor computes the same from its own key (``twinbid vendor webhook-secret``); the service learns it
    when the vendor submits an order and keeps it (the key itself is never stored).
    """
    return hmac.new(api_key.encode(), b"twinbid-webhook-signing-v1", hashlib.sha256).hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# vendors
# ---------------------------------------------------------------------------------------------------------------------


class VendorFileError(ValueError):
    """The vendors file (or a scenario's vendors list) is not usable; the message says where and why."""


class Rate(BaseModel):
    """A token bucket: up to ``burst`` requests at once, refilled at ``per_second``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    burst: Annotated[int, Field(ge=1, le=100_000)]
    per_second: Annotated[float, Field(gt=0, le=100_000)]


class VendorConfig(BaseModel):
    """One vendor allowed to submit orders (an entry of the vendors file)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(pattern=r"^[a-z0-9-]+$", max_length=40)]
    #: Salted hash of the API key (``twinbid vendor hash-key``); or
    api_key_hash: str | None = None
    #: the environment variable holding the key (read when the service starts).
    api_key_env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None = None
    #: Default notification URL for this vendor's orders (an order may name its own).
    notify: str | None = None
    #: Webhook signing secret, from this environment variable (default: derived from the API key).
    webhook_secret_env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None = None
    #: A vendor whose ``api_key_env`` is not set is left out (and named in ``skipped``) instead of
    #: stopping the service: for example vendors a shipped scenario lists as an example.
    optional: bool = False
    #: Rate limits overriding the service's defaults.
    submit_rate: Rate | None = None
    read_rate: Rate | None = None

    @field_validator("api_key_hash")
    @classmethod
    def _hash(cls, value: str | None) -> str | None:
        return None if value is None else check_hash_format(value)

    @field_validator("notify")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"must be an http:// or https:// URL (got {value!r})")
        return value

    @model_validator(mode="after")
    def _one_key(self) -> VendorConfig:
        if (self.api_key_hash is None) == (self.api_key_env is None):
            raise ValueError("give exactly one of 'api_key_hash' and 'api_key_env'")
        return self


@dataclass
class _Vendor:
    config: VendorConfig
    key_hash: str  # what verify_api_key checks against
    webhook_secret: str | None = None


@dataclass
class VendorDirectory:
    """The vendors a service accepts, with their key hashes (env keys are hashed in memory on load)."""

    vendors: dict[str, _Vendor] = field(default_factory=dict)
    #: Optional vendors left out because their key variable is not set, with the variable.
    skipped: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_configs(
        cls,
        configs: Iterable[VendorConfig | Mapping[str, Any] | Any],
        *,
        env: Mapping[str, str] | None = None,
    ) -> VendorDirectory:
        """From ``VendorConfig`` objects, plain dicts, or a scenario's ``Vendor`` models (same field names)."""
        env = os.environ if env is None else env
        out = cls()
        problems: list[str] = []
        for i, raw in enumerate(configs):
            try:
                config = _to_config(raw)
            except ValidationError as exc:
                problems += [
                    f"vendors[{i}].{'.'.join(map(str, e['loc'])) or '(entry)'}: {e['msg']}"
                    for e in exc.errors()
                ]
                continue
            if config.name in out.vendors:
                problems.append(f"vendors[{i}].name: duplicate vendor {config.name!r}")
                continue
            key_hash = config.api_key_hash
            if key_hash is None:
                key = env.get(config.api_key_env or "")
                if not key and config.optional:
                    out.skipped[config.name] = config.api_key_env or ""
                    continue
                if not key:
                    problems.append(
                        f"vendors[{i}].api_key_env: environment variable {config.api_key_env} is not set"
                    )
                    continue
                key_hash = "sha256:" + hashlib.sha256(key.encode()).hexdigest()
            secret = None
            if config.webhook_secret_env:
                secret = env.get(config.webhook_secret_env)
                if not secret:
                    problems.append(
                        f"vendors[{i}].webhook_secret_env: environment variable {config.webhook_secret_env} is not set"
                    )
                    continue
            elif config.api_key_env:
                secret = derive_webhook_secret(env[config.api_key_env])
            out.vendors[config.name] = _Vendor(config, key_hash, secret)
        if problems:
            raise VendorFileError("; ".join(problems))
        return out

    @classmethod
    def from_file(cls, path: str | Path, *, env: Mapping[str, str] | None = None) -> VendorDirectory:
        """A vendors file: YAML or JSON, a list of vendors or ``{"vendors": [...]}``."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise VendorFileError(f"{path}: {exc.strerror or exc}") from None
        try:
            if path.suffix.lower() == ".json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text)
        except Exception as exc:
            raise VendorFileError(
                f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: {exc}"
            ) from None
        if isinstance(data, dict) and set(data) == {"vendors"}:
            data = data["vendors"]
        if not isinstance(data, list):
            raise VendorFileError(f"{path}: expected a list of vendors or {{vendors: [...]}}")
        try:
            return cls.from_configs(data, env=env)
        except VendorFileError as exc:
            raise VendorFileError(f"{path}: {exc}") from None

    def get(self, name: str) -> VendorConfig | None:
        v = self.vendors.get(name)
        return v.config if v else None

    def names(self) -> list[str]:
        return sorted(self.vendors)

    def configured_secret(self, name: str) -> str | None:
        v = self.vendors.get(name)
        return v.webhook_secret if v else None

    def __len__(self) -> int:
        return len(self.vendors)


def _to_config(raw: Any) -> VendorConfig:
    if isinstance(raw, VendorConfig):
        return raw
    if isinstance(raw, Mapping):
        return VendorConfig.model_validate(dict(raw))
    # a scenario Vendor (pydantic) or anything with the same attributes
    data = {k: getattr(raw, k, None) for k in ("name", "api_key_hash", "api_key_env", "notify", "optional")}
    return VendorConfig.model_validate({k: v for k, v in data.items() if v is not None})


class Authenticator:
    """API key -> vendor. Verified keys are cached by an HMAC with a per-process pepper."""

    def __init__(self, directory: VendorDirectory, *, cache_size: int = 4096) -> None:
        self.directory = directory
        self._pepper = os.urandom(32)
        self._cache: OrderedDict[bytes, str] = OrderedDict()
        self._cache_size = cache_size

    def _digest(self, key: str) -> bytes:
        return hmac.new(self._pepper, key.encode(), hashlib.sha256).digest()

    def cached(self, key: str) -> VendorConfig | None:
        name = self._cache.get(self._digest(key))
        return self.directory.get(name) if name else None

    async def verify(self, key: str) -> VendorConfig | None:
        """The vendor whose key this is, or None."""
        if not _KEY_CHARS.match(key):
            return None
        digest = self._digest(key)
        name = self._cache.get(digest)
        if name is not None and name in self.directory.vendors:
            self._cache.move_to_end(digest)
            return self.directory.get(name)
        named = key_vendor(key)
        if named is not None and named not in self.directory.vendors:
            return None  # a generated key of a vendor we do not know: no hash to try
        candidates = (
            [self.directory.vendors[named]] if named is not None else list(self.directory.vendors.values())
        )
        for vendor in candidates:
            stored = vendor.key_hash
            ok = (
                verify_api_key(key, stored)
                if stored.startswith("sha256:")
                else await asyncio.to_thread(verify_api_key, key, stored)
            )
            if ok:
                self._cache[digest] = vendor.config.name
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
                return vendor.config
        return None


# ---------------------------------------------------------------------------------------------------------------------
# rate limits
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class TokenBucket:
    capacity: float
    rate: float  # tokens per second
    tokens: float = -1.0
    updated: float = 0.0

    def take(self, now: float | None = None, cost: float = 1.0) -> float:
        """Take ``cost`` tokens; 0.0 if granted, otherwise the seconds until they would be there."""
        now = time.monotonic() if now is None else now
        if self.tokens < 0:
            self.tokens, self.updated = self.capacity, now
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= cost:
            self.tokens -= cost
            return 0.0
        return (cost - self.tokens) / self.rate


class RateLimiter:
    """Token buckets by (subject, kind); ``limits`` gives each kind's default :class:`Rate`."""

    def __init__(self, limits: Mapping[str, Rate], *, max_subjects: int = 100_000) -> None:
        self.limits = dict(limits)
        self._buckets: OrderedDict[tuple[str, str], TokenBucket] = OrderedDict()
        self._max = max_subjects

    def take(self, subject: str, kind: str, rate: Rate | None = None, now: float | None = None) -> float:
        """0.0 if allowed, else seconds to wait (for ``Retry-After``)."""
        key = (subject, kind)
        bucket = self._buckets.get(key)
        if bucket is None:
            r = rate or self.limits[kind]
            bucket = self._buckets[key] = TokenBucket(float(r.burst), r.per_second)
            if len(self._buckets) > self._max:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(now)

    def peek(self, subject: str, kind: str) -> bool:
        """True if ``subject`` has at least one token of ``kind`` left (takes nothing)."""
        bucket = self._buckets.get((subject, kind))
        if bucket is None or bucket.tokens < 0:
            return True
        now = time.monotonic()
        return min(bucket.capacity, bucket.tokens + (now - bucket.updated) * bucket.rate) >= 1.0


def retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))
