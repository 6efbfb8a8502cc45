"""The replay store on Redis: one server, or a Redis Cluster with every meter on one shard.

Keys. ``pim:{<serial>}:<chunk>`` is a Redis bitmap of 2**16 bits: bit
``sequence % 2**16`` of chunk ``sequence >> 16`` says whether the piece was
accepted. The hash tag ``{<serial>}`` puts all of a device's keys in one hash
slot, so on a cluster every meter has one home shard. A piece has exactly one
key and one bit whatever its date of mailing, so SETBIT's returned old bit is
the whole check-and-set: atomic by itself, no other key to consult, no MULTI.
Chunks keep each string at most 8 KiB however high a meter's sequences go.

Per batch: the pieces are grouped by key and one Lua script call per key
(pipelined, all calls of a batch in one round trip per node) sets the bits
in batch order and answers which were set already; a piece repeated inside
the batch therefore finds its own bit on the second occurrence.

Expiry. The script moves the key's expiry forward (never back) to the start
(UTC) of the day 185 days after the latest date of mailing in the batch: by
then no piece of that batch can verify (EXPIRED after 183 days), with a day
to spare. The lifetime is sent in seconds, measured on the store's clock (a
parameter), so the server's clock only has to run at the right speed. A key lives while its chunk receives pieces
and disappears 185 days after the last batch that touched it; expire() has
nothing to do.

Failures. Any Redis error (unreachable, timeout, cluster down) raises
ReplayStoreError, which the verifier turns into Verdict.ERROR: never VALID.
Calls that reached Redis before the failure keep their bits, so such a piece
may later be reported DUPLICATE (the safe direction).
"""

from __future__ import annotations

import math
import sys
from array import array
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, time, timedelta
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

import redis
from redis.cluster import RedisCluster
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from meter.errors import ReplayStoreError
from meter.postoffice.replay import (
    FORGET_AFTER_DAYS,
    MAX_SERIAL,
    Piece,
    latest_mailing,
    validate_pieces,
)

CHUNK_BITS = 16
_LOW = (1 << CHUNK_BITS) - 1
_CHUNKS = 1 << (32 - CHUNK_BITS)
_ERRORS = (RedisError, RedisClusterException)

# KEYS[1]: one chunk of one device. ARGV[1]: the seconds the key must live at least (a
# key without expiry has TTL -1; EXPIRE with 0 or less deletes it). ARGV[2]: bit offsets, 2 bytes each, little-endian, in batch order.
# Returns the 0-based positions in ARGV[2] whose bit was set already.
_SCRIPT = """
local key, offsets = KEYS[1], ARGV[2]
local seen = {}
for i = 1, #offsets, 2 do
  local offset = string.byte(offsets, i) + 256 * string.byte(offsets, i + 1)
  if redis.call('SETBIT', key, offset, 1) == 1 then
    seen[#seen + 1] = (i - 1) / 2
  end
end
local ttl, current = tonumber(ARGV[1]), redis.call('TTL', key)
if current == -1 or current < ttl then
  redis.call('EXPIRE', key, ttl)
end
return seen
"""


def _utc_now() -> datetime:
    return datetime.now(UTC)


class RedisReplayStore:
    """Check-and-set of pieces on Redis or Redis Cluster (see the module docstring)."""

    def __init__(
        self,
        client: redis.Redis | RedisCluster,
        *,
        where: str,
        nodes: int,
        prefix: str,
        clock: Callable[[], datetime],
    ) -> None:
        """Use from_url()."""
        self._client = client
        self._clock = clock
        self._where = where
        self._nodes = nodes
        self._prefix = prefix
        self._sha = self._load_script()

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout: float = 2.0,
        prefix: str = "pim",
        clock: Callable[[], datetime] = _utc_now,
    ) -> RedisReplayStore:
        """Connect; a server that reports cluster_enabled:1 is used as a Redis Cluster.

        timeout bounds each connect and each reply (seconds); prefix starts every key; clock
        gives the time against which keys' lifetimes are measured.
        """
        where = _public(url)
        options: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
        try:
            probe = redis.Redis.from_url(url, **options)
        except (ValueError, *_ERRORS) as exc:
            raise ReplayStoreError(f"replay store {where}: bad Redis URL: {exc}") from exc
        try:
            cluster = probe.info("cluster").get("cluster_enabled") == 1
            if not cluster:
                return cls(probe, where=where, nodes=1, prefix=prefix, clock=clock)
            probe.close()
            client = RedisCluster.from_url(url, **options)
            masters = len(client.get_primaries())  # type: ignore[no-untyped-call]
            return cls(client, where=where, nodes=masters, prefix=prefix, clock=clock)
        except _ERRORS as exc:
            probe.close()
            raise _unreachable(where, exc) from exc

    @property
    def nodes(self) -> int:
        """1 for one server, else the number of cluster masters (when opened)."""
        return self._nodes

    def key(self, serial: int, sequence: int) -> str:
        """The key holding the bit of this piece."""
        return f"{self._prefix}:{{{serial}}}:{sequence >> CHUNK_BITS}"

    def check_and_set(self, pieces: Sequence[Piece]) -> list[bool]:
        if not pieces:
            return []
        groups: dict[tuple[int, int], tuple[list[int], array[int]]] = {}
        try:
            for index, (serial, sequence, _) in enumerate(pieces):
                group = groups.get((serial, sequence >> CHUNK_BITS))
                if group is None:
                    group = groups[serial, sequence >> CHUNK_BITS] = ([], array("H"))
                group[0].append(index)
                group[1].append(sequence & _LOW)
        except (TypeError, ValueError, OverflowError):
            validate_pieces(pieces)
            raise  # validate_pieces found nothing wrong: a bug, not bad input
        for serial, chunk in groups:
            if not (isinstance(serial, int) and 0 <= serial < MAX_SERIAL and 0 <= chunk < _CHUNKS):
                validate_pieces(pieces)
        latest = latest_mailing(pieces)
        forget_at = datetime.combine(latest + timedelta(FORGET_AFTER_DAYS + 2), time(), UTC)
        lifetime = str(math.ceil((forget_at - self._clock()).total_seconds()))
        calls = [
            (self.key(serial, chunk << CHUNK_BITS), indices, _little_endian(offsets))
            for (serial, chunk), (indices, offsets) in groups.items()
        ]
        seen = [False] * len(pieces)
        try:
            pending = calls
            for _ in range(2):  # the second round only if the server lost the script
                answers = self._run(pending, lifetime)
                lost = []
                for call, answer in zip(pending, answers, strict=True):
                    if isinstance(answer, NoScriptError):
                        lost.append(call)
                    elif isinstance(answer, Exception):
                        raise answer
                    else:
                        for position in answer:
                            seen[call[1][position]] = True
                if not lost:
                    return seen
                self._sha = self._load_script()
                pending = lost
            raise ReplayStoreError(
                f"replay store {self._where}: the server keeps losing its script"
            )
        except _ERRORS as exc:
            raise _unreachable(self._where, exc) from exc

    def expire(self, today: date) -> int:
        """Nothing to do: every key carries its expiry time (see the module docstring)."""
        return 0

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _run(self, calls: list[tuple[str, list[int], bytes]], lifetime: str) -> list[Any]:
        client = self._client
        pipe = client.pipeline(transaction=False)
        if isinstance(client, RedisCluster):
            # redis-py's cluster pipeline blocks its evalsha() helper and would ask the server
            # for the keys of each raw EVALSHA: name the node from the slot table instead.
            for key, _, offsets in calls:
                node = client.get_node_from_key(key)  # type: ignore[no-untyped-call]
                pipe.execute_command(
                    "EVALSHA", self._sha, 1, key, lifetime, offsets, target_nodes=node
                )
        else:
            for key, _, offsets in calls:
                pipe.execute_command("EVALSHA", self._sha, 1, key, lifetime, offsets)
        return list(pipe.execute(raise_on_error=False))

    def _load_script(self) -> str:
        try:
            sha = self._client.script_load(_SCRIPT)  # on a cluster: on every master
        except _ERRORS as exc:
            raise _unreachable(self._where, exc) from exc
        return str(sha)


def _little_endian(offsets: array[int]) -> bytes:
    if sys.byteorder == "big":
        offsets.byteswap()
    return offsets.tobytes()


def _public(url: str) -> str:
    """The URL without user name or password, for messages."""
    try:
        parts = urlsplit(url)
        host = f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)
    except ValueError:
        return "redis (unparsable URL)"
    return f"{parts.scheme}://{host}{parts.path}"


def _unreachable(where: str, exc: BaseException) -> ReplayStoreError:
    return ReplayStoreError(
        f"replay store {where}: Redis failed ({type(exc).__name__}: {exc}); the batch was not "
        "accepted (a piece Redis saw before the failure may come back DUPLICATE): check the "
        "server and verify again"
    )
