"""The FastAPI app around a running engine (its `EngineClient`): routes, middleware, probes, metrics.

    GET  /health   200 while the server and its engine live (no model work); 503 once a worker
                   died: the server cannot recover, restart it
    GET  /ready    runs one real step of the model (a one-token prompt, one greedy token) within
                   --ready-timeout; 503 while shutting down, when the engine is dead, or too slow
    GET  /metrics  Prometheus text (tpserve/server/metrics.py)
    POST /generate, POST /v1/completions, POST /v1/chat/completions, GET /v1/models, PUT /api
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tpserve.engine.client import EngineClient, EngineDeadError
from tpserve.engine.sampling_params import SamplingParams
from tpserve.server import chat_api, completions_api, generate_api, megatron_api, openai_api
from tpserve.server.errors import APIError, engine_dead, install_error_handlers
from tpserve.server.metrics import Metrics
from tpserve.server.middleware import AuthMiddleware, BodyGuardMiddleware, HTTPMetricsMiddleware, RequestIdMiddleware
from tpserve.server.runner import Runner, ServerConfig

logger = logging.getLogger(__name__)


def build_app(engine: EngineClient, config: ServerConfig, shutdown_engine: bool = True) -> FastAPI:
    """The app serving `engine`. With `shutdown_engine`, the app's shutdown stops the engine and
    its workers (after uvicorn has drained the requests in flight)."""
    metrics = Metrics()
    runner = Runner(engine, config, metrics)
    metrics.watch(runner)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        runner.draining = True
        if shutdown_engine:
            logger.info("stopping the engine and its workers")
            await asyncio.to_thread(engine.shutdown)

    app = FastAPI(
        title="tpserve", version="0.1.0", lifespan=lifespan,
        description="Tensor-parallel LLM inference server: OpenAI-compatible completions and chat, a native "
                    "/generate, and Megatron-LM's PUT /api.",
    )
    app.state.runner = runner
    app.state.metrics = metrics
    app.state.token_text = openai_api.TokenText(engine.tokenizer)
    app.state.started = time.time()
    install_error_handlers(app)
    app.include_router(completions_api.router)
    app.include_router(chat_api.router)
    app.include_router(openai_api.router)
    app.include_router(generate_api.router)
    app.include_router(megatron_api.router)

    @app.get("/health")
    async def health() -> JSONResponse:
        if not engine.is_healthy:
            return engine_dead(engine.error).response()
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        try:
            runner.check_available()
            await asyncio.wait_for(_one_step(engine, request.state.request_id), config.ready_timeout)
        except APIError as e:
            return e.response()
        except EngineDeadError as e:
            return engine_dead(str(e)).response()
        except TimeoutError:
            return APIError(503, f"the model did not run a step within --ready-timeout={config.ready_timeout:g} s",
                            code="not_ready", headers={"Retry-After": "5"}).response()
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # Added innermost first: the request id wraps everything, so every answer carries it.
    app.add_middleware(BodyGuardMiddleware, max_bytes=config.max_request_bytes)
    app.add_middleware(AuthMiddleware, api_key=config.api_key)
    app.add_middleware(HTTPMetricsMiddleware, metrics=metrics)
    app.add_middleware(RequestIdMiddleware)
    return app


async def _one_step(engine: EngineClient, request_id: str) -> None:
    """One prefill and one sampled token through every worker: the readiness probe."""
    tokenizer = engine.tokenizer
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else (tokenizer.eos_token_id or 0)
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    async for _ in engine.generate([token], params, f"ready-{request_id}-{time.monotonic_ns()}"):
        pass
