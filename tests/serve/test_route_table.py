"""The route table is complete: one entry is enough for a new route to be served, documented and counted."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")


def test_a_new_counted_route_is_one_entry_in_the_table(tiny_onnx: Path) -> None:
    """A route with an `endpoint` used to need a hand-added metrics label, or observe() raised
    KeyError after the response; now the labels come from the table."""
    from bnfold.serve.app import ROUTES, AccessLog, InferenceApp
    from bnfold.serve.routes import Route
    from bnfold.serve.runtime import open_session

    async def echo(app: InferenceApp, request) -> tuple[int, list, bytes]:
        return 200, [(b"content-type", b"text/plain")], request.params["model"].encode()

    dummy = Route(("GET",), "/v2/models/{model}/echo", echo, "Echo the model's name", endpoint="echo")
    app = InferenceApp({"tiny": open_session(tiny_onnx, threads=1, warmup=False)},
                       access_log=AccessLog(enabled=False), routes=[*ROUTES, dummy])

    async def run() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            return (await client.get("/v2/models/tiny/echo"), await client.get("/metrics"),
                    await client.get("/openapi.json"))

    echoed, metrics, openapi = asyncio.run(run())
    assert echoed.status_code == 200 and echoed.text == "tiny"
    assert 'bnfold_requests_total{endpoint="echo",model="tiny",protocol="http"} 1.0' in metrics.text
    assert "/v2/models/{model}/echo" in openapi.json()["paths"]
