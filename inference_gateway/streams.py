"""PredictStream's answering half, shared by `serve` (servicer.py) and serve-triton's Predict port
(predict_proxy.py): a reader task takes the request stream and puts each answer on a queue as it is
ready (in any order), then None; the handler yields from the queue."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


async def answers(read: Coroutine[Any, Any, None], out: asyncio.Queue[T | None],
                  on_close: Callable[[], None] | None = None) -> AsyncIterator[T]:
    """Yields what `read` puts on `out` until it puts None, then awaits `read` so a broken request stream
    surfaces as its error. However the stream ends (the client gone too), the reader is cancelled and
    `on_close` runs (to cancel answers still in flight). Callers wrap it in contextlib.aclosing so that
    happens when their handler closes, not when the generator is collected."""
    reader = asyncio.ensure_future(read)
    try:
        while (item := await out.get()) is not None:
            yield item
        await reader
    finally:
        reader.cancel()
        if on_close is not None:
            on_close()
