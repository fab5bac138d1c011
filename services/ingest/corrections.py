"""``POST /v1/customers/{c}/usage/corrections``: a signed change to what a meter counted.

A correction is published as an event (``schemas.corrections``) through the path every
accepted event takes — ingest's write-ahead log and Kafka — so counting it is as exact as
counting any event: once, live and in the rollups.  It is then recorded in
``usage_corrections`` (who, when, why, against what was counted): the audit, and what
lets a client retry with the same ``id`` and get the first correction back.

Only additive meters (``sum``, ``count``) take corrections.  ``value`` asks for a total:
the meter's total for the UTC month of ``time`` (for the groups named) becomes ``value``,
the correction being the difference.  A decrease is checked, atomically in Redis,
against what the aggregator has counted for that month and group less the decreases
accepted and not counted yet, and held until its event is counted: usage never goes
below zero, however many decreases arrive at once.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, ConfigDict, Field
from redis.asyncio import Redis

from schemas import corrections, lua, redis_keys
from schemas.catalog import Aggregation, Meter
from schemas.corrections import CorrectionEvent
from schemas.events import (
    CUSTOMER_ID_PATTERN,
    MAX_VALUE,
    VALUE_DECIMALS,
    UtcDatetime,
    from_micros,
    to_micros,
    utcnow,
)
from schemas.problem_types import CORRECTION_CONFLICT, FORBIDDEN, NEGATIVE_USAGE
from schemas.text import PRINTABLE_PATTERN
from schemas.windows import Window, bucket_id
from services.common.auth import Authenticator, address, credential
from services.common.meter_cache import MeterCache
from services.common.openapi import problem_responses
from services.common.problems import Problem, invalid_field
from services.common.settings import Settings

ADDITIVE = (Aggregation.SUM, Aggregation.COUNT)
CustomerPath = Annotated[str, Path(pattern=CUSTOMER_ID_PATTERN)]
Publish = Callable[[list[CorrectionEvent], datetime], Awaitable[None]]
Amount = Annotated[Decimal, Field(max_digits=19, decimal_places=VALUE_DECIMALS)]


class CorrectionRequest(BaseModel):
    """What to correct: ``delta`` (signed) or ``value`` (the month's corrected total)."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        pattern=PRINTABLE_PATTERN,
        description="Idempotency key: the same id sent again answers the first correction.",
    )
    meter: str = Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")
    time: UtcDatetime = Field(description="When the corrected usage happened.")
    delta: Amount | None = Field(None, description="The signed change, not zero.")
    value: Amount | None = Field(
        None, ge=0, description="What the meter's total for the UTC month of `time` becomes."
    )
    groups: dict[str, str] = Field(
        default_factory=dict,
        description="The value of every group of the meter (`group_by`), by name.",
    )
    reason: str = Field(min_length=1, max_length=500, pattern=PRINTABLE_PATTERN)

    def amount_error(self) -> Problem | None:
        """Exactly one of ``delta`` and ``value``; a delta not zero, under 10^12."""
        if (self.delta is None) == (self.value is None):
            return invalid_field("body.delta", "send either delta or value")
        if self.delta is not None and (self.delta == 0 or abs(self.delta) >= MAX_VALUE):
            return invalid_field("body.delta", "must be non-zero and less than 10^12 in size")
        return None


@dataclass(frozen=True, slots=True)
class Hold:
    """What the counters said of a correction (``Corrector._hold``)."""

    field: str  # in the customer's correction holds
    counted: Decimal
    held: Decimal  # decreases accepted and not counted yet
    change: Decimal
    accepted: bool


class Correction(BaseModel):
    """A correction as recorded."""

    id: str
    customer: str
    meter: str
    time: datetime
    groups: dict[str, str]
    delta: Decimal
    counted: Decimal = Field(description="The month's total for the groups, when corrected.")
    reason: str
    actor: str = Field(description="`admin` or `service`: the token that made it.")
    created_at: datetime


class Corrections(BaseModel):
    corrections: list[Correction]


class Corrector:
    """What the corrections routes need, built once per process."""

    def __init__(
        self,
        settings: Settings,
        auth: Authenticator,
        meters: MeterCache,
        redis: Redis,
        pool: AsyncConnectionPool,
        publish: Publish,
    ) -> None:
        self.settings = settings
        self.auth = auth
        self.meters = meters
        self.redis = redis
        self.pool = pool
        self.publish = publish  # durable when it returns (``app.durably``), else raises
        self._hold_script = redis.register_script(lua.source("correction_hold"))

    async def actor(self, request: Request) -> str:
        """``admin`` or ``service``; a customer's own key may not correct its usage."""
        token = credential(request)
        if self.auth.is_admin(token):
            return "admin"
        caller = await self.auth.caller(token, address(request))
        if not caller.service:
            raise Problem(FORBIDDEN, "corrections need the admin token or a service token")
        return "service"

    async def correct(
        self, customer: str, asked: CorrectionRequest, actor: str
    ) -> tuple[Correction, bool]:
        """The correction made (True) or, for a repeated id, the one made before (False)."""
        if asked.id is not None and (earlier := await self._recorded(asked.id)) is not None:
            return _same(earlier, customer, asked), False
        if error := asked.amount_error():
            raise error
        meter = await self._meter(asked.meter)
        self._check(meter, asked)
        hold = await self._hold(customer, meter, asked)
        try:
            event = CorrectionEvent(
                asked.id or f"corr_{uuid.uuid4().hex}",
                customer,
                asked.time,
                self._change(meter, asked, hold),
                meter.name,
                asked.groups,
                asked.reason,
            )
            await self.publish([event], utcnow())
        except BaseException:
            await self._release(customer, hold)
            raise
        return await self._record(event, hold.counted, actor), True

    def _change(self, meter: Meter, asked: CorrectionRequest, hold: Hold) -> Decimal:
        """The change, once the counters have said it keeps the usage at or above 0."""
        month = bucket_id(Window.MONTH, asked.time)
        if not hold.accepted:
            raise Problem(
                NEGATIVE_USAGE,
                f"meter {meter.name!r} counted {hold.counted} for this customer in"
                f" {month}{_named(asked.groups)}"
                + (f", less {hold.held} of decreases not counted yet" if hold.held else "")
                + f": a change of {hold.change} would make it negative",
                errors=[{"field": "body.delta", "reason": "would make the usage negative"}],
            )
        if hold.change == 0:
            raise invalid_field("body.value", f"is what {meter.name!r} already counts")
        if (
            meter.aggregation is Aggregation.COUNT
            and hold.change != hold.change.to_integral_value()
        ):
            raise invalid_field("body.delta", "a count meter changes by whole events")
        return hold.change

    async def _hold(self, customer: str, meter: Meter, asked: CorrectionRequest) -> Hold:
        """Check the change against the month's counter less the decreases accepted and
        not counted yet, and hold it when it decreases (``lua/correction_hold.lua``):
        two decreases at the same instant are checked against each other too."""
        month = bucket_id(Window.MONTH, asked.time)
        values = tuple(asked.groups[name] for name in meter.group_names)
        group = redis_keys.group_field(values) if values else redis_keys.TOTAL
        amount, kind = (asked.delta, "delta") if asked.delta is not None else (asked.value, "value")
        assert amount is not None
        counted, held, change, accepted = await self._hold_script(
            keys=[
                redis_keys.counters(customer, meter.name, Window.MONTH, month),
                redis_keys.correction_holds(customer),
            ],
            args=[
                group,
                redis_keys.hold_field(meter.name, month, group),
                to_micros(amount),
                kind,
                corrections.HOLD_SECONDS,
            ],
        )
        return Hold(
            redis_keys.hold_field(meter.name, month, group),
            from_micros(int(counted)),
            from_micros(int(held)),
            from_micros(int(change)),
            accepted == 1,
        )

    async def _release(self, customer: str, hold: Hold) -> None:
        """Give back a hold whose correction was not made (refused, or not published)."""
        if hold.accepted and hold.change < 0:
            await self.redis.hincrby(
                redis_keys.correction_holds(customer), hold.field, to_micros(hold.change)
            )

    async def _meter(self, name: str) -> Meter:
        meter = (await self.meters.meters()).by_name.get(name)
        if meter is None:
            raise invalid_field("body.meter", f"no live meter {name!r}")
        if meter.aggregation not in ADDITIVE:
            raise invalid_field(
                "body.meter",
                f"meter {name!r} aggregates with {meter.aggregation}: only sum and count"
                " meters take corrections",
            )
        return meter

    def _check(self, meter: Meter, asked: CorrectionRequest) -> None:
        names = set(meter.group_names)
        if set(asked.groups) != names:
            wanted = ", ".join(sorted(names)) or "none"
            raise invalid_field("body.groups", f"name every group of {meter.name!r}: {wanted}")
        now = utcnow()
        if asked.time > now + self.settings.future_tolerance:
            raise invalid_field("body.time", "is in the future")
        if asked.time < now - self.settings.correction_window:
            raise invalid_field(
                "body.time", f"is more than {self.settings.correction_days} days ago"
            )

    async def _recorded(self, correction_id: str) -> Correction | None:
        async with self.pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                f"SELECT {_COLUMNS} FROM usage_corrections WHERE id = %s", [correction_id]
            )
            row = await cur.fetchone()
        return _correction(row) if row else None

    async def _record(self, event: CorrectionEvent, counted: Decimal, actor: str) -> Correction:
        async with self.pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                "INSERT INTO usage_corrections (id, customer_id, meter, at, groups, delta,"
                " counted, reason, actor) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
                f" ON CONFLICT (id) DO NOTHING RETURNING {_COLUMNS}",
                [
                    event.id,
                    event.subject,
                    event.meter,
                    event.time,
                    orjson.dumps(event.groups).decode(),
                    event.delta,
                    counted,
                    event.reason,
                    actor,
                ],
            )
            row = await cur.fetchone()
        if row is None:  # the same id recorded meanwhile by a concurrent request
            found = await self._recorded(event.id)
            assert found is not None
            return found
        return _correction(row)

    async def listed(self, customer: str, meter: str | None, limit: int) -> list[Correction]:
        sql = f"SELECT {_COLUMNS} FROM usage_corrections WHERE customer_id = %s"
        params: list[Any] = [customer]
        if meter is not None:
            sql += " AND meter = %s"
            params.append(meter)
        async with self.pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(sql + " ORDER BY created_at DESC, id LIMIT %s", [*params, limit])
            return [_correction(row) for row in await cur.fetchall()]


_COLUMNS = "id, customer_id, meter, at, groups, delta, counted, reason, actor, created_at"


def _correction(row: dict[str, Any]) -> Correction:
    return Correction(
        id=row["id"],
        customer=row["customer_id"],
        meter=row["meter"],
        time=row["at"],
        groups=row["groups"],
        delta=row["delta"].normalize() + 0,
        counted=row["counted"].normalize() + 0,
        reason=row["reason"],
        actor=row["actor"],
        created_at=row["created_at"],
    )


def _same(earlier: Correction, customer: str, asked: CorrectionRequest) -> Correction:
    """A repeated id must repeat the request: else it is a second correction misnamed."""
    same = (
        earlier.customer == customer
        and earlier.meter == asked.meter
        and earlier.time == asked.time
        and earlier.groups == asked.groups
        and (asked.delta is None or earlier.delta == asked.delta)
        and (asked.value is None or earlier.counted + earlier.delta == asked.value)
    )
    if not same:
        raise Problem(
            CORRECTION_CONFLICT,
            f"correction {earlier.id!r} was made with other terms; use a new id",
        )
    return earlier


def _named(groups: dict[str, str]) -> str:
    if not groups:
        return ""
    return " (" + ", ".join(f"{k}={v}" for k, v in sorted(groups.items())) + ")"


def router(corrector: Corrector) -> APIRouter:
    api = APIRouter(tags=["usage"])

    @api.post(
        "/v1/customers/{customer}/usage/corrections",
        status_code=201,
        summary="Correct what a meter counted (admin or service token)",
        responses=problem_responses(401, 403, 409, 422, 503) | {200: {"model": Correction}},
    )
    async def post_correction(
        request: Request, customer: CustomerPath, body: CorrectionRequest
    ) -> Any:
        actor = await corrector.actor(request)
        made, new = await corrector.correct(customer, body, actor)
        return made if new else JSONResponse(made.model_dump(mode="json"), status_code=200)

    @api.get(
        "/v1/customers/{customer}/usage/corrections",
        summary="The corrections made to a customer's usage, newest first",
        responses=problem_responses(401, 403, 422),
    )
    async def list_corrections(
        request: Request,
        customer: CustomerPath,
        meter: Annotated[str | None, Query(pattern=r"^[a-z][a-z0-9_]{0,63}$")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> Corrections:
        await corrector.actor(request)
        return Corrections(corrections=await corrector.listed(customer, meter, limit))

    return api
