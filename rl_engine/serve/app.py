"""`build_app(backend, ...)`: the FastAPI application of the OpenAI-compatible server.

The backend is an `AsyncEngine` (`rl-engine serve`) or an `EngineHost` (a server on the engine of an RL
run); the app reaches the engine only through it (see `generation.py`). Every error, including a body
that is not JSON or a field of the wrong type, is an OpenAI error object: 400 naming the field (and
its allowed range), 401 for a missing or wrong API key, 404 for an unknown model (as OpenAI and vLLM
answer); /health needs no key. Bad input never becomes a 500; an unexpected failure is logged with its traceback and
answered 500 without details.
"""

from __future__ import annotations

import hmac
import logging
import time

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from rl_engine.serve.chat_completions import create_chat_completion
from rl_engine.serve.completions import create_completion
from rl_engine.serve.engine_process import EngineClient, EngineProcessError
from rl_engine.serve.generation import ClientGone, on_engine
from rl_engine.serve.metrics import CONTENT_TYPE, ServerStats, engine_gauges
from rl_engine.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest

logger = logging.getLogger(__name__)


def build_app(backend, *, model_name: str, api_key: str | None = None, root: str | None = None) -> FastAPI:
    app = FastAPI(title="rl_engine OpenAI-compatible server", docs_url=None, redoc_url=None, openapi_url=None)
    stats = ServerStats()
    app.state.backend, app.state.stats, app.state.model_name = backend, stats, model_name
    created = int(time.time())

    def error_response(e: APIError) -> JSONResponse:
        stats.error(e.status)
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid" or not loc:
            message = f"the request body is not a valid JSON object ({first.get('msg', 'invalid')})"
        else:
            message = f"{param}: {first.get('msg', 'invalid value')} (got {first.get('input')!r})"
        return error_response(APIError(message[:2000], param=param, code="invalid_value"))

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, e: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it: the client closed the connection

    @app.exception_handler(EngineProcessError)
    async def _engine_gone(request: Request, e: EngineProcessError) -> JSONResponse:
        return error_response(APIError(f"the engine is not running ({e}); restart the server", status=503,
                                       type="service_unavailable"))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        logger.exception("internal error answering %s", request.url.path)
        return error_response(APIError("internal server error (see the server log)", status=500,
                                       type="internal_server_error"))

    async def authenticate(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise APIError("invalid or missing API key (send 'Authorization: Bearer KEY')", status=401,
                           code="invalid_api_key")

    guarded = [Depends(authenticate)]

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(f"The model `{name}` does not exist; this server serves `{model_name}`", status=404,
                           param="model", code="model_not_found")

    @app.get("/health")
    async def health() -> Response:
        alive = backend.alive if isinstance(backend, EngineClient) else True
        return Response(status_code=200 if alive else 503)  # 503: the engine process exited

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> dict:
        engine = backend.engine
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": created, "owned_by": "rl_engine", "root": root or model_name,
            "max_model_len": engine.max_model_len, "weights_version": engine.weights_version}]}

    @app.get("/metrics", dependencies=guarded)
    async def metrics() -> Response:
        gauges = await on_engine(backend, engine_gauges, exclusive=False)
        return Response(stats.render(gauges), media_type=CONTENT_TYPE)

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        result = await create_completion(backend, body, http_request=request, model_name=model_name, stats=stats)
        return _respond(result)

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        result = await create_chat_completion(backend, body, http_request=request, model_name=model_name,
                                              stats=stats)
        return _respond(result)

    return app


def _respond(result):
    if isinstance(result, dict):
        return JSONResponse(result)
    return StreamingResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
