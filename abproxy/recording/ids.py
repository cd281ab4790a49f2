"""Request ids that carry what feedback needs, so a request writes no record of its own.

An experiment request's id is ``r1.`` and the base64url of: flags, issue time, a random nonce,
the unit's hash (as in Redis key names: never the user id itself), the experiment and the arm,
then a MAC (keyed BLAKE2b, 12 bytes) over all of it with a secret created once in Redis
(``SET NX``) and shared by every replica (which also keep every secret ever used, should Redis
lose it: :class:`Signers`). Feedback verifies the MAC and finds everything in the
id; an id that fails verification is refused, and one older than ``feedback_ttl_s`` has expired.

The upstream's own response id (``chatcmpl-...``) is mapped to the request through a compact
alias (:func:`alias_value`): the id's binary part without its MAC, experiment or arm name (the
arm's definition hash stands for it), stored in per-hour hash buckets (``layout.alias_key``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import struct
import time
from dataclasses import dataclass
from typing import Any

PREFIX = "r1."
MAX_ID_LENGTH = 256
"""The longest request id abproxy issues or accepts in a feedback post."""
SECRET_KEY = "abproxy:{ids}:secret"
"""The secret new ids are signed with: its own hash tag, created by the first replica to ask."""
SECRETS_KEY = "abproxy:{ids}:secrets"
"""Every secret an id may have been signed with (by fingerprint): each replica publishes those it
knows, so that ids issued before Redis lost its data (a restart without persistence) and ids
signed by a replica that came up meanwhile with a new secret all verify everywhere."""
MAC_BYTES = 12
NONCE_BYTES = 6
"""With the issue time (s), what tells requests apart (it names a request's feedback): among n
ids issued in one second two share it with probability ~n²/2⁴⁹ — at 1,000 requests/s once in
~18 years, at 10,000/s once in ~2 months (their scores would then count as one). Unguessable
ids come from the MAC, not from it."""
UNIT_BYTES = 16
_FORCED, _TRACED, _UNIT = 1, 2, 4
_HEAD = struct.Struct(">BI")  # flags, issued at (unix s)
DEFINITION_HASH_BYTES = 6
"""An arm id is ``variant@<12 hex digits>``: the alias keeps the first 3 of its 6 bytes, not the
name; they tell the experiment's arms apart (an alias matching two arms is not used)."""
ALIAS_ARM_BYTES = 3


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class SignedId:
    experiment: str
    arm: str
    unit: str | None
    """The unit's hash (32 hex digits), as in the unit's Redis key."""
    forced: bool
    traced: bool
    issued_at: int
    nonce: bytes

    @property
    def variant(self) -> str:
        return self.arm.rpartition("@")[0]

    @property
    def feedback_id(self) -> str:
        """Short and unique: names the request's feedback hash in Redis."""
        return "s" + _b64(self.issued_at.to_bytes(4, "big") + self.nonce)

    @property
    def trace_id(self) -> str | None:
        if not self.traced:
            return None
        return "tr-" + hashlib.sha256(b"trace:" + self.feedback_id.encode()).hexdigest()[:32]

    def core(self) -> bytes:
        """Flags, issue time, nonce and unit: what the alias keeps."""
        flags = (_FORCED if self.forced else 0) | (_TRACED if self.traced else 0) | (_UNIT if self.unit else 0)
        unit = bytes.fromhex(self.unit) if self.unit else b""
        return _HEAD.pack(flags, self.issued_at) + self.nonce + unit


def _parse_core(raw: bytes) -> tuple[bool, bool, int, bytes, str | None, bytes]:
    """(forced, traced, issued at, nonce, unit, the rest) from bytes that begin with a core."""
    flags, issued = _HEAD.unpack_from(raw)
    at = _HEAD.size
    nonce = raw[at : at + NONCE_BYTES]
    at += NONCE_BYTES
    unit = None
    if flags & _UNIT:
        unit = raw[at : at + UNIT_BYTES].hex()
        at += UNIT_BYTES
    if len(nonce) != NONCE_BYTES or (unit is not None and len(unit) != 2 * UNIT_BYTES):
        raise ValueError("truncated")
    return bool(flags & _FORCED), bool(flags & _TRACED), issued, nonce, unit, raw[at:]


class Signer:
    """Issues and verifies request ids with the secret shared through Redis."""

    def __init__(self, secret: bytes):
        self.secret = secret
        # keyed BLAKE2b is a MAC by design, and 4x faster here than HMAC-SHA256 (on the request
        # path); copying a keyed state skips hashing the key block again for every id
        self._keyed = hashlib.blake2b(key=secret[:64], digest_size=MAC_BYTES)
        self._pool = b""
        self._offset = 0
        self._tails: dict[tuple[str, str], tuple[bytes, int] | None] = {}
        """(experiment, arm) → the id's last part and its length before the core, or None when
        too long for an id."""

    def _mac(self, body: bytes) -> bytes:
        mac = self._keyed.copy()
        mac.update(body)
        return mac.digest()

    def _nonce(self) -> bytes:
        """From the OS's CSPRNG, drawn in bulk (as http.RequestIds does)."""
        if self._offset >= len(self._pool):
            self._pool, self._offset = os.urandom(NONCE_BYTES * 256), 0
        self._offset += NONCE_BYTES
        return self._pool[self._offset - NONCE_BYTES : self._offset]

    def issue(self, experiment: str, arm: str, unit: str | None, forced: bool, traced: bool, max_length: int) -> SignedId | None:
        """A new id, or None if it would be longer than ``max_length`` (very long names)."""
        tail = self._tail(experiment, arm)
        if tail is None:
            return None
        # base64 of the body and MAC: 4 characters per 3 bytes
        size = _HEAD.size + NONCE_BYTES + (UNIT_BYTES if unit else 0) + tail[1]
        if len(PREFIX) + (4 * (size + MAC_BYTES) + 2) // 3 > max_length:
            return None
        return SignedId(experiment, arm, unit, forced, traced, int(time.time()), self._nonce())

    def _tail(self, experiment: str, arm: str) -> tuple[bytes, int] | None:
        key = (experiment, arm)
        if key not in self._tails:
            name = experiment.encode()
            tail = bytes([len(name)]) + name + arm.encode() if len(name) <= 255 else None
            self._tails[key] = (tail, len(tail)) if tail is not None else None
        return self._tails[key]

    def encode(self, signed: SignedId) -> str:
        tail = self._tail(signed.experiment, signed.arm)
        assert tail is not None, "issue() refuses names that do not fit"
        body = signed.core() + tail[0]
        return PREFIX + _b64(body + self._mac(body))

    def verify(self, request_id: str) -> SignedId | None:
        """The id's contents, or None if it was not issued with this secret (forged, altered).
        Only the spelling it was issued in verifies: base64 decoders skip stray characters and
        padding, and two spellings of one id must not both be accepted."""
        if not request_id.startswith(PREFIX):
            return None
        encoded = request_id[len(PREFIX) :]
        try:
            raw = unb64(encoded)
        except ValueError:
            return None
        if _b64(raw) != encoded:
            return None
        body, mac = raw[:-MAC_BYTES], raw[-MAC_BYTES:]
        if len(mac) != MAC_BYTES or not hmac.compare_digest(mac, self._mac(body)):
            return None
        try:
            forced, traced, issued, nonce, unit, rest = _parse_core(body)
            size = rest[0]
            experiment, arm = rest[1 : 1 + size].decode(), rest[1 + size :].decode()
        except (ValueError, IndexError, struct.error, UnicodeDecodeError):
            return None
        return SignedId(experiment, arm, unit, forced, traced, issued, nonce)


def looks_signed(request_id: str) -> bool:
    return request_id.startswith(PREFIX)


def alias_value(signed: SignedId) -> str:
    """What the response id's alias keeps: with the experiment (its bucket's) and the secret, the
    request id again. The arm is kept as its definition hash when it has one."""
    _, sep, definition = signed.arm.rpartition("@")
    try:
        raw = bytes.fromhex(definition) if sep else b""
    except ValueError:
        raw = b""
    if len(raw) != DEFINITION_HASH_BYTES:
        return _b64(signed.core()) + "~" + signed.arm
    return _b64(signed.core() + raw[:ALIAS_ARM_BYTES])


def from_alias(experiment: str, value: str, arms: Any) -> SignedId | None:
    """The request an alias points to; ``arms`` lists the experiment's arm ids (to find the arm
    by its definition hash). None if the arm is unknown."""
    encoded, sep, arm = value.partition("~")
    try:
        forced, traced, issued, nonce, unit, rest = _parse_core(unb64(encoded))
    except (ValueError, IndexError, struct.error):
        return None  # not an alias abproxy wrote (a hand edit)
    if not sep:
        start = "@" + rest.hex()
        matching = {candidate for candidate in arms if "@" + candidate.rpartition("@")[2][: 2 * ALIAS_ARM_BYTES] == start}
        if len(matching) != 1:
            return None
        arm = matching.pop()
    return SignedId(experiment, arm, unit, forced, traced, issued, nonce)


def response_hash(response_id: str) -> tuple[int, str]:
    """From the response id's hash: a number that picks its alias's bucket (layout.alias_key)
    and the alias's field (40 bits: false matches among the aliases a lookup reads are ~1e-7)."""
    digest = hashlib.sha256(response_id.encode()).digest()
    return int.from_bytes(digest[:4], "big"), _b64(digest[4:9])


class Signers:
    """A process's signer, once its secret was read from Redis (None until then: requests get
    random ids and records meanwhile), and every secret it knows ids were signed with.

    Kept in step with Redis by :meth:`refresh`: a secret missing there (Redis restarted empty) is
    put back, a replica that started meanwhile with another one converges on whichever Redis holds,
    and the secrets of every replica verify on every replica."""

    def __init__(self) -> None:
        self.signer: Signer | None = None
        self._known: dict[bytes, Signer] = {}

    async def load(self, redis: Any) -> Signer:
        if self.signer is None:
            await self.refresh(redis)
        assert self.signer is not None
        return self.signer

    async def refresh(self, redis: Any) -> None:
        """Publish the secrets this process knows, learn the others', and sign with the one Redis
        holds (put back first, if Redis lost it): one pipeline in the ``{ids}`` slot."""
        current = self.signer.secret if self.signer is not None else os.urandom(32)
        pipe = redis.pipeline(transaction=False)
        pipe.set(SECRET_KEY, _b64(current), nx=True)
        pipe.get(SECRET_KEY)
        for secret in self._known:
            pipe.hsetnx(SECRETS_KEY, _fingerprint(secret), _b64(secret))
        pipe.hgetall(SECRETS_KEY)
        replies = await pipe.execute()
        chosen, published = replies[1], replies[-1]
        if chosen is None:
            raise RuntimeError("the request id secret vanished from Redis")
        if chosen not in published.values():  # just created, here or by another replica
            await redis.hsetnx(SECRETS_KEY, _fingerprint(_secret(chosen)), chosen)
        for value in (chosen, *published.values()):
            secret = _secret(value)
            if secret not in self._known:
                self._known[secret] = Signer(secret)
        self.signer = self._known[_secret(chosen)]

    def verify(self, request_id: str) -> SignedId | None:
        """The id's contents if any secret known here signed it, else None."""
        for signer in self._known.values():
            signed = signer.verify(request_id)
            if signed is not None:
                return signed
        return None


def _secret(stored: str | bytes) -> bytes:
    return unb64(stored if isinstance(stored, str) else stored.decode())


def _fingerprint(secret: bytes) -> str:
    return hashlib.blake2b(secret, digest_size=8).hexdigest()
