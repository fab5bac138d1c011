"""When ``LeaseDecider`` fetches a lease's next term ahead: with a quarter of the
current term's calls left, or a quarter of its time, and never after a refusal —
checked on the decider's own bookkeeping with a clock the test moves (no I/O)."""

from __future__ import annotations

from tally_sdk import LeaseDecider, Tally
from tally_sdk.leases import _Lease

GRANT = {"lease": "ls_a", "granted": 100, "ttl_ms": 2000, "expires_in_ms": 2000}


def granted_lease(at: list[float]) -> tuple[LeaseDecider, _Lease]:
    decider = LeaseDecider(Tally("http://127.0.0.1:9", "svc"), clock=lambda: at[0])
    lease = _Lease(("k", "api_calls", "/e"))
    decider._granted(lease, GRANT | {"customer": "c"}, {}, want=100, sent=at[0], term=1)
    return decider, lease


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


def test_nothing_is_fetched_ahead_after_a_refusal() -> None:
    at = [0.0]
    decider, lease = granted_lease(at)
    lease.lookahead = 0  # as a refusal leaves it
    assert not decider._next_term_due(lease, 1.7)
