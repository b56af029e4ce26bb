"""ADMIT's EVALSHA built from kept fragments is byte for byte the argument-by-argument one."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from apirouter.budgets import Budget, Reservation
from apirouter.keys import KeyRecord, Tier
from apirouter.limits import BucketSpec, Verdict, buckets_for, plan_for
from apirouter.redis_client import bulk_int, encode_command
from workers.admission import Admission, Ticket
from workers.admission_scripts import (
    BUCKET_TTL_MS,
    ScriptCommands,
    bucket_place,
    planned_admit,
)

_NAMES = st.text(min_size=1, max_size=12)
_LIMIT = st.one_of(st.just(0), st.integers(1, 2**40))
_TIERS = st.lists(st.builds(Tier, _LIMIT, _LIMIT, _LIMIT, _LIMIT), min_size=3, max_size=3)
_BUDGETS = st.lists(st.builds(Budget, _NAMES, st.sampled_from(["day", "month"]),
                              st.integers(-1, 2**40), st.integers(-1, 2**40),
                              st.integers(-1, 2**40)), max_size=3)
_REQUEST = st.tuples(
    st.integers(0, 2),  # key (of three, so that kept fragments are reused and replaced)
    st.integers(0, 2),  # org tier: none, or one of two
    st.integers(0, 2),  # model tier: none, or one of two
    st.sampled_from(["m", "gpt-x", "modèle"]),
    st.one_of(st.just(0), st.integers(1, 5000), st.integers(0, 2**40)),  # tokens
    st.text(max_size=20),  # reservation id
    st.one_of(st.none(), st.just(""), st.text(max_size=30)),  # nonce
    st.sampled_from([0, 1, 600_000, 2**31]),  # nonce ttl
    _BUDGETS,
    st.one_of(st.none(), st.builds(Reservation, st.integers(0, 2**40), st.integers(0, 2**40),
                                   st.integers(0, 3))),
    st.sampled_from(["a" * 40, "0123456789abcdef0123456789abcdef01234567"]))


def _keys_and_tiers(key_id: str, org: str, tiers: list[Tier], odd: str = ""
                    ) -> tuple[list[KeyRecord], list[Tier | None], list[Tier | None]]:
    """Three keys (the third of another org) and the org and model tiers the tests pick from;
    ``odd`` is put in the key ids and the other org's name (a "%" tests the templates)."""
    keys = [KeyRecord(f"{key_id}{i}{odd}", "0" * 64, org if i < 2 else f"{org}{odd}2", "",
                      frozenset(), "t", tiers[i], False) for i in range(3)]
    return keys, [None, tiers[1], Tier(5, 6, 7, 8)], [None, tiers[2], Tier(1, 1, 0, 0)]


@given(_NAMES, _NAMES, _TIERS, st.lists(_REQUEST, min_size=1, max_size=25))
@settings(max_examples=300, deadline=None)
def test_fragment_built_command_is_the_reference_encoding(
        key_id: str, org: str, tiers: list[Tier], requests: list[tuple]) -> None:  # type: ignore[type-arg]
    encoder = ScriptCommands()
    admission = Admission()
    keys, org_tiers, model_tiers = _keys_and_tiers(key_id, org, tiers)
    for (k, o, m, model, tokens, rid, nonce, nonce_ttl, budgets, r,
         sha) in requests + requests:
        key = keys[k]
        budgets = budgets if r is not None else []  # as the pipeline: a reservation with them
        specs = buckets_for(key, model, tokens, org_tiers[o], model_tiers[m])
        periods = [f"2026-11-{i:02d}" for i in range(len(budgets))]
        ticket = Ticket(key, specs, tokens, Verdict(True, None, 0, 0, 0), budgets, r, rid=rid,
                        periods=periods)
        ks, args = admission._script_args(ticket, nonce, nonce_ttl)
        want = encode_command("EVALSHA", sha, len(ks), *ks, *args)
        got = encoder.command(sha, key, model, org_tiers[o], model_tiers[m], specs, rid, nonce,
                              nonce_ttl, budgets, periods, r)
        assert got == want


_SPECS = st.builds(BucketSpec, st.sampled_from(["key:a:tpm", "org:b:tpm", "key:é:model:m:tpm"]),
                   st.integers(0, 2**40), st.integers(0, 2**40), st.just(0))


@given(st.lists(st.tuples(st.sampled_from(["o1", "o2", "{o}"]), _SPECS,
                          st.integers(-2**40, 2**40)), min_size=1, max_size=40))
@settings(max_examples=300, deadline=None)
def test_fragment_built_settlement_is_the_reference_encoding(
        settlements: list[tuple[str, BucketSpec, int]]) -> None:
    commands = ScriptCommands()
    for batch in (settlements, settlements[::-1], settlements):
        keys, args, want_keys, want_args = [], [], [], []
        for org, spec, delta in batch:
            k, fixed = commands.bucket(org, spec)
            keys.append(k)
            args.append(fixed + bulk_int(delta))
            want_keys.append(bucket_place(org, spec.name)[0])
            want_args += [spec.capacity, spec.per_minute, delta]
        assert commands.settle_many("f" * 40, keys, args) == encode_command(
            "EVALSHA", "f" * 40, len(want_keys), *want_keys, BUCKET_TTL_MS, *want_args)


@given(_NAMES, _NAMES, _TIERS, st.lists(_REQUEST, min_size=1, max_size=25))
@settings(max_examples=300, deadline=None)
def test_planned_command_is_the_reference_encoding(
        key_id: str, org: str, tiers: list[Tier], requests: list[tuple]) -> None:  # type: ignore[type-arg]
    """admit_soon's command (a plan's template, the reservation id and token count spliced in)
    is byte for byte the argument-by-argument one of the same buckets, with no budget and no
    nonce; its settlement fragments are ScriptCommands.bucket's of the plan's token-buckets."""
    admission = Admission()
    commands = ScriptCommands()
    keys, org_tiers, model_tiers = _keys_and_tiers(key_id, org, tiers, "%")
    for k, o, m, model, tokens, rid, _, _, _, _, sha in requests + requests:
        tokens = max(1, tokens)  # (admit_soon plans only requests with tokens)
        key = keys[k]
        plan = plan_for(key, model, org_tiers[o], model_tiers[m])
        ticket = Ticket(key, plan.specs(tokens), tokens, Verdict(True, None, 0, 0, 0), rid=rid)
        ks, args = admission._script_args(ticket, None, 0)
        planned = planned_admit(plan, key.org, sha)
        assert planned.command(rid, tokens) == encode_command("EVALSHA", sha, len(ks), *ks, *args)
        tpm = [s for s in ticket.specs if s.name.endswith(":tpm")]
        assert planned.token_buckets == len(tpm)
        assert list(zip(planned.settle_keys, planned.settle_fixed, strict=True)) == [
            commands.bucket(key.org, s) for s in tpm]
