"""The route table's types and its compiled form: one dictionary lookup per request.

A `Route` is one line: methods, a path pattern with `{model}` / `{version}` / other `{name}`
parameters, the handler, a summary and the rest of its OpenAPI operation. `Router` compiles the
table once, at start-up, for the models being served: every pattern whose parameters are only
the model and its version is expanded to the concrete paths (`/v2/models/lenet/infer`), so the
hot path is `dict.get(path)`; other patterns and every miss go through regular expressions,
which also tell an unknown model or version (404 naming it) from an unknown path. HEAD is
answered wherever GET is. The OpenAPI document is generated from the same table
(`bnfold.serve.openapi`), so a route cannot be served without being documented.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from bnfold.serve.errors import ServeError

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]
Response = tuple[int, Headers, bytes]
# handler(app, request) -> (status, headers, body); `app` is the InferenceApp serving the request.
Handler = Callable[[Any, "Request"], Awaitable[Response]]

_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class Route:
    """One entry of the route table: what it answers, who answers, and how it is documented.

    `doc` holds the rest of the OpenAPI operation (description, requestBody, responses, extra
    parameters), or is a function of the served models that returns it. `endpoint` labels the
    route's requests in the metrics (`infer`, `predictions`); None leaves it uncounted.
    """

    methods: tuple[str, ...]
    path: str
    handler: Handler
    summary: str
    doc: dict[str, Any] | Callable[[Mapping[str, Any]], dict[str, Any]] = field(default_factory=dict)
    endpoint: str | None = None
    allowed: tuple[str, ...] = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        # The methods answered: HEAD wherever GET is (HTTP requires it). Computed once.
        allowed = self.methods + ("HEAD",) if "GET" in self.methods and "HEAD" not in self.methods else self.methods
        object.__setattr__(self, "allowed", allowed)

    @property
    def params(self) -> list[str]:
        return _PARAM.findall(self.path)


class Request:
    """What a handler gets: the ASGI scope and receive, and the path's parameters."""

    __slots__ = ("method", "path", "scope", "receive", "params", "model", "reserved")

    def __init__(self, method: str, path: str, scope: Scope, receive: Receive, params: Mapping[str, str]) -> None:
        self.method = method
        self.path = path
        self.scope = scope
        self.receive = receive
        self.params = params
        self.model: str | None = params.get("model")
        self.reserved = 0   # body bytes counted against the app's pending-body budget

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.scope["headers"]:
            if key == name:
                return value
        return None


def _regex(pattern: str) -> re.Pattern[str]:
    parts = _PARAM.split(pattern)   # literal, name, literal, name, ...
    return re.compile("".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>[^/]+)" for i, p in enumerate(parts)) + "$")


class Router:
    """The table compiled for `models` (name -> anything with a `version`)."""

    def __init__(self, routes: Sequence[Route], models: Mapping[str, Any]) -> None:
        self.routes = list(routes)
        self.models = models
        self.exact: dict[str, tuple[Route, Mapping[str, str]]] = {}
        self.patterns: list[tuple[re.Pattern[str], Route]] = []
        seen: set[str] = set()
        for route in self.routes:
            if route.path in seen:
                raise ServeError(f"route {route.path} is in the table twice", status=500)
            seen.add(route.path)
            params = set(route.params)
            self.patterns.append((_regex(route.path), route))
            if params <= {"model", "version"}:
                for path, values in self._expand(route.path, params):
                    self.exact[path] = (route, values)

    def _expand(self, pattern: str, params: set[str]) -> list[tuple[str, dict[str, str]]]:
        if not params:
            return [(pattern, {})]
        out = []
        for name, model in self.models.items():
            values = {"model": name}
            if "version" in params:
                values["version"] = str(model.version)
            out.append((pattern.format(**values), values))
        return out

    def match(self, method: str, path: str) -> tuple[Route, Mapping[str, str]]:
        """The route and parameters for `path`, or a 404/405 `ServeError` that says why not."""
        entry = self.exact.get(path)
        if entry is None:
            entry = self._slow_match(method, path)
        route = entry[0]
        if method not in route.allowed:
            allow = ", ".join(route.allowed)
            raise ServeError(f"method {method} not allowed on {path[:200]}; use {allow}", status=405, allow=allow)
        return entry

    def _slow_match(self, method: str, path: str) -> tuple[Route, Mapping[str, str]]:
        if len(path) > 1 and path.endswith("/"):   # "/docs/" is "/docs"
            entry = self.exact.get(path.rstrip("/"))
            if entry is not None:
                return entry
            path = path.rstrip("/")
        for regex, route in self.patterns:
            found = regex.match(path)
            if found is None:
                continue
            values = found.groupdict()
            name = values.get("model")
            if name is not None and name not in self.models:
                # The name is the client's: echoed cut short (a URL may be up to --max-header-kb long).
                raise ServeError(f"unknown model {name[:200]!r}; this server has {sorted(self.models)}", status=404)
            version = values.get("version")
            if version is not None and version != str(self.models[name].version):
                raise ServeError(f"unknown version {version[:200]!r} for model {name!r}; available: "
                                 f"[{str(self.models[name].version)!r}]", status=404)
            return route, values
        raise ServeError(f"no route for {method} {path[:200]}; see /docs for the endpoints", status=404)


__all__ = ["Route", "Request", "Router", "Handler", "Response", "Headers"]
