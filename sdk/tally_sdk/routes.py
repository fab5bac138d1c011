"""The endpoint of a request as the route that will serve it: its path template.

An API's paths carry ids (``/v1/items/42``).  Named by its raw path, every id would be
an endpoint of its own: a lease per id, so a lease request for nearly every call, and
an ``endpoint`` dimension as large as the ids.  Starlette (and so FastAPI) puts the app
in ``scope["app"]`` before any middleware runs, so the app's routes can be matched here,
ahead of its router, and the request named by the template of the route it matches
(``/v1/items/{item_id}``), as OpenTelemetry's ``http.route`` names it.  Any other ASGI
app, or a path no route matches, is named by its raw path.  A mounted app
(``app.mount("/static", ...)``) names all its requests by its mount path.
"""

from __future__ import annotations

import re
from typing import Any

from tally_sdk.asgi import Scope

MAX_ENDPOINT = 256  # the longest dimension value Tally stores
_REFUSED = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
"""What Tally refuses in a dimension: control characters, and lone surrogates (an
``endpoint`` or ``end_user`` of the app's own may return them; no JSON can carry them)."""
MAX_REMEMBERED = 10_000
"""Paths whose endpoint is remembered: most requests are then one dict lookup.  Reaching
it (ids in paths, or a scan of random ones) forgets them all and starts again, so the
paths in use are soon remembered again instead of being crowded out for good."""


def raw_path(scope: Scope) -> str:
    """The request's path as Tally takes an endpoint (``dimension``): ``/a%00b`` arrives
    as ``/a\\x00b``.  Tally refuses such an endpoint, and the call's event with it:
    unbilled, its unit held."""
    return dimension(str(scope["path"]))


def dimension(text: str) -> str:
    """``text`` as Tally takes a dimension value (an endpoint, an end user): at most
    ``MAX_ENDPOINT`` characters, without control characters or lone surrogates."""
    text = text[:MAX_ENDPOINT]
    return text if text.isprintable() else _REFUSED.sub("", text)


class RouteTemplates:
    """``endpoint`` for ``TallyMiddleware``: the matched route's path template."""

    def __init__(self, max_remembered: int = MAX_REMEMBERED) -> None:
        self._max = max_remembered
        self._remembered = 0
        # method -> path -> endpoint: two lookups of strings (whose hashes are cached)
        # cost less than making and hashing a (method, path) tuple per request
        self._known: dict[Any, dict[Any, str]] = {}

    def name(self, scope: Scope) -> str:
        """The endpoint of the request ``scope`` describes."""
        method, path = scope.get("method"), scope["path"]
        paths = self._known.get(method)
        if paths is not None:
            known = paths.get(path)
            if known is not None:
                return known
        routes = getattr(scope.get("app"), "routes", None)
        if not routes:  # not a Starlette app: nothing to remember either
            return raw_path(scope)
        endpoint = _template(routes, scope) or raw_path(scope)
        if self._remembered >= self._max:
            self._known, self._remembered = {}, 0
        self._known.setdefault(method, {})[path] = endpoint
        self._remembered += 1
        return endpoint

    __call__ = name  # an ``endpoint`` like any other


def _template(routes: Any, scope: Scope) -> str | None:
    """The template of the route Starlette's router will pick: the first that matches
    fully, else the first whose path matches under another method (then a 405)."""
    partial = None
    for route in routes:
        matches, template = getattr(route, "matches", None), getattr(route, "path_format", None)
        if matches is None or not isinstance(template, str):
            continue
        match, _ = matches(scope)
        strength = getattr(match, "value", 0)  # starlette.routing.Match: NONE, PARTIAL, FULL
        if strength == 2:
            return template[:MAX_ENDPOINT]
        if strength == 1 and partial is None:
            partial = template[:MAX_ENDPOINT]
    return partial
