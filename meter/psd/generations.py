"""One record kept in the token as MAC'd generations: how the registers and the device
state survive a crash although SoftHSM2 cannot change an object's value in place.

Each update creates a new object (the next generation) holding the body and an
HMAC-SHA-256 by the token's register MAC key, makes it durable, and only then
destroys the previous one. On open the highest generation whose MAC verifies
and whose body parses wins, and the rest are removed. A crash at any instant
leaves either the old or the new generation valid.
"""

from __future__ import annotations

import hmac as _hmac
from collections.abc import Callable
from typing import Generic, TypeVar

from meter.token import DataObject, Token

__all__ = ["MAC_KEY_LABEL", "MAC_LENGTH", "Generations"]

MAC_KEY_LABEL = "register-mac"
MAC_LENGTH = 32

T = TypeVar("T")


class Generations(Generic[T]):
    """The MAC'd generations of one record kind (``application``) in a token."""

    def __init__(self, token: Token, application: str) -> None:
        self.token = token
        self.application = application

    def sealed(self, body: bytes) -> bytes:
        return body + self.token.hmac(MAC_KEY_LABEL, body)

    def newest(
        self, parse: Callable[[bytes], T | None], generation: Callable[[T], int]
    ) -> tuple[tuple[T, DataObject] | None, int]:
        """The newest record whose MAC verifies and which ``parse`` accepts (None skips a
        body), with every other object removed; and how many objects there were."""
        objects = self.token.data_objects(self.application)
        best: tuple[T, DataObject] | None = None
        for obj in objects:
            body, mac = obj.value[:-MAC_LENGTH], obj.value[-MAC_LENGTH:]
            if not _hmac.compare_digest(mac, self.token.hmac(MAC_KEY_LABEL, body)):
                continue
            record = parse(body)
            if record is not None and (best is None or generation(record) > generation(best[0])):
                best = (record, obj)
        if best is not None:
            for obj in objects:
                if obj is not best[1]:
                    self.token.destroy(obj)
        return best, len(objects)

    def exactly(
        self, parse: Callable[[bytes], T | None], generation: Callable[[T], int], wanted: int
    ) -> tuple[tuple[T, DataObject] | None, int]:
        """The record of generation ``wanted`` whose MAC verifies, with every other object
        removed; None (and nothing removed) when there is none. Also how many there were."""
        objects = self.token.data_objects(self.application)
        chosen: tuple[T, DataObject] | None = None
        for obj in objects:
            body, mac = obj.value[:-MAC_LENGTH], obj.value[-MAC_LENGTH:]
            if not _hmac.compare_digest(mac, self.token.hmac(MAC_KEY_LABEL, body)):
                continue
            record = parse(body)
            if record is not None and generation(record) == wanted:
                chosen = (record, obj)
                break
        if chosen is not None:
            for obj in objects:
                if obj is not chosen[1]:
                    self.token.destroy(obj)
        return chosen, len(objects)

    def write(self, label: str, body: bytes) -> DataObject:
        """Create the next generation and make it durable; then the caller retires the old."""
        # Private: without the token's PIN nobody can read, delete or add one.
        obj = self.token.create_data(self.application, label, self.sealed(body), private=True)
        self.token.make_durable()
        return obj

    def retire(self, old: DataObject | None) -> None:
        if old is not None:
            self.token.destroy(old)
