"""When ``LeaseDecider`` fetches a lease's next term ahead: with a quarter of the
current term's calls left, or about a quarter of its time (moved at random, so that
leases taken together do not renew together for ever), and never after a refusal —
checked on the decider's own bookkeeping with a clock the test moves (no I/O)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import pytest
from tally_sdk import LeaseDecider, Tally
from tally_sdk.decider import Ask
from tally_sdk.decision import Decision
from tally_sdk.leases import _Lease

GRANT = {"lease": "ls_a", "granted": 100, "ttl_ms": 2000, "expires_in_ms": 2000}


def granted_lease(
    at: list[float], jitter: Callable[[], float] = lambda: 0.5
) -> tuple[LeaseDecider, _Lease]:
    """A lease granted at ``at[0]``; the renewal's random share fixed to the middle."""
    tally = Tally("http://127.0.0.1:9", "svc")
    decider = LeaseDecider(tally, clock=lambda: at[0], jitter=jitter)
    lease = _Lease(("k", "api_calls", "/e"))
    decider._granted(lease, GRANT | {"customer": "c"}, {}, want=100, sent=at[0], term=1)
    return decider, lease


def renewal_time(lease: _Lease) -> float:
    assert lease.holding.active is not None
    return lease.holding.active.renew_after


def test_the_next_term_is_due_with_a_quarter_of_the_calls_left() -> None:
    at = [0.0]
    decider, lease = granted_lease(at)
    for _ in range(74):
        assert lease.holding.spend(at[0]) is not None
        assert not decider._next_term_due(lease, at[0])
    assert lease.holding.spend(at[0]) is not None  # 75 spent, 25 left
    assert decider._next_term_due(lease, at[0])


def test_the_next_term_is_due_with_a_quarter_of_the_time_left() -> None:
    at = [0.0]
    decider, lease = granted_lease(at)
    # 2 s, less a tenth for clock skew, ends at 1.8; a quarter of the 2 s before is 1.3
    assert lease.holding.spend(1.3) is not None
    assert not decider._next_term_due(lease, 1.3)
    assert decider._next_term_due(lease, 1.31)


@pytest.mark.parametrize(("jitter", "due"), [(0.0, 1.425), (0.999999, 1.175)])
def test_the_time_left_at_renewal_moves_by_a_quarter_at_most(jitter: float, due: float) -> None:
    # the lead of 0.5 s (a quarter of 2 s) shortened or lengthened by a quarter of it
    at = [0.0]
    decider, lease = granted_lease(at, jitter=lambda: jitter)
    assert renewal_time(lease) == pytest.approx(due)
    assert not decider._next_term_due(lease, due - 0.001)
    assert decider._next_term_due(lease, due + 0.001)


def test_leases_taken_together_drift_apart_term_by_term() -> None:
    """Fifty leases granted at one moment, each renewed when its term says, terms on
    end: at first they all renew within 0.25 s of each other; thirty terms later
    (about 40 s) they are spread over most of a term, not a burst at Tally."""
    draws = random.Random(12).random
    firsts, lasts = [], []
    for _ in range(50):
        at = [0.0]
        decider, lease = granted_lease(at, jitter=draws)
        firsts.append(renewal_time(lease))
        for _ in range(30):  # each term granted when the one before fell due
            at[0] = renewal_time(lease)
            lease = _Lease(lease.slot)
            decider._granted(lease, GRANT | {"customer": "c"}, {}, 100, at[0], term=2)
        lasts.append(renewal_time(lease))
    assert max(firsts) - min(firsts) <= 0.25
    assert max(lasts) - min(lasts) > 1.0
    # the 31 terms took 1.3 s each on average, as without the spread
    assert sum(lasts) / len(lasts) == pytest.approx(1.3 * 31, rel=0.01)


def test_nothing_is_fetched_ahead_after_a_refusal() -> None:
    at = [0.0]
    decider, lease = granted_lease(at)
    lease.lookahead = 0  # as a refusal leaves it
    assert not decider._next_term_due(lease, 1.7)


async def test_an_address_refusal_holds_for_that_address_only_until_its_retry_after() -> None:
    """An address Tally refused in a lease request (too many bad keys from it) is refused
    at once in every slot, without a request, for its ``Retry-After`` (at most a ttl);
    other addresses are admitted from the same term meanwhile."""
    at = [0.0]
    decider, lease = granted_lease(at)
    decider._leases[lease.slot] = lease
    refusal = Decision(allowed=False, status=429, policy="auth-failures", retry_after=60)
    decider._block(lease, "198.51.100.66", refusal, sent=0.0)
    for slot in (("k", "api_calls", "/e"), ("other-key", "api_calls", "/f")):
        assert decider.decide_now(*slot, "198.51.100.66") is refusal
    assert decider.decide_now("k", "api_calls", "/e", "203.0.113.7") is not refusal
    assert decider.decide_now("k", "api_calls", "/e", None) is not refusal
    at[0] = 1.99  # held for the ttl (2 s), not the 60 s Tally said
    assert decider.decide_now("k", "api_calls", "/e", "198.51.100.66") is refusal
    at[0] = 2.0
    assert decider.decide_now("k", "api_calls", "/e", "198.51.100.66") is not refusal
    assert decider._blocked == {}
    await decider.aclose()


async def test_addresses_refused_are_forgotten_rather_than_grow_without_bound() -> None:
    at = [0.0]
    decider, lease = granted_lease(at)
    decider.max_slots = 3
    refusal = Decision(allowed=False, status=429, policy="per-address", retry_after=1)
    for n in range(7):
        decider._block(lease, f"198.51.100.{n}", refusal, sent=0.0)
        assert len(decider._blocked) <= 3
    await decider.aclose()


async def test_a_second_address_refused_within_a_ttl_answers_every_waiting_call() -> None:
    """One address refused: the slot's other callers are asked for again, each under its
    own address.  A second refused within a ttl means Tally refuses whatever address it
    is told (the app's own): the rest are answered too, not asked for one by one."""
    at = [0.0]
    decider, lease = granted_lease(at)
    loop = asyncio.get_running_loop()
    waiting = {ip: loop.create_future() for ip in ("198.51.100.1", "198.51.100.2", "198.51.100.3")}
    for ip, future in waiting.items():
        lease.waiters.append((future, Ask("k", "api_calls", "/e", "", "reserve", ip)))
    refusal = Decision(allowed=False, status=429, policy="per-address", retry_after=1)
    decider._block(lease, "198.51.100.1", refusal, sent=0.0)
    assert [f.done() for f in waiting.values()] == [True, False, False]
    at[0] = 1.0
    decider._block(lease, "198.51.100.2", refusal, sent=1.0)
    assert all(f.result() is refusal for f in waiting.values()) and not lease.waiters
    assert "198.51.100.3" not in decider._blocked  # refused once, not remembered
    await decider.aclose()
