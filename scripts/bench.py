"""Benchmarks, each next to the raw rate of the operation underneath, measured in the same run.

The machines are shared and noisy, so what matters is the ratio: the meter's
single-piece issuing against the token's raw create+destroy of a data object
(a register update is one of those), verification from bytes against the
raw ``cryptography`` P-256 verify.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from meter.cli import provision, workflows
from meter.cli.device_process import running_device
from meter.cli.home import PIN_VARIABLES, Home
from meter.host import DeviceClient
from meter.indicium import RateCategory, decode
from meter.pki.revocation import Revocations
from meter.pki.trust import TrustStore
from meter.postoffice import EmbeddedReplayStore, Verifier
from meter.protocol.issue import IssueRequest
from meter.token import KeyAlgorithm

VECTORS = Path(__file__).resolve().parents[1] / "tests" / "vectors" / "pim1-vectors-v1.json"


def rate(fn: Callable[[], int], seconds: float) -> float:
    """Operations per second of ``fn`` (which returns how many it did), run for ~seconds."""
    done, start = 0, time.perf_counter()
    while True:
        done += fn()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed


def lab_home(folder: Path, device_serial: int) -> tuple[Home, dict[str, str], dict[str, str]]:
    """A provisioned home in ``folder``: (home, the meter token's PINs, every demo user's
    password). The bench chooses the PINs, in memory only, as a lab would, so that it can
    open the meter token itself for the raw rates of the very same token."""
    for pair in PIN_VARIABLES.values():
        for var in pair:
            os.environ.setdefault(var, f"bench-{var.lower()}")
    for var, user in (("METER_ADMIN_PASSWORD", "admin"), ("METER_SO_PASSWORD", "security")):
        os.environ.setdefault(var, workflows.development_password(user))
    home = Home.at(folder / "home")
    pins = {"user_pin": secrets.token_urlsafe(16), "so_pin": secrets.token_urlsafe(16)}
    provision.init_home(home, provision.InitOptions(device_serial=device_serial), meter_pins=pins)
    passwords = {
        "admin": os.environ["METER_ADMIN_PASSWORD"],
        "security": os.environ["METER_SO_PASSWORD"],
    } | {user: workflows.development_password(user) for user, _ in workflows.DEMO_USERS}
    return home, pins, passwords


def bench_meter(seconds: float) -> dict[str, Any]:
    """Single-piece issuing through the device's socket, next to the same token's raw rates.

    The home is provisioned with PINs the bench chooses (as a lab would), so that it
    can also open the meter token itself, before and after the device runs, for the
    raw create+destroy and sign rates of the very same token.
    """
    with tempfile.TemporaryDirectory(prefix="meter-bench-") as tmp:
        home, pins, passwords = lab_home(Path(tmp), device_serial=123456789012)
        raw_before = raw_token_rates(home, pins["user_pin"], seconds)
        req = IssueRequest(
            postage=730,
            rate_category=RateCategory.FIRST_CLASS_LETTER,
            origin_zip="94043",
            destination_zip="62704",
            address=["Jane Q. Public", "1234 Main St.", "Springfield, IL 62704"],
        )
        with running_device(home):
            workflows.setup_demo_device(home, passwords, 2**39)
            with DeviceClient(home.socket) as client:
                client.logon("customer", passwords["customer"])
                issue_rate = rate(lambda: [client.issue(req)] and 1, seconds)
                pieces = client.get("/v1/psd-status")["piece_count"]
            with DeviceClient(home.socket) as anybody:
                status_rate = rate(lambda: [anybody.get("/v1/status")] and 1, seconds)
        raw_after = raw_token_rates(home, pins["user_pin"], seconds)
        create_destroy = (raw_before["create_destroy"] + raw_after["create_destroy"]) / 2
        durable = (raw_before["create_sync_destroy"] + raw_after["create_sync_destroy"]) / 2
        return {
            "raw_token": {
                "sign_per_s": round((raw_before["sign"] + raw_after["sign"]) / 2, 1),
                "create_destroy_per_s": round(create_destroy, 1),
                "create_destroy_before_and_after_per_s": [
                    round(raw_before["create_destroy"], 1),
                    round(raw_after["create_destroy"], 1),
                ],
                "create_sync_destroy_per_s": round(durable, 1),
            },
            "issue_single": {
                "per_s": round(issue_rate, 1),
                "ratio_to_create_destroy": round(issue_rate / create_destroy, 3),
                "target_ratio": 0.8,
                # The same with the profile's sync in the raw figure: the device's own cost.
                "ratio_to_durable_create_destroy": round(issue_rate / durable, 3),
                "pieces": pieces,
                "path": "client -> device socket -> firmware -> token, one piece per request",
            },
            "status_no_role": {
                "per_s": round(status_rate, 1),
                "round_trip_ms": round(1000 / status_rate, 3),
            },
        }


def raw_token_rates(home: Home, pin: str, seconds: float) -> dict[str, float]:
    """The meter token's own sign and create+destroy rates (the device is not running)."""
    with home.open_token("meter", pin) as token:
        sign = rate(
            lambda: [token.sign("indicium-signing", KeyAlgorithm.ECDSA_P256, b"x" * 84)] and 1,
            seconds,
        )

        def create_destroy() -> int:
            obj = token.create_data("bench", "bench", b"r" * 150)
            token.destroy(obj)
            return 1

        def create_sync_destroy() -> int:
            # What any durable register write costs on this token: SoftHSM2 never syncs,
            # so the profile's sync comes with every piece.
            obj = token.create_data("bench", "bench", b"r" * 150)
            token.make_durable()
            token.destroy(obj)
            return 1

        return {
            "sign": sign,
            "create_destroy": rate(create_destroy, seconds),
            "create_sync_destroy": rate(create_sync_destroy, seconds),
        }


def sample_indicia(count: int) -> tuple[list[bytes], TrustStore, datetime]:
    """Fresh ECDSA indicia signed in software with the spec's test meter key (test key only)."""
    vectors = json.loads(VECTORS.read_text())
    certs = vectors["certificates"]
    trust = TrustStore.from_pem(
        certs["postal_root"].encode(), "".join(certs["providers"] + certs["meters"]).encode()
    )
    template = decode(bytes.fromhex(vectors["vectors"][0]["indicium_hex"]))
    key = serialization.load_pem_private_key(
        vectors["meter_private_keys_for_tests_only"][str(template.device_serial)].encode(), None
    )
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    out = []
    for i in range(count):
        ind = replace(template, sequence=1000 + i, ascending=template.ascending + i)
        ind = replace(ind, descending=template.descending - i)
        r, s = decode_dss_signature(key.sign(ind.signed_part(), ec.ECDSA(hashes.SHA256())))
        out.append(ind.with_signature(r.to_bytes(32, "big") + s.to_bytes(32, "big")).to_bytes())
    return out, trust, template.time_of_issue


def bench_verify(seconds: float, count: int = 4096) -> dict[str, Any]:
    indicia, trust, issued = sample_indicia(count)
    public = trust.candidates(decode(indicia[0]).key_id)[0].meter.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    signed = [(d[:84], d[84:]) for d in indicia]
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    ders = [
        (m, encode_dss_signature(int.from_bytes(s[:32], "big"), int.from_bytes(s[32:], "big")))
        for m, s in signed
    ]

    def raw() -> int:
        # As many verifies as one round of batch(), so that the two take even turns.
        for m, sig in ders:
            public.verify(sig, m, ec.ECDSA(hashes.SHA256()))
        return len(ders)

    from bench_verify import paired_rates

    with tempfile.TemporaryDirectory(prefix="meter-bench-") as tmp:
        rounds = {"n": 0}

        def batch() -> int:
            # A new store each round so every piece is new (VALID), as at a real office.
            store = EmbeddedReplayStore.open(Path(tmp) / f"replay-{rounds['n']}")
            rounds["n"] += 1
            with store:
                verifier = Verifier(
                    trust, Revocations.empty(), store, (issued + timedelta(days=1)).date()
                )
                for start in range(0, len(indicia), 512):
                    verifier.verify_batch(indicia[start : start + 512])
            return len(indicia)

        # Taking turns with raw(): measured one after the other, the ratio moved with
        # whatever else the machine ran (0.54 to 0.98 in four runs on a shared 2-core box).
        rates = paired_rates({"raw": raw, "verify": batch}, seconds)
    raw_rate, verify_rate = rates["raw"], rates["verify"]
    return {
        "verify_bytes": {
            "per_s": round(verify_rate, 1),
            "raw_verify_per_s": round(raw_rate, 1),
            "ratio_to_raw_verify": round(verify_rate / raw_rate, 3),
            "target_ratio": 0.8,
            "batch": 512,
            "replay_store": "embedded (one fsync per batch)",
        }
    }


SECTIONS = ("meter", "verify", "replay", "postoffice", "reload")


def run_sections(sections: set[str], seconds: float) -> dict[str, Any]:
    """Each section's figures next to the raw rate measured in the same run."""
    from bench_replay import (
        bench_replay_embedded,
        bench_replay_embedded_trays,
        bench_replay_redis,
        bench_replay_redis_cluster,
    )
    from bench_verify import bench_verify_bytes_all_cores, bench_verify_images

    report: dict[str, Any] = {}
    if "meter" in sections:
        from bench_batch import bench_issue_batch, bench_labels_parallel

        report.update(bench_meter(seconds))
        report.update(bench_issue_batch(seconds))
        report.update(bench_labels_parallel(seconds))
    if "verify" in sections:
        report.update(bench_verify(seconds))
        report.update(bench_verify_images(seconds))
        report.update(bench_verify_bytes_all_cores(seconds))
    if "replay" in sections:
        report["replay_embedded"] = bench_replay_embedded(seconds)
        report["replay_embedded_trays"] = bench_replay_embedded_trays(seconds)
        report["replay_redis"] = bench_replay_redis(seconds, REDIS_URL)
        report["replay_redis_cluster"] = bench_replay_redis_cluster(seconds, REDIS_CLUSTER_URL)
        single = report["replay_redis"].get("check_and_set_per_s")
        cluster = report["replay_redis_cluster"].get("check_and_set_per_s")
        if single and cluster:
            report["replay_redis_cluster"]["ratio_to_one_node"] = round(cluster / single, 2)
    if "reload" in sections:
        from bench_reload import bench_reload

        report.update(bench_reload(seconds))
    if "postoffice" in sections:
        from bench_postoffice import bench_postoffice_hostile_images, bench_postoffice_http
        from bench_redis_aof import bench_replay_redis_aof

        report["postoffice_http"] = bench_postoffice_http(seconds)
        report["postoffice_hostile_images"] = bench_postoffice_hostile_images(seconds)
        report["replay_redis_aof"] = bench_replay_redis_aof(seconds)
    return report


REDIS_URL = os.environ.get("METER_BENCH_REDIS_URL", "redis://127.0.0.1:6390/0")
REDIS_CLUSTER_URL = os.environ.get("METER_BENCH_REDIS_CLUSTER_URL", "redis://127.0.0.1:7000")


def table_rows(report: dict[str, Any]) -> list[tuple[str, float, str]]:
    rows: list[tuple[str, float, str]] = []
    if "raw_token" in report:
        rows += [
            ("raw token ECDSA P-256 sign", report["raw_token"]["sign_per_s"], ""),
            (
                "raw token create+destroy data object",
                report["raw_token"]["create_destroy_per_s"],
                "",
            ),
            (
                "raw token create+sync+destroy (a durable register write)",
                report["raw_token"]["create_sync_destroy_per_s"],
                "",
            ),
            (
                "meter issue through the device socket, one durable debit each",
                report["issue_single"]["per_s"],
                f"{report['issue_single']['ratio_to_create_destroy']:.2f} x create+destroy (target 0.8)",
            ),
            (
                "No-Role Request Status through the socket",
                report["status_no_role"]["per_s"],
                f"{report['status_no_role']['round_trip_ms']:.2f} ms a round trip",
            ),
        ]
    if "issue_batch" in report:
        ib, lp = report["issue_batch"], report["labels_parallel"]
        rows += [
            (
                f"batch issue through the socket, {ib['batch']} a request",
                ib["per_s"],
                f"{ib['ratio_to_raw_sign']:.2f} x raw sign {ib['raw_sign_per_s']:,.0f}/s "
                "(target 0.5)",
            ),
            (
                f"labels into one PDF, {lp['cores']} cores",
                lp["per_s"],
                f"{lp['ratio_to_raw_single_core']:.2f} x one label on one core "
                f"{lp['raw_single_core_per_s']:,.0f}/s (target 1.6); "
                f"{lp['ratio_to_single_process']:.2f} x one process",
            ),
        ]
    if "verify_bytes" in report:
        vb, vi, va = (
            report["verify_bytes"],
            report["verify_images"],
            report["verify_bytes_all_cores"],
        )
        rows += [
            ("raw cryptography P-256 verify", vb["raw_verify_per_s"], ""),
            (
                "post office verify from bytes",
                vb["per_s"],
                f"{vb['ratio_to_raw_verify']:.2f} x raw verify (target 0.8)",
            ),
            (f"verify from bytes, {va['cores']} cores", va["per_s"], ""),
            ("raw zxing-cpp decode of a label PNG", vi["raw_decode_per_s"], ""),
            (
                "raw zxing-cpp decode, PDF417 only, no rotate/invert/downscale",
                vi["raw_decode_tuned_per_s"],
                "",
            ),
            (
                "post office verify from label images",
                vi["per_s"],
                f"{vi['ratio_to_tuned']:.2f} x tuned raw decode (target 0.8); rotated read "
                f"{vi['rotated_decoded']['read']} of {vi['rotated_decoded']['of']}",
            ),
        ]
    if "replay_embedded" in report:
        re_ = report["replay_embedded"]
        rows.append(
            (
                f"embedded replay store check-and-set, {re_['live_stamps']:,} live",
                re_["check_and_set_per_s"],
                f"bitmaps {re_['bytes'] / 1e6:.2f} MB (goal <= 17 MB, >= 1,000,000/s)",
            )
        )
        for key, name in (
            ("replay_redis", "Redis, one node"),
            ("replay_redis_cluster", "Redis Cluster"),
        ):
            entry = report[key]
            if "skipped" in entry:
                rows.append((f"{name}: skipped ({entry['skipped']})", 0.0, ""))
            else:
                note = f"{entry['nodes']} node(s)"
                if "ratio_to_one_node" in entry:
                    note += f", {entry['ratio_to_one_node']:.2f} x one node"
                rows.append((f"{name} pipelined check-and-set", entry["check_and_set_per_s"], note))
    if "replay_embedded_trays" in report:
        tr = report["replay_embedded_trays"]
        rows.append(
            (
                f"embedded replay store, sorting-centre trays, {tr['meters']:,} meters",
                tr["check_and_set_per_s"],
                f"bitmaps {tr['bytes'] / 1e6:.2f} MB (goal >= 1,000,000/s)",
            )
        )
    if "postoffice_http" in report:
        ph, hi, aof = (
            report["postoffice_http"],
            report["postoffice_hostile_images"],
            report["replay_redis_aof"],
        )
        rows += [
            ("post office: raw verify + record of one piece, no HTTP", ph["raw_cancel_per_s"], ""),
            (
                f"post office HTTP cancel, {ph['clients']} clients",
                ph["per_s"],
                f"p50 {ph['p50_ms']} ms, p99 {ph['p99_ms']} ms",
            ),
            (
                "post office HTTP check (nothing recorded)",
                ph["check"]["per_s"],
                f"p50 {ph['check']['p50_ms']} ms, p99 {ph['check']['p99_ms']} ms",
            ),
            (
                f"post office HTTP cancel-batch of {ph['batch']['items']}: pieces",
                ph["batch"]["pieces_per_s"],
                f"p50 {ph['batch']['p50_ms']} ms, p99 {ph['batch']['p99_ms']} ms a batch",
            ),
            (
                f"hostile images, {hi['in_flight']} in flight: requests answered",
                hi["per_s"],
                f"peak RSS {hi['peak_rss_mb']} MB (limit {hi['limit_mb']} MB)",
            ),
        ]
        if "skipped" in aof:
            rows.append((f"Redis with AOF: skipped ({aof['skipped']})", 0.0, ""))
        else:
            rows.append(
                (
                    f"Redis check-and-set, AOF appendfsync {aof['appendfsync']}",
                    aof["check_and_set_per_s"],
                    f"{aof['check_and_set_per_s'] / aof['aof_off_per_s']:.2f} x AOF off "
                    f"({aof['aof_off_per_s']:,.0f}/s)",
                )
            )
    if "reload" in report:
        from bench_reload import table_rows as reload_rows

        rows += reload_rows(report)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    parser.add_argument(
        "--only",
        action="append",
        choices=SECTIONS,
        help="run only this part (repeatable): meter, verify, replay, postoffice or reload",
    )
    args = parser.parse_args()
    report: dict[str, Any] = {
        "machine": {"cores": os.cpu_count(), "python": sys.version.split()[0]},
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    report.update(run_sections(set(args.only or SECTIONS), args.seconds))
    if args.json:
        print(json.dumps(report))
        return 0
    rows = table_rows(report)
    width = max(len(r[0]) for r in rows)
    print(f"{'operation':<{width}}  {'per second':>12}  note")
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>12,.1f}  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
