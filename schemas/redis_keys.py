"""The Redis key layout: written by the aggregator, read by the api.

Every key carries the customer as a hash tag (``{cust}``) so that all of one customer's
keys live in one Redis Cluster slot: the aggregator updates a customer's counters, its
de-duplication marks and its offset watermark in a single atomic Lua call.

``tally:{cust}:c:<meter>:<window>:<bucket>``   HASH of counters, in micro-units
    field ``*``                  the meter over all events
    field ``<group>``            the meter for one combination of its group-by values
    field ``<field>@t``          (``latest`` meters) event time, µs since the epoch,
                                 of the value held in ``<field>``
``tally:{cust}:u:<meter>:<window>:<bucket>:<group>``   SET of distinct values
                                 (``unique_count`` meters; ``<group>`` is ``*`` for all)
``tally:{cust}:seen:<bucket>``   SET of 8-byte digests of (source, id) first seen in a
                                 de-duplication bucket (processing time)
``tally:{cust}:offsets``         HASH ``<topic>/<partition>[@<incarnation>]`` → last Kafka
                                 offset applied; ``<incarnation>`` is
                                 ``[<TALLY_KAFKA_INCARNATION>:]<topic id>``

Alerts (thresholds written by billing's notification package, evaluated by the
aggregator's batch call, drained by the aggregator; see ``schemas.alerts``):

``tally:{cust}:alerts``          HASH meter → the meter's compiled thresholds: lines
                                 ``<micro-units> <label>`` in increasing quantity
``tally:{cust}:alerts:fired``    HASH ``<meter>|<yyyymm>`` → the highest threshold
                                 (micro-units) fired in that month
``tally:{cust}:alerts:out``      LIST crossings waiting to be published:
                                 ``<meter> <yyyymm> <threshold µ> <total µ> <label>``
``tally:{cust}:alerts:spend``    STRING a counter the batch call bumps when it changes a
                                 month total of a customer whose ``alerts`` hash holds
                                 ``*spend`` (whole-invoice spend rules): the invoice
                                 must be rated again; the aggregator moves it to
``tally:alerts:spend:due``       ZSET customers whose whole-invoice spend alerts billing
                                 evaluates next, scored by when first marked (ms)
``tally:{cust}:alerts:spent``    HASH ``<rule>|<period start>`` → the highest spend
                                 threshold fired in that period

Enforcement state (written by the api; reservations settled by the aggregator):

``tally:{cust}:account``         HASH plan, status, trial_ends (ms), policies (JSON: the
                                 plan's limits compiled for the enforcement script)
``tally:{cust}:keys``            HASH API key id → JSON {s: scopes, x: expires (ms), r: revoked}
``tally:{cust}:rl``              HASH rate-limit state by field ``<policy>|<algorithm>``,
                                 then ``|k=<key id>`` and ``|e=<endpoint>`` for a
                                 policy scoped per key and/or endpoint
``tally:{cust}:corr``            HASH ``<meter>|<yyyymm>|<group>`` → micro-units of usage
                                 decreases the corrections API accepted and the
                                 aggregator has not counted yet (it takes them off in
                                 the call that counts them)
``tally:{cust}:rl:u:<digest>``   HASH the same, for one end user (policies scoped per
                                 end user; the digest of the call's ``end_user``)
``tally:{cust}:resv``            HASH event digest → ``<meter>|<micro-units>`` held for it;
                                 lease id → ``<meter>|<held>|<term grant>|<term end ms>|<term>``
                                 (micro-units; term ``-`` once returned; ``lua/lease.lua``)
``tally:{cust}:lease:<id>:answer`` STRING ``<term>|<request's sha1>|<answer>``: a numbered
                                 lease request's answer, for a resend of it (ttl + settle)
``tally:{cust}:resv:exp``        ZSET event digest or lease id scored by when what it
                                 holds is released (ms)
``tally:{cust}:held``            HASH meter → micro-units held by open reservations and leases
``tally:key:<hex digest>``       STRING ``<cust> <key id>``: who an API key belongs to
``tally:ip:{<ip>}``              HASH the per-IP limits' state (before authentication)
``tally:ip:{<ip>}:auth``         STRING failed credentials from the address in its current
                                 one-minute window (expires with the window)

``<window>`` is minute|hour|day|month and ``<bucket>`` its UTC start as in
``schemas.windows.bucket_id``.  ``<group>`` is the JSON array of the group-by values in
the meter's ``group_by`` order.
"""

from __future__ import annotations

from hashlib import blake2b

import orjson

from schemas import lua
from schemas.windows import Window

PREFIX = "tally"
DIGEST_BYTES = 8
TOTAL = "*"
TIME_SUFFIX = "@t"
COUNT_SUFFIX = "#n"
"""An avg meter keeps, beside each group's sum, its number of values (in micro-units, as
every counter) under the group's field plus this suffix: avg = sum / number, exactly."""


def _tag(customer: str) -> str:
    return f"{PREFIX}:{{{customer}}}"


def counters(customer: str, meter: str, window: Window, bucket: str) -> str:
    return counters_prefix(customer, meter, window) + bucket


def counters_prefix(customer: str, meter: str, window: Window) -> str:
    """The counters keys of a meter's buckets up to the bucket id: a usage read names
    dozens of buckets, one concatenation each."""
    return f"{_tag(customer)}:c:{meter}:{window.value}:"


ZONES = f"{PREFIX}:zones"
"""Customers billed in a zone other than UTC → the zone's IANA name.  The accounts
projection writes it; the enforcement and the aggregator read it
(``services.common.zone_book``) to count and enforce quotas over the customer's local
calendar month (``schemas.zones.quota_month``)."""

ZONES_VERSION = f"{PREFIX}:zones:version"
"""Set to a new value (the time in ns) whenever ``ZONES`` changes: readers poll it and
reload the hash only then; a flushed Redis never offers a version seen before."""

COUNTED_METERS = f"{PREFIX}:meters:counted"
"""A set of the meters the aggregator has counted events of: each aggregator process adds
a meter the first time it counts one (in the pipeline that counts it), so the admin API
knows in one lookup — not a scan of every customer's keys — that changing how a meter
counts would rewrite history."""


def unique_set(customer: str, meter: str, window: Window, bucket: str, group: str) -> str:
    return f"{_tag(customer)}:u:{meter}:{window.value}:{bucket}:{group}"


def seen(customer: str, bucket: str) -> str:
    return f"{_tag(customer)}:seen:{bucket}"


def offsets(customer: str) -> str:
    return f"{_tag(customer)}:offsets"


def offset_field(topic: str, partition: int, incarnation: str = "") -> str:
    """``incarnation`` names one life of the topic (the aggregator puts the topic's Kafka
    id in it): offsets restart from 0 when a topic is recreated (always, for the embedded
    in-memory broker), and old watermarks must not then hide new records."""
    return f"{topic}/{partition}" + (f"@{incarnation}" if incarnation else "")


def group_field(values: tuple[str, ...]) -> str:
    """The hash field for one combination of group-by values (``*`` for none)."""
    return orjson.dumps(list(values)).decode() if values else TOTAL


def count_field(group: str) -> str:
    """The field holding an avg meter's number of values for ``group``."""
    return group + COUNT_SUFFIX


def parse_group(field: str) -> tuple[str, ...]:
    return () if field == TOTAL else tuple(orjson.loads(field))


RELEASE_LUA = lua.source("release")
"""``release(reservations, expiries, held, digest)``: the Lua function both the enforcement
script and the aggregator's sink use to release a reservation; prepended to each."""


def alerts(customer: str) -> str:
    return f"{_tag(customer)}:alerts"


def alerts_fired(customer: str) -> str:
    return f"{_tag(customer)}:alerts:fired"


def alerts_out(customer: str) -> str:
    return f"{_tag(customer)}:alerts:out"


ALERTS_OUT_PATTERN = f"{PREFIX}:*:alerts:out"


def spend_mark(customer: str) -> str:
    return f"{_tag(customer)}:alerts:spend"


SPEND_MARK_PATTERN = f"{PREFIX}:*:alerts:spend"
SPEND_DUE = f"{PREFIX}:alerts:spend:due"


def spend_fired(customer: str) -> str:
    return f"{_tag(customer)}:alerts:spent"


"""Every customer's crossings list, for the aggregator's sweep at start."""
FIRED_TTL_SECONDS = 400 * 24 * 3600
"""Fired markers outlive their month (the marker field names it) by a year."""


def customer_of(key: str) -> str:
    """The customer a hash-tagged key belongs to."""
    return key[key.index("{") + 1 : key.rindex("}")]


def account(customer: str) -> str:
    return f"{_tag(customer)}:account"


def api_keys(customer: str) -> str:
    return f"{_tag(customer)}:keys"


def rate_states(customer: str) -> str:
    return f"{_tag(customer)}:rl"


def correction_holds(customer: str) -> str:
    """Decreases accepted by the corrections API and not yet counted (``hold_field``)."""
    return f"{_tag(customer)}:corr"


def hold_field(meter: str, month: str, group: str) -> str:
    """A decrease's field in ``correction_holds``: the counter it is checked against,
    the month bucket ``month``'s ``group`` field of ``meter``."""
    return f"{meter}|{month}|{group}"


def end_user_rate_states(customer: str, end_user: str) -> str:
    """One end user's states of the customer's ``end_user``-scoped rate limits: a key
    of its own, so an end user gone quiet expires with its states."""
    digest = blake2b(end_user.encode(), digest_size=DIGEST_BYTES).hexdigest()
    return f"{_tag(customer)}:rl:u:{digest}"


def reservations(customer: str) -> str:
    return f"{_tag(customer)}:resv"


def reservation_expiries(customer: str) -> str:
    return f"{_tag(customer)}:resv:exp"


def held(customer: str) -> str:
    return f"{_tag(customer)}:held"


def lease_answer(customer: str, lease: str) -> str:
    """The last answer to a numbered lease request (``lease.lua``): a resent request
    gets it again instead of a second grant."""
    return f"{_tag(customer)}:lease:{lease}:answer"


def key_owner(key_digest: bytes) -> str:
    return f"{PREFIX}:key:{key_digest.hex()}"


def client_ip(address: str) -> str:
    return f"{PREFIX}:ip:{{{address}}}"


def auth_failures(address: str) -> str:
    return f"{client_ip(address)}:auth"


def event_digest(source: str, event_id: str) -> bytes:
    """The 8-byte identity of an event (its idempotency key, (source, id)) in Redis:
    in the de-duplication sets, and naming the reservation the event settles."""
    return blake2b(f"{source}\x00{event_id}".encode(), digest_size=DIGEST_BYTES).digest()
