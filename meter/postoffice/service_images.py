"""Label images decoded a bounded number at a time.

An image costs memory in proportion to its pixels, whatever its file size: a
32 KB PNG can declare 144 million of them. So the service decodes images on
its own small pool of threads (``image_workers``, by default one per core),
lets at most ``image_queue`` more wait for a thread, and answers any image
beyond that at once with 503 and ``Retry-After``, before reading more of it.
Each image's header is checked against the pixel cap before it is decoded
(``meter.label.decode_image``), so the work of one decode is bounded too.
The peak memory is then about (workers) x (one capped decode), whatever is
sent; docs/postoffice.md ("Running it exposed") gives the measured figure.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

from meter.errors import BarcodeError, InvalidInput
from meter.label import decode_image
from meter.postoffice.service_http import Rejected

__all__ = ["ImageGate"]

RETRY_AFTER_S = 2  # about one decode of a large label


class ImageGate:
    """Admits an image only while a worker or a queue place is free; decodes it there."""

    def __init__(self, workers: int, queue: int, max_pixels: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="label-decode")
        self._capacity = workers + queue
        self._admitted = 0
        self._lock = threading.Lock()
        self._max_pixels = max_pixels

    @property
    def admitted(self) -> int:
        """Images being decoded or waiting now."""
        with self._lock:
            return self._admitted

    def admit(self) -> None:
        """Take a place, or Rejected(503) when every place is taken; release() gives it back."""
        with self._lock:
            if self._admitted >= self._capacity:
                raise Rejected(
                    503,
                    f"{self._capacity} label images are being read already; nothing was "
                    "verified, send this one again shortly",
                    "Busy",
                    headers={"Retry-After": str(RETRY_AFTER_S)},
                )
            self._admitted += 1

    def release(self) -> None:
        with self._lock:
            self._admitted -= 1

    async def decode(self, image: bytes) -> bytes:
        """The indicium in an image, for a caller that was admitted; 400 when unreadable."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, self._decode, image)
        except (BarcodeError, InvalidInput) as exc:
            raise Rejected(400, str(exc), type(exc).__name__) from exc

    def _decode(self, image: bytes) -> bytes:
        return decode_image(image, max_pixels=self._max_pixels)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
