"""``analyze --by route`` on the "request completed" lines the web middleware writes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

import rag_instrument as ri
from rag_instrument.cli.__main__ import main
from rag_instrument.web import RequestMiddleware


async def _search(request: Request) -> JSONResponse:
    with ri.stage("retrieval"):
        await asyncio.sleep(0)
    return JSONResponse({"q": request.query_params.get("q")})


async def _broken(request: Request) -> PlainTextResponse:
    return PlainTextResponse("down", status_code=503)


def test_routes_from_the_middleware_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "web.jsonl"
    ri.configure(
        exporter="memory", log_file=str(log), budgets={"GET /api/search": 0.001}
    )
    app = RequestMiddleware(
        Starlette(routes=[Route("/api/search", _search), Route("/api/broken", _broken)])
    )

    async def traffic() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            for i in range(5):
                await client.get(f"/api/search?q={i}")
            await client.get("/api/broken")
            await client.get("/nowhere")

    asyncio.run(traffic())
    ri.shutdown()
    assert main(["analyze", str(log), "--by", "route", "--format", "json"]) == 0
    rows = {r["route"]: r for r in json.loads(capsys.readouterr().out)}
    search = rows["GET /api/search"]
    assert (search["count"], search["errors"], search["statuses"]) == (5, 0, {"2xx": 5})
    # The route's budget comes from the middleware's own "budget exceeded" lines.
    assert (search["budget_ms"], search["over_budget"]) == (0.001, 5)
    assert (rows["GET /api/broken"]["errors"], rows["GET /api/broken"]["statuses"]) == (
        1, {"5xx": 1}
    )
    assert sum(r["count"] for r in rows.values()) == 7
    # The same log by stage: the retrieval runs inside the requests.
    assert main(["analyze", str(log), "--format", "json"]) == 0
    (stage,) = json.loads(capsys.readouterr().out)
    assert (stage["stage"], stage["count"]) == ("retrieval", 5)
    assert main(["analyze", str(log)]) == 0
    assert "GET /api/search" in capsys.readouterr().out  # the budget table names the route


def test_route_budgets_from_a_file_or_option_in_any_case(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # configure() takes "post /api/search"; --budgets and --budget take the same keys.
    log = tmp_path / "web.jsonl"
    ri.configure(exporter="memory", log_file=str(log))
    app = RequestMiddleware(Starlette(routes=[Route("/api/search", _search)]))

    async def traffic() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            for i in range(3):
                await client.get(f"/api/search?q={i}")

    asyncio.run(traffic())
    ri.shutdown()
    budgets = tmp_path / "budgets.toml"
    budgets.write_text('"get /api/search" = 0.0001\n')
    for option in (["--budgets", str(budgets)], ["--budget", "Get  /api/search=0.0001"]):
        argv = ["analyze", str(log), "--by", "route", "--format", "json", *option]
        assert main([*argv, "--fail-on-budget"]) == 1, option
        (row,) = json.loads(capsys.readouterr().out)
        assert (row["route"], row["budget_ms"], row["over_budget"]) == (
            "GET /api/search", 0.0001, 3
        )
