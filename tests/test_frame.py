"""The I4.0 message frame, its AAS interaction elements and the topic scheme."""

from __future__ import annotations

import json
import re

import pytest
from basyx.aas import model
from basyx.aas.adapter.json import json_serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.bidding.provider import Provider
from protocol.elements import (
    MAX_AMOUNT,
    MAX_TIME,
    Bid,
    Booking,
    ElementError,
    Reason,
    StepCall,
    StepResult,
    decode_element,
)
from protocol.frame import BIDDING_PROTOCOL, FrameError, MessageType, Role, make_message, parse_message
from protocol.message_cache import MessageCache
from protocol.topics import (
    Channel,
    TopicError,
    cfp_topic,
    check_name,
    check_sender,
    direct_topic,
    events_topic,
    matches,
    parse_topic,
)

CALL = StepCall(
    "p-1", 2, "milling", "store", 3.5, priority=1, due=40.0, parameters={"depth": 3, "alloy": "al"}
)


def cfp() -> bytes:
    return make_message(
        MessageType.CALL_FOR_PROPOSAL,
        sender="https://acme.example/aas/p-1",
        sender_role=Role.REQUESTER,
        conversation_id="c-1",
        reply_by=1767225600000,
        elements=CALL.to_json_elements(),
    ).to_json()


def test_frame_has_exactly_the_field_names_of_vdi_2193_1() -> None:
    data = json.loads(cfp())
    frame = data["frame"]
    assert set(data) == {"frame", "interactionElements"}
    assert set(frame) == {"semanticProtocol", "type", "messageId", "conversationId", "sender", "replyBy"}
    assert frame["semanticProtocol"] == {
        "type": "ExternalReference",
        "keys": [{"type": "GlobalReference", "value": BIDDING_PROTOCOL}],
    }
    assert frame["sender"] == {
        "identification": {"id": "https://acme.example/aas/p-1", "idType": "IRI"},
        "role": {"name": "ServiceRequester"},
    }
    assert frame["type"] == "callForProposal" and frame["replyBy"] == 1767225600000


def test_reply_carries_receiver_and_in_reply_to() -> None:
    msg = make_message(
        MessageType.PROPOSAL,
        sender="urn:r",
        sender_role=Role.PROVIDER,
        conversation_id="c",
        receiver="urn:p",
        in_reply_to="m-1",
    )
    frame = json.loads(msg.to_json())["frame"]
    assert frame["receiver"]["role"]["name"] == "ServiceRequester" and frame["inReplyTo"] == "m-1"
    assert parse_message(msg.to_json()) == msg


def test_interaction_elements_are_real_basyx_objects() -> None:
    msg = parse_message(cfp())
    element = decode_element(msg.interactionElements[0])
    assert isinstance(element, model.SubmodelElementCollection)
    capability = element.get_referable("milling")
    assert isinstance(capability, model.Capability)
    assert capability.semantic_id.key[0].value == "https://twinbid.dev/capabilities/milling"
    assert StepCall.from_json_elements(msg.interactionElements) == CALL
    assert StepCall.from_json_elements(msg.interactionElements, strict=True) == CALL


times = st.floats(min_value=0, max_value=MAX_TIME, width=64)
amounts = st.floats(min_value=0, max_value=MAX_AMOUNT, width=64)


@settings(max_examples=200, deadline=None)
@given(
    start=times,
    completion=times,
    price=amounts,
    resource=st.text(min_size=1, max_size=20),
    setup=st.floats(min_value=0, max_value=1e6),
)
def test_fast_codec_writes_exactly_what_basyx_writes(start, completion, price, resource, setup) -> None:
    bid = Bid(resource, "milling", start, completion, 1.0, setup, 0.0, price, 9.0, "cell")
    via_basyx = json.loads(json.dumps(bid.to_element(), cls=json_serialization.AASToJsonEncoder))
    assert bid.to_json_elements() == [via_basyx]
    assert Bid.from_json_elements([via_basyx]) == bid
    assert Bid.from_json_elements([via_basyx], strict=True) == bid


@pytest.mark.parametrize(
    "content", [Booking("ws-1", 1.0, 2.0), StepResult("ws-1", 1.0, 2.5, "a"), Reason("x", "y")]
)
def test_every_content_round_trips_through_basyx(content) -> None:
    raw = json.loads(json.dumps(content.to_element(), cls=json_serialization.AASToJsonEncoder))
    assert content.to_json_elements() == [raw]
    assert type(content).from_json_elements([raw], strict=True) == content


@settings(max_examples=200, deadline=None)
@given(
    receiver=st.none() | st.text(min_size=1, max_size=40),
    reply_by=st.none() | st.integers(min_value=0, max_value=2**62),
    in_reply_to=st.none() | st.text(min_size=1, max_size=256),
    value=st.text(max_size=30),
)
def test_own_frames_are_written_exactly_as_pydantic_writes_them(
    receiver, reply_by, in_reply_to, value
) -> None:
    """Our frames skip pydantic's validation and serializer (speed): the bytes must not change,
    and what we write must parse back to the same message."""
    msg = make_message(
        MessageType.PROPOSAL,
        sender="urn:twinbid:r-1",
        sender_role=Role.PROVIDER,
        conversation_id="conv-1",
        receiver=receiver,
        reply_by=reply_by,
        in_reply_to=in_reply_to,
        elements=[{"idShort": "x", "modelType": "Property", "value": value, "valueType": "xs:string"}],
    )
    wire = msg.to_json()
    assert wire == msg.model_dump_json(exclude_none=True, by_alias=True).encode()
    assert wire is msg.to_json()  # cached
    back = parse_message(wire)
    assert back == msg and back.to_json() == wire


@pytest.mark.parametrize(
    "kwargs",
    [
        {"conversation_id": ""},
        {"conversation_id": "c" * 257},
        {"message_id": "m" * 257},
        {"in_reply_to": ""},
        {"reply_by": -1},
        {"sender": ""},
    ],
)
def test_own_frames_are_held_to_the_limits_of_received_ones(kwargs) -> None:
    args = {"sender": "urn:p", "sender_role": Role.REQUESTER, "conversation_id": "c", **kwargs}
    with pytest.raises(ValueError):
        make_message(MessageType.CALL_FOR_PROPOSAL, **args)


def test_size_limit_is_checked_before_parsing() -> None:
    with pytest.raises(FrameError, match="exceeds the limit of 100 bytes"):
        parse_message(b"{" * 101, max_bytes=100)


@pytest.mark.parametrize(
    ("payload", "where", "reason"),
    [
        (b"not json", "", "not JSON"),
        (b"[1, 2]", "", "top level must be an object"),
        (b"{}", "frame", "Field required"),
        (b'{"frame": {"type": "bid"}}', "frame.semanticProtocol", "Field required"),
    ],
)
def test_malformed_input_gets_a_precise_error(payload: bytes, where: str, reason: str) -> None:
    with pytest.raises(FrameError) as info:
        parse_message(payload)
    assert info.value.where == where and reason in info.value.reason


def test_bad_message_type_is_named_and_the_sender_salvaged_for_a_reply() -> None:
    data = json.loads(cfp())
    data["frame"]["type"] = "gimme"
    with pytest.raises(FrameError) as info:
        parse_message(json.dumps(data))
    assert info.value.where == "frame.type"
    assert info.value.salvaged.sender == "https://acme.example/aas/p-1"


def test_element_with_wrong_value_type_is_rejected_precisely() -> None:
    raw = CALL.to_json_elements()
    raw[0]["value"][1]["value"] = "two"  # step, an xs:long
    with pytest.raises(
        ElementError, match=r"interactionElements\[0\].value\[1\].step: 'two' is not a valid xs:long"
    ):
        StepCall.from_json_elements(raw)
    with pytest.raises(ElementError, match="not a valid AAS element"):
        StepCall.from_json_elements(raw, strict=True)


def _call_with(field: str, value_type: str, text: str) -> list[dict]:
    raw = CALL.to_json_elements()
    item = next(i for i in raw[0]["value"] if i["idShort"] == field)
    item["valueType"], item["value"] = value_type, text
    return raw


@pytest.mark.parametrize(
    ("field", "value_type", "text", "says"),
    [
        ("step", "xs:long", str(10**30), "does not fit a 64-bit integer"),
        ("step", "xs:long", "-7", "outside 1..2.14748e+09"),
        ("step", "xs:long", "0", "outside 1.."),
        ("step", "xs:double", "1.5", "not a whole number"),
        ("step", "xs:double", "1E308", "outside 1.."),
        ("release", "xs:double", "1E308", "outside 0..1e+12"),
        ("release", "xs:double", "-1.0", "outside 0..1e+12"),
        ("release", "xs:double", "INF", "not a finite number"),
        ("release", "xs:double", "NaN", "not a finite number"),
        ("priority", "xs:long", "9", "outside 1..5"),
        ("remaining_work", "xs:long", str(2**63), "does not fit a 64-bit integer"),
    ],
)
def test_every_number_in_a_call_is_bounded_and_finite(
    field: str, value_type: str, text: str, says: str
) -> None:
    """Issue 21 finding 3: what no column or schedule can hold is refused when the call is read,
    naming the field, on the fast and the strict (basyx) path alike."""
    raw = _call_with(field, value_type, text)
    with pytest.raises(ElementError, match=f"{field}: .*{re.escape(says)}"):
        StepCall.from_json_elements(raw)
    with pytest.raises(ElementError):
        StepCall.from_json_elements(raw, strict=True)


def test_parameters_and_reply_by_are_bounded_too() -> None:
    raw = CALL.to_json_elements()
    params = next(i for i in raw[0]["value"] if i["idShort"] == "parameters")
    params["value"] = [
        {"idShort": "depth", "modelType": "Property", "valueType": "xs:long", "value": str(10**20)}
    ]
    with pytest.raises(ElementError, match=r"depth: .*does not fit a 64-bit integer"):
        StepCall.from_json_elements(raw)
    data = json.loads(cfp())
    data["frame"]["replyBy"] = 2**64
    with pytest.raises(FrameError) as info:
        parse_message(json.dumps(data))
    assert info.value.where == "frame.replyBy"
    with pytest.raises(ValueError, match="replyBy"):
        make_message(MessageType.PROPOSAL, sender="urn:r", sender_role=Role.PROVIDER, conversation_id="c",
                     reply_by=2**63)  # fmt: skip


def test_missing_field_is_named() -> None:
    raw = CALL.to_json_elements()
    del raw[0]["value"][0]
    with pytest.raises(ElementError, match=r"CallForProposal.product: missing"):
        StepCall.from_json_elements(raw)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_garbage_never_raises_anything_but_frame_error(payload: bytes) -> None:
    try:
        parse_message(payload)
    except FrameError:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_elements_never_raise_anything_but_element_error(data) -> None:
    raw = CALL.to_json_elements()
    item = data.draw(st.integers(0, len(raw[0]["value"]) - 1))
    key = data.draw(st.sampled_from(["value", "valueType", "idShort", "modelType"]))
    raw[0]["value"][item][key] = data.draw(json_values)
    for strict in (False, True):
        try:
            StepCall.from_json_elements(raw, strict=strict)
        except ElementError:
            pass


def test_topics_carry_the_sender_and_parse_back() -> None:
    assert cfp_topic("plant", "milling", "p-1") == "i40/plant/cfp/milling/p-1"
    assert parse_topic(direct_topic("plant", "ws-1", "p-1")).receiver == "ws-1"
    t = parse_topic(events_topic("plant", "p-1"))
    assert t.channel is Channel.EVENTS and t.sender == "p-1"


@pytest.mark.parametrize("name", ["", "A", "ws_1", "-ws", "ws-", "a" * 65, "ws/1", "+", "#"])
def test_bad_short_names_are_refused(name: str) -> None:
    with pytest.raises(TopicError):
        check_name(name)


@pytest.mark.parametrize("topic", ["i40/p/to/ws-1", "x/p/to/a/b", "i40/p/cfp/Milling/p-1", "i40/p/nope/a/b"])
def test_topics_outside_the_scheme_are_refused(topic: str) -> None:
    with pytest.raises(TopicError):
        parse_topic(topic)


def test_sender_must_match_the_topic() -> None:
    registry = {"urn:p1": "p-1", "urn:p2": "p-2"}.get
    topic = parse_topic("i40/plant/to/ws-1/p-1")
    check_sender(topic, "urn:p1", registry)
    with pytest.raises(TopicError, match="belongs to 'p-2' but was published by 'p-1'"):
        check_sender(topic, "urn:p2", registry)
    with pytest.raises(TopicError, match="not registered"):
        check_sender(topic, "urn:mallory", registry)


def test_topic_filter_matching() -> None:
    assert matches("i40/p/cfp/milling/+", "i40/p/cfp/milling/p-1")
    assert matches("i40/p/#", "i40/p/to/a/b")
    assert not matches("i40/p/to/a/+", "i40/p/to/b/c")
    assert not matches("i40/p/to/a/+", "i40/p/to/a")


def test_bidders_of_one_process_share_the_parse_of_a_call_and_its_step() -> None:
    """Every bidder of a process receives the same call, byte for byte: one parse, one reading of
    the step, shared; a payload that differs in one byte is its own message; a bad payload is
    parsed (and rejected) for every receiver, and the cache stays bounded."""
    cache = MessageCache(size=4)
    payload = cfp()
    first = cache.parse(bytes(payload))  # copies: each connection hands over bytes of its own
    providers = [Provider.on_call(f"urn:r{i}", cache.parse(bytes(payload)), 0)[0] for i in range(10)]
    assert cache.hits == 10 and all(p.call == CALL for p in providers)
    assert all(p.call is providers[0].call for p in providers)  # read from the elements once
    assert first.memo("StepCall", lambda: None) is providers[0].call
    other = cache.parse(payload.replace(b"c-1", b"c-2"))
    assert other is not first and other.conversation == "c-2" and cache.hits == 10
    for _ in range(2):
        with pytest.raises(FrameError, match="not JSON"):
            cache.parse(b"not json")
    for n in range(5):
        cache.parse(payload.replace(b"c-1", f"c-{n + 3}".encode()))
    assert len(cache._parsed) == 4 and cache.parse(payload) is not first  # the oldest went
