"""The SDK's local lease accounting (``tally_sdk.holding``) against a naive model:
whatever the order of grants, spends, renewals, clock steps and returns, a call is
admitted only from a term with units and time left, never more than granted, and what
is handed back as ``spent`` (renewed or returned, each term once) is what was admitted."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st
from tally_sdk.decision import Decision
from tally_sdk.holding import Holding, Term

Step = tuple[str, int]
steps = st.lists(
    st.one_of(
        st.tuples(st.just("grant"), st.integers(0, 5)),
        st.tuples(st.just("spend"), st.integers(1, 8)),
        st.tuples(st.just("tick"), st.integers(1, 3)),
        st.tuples(st.just("renew"), st.just(0)),
        st.tuples(st.just("retire"), st.just(0)),
    ),
    max_size=60,
)


@dataclass
class Naive:
    """Per lease term: granted, its deadline, and the calls admitted from it."""

    granted: dict[str, int] = field(default_factory=dict)
    deadline: dict[str, int] = field(default_factory=dict)
    admitted: dict[str, int] = field(default_factory=dict)
    handed_back: dict[str, int] = field(default_factory=dict)


@given(steps)
@settings(max_examples=300, deadline=None)
def test_never_admits_more_than_granted_and_reports_what_was_admitted(
    plan: list[Step],
) -> None:
    holding, naive, now, terms = Holding(), Naive(), 0, 0
    for action, amount in plan:
        if action == "grant":
            terms += 1
            name = f"ls_{terms}"
            naive.granted[name], naive.deadline[name] = amount, now + 4
            grant = Decision(allowed=True, status=200, lease=name)
            holding.add(Term(name, amount, now + 4, grant), now)
        elif action == "spend":
            for _ in range(amount):
                decision = holding.spend(now)
                if decision is None:
                    usable = [
                        n
                        for n in naive.granted
                        if n not in naive.handed_back
                        and naive.admitted.get(n, 0) < naive.granted[n]
                        and now < naive.deadline[n]
                        and _held(holding, n)
                    ]
                    assert usable == []  # refused only when no held term had room
                    break
                name = str(decision.lease)
                assert name not in naive.handed_back  # never spent after being handed back
                assert now < naive.deadline[name]
                naive.admitted[name] = naive.admitted.get(name, 0) + 1
                assert naive.admitted[name] <= naive.granted[name]
        elif action == "tick":
            now += amount
        elif action == "renew":
            spare = holding.renewal()
            if spare is not None:
                _hand_back(naive, spare)
        else:
            for term in holding.take_retired():
                _hand_back(naive, term)
    for term in holding.finished():
        _hand_back(naive, term)
    assert naive.handed_back == {n: naive.admitted.get(n, 0) for n in naive.granted}


def _hand_back(naive: Naive, term: Term) -> None:
    """Renewed or returned: each term once, its spent final."""
    assert term.lease not in naive.handed_back
    naive.handed_back[term.lease] = term.spent


def _held(holding: Holding, name: str) -> bool:
    return any(t is not None and t.lease == name for t in (holding.active, holding.ready))


def test_a_term_put_back_after_a_failed_renewal_does_not_displace_another() -> None:
    """A renewal failed (the request's answer never came) while another term finished:
    the one put back is renewed next, the other goes to be returned, neither is lost."""
    holding = Holding()
    grant = Decision(allowed=True, status=200)
    holding.add(Term("ls_a", 1, 10, grant), 0)
    holding.add(Term("ls_b", 1, 10, grant), 0)
    assert holding.spend(0) is not None  # ls_a spent
    assert holding.spend(0) is not None  # ls_b active, ls_a the spare
    renewing = holding.renewal()
    assert renewing is not None and renewing.lease == "ls_a"
    assert holding.spend(0) is None  # ls_b spent: it becomes the spare meanwhile
    holding.put_back(renewing)
    assert holding.renewal() is renewing
    assert [t.lease for t in holding.take_retired()] == ["ls_b"]
