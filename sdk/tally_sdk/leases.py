"""``LeaseDecider``: most calls decided in this process, from leases (DESIGN.md decision 8).

A round trip to Tally per request costs the app more than its own work.  So the
decider holds a lease per (key, meter, endpoint): calls are admitted from it with no
await at all while units remain, the next term is fetched in the background before
this one runs out, and concurrent callers that find nothing left share one lease
request.  Exactness stays with Tally: a lease's units are reserved there atomically,
grants shrink to one call near a limit, each admitted call's event carries the lease
id (``tallylease``) that settles its unit, and unspent units are handed back on
renewal, when idle, and on shutdown.

Asked for only what is waiting plus a lookahead: none for a new slot, doubled while
grants come back full, halved when they do not or a term ends with units unspent, none
after a refusal.  A rate limit's tokens are taken when granted and Tally gives back a
term's unspent ones only when it is renewed or returned, so over-asking would leave the
customer fewer calls than its plan allows meanwhile (a slot per endpoint: an app with
many endpoints, each holding a spare token, would leave many).  A refusal is
cached for its ``Retry-After`` (at most a lease's ttl) — the slot's, or, refused for the
address that asked (too many bad keys or calls from it), that address's calls in every
slot, while the slot's other callers are asked for again — and a key Tally does not take
(401: unknown, revoked or expired) for a lease's ttl, so neither a refused caller nor a
client retrying with a dead key in a loop costs Tally a request per call meanwhile.
Where Tally cannot grant leases (503: no Redis; an older Tally without the route; 409
``lease-declined``: the plan limits each end user, which only a call naming its end user
can count), calls go to ``fallback`` (``RemoteDecider``, ``/v1/enforce``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from tally_sdk.client import Tally
from tally_sdk.decider import Ask, Decider, RemoteDecider
from tally_sdk.decision import Decision
from tally_sdk.errors import AuthenticationError, TallyError, error_of
from tally_sdk.holding import Holding, Term

log = logging.getLogger("tally_sdk")

Slot = tuple[str, str, str]  # key, meter, endpoint
REFUSALS = frozenset({403, 429})
ADDRESS_POLICIES = frozenset({"auth-failures", "per-address"})
"""Refusals of the address a lease request named, not of its key: answered to the calls
from that address (in any slot, until ``Retry-After``), never to the slot's other
callers."""
UNKNOWN_LEASE = "https://tally.dev/problems/unknown-lease"
LEASE_DECLINED = "https://tally.dev/problems/lease-declined"
DECLINED_SECONDS = 60.0
"""How long a slot whose lease was declined (its plan limits each end user) is decided
call by call before a lease is asked for again: a plan change may lift the limit."""
MAX_WANT = 10_000  # the most one lease request may ask for
RENEWAL_SPREAD = 0.25
"""How far a term's renewal by time moves at random, early or late, as a share of its lead
(a quarter of the term).  Leases taken at one moment (an app's start; every customer
after a blip of Tally) would otherwise renew together term after term, a burst of lease
requests at Tally each time; moving each renewal by up to this much spreads them out
within a few minutes, for about 0.3 % more renewals and a lead never under 3/4 of it."""


@dataclass(slots=True)
class _Lease:
    """A slot's holding and what is under way for it."""

    slot: Slot
    holding: Holding = field(default_factory=Holding)
    waiters: deque[tuple[asyncio.Future[Decision], Ask]] = field(default_factory=deque)
    fetching: asyncio.Task[None] | None = None
    lookahead: int = 0  # calls asked for beyond those waiting
    refusal: Decision | None = None
    refused_until: float = 0.0
    address_refused_at: float = -float("inf")  # when a lease request's address was refused
    unauthorized: AuthenticationError | None = None
    unauthorized_until: float = 0.0
    remote_until: float = 0.0
    used_at: float = 0.0
    customer: str | None = None


class LeaseDecider:
    """Decide calls from leases; ``fallback`` decides when leases cannot be had.

    ``max_slots`` bounds memory (least recently used slots are returned and dropped);
    a slot unused for ``idle`` seconds is returned too.  ``max_lookahead`` caps how many
    calls beyond those waiting one request asks for.  ``clock`` (monotonic seconds) and
    ``jitter`` (a number in [0, 1) drawn for each term) are there for tests to fix.
    """

    def __init__(
        self,
        tally: Tally,
        *,
        fallback: Decider | None = None,
        max_slots: int = 10_000,
        max_lookahead: int = 1_000,
        idle: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.tally = tally
        self.fallback = fallback or RemoteDecider(tally)
        self.max_slots, self.max_lookahead, self.idle = max_slots, max_lookahead, idle
        self._clock = clock
        self._jitter = jitter  # in [0, 1): where in ``RENEWAL_SPREAD`` a renewal falls
        self._leases: OrderedDict[Slot, _Lease] = OrderedDict()
        self._blocked: dict[str, tuple[Decision, float]] = {}  # address: refusal, until
        self._ttl = 2.0  # a term's length as Tally last said; refusals are cached no longer
        self._unsupported = False
        self._janitor: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()

    async def decide(self, ask: Ask) -> Decision:
        if ask.mode != "reserve" or self._unsupported:
            return await self.fallback.decide(ask)
        decided = self.decide_now(ask.key, ask.meter, ask.endpoint, ask.client_ip)
        if decided is not None:
            return decided
        lease, now = self._lease((ask.key, ask.meter, ask.endpoint)), self._clock()
        if now < lease.unauthorized_until and lease.unauthorized is not None:
            was = lease.unauthorized  # Tally refused this key a moment ago: a new copy,
            # as an exception raised again would carry every earlier traceback along
            raise AuthenticationError(str(was), status=was.status, problem=was.problem)
        if now < lease.remote_until:
            return await self.fallback.decide(ask)
        return await self._wait(lease, ask)

    def decide_now(
        self, key: str, meter: str, endpoint: str, client_ip: str | None = None
    ) -> Decision | None:
        """A reserve-mode call decided without awaiting anything — admitted from a held
        term, or refused by a cached refusal — else ``None`` (then ``decide``).

        The middleware's fast path: no ``Ask`` and no coroutine per call; the next term
        is fetched in the background when this one runs low, as ``decide`` does."""
        if self._unsupported:
            return None
        if self._blocked and client_ip in self._blocked:
            refusal = self._address_refusal(client_ip)
            if refusal is not None:
                return refusal
        lease, now = self._lease((key, meter, endpoint)), self._clock()
        lease.used_at = now
        admitted = lease.holding.spend(now)
        if admitted is not None:
            # the next term is held or on its way most of the time: no call then
            ahead = lease.fetching is not None or lease.holding.ready is not None
            if not ahead and self._next_term_due(lease, now):
                self._fetch(lease, Ask(key, meter, endpoint, "", "reserve", client_ip))
            return admitted
        if now < lease.refused_until and lease.refusal is not None:
            return lease.refusal
        return None

    async def aclose(self) -> None:
        """Return every lease (on shutdown): their unspent units are free at once."""
        if self._janitor is not None:
            self._janitor.cancel()
        leases, self._leases = list(self._leases.values()), OrderedDict()
        for lease in leases:
            if lease.fetching is not None:
                lease.fetching.cancel()
        await asyncio.gather(*(self._return(lease, lease.holding.finished()) for lease in leases))

    # Local ------------------------------------------------------------------------

    def _lease(self, slot: Slot) -> _Lease:
        lease = self._leases.get(slot)
        if lease is not None:
            self._leases.move_to_end(slot)
            return lease
        lease = self._leases[slot] = _Lease(slot)
        if len(self._leases) > self.max_slots:
            _, evicted = self._leases.popitem(last=False)
            self._drop(evicted)
        if self._janitor is None:
            self._janitor = asyncio.create_task(self._sweep())
        return lease

    def _next_term_due(self, lease: _Lease, now: float) -> bool:
        """Whether to fetch the next term ahead: this one is nearly spent or nearly over.
        The caller has checked that no next term is held or being fetched."""
        if lease.lookahead == 0:
            return False
        term = lease.holding.active
        return term is None or term.spent >= term.renew_at or now > term.renew_after

    def _address_refusal(self, address: str) -> Decision | None:
        """The refusal Tally gave ``address`` (too many bad keys, too many calls), while
        it lasts."""
        refusal, until = self._blocked[address]
        if self._clock() < until:
            return refusal
        del self._blocked[address]
        return None

    async def _wait(self, lease: _Lease, ask: Ask) -> Decision:
        waiter: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
        lease.waiters.append((waiter, ask))
        self._fetch(lease, ask)
        decision = await waiter
        return decision if decision is not _REMOTE else await self.fallback.decide(ask)

    def _serve(self, lease: _Lease, answer: Decision | None = None) -> None:
        """Admit waiting calls from what is held; with ``answer``, answer them all so."""
        now = self._clock()
        while lease.waiters:
            waiter = lease.waiters[0][0]
            if waiter.done():  # its caller went away: it spends nothing
                lease.waiters.popleft()
                continue
            decision = answer or lease.holding.spend(now)
            if decision is None:
                return
            lease.waiters.popleft()[0].set_result(decision)

    def _block(self, lease: _Lease, address: str | None, refusal: Decision, sent: float) -> None:
        """Answer the calls from ``address`` with ``refusal``, now and until its
        ``Retry-After``; the slot's other callers wait on, to be asked for again — unless
        another address of this slot was refused within a ttl: then Tally refuses every
        address it is told (the app's own, say, its ``X-Forwarded-For`` not believed),
        and asking again for each would cost a request per waiting address."""
        if address is not None:
            if len(self._blocked) >= self.max_slots:
                self._blocked = {}
            until = sent + min(float(refusal.retry_after or self._ttl), self._ttl)
            self._blocked[address] = (refusal, until)
        everyone = sent - lease.address_refused_at < self._ttl
        lease.address_refused_at = sent
        waiting, lease.waiters = lease.waiters, deque()
        for waiter, ask in waiting:
            if waiter.done():
                continue
            if everyone or ask.client_ip == address:
                waiter.set_result(refusal)
            else:
                lease.waiters.append((waiter, ask))

    def _fail(self, lease: _Lease, exc: BaseException) -> None:
        while lease.waiters:
            waiter = lease.waiters.popleft()[0]
            if not waiter.done():
                waiter.set_exception(exc)

    # Talking to Tally -----------------------------------------------------------

    def _fetch(self, lease: _Lease, ask: Ask) -> None:
        if lease.fetching is None:
            lease.fetching = asyncio.create_task(self._fetching(lease, ask))

    async def _fetching(self, lease: _Lease, ask: Ask) -> None:
        """Ask for terms until nobody waits; always leave no waiter unanswered."""
        try:
            while await self._ask(lease, ask) and lease.waiters:
                ask = lease.waiters[0][1]  # asked as the first call waiting (its address)
        except TallyError as exc:
            self._fail(lease, exc)
        except BaseException as exc:
            self._fail(lease, TallyError(f"lease request failed: {exc!r}"))
            raise
        finally:
            lease.fetching = None
            self._serve(lease, None)
            if lease.waiters:  # arrived after the last grant, or of another address
                self._fetch(lease, lease.waiters[0][1])

    async def _ask(self, lease: _Lease, ask: Ask) -> bool:
        """One lease request; whether to ask again for calls still waiting."""
        renewed = lease.holding.renewal()
        if renewed is not None and renewed.spent < renewed.granted:
            lease.lookahead //= 2  # it ended with units unspent: asked for too many
        want = min(MAX_WANT, max(1, len(lease.waiters) + lease.lookahead))
        body: dict[str, Any] = {"want": want, "meter": ask.meter, "endpoint": ask.endpoint}
        # Numbered terms under an id chosen here: the pipelined client resends a request
        # once when its connection drops, and Tally answers the resend as it answered the
        # first time instead of granting twice.
        if renewed is not None:
            term = renewed.number + 1
            body |= {"lease": renewed.lease, "spent": renewed.spent, "term": term}
        else:
            term = 1
            body |= {"lease": new_lease_id(), "term": term}
        sent = self._clock()
        try:
            status, headers, answer = await self.tally.post_decision(
                "/v1/leases", body, ask.key, ask.client_ip
            )
        except TallyError:
            if renewed is not None:
                lease.holding.put_back(renewed)  # not renewed, as far as we know
            raise
        if status == 200 and answer is not None:
            self._granted(lease, answer, headers, want, sent, term)
            return True
        if status in REFUSALS:
            refusal = Decision.from_answer(status, headers, answer or {})
            if (answer or {}).get("policy") in ADDRESS_POLICIES:
                if renewed is not None:  # refused before any lease was looked at
                    lease.holding.put_back(renewed)
                self._block(lease, ask.client_ip, refusal, sent)
            else:
                self._refused(lease, refusal, sent)
            return False
        if status == 404 and (answer or {}).get("type") == UNKNOWN_LEASE:
            return True  # the renewed lease ended: the next request takes a new one
        if status == 409 and (answer or {}).get("type") == LEASE_DECLINED:
            lease.remote_until = sent + DECLINED_SECONDS  # limits per end user: per call
            self._serve(lease, _REMOTE)
            return False
        if status == 503 or status in (404, 405):
            self._unsupported = status != 503
            lease.remote_until = sent + 1.0
            self._serve(lease, _REMOTE)
            return False
        error = error_of(status, answer, "POST /v1/leases", "")
        if renewed is not None:  # Tally changed nothing: return it later, as the service
            lease.holding.put_back(renewed)
        if isinstance(error, AuthenticationError):
            # keys do not come back to life: the same answer for the ttl, as a revocation
            # reaches a holder within it
            lease.unauthorized, lease.unauthorized_until = error, sent + self._ttl
        raise error

    def _granted(
        self,
        lease: _Lease,
        answer: dict[str, Any],
        headers: dict[str, str],
        want: int,
        sent: float,
        term: int,
    ) -> None:
        """Hold the new term (its clock starts when we asked: safe whatever the skew)."""
        self._ttl = int(answer.get("ttl_ms") or 2000) / 1000
        granted, lease_id = int(answer.get("granted") or 0), str(answer["lease"])
        decision = replace(Decision.from_answer(200, headers, answer), lease=lease_id)
        lease.customer = decision.customer
        left = int(answer.get("expires_in_ms") or self._ttl * 1000) / 1000  # less on a resend
        deadline = sent + min(left, self._ttl) - min(0.25, self._ttl / 10)
        held = Term(  # the next is due ahead, with a quarter of its calls or ~time left
            lease_id,
            granted,
            deadline,
            decision,
            number=term,
            renew_at=granted - max(1, granted // 4),
            renew_after=deadline - self._lead(),
        )
        lease.holding.add(held, self._clock())
        lease.lookahead = (
            min(self.max_lookahead, max(1, lease.lookahead * 2))
            if granted >= want
            else granted // 2
        )
        lease.refusal = None
        self._serve(lease)

    def _lead(self) -> float:
        """How long before a term ends its successor is fetched: a quarter of the term,
        moved at random by up to ``RENEWAL_SPREAD`` of it."""
        return self._ttl / 4 * (1 + RENEWAL_SPREAD * (2 * self._jitter() - 1))

    def _refused(self, lease: _Lease, refusal: Decision, sent: float) -> None:
        """Answer every waiter, and the same callers until ``Retry-After``, with it."""
        lease.lookahead = 0
        lease.refusal = refusal
        lease.refused_until = sent + min(float(refusal.retry_after or self._ttl), self._ttl)
        self._serve(lease, refusal)

    # Giving back ----------------------------------------------------------------

    async def _sweep(self) -> None:
        """Return what idle slots hold, and terms that finished with units unspent:
        unreturned, those stay held in Tally until its settle window passes."""
        while True:
            await asyncio.sleep(max(0.1, self._ttl / 2))
            now = self._clock()
            self._blocked = {a: b for a, b in self._blocked.items() if now < b[1]}
            for slot, lease in list(self._leases.items()):
                busy = lease.fetching is not None or lease.waiters
                if not busy and now - lease.used_at > self.idle:
                    del self._leases[slot]
                    self._drop(lease)
                elif lease.holding.retired:
                    self._later(self._return(lease, lease.holding.take_retired()))

    def _drop(self, lease: _Lease) -> None:
        if lease.fetching is not None:
            lease.fetching.cancel()
        self._later(self._return(lease, lease.holding.finished()))

    def _later(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _return(self, lease: _Lease, terms: list[Term]) -> None:
        """``POST /v1/leases/return`` each term, as the service (a revoked key may not)."""
        if lease.customer is None:
            return
        for term in terms:
            body = {
                "lease": term.lease,
                "spent": term.spent,
                "customer": lease.customer,
                "term": term.number,  # a late return of an older term frees nothing
            }
            try:
                status, _, answer = await self.tally.post_decision("/v1/leases/return", body, None)
            except TallyError as exc:
                log.warning("tally: lease %s not returned: %s", term.lease, exc)
                continue
            if status != 200 and status != 404:
                log.warning("tally: lease %s not returned: %s %s", term.lease, status, answer)


def new_lease_id() -> str:
    """96 random bits: ``ls_`` and 16 URL-safe characters, as Tally's own lease ids."""
    return "ls_" + secrets.token_urlsafe(12)


_REMOTE = Decision(allowed=False, status=0)
"""Marks waiters to be decided by the fallback (never relayed to a caller)."""
