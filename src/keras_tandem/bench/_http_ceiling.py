"""The HTTP ceiling of `tandem bench http`: what the HTTP layer leaves, with no inference.

Owns one small aiohttp server that takes the same `:predict` request as
`tandem serve`, reads its body, parses it with the server's own parser
(`keras_tandem.server.parse_predict_body`, so the same JSON decoder and the
same row checks) and answers a canned TF Serving `{"predictions": [...]}`
body of the right shape, encoded once, with the same headers. No Predictor,
no validation of shape or dtype, no batching, no encoding per request: the
rate it reaches is the most any server on this framework and this request
can answer.

It runs as `tandem serve` does in the bench: an event loop on a thread of
the bench's own process (not a child process), with aiohttp's access log off
and the same listen backlog, so both compete for the CPU with the load
generator the same way.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import orjson
from aiohttp import web

from keras_tandem.server import parse_predict_body


class CeilingServer:
    """The no-inference aiohttp server, on its own thread and event loop.

    Args:
        name: the model name in `/v1/models/NAME:predict`.
        fields: the model's inputs (`Predictor.inputs`), for the parser.
        prediction: one example's canned answer (a list, e.g. 10 floats); a
            request of n examples gets n copies.

    Attributes:
        url: `http://127.0.0.1:PORT`.
        parsed: requests parsed (and answered) so far.
    """

    def __init__(self, name: str, fields: Sequence[Any], prediction: list[Any]):
        self._fields = list(fields)
        self._one = orjson.dumps({"predictions": [prediction]})
        self._prediction = prediction
        self.parsed = 0
        self._loop = asyncio.new_event_loop()
        self._stopped = False
        ready: Future = Future()
        self._thread = threading.Thread(target=self._run, args=(name, ready),
                                        name="http-ceiling", daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{ready.result(timeout=60)}"

    async def _predict(self, request: web.Request) -> web.Response:
        body = await request.read()
        x, _ = parse_predict_body(body, self._fields)
        self.parsed += 1
        rows = len(x) if getattr(x, "ndim", 1) > 1 else 1
        payload = self._one if rows == 1 else orjson.dumps(
            {"predictions": [self._prediction] * rows})
        return web.Response(body=payload, headers={
            "Content-Type": "application/json", "X-Model-Version": "1",
            "X-Weight-Version": "1"})

    def _run(self, name: str, ready: Future) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post(f"/v1/models/{name}:predict", self._predict)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        try:
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
            loop.run_until_complete(site.start())
            port = runner.addresses[0][1]
        except BaseException as e:  # noqa: BLE001 - re-raised by the constructor
            loop.run_until_complete(runner.cleanup())
            loop.close()
            ready.set_exception(e)
            return
        ready.set_result(port)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            loop.close()

    def stop(self) -> None:
        """Stops the server and joins its thread. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(60)

    def __enter__(self) -> CeilingServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
