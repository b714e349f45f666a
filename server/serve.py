"""`tpserve serve`: start the engine (its workers), then uvicorn, then stop in order.

SIGTERM or Ctrl-C: the server marks itself draining (/ready and new requests answer 503),
uvicorn closes the listening socket and idle connections, requests in flight run on for up to
--shutdown-timeout seconds; those still running then are cancelled (their engine requests
aborted), the app's shutdown stops the engine and joins its workers, and the process exits 0.
No worker outlives the server: they are its children, and the engine's shutdown kills any
that do not stop.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import signal
import socket
import threading
import time

import uvicorn

from tpserve.engine.client import EngineClient
from tpserve.engine.config import EngineConfig
from tpserve.server.app import build_app
from tpserve.server.runner import ServerConfig

logger = logging.getLogger("tpserve.server")


class DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the app at once when a stop signal arrives."""

    def __init__(self, config: uvicorn.Config, runner) -> None:
        super().__init__(config)
        self.runner = runner
        self.exit_code = 0

    def handle_exit(self, sig, frame) -> None:
        if not self.runner.draining:
            logger.info("signal %d: draining (up to %g s for requests in flight)", sig,
                        self.config.timeout_graceful_shutdown or 0)
        self.runner.draining = True
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        # uvicorn re-raises the signal after a graceful stop, which ends the process with
        # 128 + signal; a drained stop is a clean exit, so the signal is only recorded.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening address, taken before the model loads: a port in use is an error in seconds,
    not after minutes of loading. Connections are refused until uvicorn listens on it.

    Raises OSError with a message that names the flag to change.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: restart over TIME_WAIT
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise OSError(f"port {port} on {host} is in use (another server?): choose a free one with --port") from None
        if e.errno == errno.EACCES:
            raise OSError(f"no permission to listen on port {port}: choose --port 1024 or above") from None
        raise OSError(f"cannot listen on {host}:{port} ({e.strerror or e}): "
                      "--host must be an address of this machine, e.g. 127.0.0.1 or 0.0.0.0") from None
    return sock


# Under torchrun, how long a server whose engine died stays up: requests in flight get their
# error event and new ones 503, then the process exits non-zero for torchrun to see.
DEAD_ENGINE_GRACE_S = 2.0


def _exit_when_engine_dies(engine: EngineClient, server: "DrainingServer") -> None:
    while not server.should_exit:
        if not engine.is_healthy:
            logger.error("the engine is dead (%s); exiting so that torchrun can restart the group", engine.error)
            server.runner.draining = True
            time.sleep(DEAD_ENGINE_GRACE_S)
            server.exit_code = 1
            server.should_exit = True
            return
        time.sleep(0.5)


def serve(engine_config: EngineConfig, server_config: ServerConfig, sock: socket.socket,
          log_level: str = "info") -> int:
    """Serve on `sock` (from `bind_socket`) until a stop signal, or under torchrun until the engine
    dies; closes it. Returns the exit code: 0 after a stop signal, 1 when the engine died."""
    host, port = sock.getsockname()[:2]
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.info("starting the engine: %s, tensor parallel size %d, pipeline parallel size %d",
                engine_config.checkpoint, engine_config.tensor_parallel_size, engine_config.pipeline_parallel_size)
    engine = EngineClient(engine_config)
    try:
        app = build_app(engine, server_config)
        config = uvicorn.Config(
            app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=server_config.shutdown_timeout,
            access_log=log_level == "debug",
        )
        server = DrainingServer(config, app.state.runner)
        logger.info("serving %s on http://%s:%d (max_model_len %d)", server_config.model_name, host, port,
                    engine.max_model_len)
        if engine_config.launcher == "torchrun":
            threading.Thread(target=_exit_when_engine_dies, args=(engine, server), daemon=True).start()
        server.run(sockets=[sock])
        return server.exit_code
    finally:
        engine.shutdown()
        sock.close()  # a no-op when the app's shutdown already stopped it
