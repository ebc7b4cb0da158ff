"""The VDI/VDE 2193-1 message frame as pydantic models.

Field names are exactly those of the public I4.0 language frame (and of
ARCHITECTURE.md), so that other I4.0 implementations can read what we send and
we can read theirs. `interactionElements` stay plain JSON here: turning them into
basyx objects is `protocol.elements`' job and happens only where the content is
needed, which keeps routing and de-duplication cheap.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable
from enum import StrEnum
from typing import Any, NamedTuple, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

BIDDING_PROTOCOL = "http://www.vdi.de/gma720/vdi2193_2/bidding"
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024
#: The largest replyBy (epoch milliseconds) a frame may carry: a 64-bit integer, as stored.
MAX_EPOCH_MS = 2**63 - 1
T = TypeVar("T")


class MessageType(StrEnum):
    """Message types of the bidding procedure (VDI/VDE 2193-2)."""

    CALL_FOR_PROPOSAL = "callForProposal"
    PROPOSAL = "proposal"
    REFUSE_PROPOSAL = "refuseProposal"
    NOT_UNDERSTOOD = "notUnderstood"
    ACCEPT_PROPOSAL = "acceptProposal"
    REJECT_PROPOSAL = "rejectProposal"
    INFORM_CONFIRM = "informConfirm"
    INFORM = "inform"
    INFORM_FAILURE = "informFailure"


class Role(StrEnum):
    REQUESTER = "ServiceRequester"
    PROVIDER = "ServiceProvider"


class _Strict(BaseModel):
    # Unknown fields are kept (other implementations may add some) but never trusted.
    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)


class Key(_Strict):
    type: str
    value: str


class SemanticProtocol(_Strict):
    type: str = "ExternalReference"
    keys: list[Key] = Field(min_length=1)

    @property
    def uri(self) -> str:
        return self.keys[0].value


class Identification(_Strict):
    id: str = Field(min_length=1, max_length=2048)
    idType: str = "IRI"


class RoleRef(_Strict):
    name: str = Field(min_length=1, max_length=256)


class Participant(_Strict):
    identification: Identification
    role: RoleRef

    @property
    def id(self) -> str:
        return self.identification.id


class Frame(_Strict):
    semanticProtocol: SemanticProtocol
    type: MessageType
    messageId: str = Field(min_length=1, max_length=256)
    conversationId: str = Field(min_length=1, max_length=256)
    sender: Participant
    receiver: Participant | None = None
    replyBy: int | None = Field(default=None, ge=0, le=MAX_EPOCH_MS)  # epoch milliseconds
    inReplyTo: str | None = Field(default=None, min_length=1, max_length=256)


class Message(_Strict):
    """One I4.0 message: the frame plus the AAS elements it carries."""

    frame: Frame
    interactionElements: list[dict[str, Any]] = Field(default_factory=list)
    # Slots, not fields (never serialized or compared): the cached wire form, and values read from
    # the elements once for every agent of a process that shares this message (`memo`).
    __slots__ = ("_memo", "_wire")

    # Convenience accessors, so that callers read like the protocol text.
    @property
    def type(self) -> MessageType:
        return self.frame.type

    @property
    def id(self) -> str:
        return self.frame.messageId

    @property
    def conversation(self) -> str:
        return self.frame.conversationId

    @property
    def sender(self) -> str:
        return self.frame.sender.id

    @property
    def receiver(self) -> str | None:
        return self.frame.receiver.id if self.frame.receiver else None

    @property
    def in_reply_to(self) -> str | None:
        return self.frame.inReplyTo

    @property
    def reply_by(self) -> int | None:
        return self.frame.replyBy

    def to_json(self) -> bytes:
        """The wire form (cached: a message is serialized to be kept, journaled and published)."""
        try:
            return _WIRE.__get__(self, Message)  # the slot itself: pydantic's __getattr__ is slow to miss
        except AttributeError:
            frame = _plain_frame(self.frame) if not self.__pydantic_extra__ else None
            if frame is None:  # fields we do not know of (another implementation's): pydantic writes them
                wire = self.model_dump_json(exclude_none=True, by_alias=True).encode()
            else:
                wire = orjson.dumps({"frame": frame, "interactionElements": self.interactionElements})
            object.__setattr__(self, "_wire", wire)
            return wire

    def memo(self, key: str, read: Callable[[], T]) -> T:
        """``read()``, computed once per message: the agents of a process that received the same
        payload share one parsed message (`MessageCache`), and a call for proposals read by ten
        bidders is read once. A failure is not kept: each caller meets it."""
        try:
            memo = _MEMO.__get__(self, Message)
        except AttributeError:
            memo = {}
            object.__setattr__(self, "_memo", memo)
        try:
            return memo[key]
        except KeyError:
            value = memo[key] = read()
            return value


_WIRE = Message.__dict__["_wire"]
_MEMO = Message.__dict__["_memo"]


def _plain_frame(frame: Frame) -> dict[str, Any] | None:
    """The frame as JSON data, in the model's field order, when it holds only the standard fields
    (a third of pydantic's serializer's cost); None when anything carries extra fields."""
    if frame.__pydantic_extra__ or frame.semanticProtocol is not _PROTOCOL:
        return None
    out: dict[str, Any] = {
        "semanticProtocol": _PROTOCOL_JSON,
        "type": frame.type.value,
        "messageId": frame.messageId,
        "conversationId": frame.conversationId,
    }
    for name, p in (("sender", frame.sender), ("receiver", frame.receiver)):
        if p is None:
            continue
        if p.__pydantic_extra__ or p.identification.__pydantic_extra__ or p.role.__pydantic_extra__:
            return None
        out[name] = {
            "identification": {"id": p.identification.id, "idType": p.identification.idType},
            "role": {"name": p.role.name},
        }
    if frame.replyBy is not None:
        out["replyBy"] = frame.replyBy
    if frame.inReplyTo is not None:
        out["inReplyTo"] = frame.inReplyTo
    return out


class FrameError(ValueError):
    """A payload that is not a valid I4.0 message; `where` names the offending field."""

    def __init__(self, reason: str, where: str = "", *, salvaged: Salvaged | None = None) -> None:
        self.reason = reason
        self.where = where
        #: what could be salvaged to address a `notUnderstood` reply, if anything
        self.salvaged = salvaged
        super().__init__(f"{where}: {reason}" if where else reason)


class Salvaged(NamedTuple):
    """The addressing fields of a frame that failed validation."""

    sender: str
    message_id: str
    conversation_id: str


def new_id() -> str:
    return str(uuid.uuid4())


@functools.lru_cache(maxsize=8192)
def participant(aas_id: str, role: Role) -> Participant:
    """The sender/receiver block; frozen, so one instance per (agent, role) serves every message."""
    return Participant(identification=Identification(id=aas_id), role=RoleRef(name=role.value))


_PROTOCOL = SemanticProtocol(keys=[Key(type="GlobalReference", value=BIDDING_PROTOCOL)])
_PROTOCOL_JSON = _PROTOCOL.model_dump()
_FRAME_FIELDS = {"semanticProtocol", "type", "messageId", "conversationId", "sender"}


def make_message(
    type: MessageType,
    *,
    sender: str,
    sender_role: Role,
    conversation_id: str,
    receiver: str | None = None,
    receiver_role: Role | None = None,
    reply_by: int | None = None,
    in_reply_to: str | None = None,
    elements: list[dict[str, Any]] | None = None,
    message_id: str | None = None,
) -> Message:
    """Build a bidding-procedure message; ids are generated where not given.

    Our own frames are built without pydantic's validation (a third of a message's cost): the
    arguments are checked here instead, against the same limits the model enforces on input.
    """
    if not isinstance(type, MessageType):
        type = MessageType(type)
    msg_id = message_id or new_id()
    for name, value in (
        ("messageId", msg_id),
        ("conversationId", conversation_id),
        ("inReplyTo", in_reply_to),
    ):
        if value is not None and not (isinstance(value, str) and 0 < len(value) <= 256):
            raise ValueError(f"{name} must be a string of 1 to 256 characters, not {value!r}")
    if reply_by is not None and not (isinstance(reply_by, int) and 0 <= reply_by <= MAX_EPOCH_MS):
        raise ValueError(f"replyBy must be epoch milliseconds (an int >= 0), not {reply_by!r}")
    fields = {
        "semanticProtocol": _PROTOCOL,
        "type": type,
        "messageId": msg_id,
        "conversationId": conversation_id,
        "sender": _participant(sender, sender_role),
        "receiver": _participant(receiver, receiver_role or _opposite(sender_role)) if receiver else None,
        "replyBy": reply_by,
        "inReplyTo": in_reply_to,
    }
    frame = Frame.model_construct(
        _FRAME_FIELDS | {k for k in ("receiver", "replyBy", "inReplyTo") if fields[k] is not None}, **fields
    )
    return Message.model_construct(
        {"frame", "interactionElements"}, frame=frame, interactionElements=elements or []
    )


def _participant(aas_id: str, role: Role) -> Participant:
    if not (isinstance(aas_id, str) and 0 < len(aas_id) <= 2048):
        raise ValueError(f"an AAS id must be a string of 1 to 2048 characters, not {aas_id!r}")
    return participant(aas_id, role)


def _opposite(role: Role) -> Role:
    return Role.PROVIDER if role is Role.REQUESTER else Role.REQUESTER


def parse_message(payload: bytes | str, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Message:
    """Parse and validate a payload; raise FrameError saying what is wrong and where.

    The size is checked before any parsing so an oversized payload costs nothing.
    On a validation error, `FrameError.partial` holds a best-effort frame (sender,
    messageId, conversationId) so the caller can still answer `notUnderstood`.
    """
    size = len(payload)
    if size > max_bytes:
        raise FrameError(f"message of {size} bytes exceeds the limit of {max_bytes} bytes")
    try:
        data = orjson.loads(payload)  # a quarter of json.loads' cost; nesting is capped at 1024
    except orjson.JSONDecodeError as exc:
        if "depth limit" in str(exc):
            raise FrameError(f"not JSON a receiver accepts: nested too deeply ({exc})") from None
        raise FrameError(f"not JSON: {exc}") from None
    except RecursionError:  # found by the fuzz suite: '[[[[...' escaped as RecursionError
        raise FrameError("not JSON a receiver accepts: nested too deeply") from None
    if not isinstance(data, dict):
        raise FrameError(f"top level must be an object, not {type(data).__name__}")
    try:
        return Message.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
        raise FrameError(err["msg"] + more, where, salvaged=_salvage(data)) from None


def _salvage(data: dict[str, Any]) -> Salvaged | None:
    """Recover enough of a broken frame to address a notUnderstood reply."""
    frame = data.get("frame")
    if not isinstance(frame, dict):
        return None
    try:
        sender = Participant.model_validate(frame.get("sender"))
    except ValidationError:
        return None
    msg_id = frame.get("messageId")
    conv = frame.get("conversationId")
    if not all(isinstance(v, str) and 0 < len(v) <= 256 for v in (msg_id, conv)):
        return None
    return Salvaged(sender.id, msg_id, conv)
