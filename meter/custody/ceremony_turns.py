"""A ceremony's run (its sessions; the transcript of a failed run) and the custodians' turns:
each share to its card, sealed file or paper sheet (export), or back from it (import), with
the people in the room walked through each step.

A card turn: "insert your card into reader R"; the host waits until the reader holds a
card that is not the previous custodian's (a card left in would otherwise receive the next
custodian's PIN: "take alice's card (serial …) out"); "PIN of bob's card (serial …)"; the
PIN goes only to that serial (checked again in the session that sends it); then the
custodian confirms the share's fingerprint. The serial goes into the transcript.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meter.custody import paper, sealed
from meter.custody.card import CardError, CardShareStore, CardStatus
from meter.custody.ceremony_transcript import Transcript, unsigned, write_json
from meter.custody.shares import CustodyShare
from meter.durable import write_atomically
from meter.errors import AuthenticationFailed, CustodyError, MeterError

if TYPE_CHECKING:
    from meter.custody.ceremony import Place, Prompter
    from meter.host import DeviceClient

__all__ = ["CARD_WAIT_S", "Run", "Turns"]

CARD_WAIT_S = 120.0


@dataclass
class Turns:
    """Whose card was in which reader last, so that the next custodian's PIN never goes to
    a card left in."""

    prompter: Prompter
    last: dict[str, tuple[str, str]] = field(default_factory=dict)  # reader -> (who, serial)

    def card(self, place: Place) -> tuple[CardShareStore, CardStatus]:
        """This custodian's card in its reader (not the previous custodian's), and its status."""
        store = CardShareStore(place.where)
        self.prompter.say(f"{place.custodian}: insert your card into reader {place.where!r}")
        previous = self.last.get(place.where)

        def still_there(status: CardStatus) -> None:
            assert previous is not None
            self.prompter.say(
                f"take {previous[0]}'s card (serial {status.serial}) out of reader "
                f"{place.where!r}: it is {place.custodian}'s turn"
            )

        status = store.wait_for_next_card(
            CARD_WAIT_S,
            other_than=previous[1] if previous else None,
            still_there=still_there,
        )
        self.last[place.where] = (place.custodian, status.serial)
        return store, status

    def pin(self, place: Place, status: CardStatus) -> str:
        return self.prompter.secret(f"PIN of {place.custodian}'s card (serial {status.serial})")

    # -- export ----------------------------------------------------------------------

    def put(self, share: CustodyShare, place: Place, transcript: Transcript) -> None:
        who = f"{place.custodian} ({share.group} #{share.member} of {share.members})"
        self.prompter.say(f"Share for {who}: {place.describe()}")
        serial = None
        if place.kind == "card":
            store, status = self.card(place)
            serial = status.serial
            pin = self.pin(place, status)
            try:
                store.write(share, pin, serial=serial)
            except CardError as exc:
                if "already holds" not in str(exc) or not self.prompter.confirm(
                    f"{exc}. Overwrite it with the share of ceremony {share.ceremony}?"
                ):
                    raise
                store.write(share, pin, overwrite=True, serial=serial)
        elif place.kind == "sealed":
            passphrase = self.prompter.secret(
                f"new passphrase for {place.where} ({place.custodian})"
            )
            sealed.seal(share, Path(place.where), passphrase, log2_n=place.log2_n)
        else:
            write_atomically(Path(place.where), paper.to_paper(share).encode())
        if not self.prompter.confirm(
            f"{place.custodian}: your share's fingerprint is {share.fingerprint}. Noted it?"
        ):
            raise CustodyError(
                f"{place.custodian} did not confirm the share {share.label()}: the ceremony "
                "stops here; the device is unchanged (rerun it with the same ceremony id)"
            )
        transcript.share_stored(share, place, serial)

    # -- import ----------------------------------------------------------------------

    def collect(self, places: list[Place], transcript: Transcript) -> list[CustodyShare]:
        """Every share the custodians present; one that cannot be read, or that its custodian
        does not recognize, is reported and skipped (a blocked PIN, a removed card), so that
        other custodians can still make up the count."""
        shares: list[CustodyShare] = []
        for place in places:
            self.prompter.say(f"{place.custodian}: your share from {place.describe()}")
            serial = None
            try:
                if place.kind == "card":
                    store, status = self.card(place)
                    serial = status.serial
                    share = store.read(self.pin(place, status), serial=serial)
                else:
                    share = _from_file(place, self.prompter)
                if not self.prompter.confirm(
                    f"{place.custodian}: this is share {share.label()}, fingerprint "
                    f"{share.fingerprint}. Is it the one you noted?"
                ):
                    raise CustodyError(
                        f"{place.custodian} did not recognize the share {share.label()} "
                        f"from {place.describe()}"
                    )
            except (CustodyError, AuthenticationFailed) as exc:
                # Card refusals are CustodyErrors (WrongPin also AuthenticationFailed).
                transcript.share_refused(place, str(exc), serial)
                self.prompter.say(f"not used: {exc}")
                continue
            transcript.share_presented(share, place, serial)
            shares.append(share)
        return shares


def _from_file(place: Place, prompter: Prompter) -> CustodyShare:
    if place.kind == "sealed":
        return sealed.unseal(Path(place.where), prompter.secret(f"passphrase of {place.where}"))
    try:
        text = Path(place.where).read_text()
    except OSError as exc:
        raise CustodyError(f"cannot read the paper share {place.where}: {exc}") from exc
    return paper.from_paper(text)


@dataclass
class Run:
    """One run of a ceremony: its device, people and transcript, and how far it got."""

    client: DeviceClient
    prompter: Prompter
    transcript: Transcript
    custodian: str
    finishing: bool = False  # a move's last step was sent: it may have committed
    committed: bool = False  # the device took the keys (import) or was withdrawn (move)

    @contextmanager
    def session(self, user_id: str, step: str) -> Iterator[None]:
        """One user's session on the device for one step (rule 4: one user at a time)."""
        self.prompter.say(f"{step}: user '{user_id}' logs on")
        session = self.client.logon(user_id, self.prompter.password(user_id))
        self.transcript.step(step, user_id, str(session.get("role")))
        try:
            yield
        except MeterError as exc:
            self.transcript.step_failed(step, str(exc))
            raise
        finally:
            with suppress(MeterError):  # the connection closing ends the session as well
                self.client.logoff()

    def failed(self, error: BaseException, path: Path) -> None:
        """The failed run's transcript, signed by the audit key if the device will (a Key
        Custodian's session), else marked unsigned with the device's reason; never raises,
        so that the ceremony's own error is the one reported."""
        t, say = self.transcript, self.prompter.say
        if self.committed and t.purpose != "import":
            say(
                f"the device committed the move: rerun with --ceremony-id {t.ceremony} to get its documents"
            )
            return
        # Beside the completed one's name, never over it: a failed rerun of a finished
        # ceremony must not replace its transcript (the audit log keeps every one).
        path = path.with_name(path.name.removesuffix(".json") + ".failed.json")
        reason = str(error) or type(error).__name__
        if self.committed:
            reason += (
                "; the keys were imported: rerun the same import (no shares needed) to sign "
                "its transcript"
            )
        t.failed(reason)
        document: dict[str, Any]
        try:
            with self.session(self.custodian, "Key Custodian: sign the failed transcript"):
                if self.finishing and (
                    self.client.get("/v1/status").get("withdrawn_for") == t.ceremony
                ):
                    say(
                        f"the move committed: rerun with --ceremony-id {t.ceremony} to get its documents"
                    )
                    return
                document = self.client.post(
                    "/v1/ceremony/transcript", {"ceremony": t.ceremony, "transcript": t.body()}
                )
        except Exception as refused:  # whatever it is (even an aborted prompt): write it unsigned
            document = unsigned(t.body(), f"the device did not sign it: {refused}")
        try:
            write_json(path, document)
        except OSError as exc:
            say(f"the failed ceremony's transcript could not be written to {path}: {exc}")
            return
        signed = "unsigned" if document.get("signature") is None else "signed"
        say(f"Ceremony {t.ceremony} failed: {reason}; its transcript ({signed}): {path}")
