"""The state behind the verification service's endpoints: counters, the replay store
(opened again after it failed), the register ledger, the certificates, the stations."""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool

from meter.errors import MeterError, ReplayStoreError
from meter.postoffice import ReplayStore, Verdict, VerificationResult, Verifier, open_replay_store
from meter.postoffice.ledger import FirstAccepted, RegisterLedger
from meter.postoffice.reconcile import load_credited, reconcile
from meter.postoffice.replay_redis import RedisReplayStore
from meter.postoffice.service_config import ServiceConfig
from meter.postoffice.stations import StationRegistry
from meter.postoffice.trustdir import CertificateDirectory

__all__ = ["CREDITED_FILE", "Counters", "Service"]

CREDITED_FILE = "credited.json"  # the provider's export, in the certificate directory
STORE_RETRY_SECONDS = 1.0  # a failed replay store is opened again at most this often
_PATH = re.compile(r"(?<![\w.])/[^\s'\",:;)]+")


class Counters:
    """Verdicts and refused requests since the service started; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._since = datetime.now(UTC).replace(microsecond=0)
        self._verdicts: Counter[str] = Counter({v.value: 0 for v in Verdict})
        self._requests: Counter[str] = Counter(check=0, check_batch=0, cancel=0, cancel_batch=0)
        self._rejected: Counter[str] = Counter()

    def add(self, results: Sequence[VerificationResult]) -> None:
        with self._lock:
            self._verdicts.update(r.verdict.value for r in results)

    def request(self, endpoint: str) -> None:
        with self._lock:
            self._requests[endpoint] += 1

    def reject(self, status: int) -> None:
        with self._lock:
            self._rejected[str(status)] += 1

    def to_json(self) -> dict[str, Any]:
        with self._lock:
            return {
                "since": self._since.isoformat(),
                "verdicts": dict(self._verdicts),
                "requests": dict(self._requests),
                "rejected": dict(self._rejected),
            }

    def prometheus(self, ready: bool) -> str:
        data = self.to_json()
        lines = [
            "# HELP meter_postoffice_verdicts_total Verdicts given since the service started.",
            "# TYPE meter_postoffice_verdicts_total counter",
            *(
                f'meter_postoffice_verdicts_total{{verdict="{k}"}} {v}'
                for k, v in data["verdicts"].items()
            ),
            "# HELP meter_postoffice_requests_total Verification requests accepted.",
            "# TYPE meter_postoffice_requests_total counter",
            *(
                f'meter_postoffice_requests_total{{endpoint="{k}"}} {v}'
                for k, v in data["requests"].items()
            ),
            "# HELP meter_postoffice_rejected_total Requests refused before verification.",
            "# TYPE meter_postoffice_rejected_total counter",
            *(
                f'meter_postoffice_rejected_total{{status="{k}"}} {v}'
                for k, v in sorted(data["rejected"].items())
            ),
            "# HELP meter_postoffice_ready 1 when trust and replay store are usable.",
            "# TYPE meter_postoffice_ready gauge",
            f"meter_postoffice_ready {int(ready)}",
        ]
        return "\n".join(lines) + "\n"


class _StoreSlot:
    """The replay store, opened again after it failed (e.g. Redis down, then back)."""

    def __init__(self, location: str | Path, replicas: int = 0) -> None:
        self._location = location
        self._replicas = replicas
        self._lock = threading.Lock()
        self._store: ReplayStore | None = None
        self._problem: str | None = None
        self._last_attempt = 0.0
        self._open()

    @property
    def is_url(self) -> bool:
        return "://" in str(self._location)

    @property
    def problem(self) -> str | None:
        with self._lock:
            return self._problem

    def get(self) -> ReplayStore:
        """The open store, or one whose every call fails with the reason it is not open."""
        with self._lock:
            retry = time.monotonic() - self._last_attempt >= STORE_RETRY_SECONDS
            if self._problem is not None and retry:
                self._close()
                self._open()
            if self._store is None:
                return _Unavailable(self._problem or "replay store is not open")
            return self._store

    def durability(self) -> dict[str, Any]:
        """What a Redis store's servers say of their persistence and replicas (readiness)."""
        with self._lock:
            store = self._store
        if not isinstance(store, RedisReplayStore):
            return {}
        try:
            return {"store_durability": store.durability()}
        except ReplayStoreError:
            return {}  # unreachable: problems() says so

    def observe(self, results: Sequence[VerificationResult]) -> None:
        """Note whether the store answered this batch."""
        failed = next((r for r in results if r.verdict is Verdict.ERROR), None)
        answered = any(r.verdict in (Verdict.VALID, Verdict.DUPLICATE) for r in results)
        with self._lock:
            if failed is not None:
                self._problem = failed.reason
            elif answered:
                self._problem = None

    def close(self) -> None:
        with self._lock:
            self._close()

    def _open(self) -> None:
        self._last_attempt = time.monotonic()
        try:
            if not self.is_url:
                Path(self._location).parent.mkdir(parents=True, exist_ok=True)
            if self._replicas and isinstance(self._location, str):
                self._store = RedisReplayStore.from_url(self._location, replicas=self._replicas)
            else:
                self._store = open_replay_store(self._location)
            self._problem = None
        except ReplayStoreError as exc:
            self._store, self._problem = None, str(exc)
        except OSError as exc:
            self._store = None
            self._problem = f"replay store {self._location}: {exc.strerror or exc}"

    def _close(self) -> None:
        if self._store is not None:
            store, self._store = self._store, None
            with contextlib.suppress(MeterError):  # it failed already; _problem says why
                store.close()


class _Unavailable:
    """A replay store that could not be opened: the verifier turns this into ERROR."""

    def __init__(self, reason: str) -> None:
        self._reason = reason

    def check_and_set(self, pieces: Sequence[Any]) -> list[bool]:
        raise ReplayStoreError(self._reason)

    def seen(self, pieces: Sequence[Any]) -> list[bool]:
        raise ReplayStoreError(self._reason)

    def expire(self, today: date) -> int:
        raise ReplayStoreError(self._reason)

    def close(self) -> None:
        pass


class Service:
    """The state behind the endpoints."""

    def __init__(
        self,
        config: ServiceConfig,
        certs: CertificateDirectory,
        slot: _StoreSlot,
        ledger: RegisterLedger,
    ) -> None:
        self.config = config
        self.certs = certs
        self.slot = slot
        self.ledger = ledger
        self.stations = StationRegistry(config.stations_file)
        self.counters = Counters()
        self._ledger_problem: str | None = None
        self._expired_on: date | None = None  # the day expiry last ran
        self._expiry_lock = threading.Lock()

    @classmethod
    def start(cls, config: ServiceConfig) -> Service:
        certs = CertificateDirectory(config.cert_dir)
        slot = _StoreSlot(config.store, config.redis_replicas)
        if slot.problem is not None and not slot.is_url:
            # An embedded store that is corrupt or in use will not heal by itself.
            raise ReplayStoreError(slot.problem)
        try:
            config.ledger.parent.mkdir(parents=True, exist_ok=True)
            ledger = RegisterLedger.open(config.ledger)
        except BaseException:
            slot.close()
            raise
        return cls(config, certs, slot, ledger)

    def today(self) -> date:
        return self.config.today or datetime.now(UTC).date()

    def _expire_once_a_day(self, store: ReplayStore, today: date) -> None:
        """Forget pieces past the 183-day window, on the first verification of each day."""
        with self._expiry_lock:
            if self._expired_on == today:
                return
            try:
                store.expire(today)
            except MeterError:
                return  # the store is failing: the verification will say so; retry next time
            self._expired_on = today

    async def verify(
        self, items: list[bytes], station: str | None, at: datetime | None = None
    ) -> tuple[list[VerificationResult], list[FirstAccepted | None], str | None]:
        """Verdicts in order, where each DUPLICATE was first accepted, and a ledger failure.

        With a station the pieces are cancelled: recorded in the replay store
        and the ledger, under the station's name. Without one they are only
        looked at, and nothing anywhere changes.
        """
        record = station is not None

        def work() -> list[VerificationResult]:
            trust, revocations = self.certs.current()
            store, today = self.slot.get(), self.today()
            if record:
                self._expire_once_a_day(store, today)
            return Verifier(trust, revocations, store, today).verify_batch(items, record=record)

        results = await run_in_threadpool(work)
        self.slot.observe(results)
        self.counters.add(results)
        problem: str | None = None
        if station is not None:
            try:
                await run_in_threadpool(self._record, results, station, at)
            except (MeterError, OSError) as exc:
                problem = str(exc)
            self._ledger_problem = problem
        first = await run_in_threadpool(self._first_accepted, results)
        return results, first, problem

    def _record(self, results: list[VerificationResult], station: str, at: datetime | None) -> None:
        self.ledger.record(results, station=station, at=at)

    def _first_accepted(self, results: Sequence[VerificationResult]) -> list[FirstAccepted | None]:
        duplicates = [
            (r.indicium.device_serial, r.indicium.sequence)
            for r in results
            if r.verdict is Verdict.DUPLICATE and r.indicium is not None
        ]
        try:
            found = iter(self.ledger.first_accepted(duplicates))
        except MeterError:
            found = iter([None] * len(duplicates))  # the verdict stands without the detail
        return [
            next(found) if r.verdict is Verdict.DUPLICATE and r.indicium is not None else None
            for r in results
        ]

    async def reconciliation(self) -> dict[str, Any]:
        def work() -> dict[str, Any]:
            path = self.config.cert_dir / CREDITED_FILE
            # Signed by the provider: checked against the provider certificates we trust.
            trust, _ = self.certs.current()
            credited = load_credited(path, trust) if path.exists() else None
            return reconcile(self.ledger, credited).to_json()

        return await run_in_threadpool(work)

    def problems(self) -> list[str]:
        """What keeps the service from being ready, in words without filesystem paths."""
        self.certs.current_set()  # looks at the directory now
        self.slot.get()  # opens a failed store again if its retry time has come
        found = [
            ("certificates", self.certs.problem),
            ("replay store", self.slot.problem),
            ("register ledger", self._ledger_problem),
        ]
        return [f"{part}: {_without_paths(p)}" for part, p in found if p is not None]

    def describe(self) -> dict[str, Any]:
        loaded = self.certs.current_set()
        return {
            "certificates": {
                "files": len(loaded.files),
                "meters": len(loaded.trust.credentials),
                "revoked": len(loaded.revocations),
            },
            "store": "redis" if self.slot.is_url else "embedded",
            **self.slot.durability(),
            "today": self.today().isoformat(),
        }

    def close(self) -> None:
        try:
            self.ledger.close()
        finally:
            self.slot.close()


def _without_paths(message: str) -> str:
    """A problem as /readyz may show it to anyone: each path cut to its file name."""
    return _PATH.sub(lambda m: Path(m.group(0)).name or "/", message)
