"""HTTP routes for the live training view (web/hidream_lokr_live.js), registered on ComfyUI's server at import.

    GET  /hidream_lokr/runs?node=<id>&prompt_id=<id>   summaries of the runs (of one node / prompt), oldest first
    GET  /hidream_lokr/runs/latest?node=<id>           the newest run (of one node): how a reloaded page finds it
    GET  /hidream_lokr/runs/<run_id>?since=<n>         a run's summary + its per-step events from index n on
    GET  /hidream_lokr/runs/<run_id>/previews/<index>  a run's preview image (only files the run recorded)
    POST /hidream_lokr/runs/<run_id>/command           body {"command": "sample" | "save" | "stop"}

ComfyUI also serves every route under /api/... (the frontend's api.fetchApi uses that prefix). Everything from the
browser is validated before it touches the registry: a malformed run id or body is a 400, an unknown run a 404, a
finished run a 409 (a run whose trainer core cannot take commands: 501), each with a JSON {"error": message}. A command only ever reaches the run its URL names.
"""
from __future__ import annotations

import json
import logging
from typing import Optional

from aiohttp import web

from .run_registry import COMMANDS, REGISTRY, RUN_ID_PATTERN, RunNotFound, RunNotRunning

logger = logging.getLogger(__name__)

PREFIX = "/hidream_lokr"
MAX_COMMAND_BODY_BYTES = 256  # {"command": "sample"} is 21 bytes; anything much larger is not from our UI
MAX_QUERY_ID_CHARS = 64  # node and prompt ids are short (node ids like "7" or "12:3", prompt ids are uuids)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _run_id(request: web.Request) -> tuple[Optional[str], Optional[web.Response]]:
    run_id = request.match_info.get("run_id", "")
    if not RUN_ID_PATTERN.match(run_id):
        return None, _error(400, f"malformed run id {run_id[:80]!r}: run ids look like '3-1a2b3c4d' "
                                 f"(GET {PREFIX}/runs lists them)")
    if REGISTRY.get(run_id) is None:
        return None, _error(404, f"no training run {run_id!r} in this ComfyUI session (GET {PREFIX}/runs lists "
                                 "the runs; runs are forgotten when ComfyUI restarts)")
    return run_id, None


def _query_id(request: web.Request, name: str) -> tuple[Optional[str], Optional[web.Response]]:
    value = request.query.get(name)
    if value is None:
        return None, None
    if not value or len(value) > MAX_QUERY_ID_CHARS or not value.isprintable():
        return None, _error(400, f"malformed {name!r} query parameter: give a node or prompt id of at most "
                                 f"{MAX_QUERY_ID_CHARS} printable characters")
    return value, None


def _non_negative_int(text: str, name: str) -> tuple[Optional[int], Optional[web.Response]]:
    if not text.isdigit() or len(text) > 9:
        return None, _error(400, f"{name} must be a non-negative integer, got {text[:40]!r}")
    return int(text), None


async def list_runs(request: web.Request) -> web.Response:
    node_id, problem = _query_id(request, "node")
    if problem:
        return problem
    prompt_id, problem = _query_id(request, "prompt_id")
    if problem:
        return problem
    return web.json_response({"runs": REGISTRY.runs_for(node_id, prompt_id)})


async def latest_run(request: web.Request) -> web.Response:
    node_id, problem = _query_id(request, "node")
    if problem:
        return problem
    runs = REGISTRY.runs_for(node_id)
    if not runs:
        where = f" for node {node_id!r}" if node_id is not None else ""
        return _error(404, f"no training run{where} in this ComfyUI session yet")
    return web.json_response(runs[-1])


async def run_history(request: web.Request) -> web.Response:
    run_id, problem = _run_id(request)
    if problem:
        return problem
    since, problem = _non_negative_int(request.query.get("since", "0"), "since")
    if problem:
        return problem
    history = REGISTRY.history(run_id, since)
    return web.json_response(history) if history is not None else _error(404, f"no training run {run_id!r}")


async def run_preview(request: web.Request) -> web.Response:
    run_id, problem = _run_id(request)
    if problem:
        return problem
    index, problem = _non_negative_int(request.match_info.get("index", ""), "preview index")
    if problem:
        return problem
    path = REGISTRY.preview_path(run_id, index)
    if path is None or not path.is_file():
        return _error(404, f"run {run_id!r} has no preview {index}")
    # The path comes from the registry (written by the training), never from the request.
    return web.FileResponse(path, headers={"Cache-Control": "no-cache"})


async def run_command(request: web.Request) -> web.Response:
    run_id, problem = _run_id(request)
    if problem:
        return problem
    if request.content_length is not None and request.content_length > MAX_COMMAND_BODY_BYTES:
        return _error(400, f"request body too large ({request.content_length} bytes; a command is "
                           f'{{"command": "sample"}}, at most {MAX_COMMAND_BODY_BYTES} bytes)')
    raw = await request.content.read(MAX_COMMAND_BODY_BYTES + 1)  # bounded even without a Content-Length
    if len(raw) > MAX_COMMAND_BODY_BYTES:
        return _error(400, f"request body too large (a command is at most {MAX_COMMAND_BODY_BYTES} bytes)")
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return _error(400, 'request body is not JSON: send {"command": "sample" | "save" | "stop"}')
    if not isinstance(body, dict) or set(body) != {"command"} or not isinstance(body["command"], str):
        return _error(400, 'request body must be exactly {"command": "<name>"} with a string name')
    command = body["command"]
    if command not in COMMANDS:
        return _error(400, f"unknown command {command[:40]!r}: expected one of {', '.join(COMMANDS)}")
    try:
        queued = REGISTRY.command(run_id, command)
    except RunNotFound:
        return _error(404, f"no training run {run_id!r}")
    except RunNotRunning as e:
        return _error(409, str(e))
    logger.info("HiDream LoKr run %s: %s requested from the browser", run_id, command)
    return web.json_response({"run_id": run_id, "command": command, "queued": queued,
                              "note": "runs at the next step boundary" if queued else "already waiting"})


def register(routes: web.RouteTableDef) -> None:
    routes.get(f"{PREFIX}/runs")(list_runs)
    routes.get(f"{PREFIX}/runs/latest")(latest_run)  # before {run_id}: aiohttp matches in order
    routes.get(f"{PREFIX}/runs/{{run_id}}")(run_history)
    routes.get(f"{PREFIX}/runs/{{run_id}}/previews/{{index}}")(run_preview)
    routes.post(f"{PREFIX}/runs/{{run_id}}/command")(run_command)


def _register_on_comfy_server() -> None:
    try:
        from .compat import routes
    except ImportError:  # not inside ComfyUI
        return
    table = routes()
    if table is None:
        logger.warning("HiDream LoKr: ComfyUI's server is not up; the live training view's routes are missing")
        return
    register(table)


_register_on_comfy_server()
