"""Who may manage webhooks: a customer's own key (for itself), or the seller (a service
token or the admin token) for anyone, and alone for the seller's own endpoints."""

from __future__ import annotations

from starlette.requests import Request

from schemas.api_keys import Scope
from services.common.auth import Authenticator, Caller, address, credential, forbidden_customer


class Access:
    def __init__(self, auth: Authenticator) -> None:
        self._auth = auth

    def _is_admin(self, request: Request) -> bool:
        return self._auth.is_admin(credential(request))

    async def customer(self, request: Request, customer: str, scope: Scope) -> Caller:
        """The caller, allowed ``scope`` on ``customer``; ``Caller.service`` for the seller."""
        if self._is_admin(request):
            return Caller(None)
        return await self._auth.authorize(request, scope, customer)

    async def seller(self, request: Request) -> None:
        """A service token or the admin token; a customer's key is refused (403)."""
        if self._is_admin(request):
            return
        caller = await self._auth.caller(credential(request), address(request))
        if not caller.service:
            raise forbidden_customer()

    async def caller(self, request: Request) -> Caller:
        if self._is_admin(request):
            return Caller(None)
        return await self._auth.caller(credential(request), address(request))

    async def require(self, caller: Caller, customer: str, scope: Scope) -> None:
        await self._auth.require(caller, customer, scope)
