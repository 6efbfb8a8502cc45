"""What the Redis replay store sends: key layout constants, the Lua scripts, one key's call,
the WAIT/WAITAOF command, and the small conversions and messages around them.

Split out of meter.postoffice.replay_redis (the store and its routing), whose docstring
explains the key layout, the scripts' atomicity and the durability argument.
"""

from __future__ import annotations

import sys
from array import array
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.exceptions import RedisClusterException, RedisError

from meter.errors import InvalidInput, ReplayStoreError

__all__ = [
    "CHUNK_BITS",
    "MAX_REPLICA_TIMEOUT_MS",
    "wait_command",
]

CHUNK_BITS = 16
_LOW = (1 << CHUNK_BITS) - 1
_CHUNKS = 1 << (32 - CHUNK_BITS)
_ERRORS = (RedisError, RedisClusterException)
_ROUNDS = 4  # sends of one call at most: the first, then after MOVED, ASK, NOSCRIPT
MAX_REPLICA_TIMEOUT_MS = 60_000

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
# The same bits read: KEYS[1] and the offsets (ARGV[1]) as above; writes nothing. Not
# BITFIELD_RO: its three arguments per piece cost redis-py 1.4 s of CPU for 200,000 pieces
# over 3,000 keys, this script's one argument per key 0.6 s (grouping included).
_SEEN_SCRIPT = """
local key, offsets = KEYS[1], ARGV[1]
local seen = {}
for i = 1, #offsets, 2 do
  local offset = string.byte(offsets, i) + 256 * string.byte(offsets, i + 1)
  if redis.call('GETBIT', key, offset) == 1 then
    seen[#seen + 1] = (i - 1) / 2
  end
end
return seen
"""


@dataclass
class _Call:
    """The pieces of one batch that live in one key."""

    key: str
    indices: list[int]  # their positions in the batch
    offsets: array[int]  # their bits in the key, in batch order
    asking: tuple[str, int] | None = None  # the node an ASK redirection named


# One node's share of a round: its name ("" for one server), its client, its calls.
_Share = tuple[str, redis.Redis, list[_Call]]
# A node's answers in call order, and its WAIT (or WAITAOF) with the reply; or what failed.
_Outcome = tuple[list[Any], tuple[str | int, ...] | None, Any] | BaseException


def wait_command(
    version: str, aof_enabled: bool, replicas: int, timeout_ms: int
) -> tuple[str | int, ...]:
    """The command that holds a reply until replicas have the writes before it.

    WAITAOF (Redis 7.2+) also waits for the fsync of the AOF on the master (numlocal 1,
    which needs AOF on) and on the replicas; WAIT only for the replicas' receipt.
    """
    numbers = [int("0" + "".join(c for c in part if c.isdigit())) for part in version.split(".")]
    if aof_enabled and (*numbers, 0, 0)[:2] >= (7, 2):
        return ("WAITAOF", 1, replicas, timeout_ms)
    return ("WAIT", replicas, timeout_ms)


def _pipeline(client: redis.Redis, stack: list[tuple[Any, ...]]) -> list[Any]:
    pipe = client.pipeline(transaction=False)
    for args in stack:
        pipe.execute_command(*args)  # type: ignore[no-untyped-call]
    return list(pipe.execute(raise_on_error=False))


def _check_replicas(replicas: object, timeout_ms: object) -> None:
    if type(replicas) is not int or replicas < 0:
        raise InvalidInput(f"replicas must be an integer 0 or more, not {replicas!r}")
    if type(timeout_ms) is not int or not 1 <= timeout_ms <= MAX_REPLICA_TIMEOUT_MS:
        raise InvalidInput(
            f"replica_timeout_ms must be an integer from 1 to {MAX_REPLICA_TIMEOUT_MS} "
            f"(0 would make WAIT wait forever), not {timeout_ms!r}"
        )


def _weakest(values: list[str], order: tuple[str, ...]) -> str:
    return min(values, key=lambda v: order.index(v) if v in order else 0)


def _little_endian(offsets: array[int]) -> bytes:
    if sys.byteorder == "big":
        swapped = array("H", offsets)
        swapped.byteswap()
        return swapped.tobytes()
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
    if isinstance(exc, ReplayStoreError):
        return exc
    return ReplayStoreError(
        f"replay store {where}: Redis failed ({type(exc).__name__}: {exc}); the batch was not "
        "accepted (a piece Redis saw before the failure may come back DUPLICATE): check the "
        "server and verify again"
    )
