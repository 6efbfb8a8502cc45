"""The replay store on Redis: one server, or a Redis Cluster with every meter on one shard.

Keys. ``pim:{<serial>}:<chunk>`` is a Redis bitmap of 2**16 bits: bit
``sequence % 2**16`` of chunk ``sequence >> 16`` says whether the piece was
accepted. The hash tag ``{<serial>}`` puts all of a device's keys in one hash
slot, so on a cluster every meter has one home shard. A piece has exactly one
key and one bit whatever its date of mailing, so SETBIT's returned old bit is
the whole check-and-set: atomic by itself, no other key to consult, no MULTI.
Chunks keep each string at most 8 KiB however high a meter's sequences go.

Per batch: the pieces are grouped by key and one Lua script call per key
(pipelined, all calls of a batch in one round trip per node, the nodes in
parallel) sets the bits in batch order and answers which were set already; a
piece repeated inside the batch therefore finds its own bit on the second
occurrence. seen() reads the same bits with a script that writes nothing.

Expiry. The script moves the key's expiry forward (never back) to the start
(UTC) of the day 185 days after the latest date of mailing in the batch: by
then no piece of that batch can verify (EXPIRED after 183 days), with a day
to spare. The lifetime is sent in seconds, measured on the store's clock (a
parameter), so the server's clock only has to run at the right speed. A key lives while its chunk receives pieces
and disappears 185 days after the last batch that touched it; expire() has
nothing to do.

Durability. A piece answered new must survive a crash, or its postage can be
used again. On one server that takes ``appendonly yes`` with ``appendfsync
always`` (Redis fsyncs the AOF before it replies). Against the loss of a
server, replicas=N appends to each master's share of the batch, on the same
connection, ``WAIT N timeout`` (Redis < 7.2: the replicas received the writes)
or ``WAITAOF 1 N timeout`` (7.2+ with AOF on: the master and N replicas
fsynced them); fewer acknowledgements raise ReplayStoreError.

Failures. Any Redis error (unreachable, timeout, cluster down, replicas
missing) raises ReplayStoreError, which the verifier turns into
Verdict.ERROR: never VALID. Calls that reached Redis before the failure keep
their bits, so such a piece may later be reported DUPLICATE (the safe
direction). A MOVED or ASK answer (failover, resharding) sends that key's
call again to its new node: the call did not run where it was refused.
"""

from __future__ import annotations

import contextlib
import math
from array import array
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, time, timedelta
from types import TracebackType
from typing import Any, Self

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import (
    AskError,
    MovedError,
    NoScriptError,
    ResponseError,
)
from redis.retry import Retry

from meter.errors import ReplayStoreError
from meter.postoffice.replay import (
    FORGET_AFTER_DAYS,
    MAX_SERIAL,
    Piece,
    latest_mailing,
    validate_pieces,
)
from meter.postoffice.replay_redis_wire import (
    _CHUNKS,
    _ERRORS,
    _LOW,
    _ROUNDS,
    _SCRIPT,
    _SEEN_SCRIPT,
    CHUNK_BITS,
    MAX_REPLICA_TIMEOUT_MS,
    _Call,
    _check_replicas,
    _little_endian,
    _Outcome,
    _pipeline,
    _public,
    _Share,
    _unreachable,
    _weakest,
    wait_command,
)

__all__ = ["CHUNK_BITS", "MAX_REPLICA_TIMEOUT_MS", "RedisReplayStore", "wait_command"]


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
        replicas: int = 0,
        replica_timeout_ms: int = 1000,
    ) -> None:
        """Use from_url()."""
        _check_replicas(replicas, replica_timeout_ms)
        self._client = client
        self._clock = clock
        self._where = where
        self._nodes = nodes
        self._prefix = prefix
        self._replicas = replicas
        self._replica_timeout_ms = replica_timeout_ms
        self._wait_by_node: dict[str, tuple[str | int, ...]] = {}
        cluster = isinstance(client, RedisCluster)
        self._pool = ThreadPoolExecutor(nodes, "replay-redis") if cluster else None
        self._closed = False
        self._sha, self._seen_sha = self._load_scripts()

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout: float = 2.0,
        prefix: str = "pim",
        clock: Callable[[], datetime] = _utc_now,
        replicas: int = 0,
        replica_timeout_ms: int = 1000,
    ) -> RedisReplayStore:
        """Connect; a server that reports cluster_enabled:1 is used as a Redis Cluster.

        timeout bounds each connect and each reply (seconds; a reply that waits for
        replicas gets replica_timeout_ms more); prefix starts every key; clock gives the
        time against which keys' lifetimes are measured. replicas: how many replicas of
        each master must acknowledge a batch's writes before it is answered (0: none).
        """
        _check_replicas(replicas, replica_timeout_ms)
        where = _public(url)
        options: dict[str, Any] = {
            "socket_timeout": timeout + (replica_timeout_ms / 1000 if replicas else 0),
            "socket_connect_timeout": timeout,
        }
        try:
            # redis-py's default Retry sends a whole pipeline again after a timeout: the
            # scripts would run twice and the second run would call every new piece of the
            # batch DUPLICATE. No retry, as redis-py gives a cluster's nodes; _send() sends
            # again once, only after a broken connection.
            probe = redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), **options)
        except (ValueError, *_ERRORS) as exc:
            raise ReplayStoreError(f"replay store {where}: bad Redis URL: {exc}") from exc
        try:
            if probe.info("cluster").get("cluster_enabled") == 1:
                probe.close()
                cluster = RedisCluster.from_url(url, **options)
                client: redis.Redis | RedisCluster = cluster
                nodes = len(cluster.get_primaries())  # type: ignore[no-untyped-call]
            else:
                client, nodes = probe, 1
        except _ERRORS as exc:
            probe.close()
            raise _unreachable(where, exc) from exc
        return cls(
            client,
            where=where,
            nodes=nodes,
            prefix=prefix,
            clock=clock,
            replicas=replicas,
            replica_timeout_ms=replica_timeout_ms,
        )

    @property
    def nodes(self) -> int:
        """1 for one server, else the number of cluster masters (when opened)."""
        return self._nodes

    @property
    def replicas(self) -> int:
        """How many replicas of each master acknowledge a batch's writes before its answer."""
        return self._replicas

    def key(self, serial: int, sequence: int) -> str:
        """The key holding the bit of this piece."""
        return f"{self._prefix}:{{{serial}}}:{sequence >> CHUNK_BITS}"

    def check_and_set(self, pieces: Sequence[Piece]) -> list[bool]:
        if not pieces:
            return []
        calls = self._calls(pieces)
        latest = latest_mailing(pieces)
        forget_at = datetime.combine(latest + timedelta(FORGET_AFTER_DAYS + 2), time(), UTC)
        lifetime = str(math.ceil((forget_at - self._clock()).total_seconds()))
        seen = [False] * len(pieces)

        def evalsha(call: _Call) -> tuple[Any, ...]:
            return ("EVALSHA", self._sha, 1, call.key, lifetime, _little_endian(call.offsets))

        for call, answer in self._run(calls, evalsha, wait=self._replicas > 0):
            for position in answer:
                seen[call.indices[position]] = True
        return seen

    def seen(self, pieces: Sequence[Piece]) -> list[bool]:
        """For each piece, True if it is recorded; reads only, records nothing.

        The same checks of the input as check_and_set (InvalidInput names the first bad piece).
        """
        if not pieces:
            return []
        calls = self._calls(pieces)
        latest_mailing(pieces)  # the dates are checked as check_and_set checks them
        seen = [False] * len(pieces)

        def evalsha(call: _Call) -> tuple[Any, ...]:
            return ("EVALSHA", self._seen_sha, 1, call.key, _little_endian(call.offsets))

        for call, answer in self._run(calls, evalsha, wait=False):
            for position in answer:
                seen[call.indices[position]] = True
        return seen

    def durability(self) -> dict[str, str | int]:
        """What the server(s) promise for a piece answered new, for a readiness report.

        appendonly, appendfsync and maxmemory_policy are the weakest over the masters
        ("unknown" where CONFIG is refused, as on some managed Redis; any policy but
        noeviction may evict keys, so forget pieces); replicas_connected is the fewest in
        sync replicas of any master. Raises ReplayStoreError when Redis cannot be reached.
        """
        found: dict[str, list[str]] = {"appendonly": [], "appendfsync": [], "policy": []}
        connected = []
        try:
            for _, node in self._masters():
                aof = node.info("persistence").get("aof_enabled")
                found["appendonly"].append("yes" if aof == 1 else "no" if aof == 0 else "unknown")
                for name, parameter in (
                    ("appendfsync", "appendfsync"),
                    ("policy", "maxmemory-policy"),
                ):
                    try:
                        value = node.config_get(parameter).get(parameter, "unknown")
                    except ResponseError:  # CONFIG renamed or not permitted
                        value = "unknown"
                    found[name].append(str(value))
                replication = node.info("replication").items()
                connected.append(
                    sum(
                        1
                        for name, value in replication
                        # slave0, slave1...: dicts; slave_repl_offset and such: numbers
                        if name.startswith("slave")
                        and isinstance(value, dict)
                        and value.get("state") == "online"
                    )
                )
        except _ERRORS as exc:
            raise _unreachable(self._where, exc) from exc
        policies = found["policy"]
        return {
            "appendonly": _weakest(found["appendonly"], ("unknown", "no", "yes")),
            "appendfsync": _weakest(found["appendfsync"], ("unknown", "no", "everysec", "always")),
            "maxmemory_policy": next((p for p in policies if p != "noeviction"), "noeviction"),
            "replicas_wanted": self._replicas,
            "replicas_connected": min(connected),
            "replica_timeout_ms": self._replica_timeout_ms,
            "masters": len(connected),
        }

    def expire(self, today: date) -> int:
        """Nothing to do: every key carries its expiry time (see the module docstring)."""
        return 0

    def close(self) -> None:
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown()
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _calls(self, pieces: Sequence[Piece]) -> list[_Call]:
        """The batch grouped by key; InvalidInput (nothing sent) if a piece is bad."""
        groups: dict[tuple[int, int], _Call] = {}
        try:
            for index, (serial, sequence, _) in enumerate(pieces):
                call = groups.get((serial, sequence >> CHUNK_BITS))
                if call is None:
                    key = self.key(serial, sequence)
                    call = groups[serial, sequence >> CHUNK_BITS] = _Call(key, [], array("H"))
                call.indices.append(index)
                call.offsets.append(sequence & _LOW)
        except (TypeError, ValueError, OverflowError):
            validate_pieces(pieces)
            raise  # validate_pieces found nothing wrong: a bug, not bad input
        for serial, chunk in groups:
            if not (isinstance(serial, int) and 0 <= serial < MAX_SERIAL and 0 <= chunk < _CHUNKS):
                validate_pieces(pieces)
        return list(groups.values())

    def _run(
        self, calls: list[_Call], command: Callable[[_Call], tuple[Any, ...]], wait: bool
    ) -> list[tuple[_Call, Any]]:
        """Every call's answer, each node's share pipelined on one connection (and its WAIT
        after it when wait); calls refused with MOVED, ASK or NOSCRIPT are sent again."""
        if self._closed:
            raise ReplayStoreError(f"replay store {self._where}: used after close()")
        answered: list[tuple[_Call, Any]] = []
        pending = calls
        try:
            for _ in range(_ROUNDS):
                shares = self._route(pending)
                outcomes = self._on_nodes(shares, command, wait)
                pending, reload, refresh = [], False, False
                failure: BaseException | None = None
                for (name, _, share), outcome in zip(shares, outcomes, strict=True):
                    if isinstance(outcome, BaseException):
                        failure, refresh = failure or outcome, True
                        continue
                    answers, wait_command, wait_reply = outcome
                    for call, answer in zip(share, answers, strict=True):
                        if isinstance(answer, NoScriptError):
                            reload = True
                            pending.append(call)
                        elif isinstance(answer, AskError):  # MovedError is an AskError
                            refresh = refresh or isinstance(answer, MovedError)
                            moved = isinstance(answer, MovedError)
                            call.asking = None if moved else (answer.host, answer.port)
                            pending.append(call)
                        elif isinstance(answer, Exception):
                            failure = failure or answer
                        else:
                            answered.append((call, answer))
                    # A node that ran none of its calls (all refused) wrote nothing to wait
                    # for; a replica (after a failover) even refuses the WAIT.
                    ran = any(not isinstance(answer, Exception) for answer in answers)
                    if wait_command is not None and ran:
                        failure = failure or self._wait_failure(name, wait_command, wait_reply)
                if refresh:
                    self._refresh_slots()
                if failure is not None:
                    raise failure
                if not pending:
                    return answered
                if reload:
                    self._sha, self._seen_sha = self._load_scripts()
        except _ERRORS as exc:
            raise _unreachable(self._where, exc) from exc
        raise ReplayStoreError(
            f"replay store {self._where}: calls kept being refused (MOVED, ASK or NOSCRIPT) "
            f"{_ROUNDS} times; the batch was not accepted: verify again"
        )

    def _route(self, calls: list[_Call]) -> list[_Share]:
        """The calls grouped by the master that holds their key."""
        client = self._client
        if not isinstance(client, RedisCluster):
            return [("", client, calls)]
        shares: dict[str, _Share] = {}
        for call in calls:
            if call.asking is not None:
                node = client.get_node(host=call.asking[0], port=call.asking[1])  # type: ignore[no-untyped-call]
                if node is None:
                    raise ReplayStoreError(
                        f"replay store {self._where}: ASK named an unknown node "
                        f"{call.asking[0]}:{call.asking[1]}; verify again"
                    )
            else:
                node = client.get_node_from_key(call.key)  # type: ignore[no-untyped-call]
            share = shares.get(node.name)
            if share is None:
                share = shares[node.name] = (node.name, client.get_redis_connection(node), [])
            share[2].append(call)
        return list(shares.values())

    def _on_nodes(
        self, shares: list[_Share], command: Callable[[_Call], tuple[Any, ...]], wait: bool
    ) -> list[_Outcome]:
        if self._pool is None or len(shares) == 1:
            return [self._send(share, command, wait) for share in shares]
        return list(self._pool.map(lambda share: self._send(share, command, wait), shares))

    def _send(
        self, share: _Share, command: Callable[[_Call], tuple[Any, ...]], wait: bool
    ) -> _Outcome:
        """One node's calls in one pipeline, so on one connection, its WAIT last.

        WAIT counts the replicas that reached the offset of this connection's last write,
        so it must follow the writes on their connection. redis-py's cluster pipeline does
        keep one connection per node for the first send, but sends calls refused with MOVED
        or ASK, or cut by a broken connection, again one by one through the cluster client,
        on other connections and nodes: a WAIT there would acknowledge without covering
        them. Hence one plain pipeline per master (its own client from the cluster), and
        redirections handled in _run with a WAIT of their own.
        """
        name, client, calls = share
        try:
            wait_command = self._wait_command(name, client) if wait else None
            stack: list[tuple[Any, ...]] = []
            for call in calls:
                if call.asking is not None:
                    stack.append(("ASKING",))
                stack.append(command(call))
            if wait_command is not None:
                stack.append(wait_command)
            try:
                replies = _pipeline(client, stack)
            except redis.ConnectionError:
                # A connection the server had closed while idle: sent again, whole and on
                # one new connection. Had the server run part of it, those pieces now come
                # back DUPLICATE: the safe direction.
                replies = _pipeline(client, stack)
        except _ERRORS as exc:
            return exc
        wait_reply = None
        if wait_command is not None:
            wait_reply, _ = replies.pop(), stack.pop()
        answers = [reply for reply, args in zip(replies, stack, strict=True) if args[0] != "ASKING"]
        return answers, wait_command, wait_reply

    def _wait_command(self, name: str, client: redis.Redis) -> tuple[str | int, ...]:
        """WAITAOF 1 N t where the server has it (7.2+) and AOF is on, else WAIT N t."""
        known = self._wait_by_node.get(name)
        if known is None:
            version = str(client.info("server").get("redis_version", "0"))
            aof = client.info("persistence").get("aof_enabled") == 1
            known = wait_command(version, aof, self._replicas, self._replica_timeout_ms)
            self._wait_by_node[name] = known
        return known

    def _wait_failure(
        self, name: str, command: tuple[str | int, ...], reply: Any
    ) -> BaseException | None:
        """What is wrong with a WAIT's (or WAITAOF's) reply, if anything."""
        if isinstance(reply, Exception):
            self._wait_by_node.pop(name, None)  # e.g. AOF switched off: ask again next time
            return reply
        where = name or "the server"
        if command[0] == "WAIT":
            acknowledged, what = int(reply), "received"
        else:
            local, acknowledged = (int(n) for n in reply)
            what = "fsynced to their AOF"
            if local < 1:
                return ReplayStoreError(
                    f"replay store {self._where}: {where} did not fsync the batch to its "
                    "AOF in time; the batch was not accepted: verify again"
                )
        if acknowledged >= self._replicas:
            return None
        return ReplayStoreError(
            f"replay store {self._where}: only {acknowledged} of {self._replicas} replicas "
            f"{what} the batch's writes on {where} within {self._replica_timeout_ms} ms "
            f"({command[0]}); the batch was not accepted (its pieces may come back "
            "DUPLICATE): check the replicas and verify again"
        )

    def _masters(self) -> list[tuple[str, redis.Redis]]:
        client = self._client
        if not isinstance(client, RedisCluster):
            return [("", client)]
        primaries = client.get_primaries()  # type: ignore[no-untyped-call]
        return [(node.name, client.get_redis_connection(node)) for node in primaries]

    def _refresh_slots(self) -> None:
        """After a failover or resharding: the slot table again, for the next call."""
        if isinstance(self._client, RedisCluster):
            # The failure being reported says more; the next call tries again.
            with contextlib.suppress(*_ERRORS):
                self._client.nodes_manager.initialize()

    def _load_scripts(self) -> tuple[str, str]:
        try:  # on a cluster: on every master
            return str(self._client.script_load(_SCRIPT)), str(
                self._client.script_load(_SEEN_SCRIPT)
            )
        except _ERRORS as exc:
            raise _unreachable(self._where, exc) from exc
