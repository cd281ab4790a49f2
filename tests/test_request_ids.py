"""Signed request ids, called in process: they carry a request to its feedback, refuse anything
altered or forged, and keep verifying across a secret rotation (Redis losing its data)."""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from proxykit import RedisServer
from redis.asyncio import Redis as AsyncRedis

from abproxy.recording import ids, layout
from abproxy.recording.ids import SignedId, Signer, Signers

T = TypeVar("T")

SECRET = b"the secret every replica shares"
OTHER_SECRET = b"a secret some other proxy uses!!"
EXPERIMENT = "translation"
ARM = "professional@0123456789ab"
OTHER_ARM = "basic@fedcba987654"
UNIT = layout.hash_unit("user-42")
ROOMY = 10_000
"""A max_length no id comes near."""
BASE64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

SETTINGS = settings(max_examples=200, deadline=None)
"""For the tamper properties."""
QUICK = settings(max_examples=100, deadline=None)

names = st.text(max_size=40)
units = st.one_of(st.none(), st.text(max_size=20).map(layout.hash_unit))


def issue(signer: Signer, experiment: str = EXPERIMENT, arm: str = ARM, unit: str | None = UNIT,
          forced: bool = False, traced: bool = False) -> tuple[str, SignedId]:  # fmt: skip
    signed = signer.issue(experiment, arm, unit, forced, traced, ROOMY)
    assert signed is not None
    return signer.encode(signed), signed


def raw_of(request_id: str) -> bytes:
    return ids.unb64(request_id[len(ids.PREFIX) :])


def encode_raw(raw: bytes) -> str:
    return ids.PREFIX + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


# -- issue and verify ---------------------------------------------------------------------------


@QUICK
@given(experiment=names, arm=names, unit=units, forced=st.booleans(), traced=st.booleans())
def test_an_issued_id_verifies_back_to_its_experiment_arm_unit_and_flags(
    experiment: str, arm: str, unit: str | None, forced: bool, traced: bool
) -> None:
    signer = Signer(SECRET)
    request_id, signed = issue(signer, experiment, arm, unit, forced, traced)
    assert request_id.startswith("r1.")
    assert ids.looks_signed(request_id)
    verified = signer.verify(request_id)
    assert verified == signed
    assert verified is not None
    assert (verified.experiment, verified.arm, verified.unit, verified.forced, verified.traced) == (
        experiment, arm, unit, forced, traced,
    )  # fmt: skip


def test_a_verified_id_names_the_same_variant_feedback_and_trace_as_when_it_was_issued() -> None:
    signer = Signer(SECRET)
    request_id, signed = issue(signer, traced=True)
    verified = Signer(SECRET).verify(request_id)  # another replica, same secret
    assert verified is not None
    assert verified.variant == "professional"
    assert verified.feedback_id == signed.feedback_id
    assert verified.trace_id == signed.trace_id
    assert verified.trace_id is not None and verified.trace_id.startswith("tr-")


def test_an_untraced_id_names_no_trace() -> None:
    request_id, _ = issue(Signer(SECRET), traced=False)
    verified = Signer(SECRET).verify(request_id)
    assert verified is not None and verified.trace_id is None


def test_two_ids_issued_for_the_same_request_differ_and_name_different_feedback() -> None:
    signer = Signer(SECRET)
    issued = [issue(signer) for _ in range(2000)]  # more than one pool of nonces
    assert len({request_id for request_id, _ in issued}) == len(issued)
    assert len({signed.feedback_id for _, signed in issued}) == len(issued)
    assert len({signed.trace_id for _, signed in (issue(signer, traced=True) for _ in range(50))}) == 50
    assert all(signer.verify(request_id) == signed for request_id, signed in issued)


def test_an_id_signed_with_another_secret_is_refused() -> None:
    request_id, _ = issue(Signer(OTHER_SECRET))
    assert Signer(SECRET).verify(request_id) is None


def test_every_truncation_of_an_id_is_refused() -> None:
    signer = Signer(SECRET)
    for unit in (UNIT, None):
        request_id, _ = issue(signer, unit=unit)
        for length in range(len(request_id)):
            assert signer.verify(request_id[:length]) is None, request_id[:length]


@SETTINGS
@given(experiment=names, unit=units, data=st.data())
def test_any_single_changed_character_of_the_signed_part_is_refused(
    experiment: str, unit: str | None, data: st.DataObject
) -> None:
    # The last character is left to the test below: it may carry bits no byte uses.
    signer = Signer(SECRET)
    request_id, _ = issue(signer, experiment, ARM, unit)
    position = data.draw(st.integers(len(ids.PREFIX), len(request_id) - 2), label="position")
    replacement = data.draw(st.sampled_from(BASE64URL).filter(lambda c: c != request_id[position]), label="replacement")
    altered = request_id[:position] + replacement + request_id[position + 1 :]
    assert signer.verify(altered) is None


@SETTINGS
@given(experiment=names, unit=units, data=st.data())
def test_any_flipped_bit_of_the_signed_bytes_is_refused(experiment: str, unit: str | None, data: st.DataObject) -> None:
    signer = Signer(SECRET)
    request_id, _ = issue(signer, experiment, ARM, unit)
    raw = bytearray(raw_of(request_id))
    bit = data.draw(st.integers(0, 8 * len(raw) - 1), label="bit")
    raw[bit // 8] ^= 1 << (bit % 8)
    assert signer.verify(encode_raw(bytes(raw))) is None


def test_changing_the_last_character_of_an_id_is_refused_whatever_the_ids_length() -> None:
    signer = Signer(SECRET)
    lengths = set()
    for size in range(1, 4):  # experiment names of 1, 2, 3 bytes: signed parts of every length mod 3
        request_id, _ = issue(signer, experiment="e" * size, unit=None)
        lengths.add(len(raw_of(request_id)) % 3)
        accepted = [c for c in BASE64URL if c != request_id[-1] and signer.verify(request_id[:-1] + c) is not None]
        assert accepted == [], (request_id, accepted)
    assert lengths == {0, 1, 2}


def test_an_id_with_a_changed_prefix_is_refused() -> None:
    signer = Signer(SECRET)
    request_id, _ = issue(signer)
    for prefix in ("r2.", "x1.", "r1_"):
        assert signer.verify(prefix + request_id[len(ids.PREFIX) :]) is None, prefix


def test_an_id_spelled_differently_but_decoding_to_the_same_bytes_is_refused() -> None:
    signer = Signer(SECRET)
    request_id = next(rid for rid, _ in (issue(signer) for _ in range(200)) if "-" in rid[len(ids.PREFIX) :])
    body = request_id[len(ids.PREFIX) :]
    variants = {
        "'+' for '-'": ids.PREFIX + body.replace("-", "+", 1),
        "an inserted '!'": ids.PREFIX + body[:5] + "!" + body[5:],
        "trailing '='": request_id + "==",
    }
    accepted = {what for what, variant in variants.items() if signer.verify(variant) is not None}
    assert accepted == set()


@QUICK
@given(garbage=st.one_of(st.text(), st.text().map(lambda text: ids.PREFIX + text), st.binary().map(encode_raw)))
def test_garbage_is_refused_without_raising(garbage: str) -> None:
    assert Signer(SECRET).verify(garbage) is None


@QUICK
@given(experiment=st.text(max_size=60), arm=st.text(max_size=60), unit=units, max_length=st.integers(0, 400))
def test_an_id_is_issued_exactly_when_it_fits_in_max_length(
    experiment: str, arm: str, unit: str | None, max_length: int
) -> None:
    signer = Signer(SECRET)
    full = signer.issue(experiment, arm, unit, False, False, ROOMY)
    assert full is not None  # at most 240 bytes of experiment name
    needed = len(signer.encode(full))
    bounded = signer.issue(experiment, arm, unit, False, False, max_length)
    if needed <= max_length:
        assert bounded is not None
        assert len(signer.encode(bounded)) <= max_length
    else:
        assert bounded is None


# -- Signers: the secret shared through Redis, and rotations ------------------------------------


def with_redis(url: str, scenario: Callable[[AsyncRedis], Awaitable[T]]) -> T:
    async def main() -> T:
        client = AsyncRedis.from_url(url, decode_responses=True)
        try:
            return await scenario(client)
        finally:
            await client.aclose()

    return asyncio.run(main())


def test_a_process_that_has_not_read_the_secret_verifies_nothing() -> None:
    request_id, _ = issue(Signer(SECRET))
    assert Signers().verify(request_id) is None


def test_replicas_that_load_the_secret_from_one_redis_verify_each_others_ids(
    redis_client: redis.Redis, redis_server: RedisServer
) -> None:
    async def scenario(client: AsyncRedis) -> None:
        first, second = Signers(), Signers()
        signer_one = await first.load(client)
        signer_two = await second.load(client)
        one_id, one = issue(signer_one)
        two_id, two = issue(signer_two)
        assert second.verify(one_id) == one
        assert first.verify(two_id) == two
        assert await first.load(client) is signer_one  # loaded once, then kept

    with_redis(redis_server.url, scenario)
    assert redis_client.get(ids.SECRET_KEY) is not None


def test_ids_signed_before_redis_lost_its_secret_verify_on_every_replica_after_another_secret_took_over(
    redis_client: redis.Redis, redis_server: RedisServer
) -> None:
    async def scenario(client: AsyncRedis) -> None:
        old_replica = Signers()
        old_id, old = issue(await old_replica.load(client))
        redis_client.flushall()  # Redis restarted without persistence
        new_replica = Signers()
        new_id, new = issue(await new_replica.load(client))  # comes up meanwhile: a new secret
        assert new_replica.verify(old_id) is None  # not yet: it has not heard of the old one

        await old_replica.refresh(client)
        await new_replica.refresh(client)
        later = Signers()
        await later.load(client)
        for replica in (old_replica, new_replica, later):
            assert replica.verify(old_id) == old
            assert replica.verify(new_id) == new
        # every replica now signs with the one secret Redis holds
        assert old_replica.signer is not None and new_replica.signer is not None
        after_id, after = issue(old_replica.signer)
        assert new_replica.signer.verify(after_id) == after
        assert Signer(ids.unb64(str(redis_client.get(ids.SECRET_KEY)))).verify(after_id) == after

    with_redis(redis_server.url, scenario)


def test_a_replica_puts_its_secret_back_when_redis_comes_back_empty(
    redis_client: redis.Redis, redis_server: RedisServer
) -> None:
    async def scenario(client: AsyncRedis) -> None:
        replica = Signers()
        before_id, before = issue(await replica.load(client))
        redis_client.flushall()
        await replica.refresh(client)
        newcomer = Signers()
        signer = await newcomer.load(client)
        assert signer.verify(before_id) == before  # signs with the very secret used before
        assert newcomer.verify(before_id) == before

    with_redis(redis_server.url, scenario)


# -- aliases of upstream response ids -------------------------------------------------------------


@QUICK
@given(
    unit=units,
    forced=st.booleans(),
    traced=st.booleans(),
    arm=st.sampled_from([ARM, OTHER_ARM, "legacy", "v@not-a-hash", "v~x@12"]),
)
def test_an_alias_leads_back_to_the_request_it_was_made_for(
    unit: str | None, forced: bool, traced: bool, arm: str
) -> None:
    _, signed = issue(Signer(SECRET), EXPERIMENT, arm, unit, forced, traced)
    value = ids.alias_value(signed)
    assert ids.from_alias(EXPERIMENT, value, [ARM, OTHER_ARM, "third@aaaaaa000000"]) == signed


def test_an_alias_is_as_short_whatever_the_experiment_and_variant_names() -> None:
    signer = Signer(SECRET)
    short = ids.alias_value(issue(signer, "e", "v@0123456789ab")[1])
    long = ids.alias_value(issue(signer, "e" * 200, "v" * 200 + "@0123456789ab")[1])
    assert len(short) == len(long)
    assert "v" * 200 not in long and "e" * 200 not in long


def test_an_alias_whose_arm_is_no_longer_known_leads_nowhere() -> None:
    _, signed = issue(Signer(SECRET), arm=ARM)
    assert ids.from_alias(EXPERIMENT, ids.alias_value(signed), [OTHER_ARM]) is None


def test_an_alias_matching_two_arms_leads_nowhere() -> None:
    _, signed = issue(Signer(SECRET), arm="a@abcdef000000")
    value = ids.alias_value(signed)
    assert ids.from_alias(EXPERIMENT, value, ["a@abcdef000000", "b@abcdef111111"]) is None
    assert ids.from_alias(EXPERIMENT, value, ["a@abcdef000000", "b@abcd00111111"]) == signed


# -- response_hash -----------------------------------------------------------------------------

RESPONSE_IDS = [f"chatcmpl-{n:06d}" for n in range(20_000)]


def test_a_response_id_hashes_the_same_in_every_call_and_every_process() -> None:
    sample = ["chatcmpl-abc", "resp_0123", "", "ünïcode-id", *RESPONSE_IDS[:20]]
    here = [list(ids.response_hash(response_id)) for response_id in sample]
    assert here == [list(ids.response_hash(response_id)) for response_id in sample]
    program = (
        "import json, sys\n"
        "from abproxy.recording.ids import response_hash\n"
        "print(json.dumps([list(response_hash(i)) for i in json.loads(sys.stdin.read())]))\n"
    )
    root = Path(__file__).resolve().parents[1]
    for seed in ("1", "2"):  # str hashes differ between these processes; response hashes must not
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run(
            [sys.executable, "-c", program],
            input=json.dumps(sample),
            capture_output=True,
            text=True,
            env=env,
            cwd=root,
            check=True,
        )
        assert json.loads(done.stdout) == here


def test_different_response_ids_get_different_alias_fields_of_forty_bits() -> None:
    fields = [ids.response_hash(response_id)[1] for response_id in RESPONSE_IDS]
    assert len(set(fields)) == len(fields)
    assert {len(ids.unb64(field)) for field in fields} == {5}


@pytest.mark.parametrize("level", [1, 2, 3])
def test_response_ids_spread_evenly_over_an_hours_alias_buckets(level: int) -> None:
    buckets = 4**level
    counts = collections.Counter(ids.response_hash(response_id)[0] % buckets for response_id in RESPONSE_IDS)
    expected = len(RESPONSE_IDS) / buckets
    assert len(counts) == buckets
    assert all(abs(count - expected) < 0.3 * expected for count in counts.values()), counts
