"""The Matrix wire format (contract §3): parsers accept the layout and reject the rest."""

from __future__ import annotations

from mautrix.types import EventType, RoomCreatePreset

from surfaces_plugin import layout
from surfaces_plugin.layout import (
    AccessDecision,
    AccessDecisions,
    Binding,
    Memory,
    RoomMarkers,
    SpaceChild,
)

BOT = "@bot:hs.example"
ALICE = "@alice:hs.example"
SPACE = "!space:hs.example"


def binding(**changes: object) -> Binding:
    base = dict(owner=ALICE, space_id=SPACE, agent="echo", title="Chat", platform_chat_id="c1")
    return Binding(**{**base, **changes})  # type: ignore[arg-type]


# --- constants and event types


def test_namespace_and_event_types_are_the_contracts() -> None:
    assert layout.NAMESPACE == "org.surfaces"
    assert layout.LAYOUT_VERSION == 1
    assert layout.BINDING_TYPE == "org.surfaces.binding"
    assert layout.MEMORY_TYPE == "org.surfaces.memory"
    assert layout.ACCESS_TYPE == "org.surfaces.access"
    assert layout.TURN_KEY == "org.surfaces.turn"
    assert layout.RESET_KEY == "org.surfaces.reset"
    assert layout.BINDING == EventType.find("org.surfaces.binding", EventType.Class.STATE)
    assert layout.BINDING.is_state and layout.MEMORY.is_state
    assert layout.ACCESS.is_account_data


# --- create markers


def test_space_markers_parse() -> None:
    content = {
        "type": "m.space",
        "org.surfaces.kind": "space",
        "org.surfaces.owner": ALICE,
        "org.surfaces.v": 1,
    }
    assert layout.parse_create_markers(content) == RoomMarkers("space", ALICE, 1)


def test_working_markers_parse_and_ignore_unrelated_keys() -> None:
    content = {
        "org.surfaces.kind": "working",
        "org.surfaces.owner": ALICE,
        "org.surfaces.v": 1,
        "room_version": "12",
    }
    assert layout.parse_create_markers(content) == RoomMarkers("working", ALICE, 1)


def test_markers_reject_wrong_kind_owner_version_or_space_type() -> None:
    good = {"org.surfaces.kind": "working", "org.surfaces.owner": ALICE, "org.surfaces.v": 1}
    bad = [
        {**good, "org.surfaces.kind": "dm"},
        {**good, "org.surfaces.owner": "alice"},
        {**good, "org.surfaces.v": "1"},
        {**good, "org.surfaces.v": True},
        {**good, "org.surfaces.v": 0},
        {**good, "type": "m.space"},  # a working room that is a space
        {**good, "org.surfaces.kind": "space"},  # a space that is not m.space
        {k: v for k, v in good.items() if k != "org.surfaces.owner"},
        [],
        None,
        "working",
    ]
    for content in bad:
        assert layout.parse_create_markers(content) is None, content


def test_newer_marker_version_parses_so_the_planner_can_leave_it_alone() -> None:
    content = {"org.surfaces.kind": "working", "org.surfaces.owner": ALICE, "org.surfaces.v": 2}
    assert layout.parse_create_markers(content) == RoomMarkers("working", ALICE, 2)


def test_predecessor_and_room_version_read_from_create_content() -> None:
    assert layout.create_predecessor({"predecessor": {"room_id": "!old"}}) == "!old"
    assert layout.create_predecessor({"predecessor": {"room_id": 5}}) is None
    assert layout.create_predecessor({"predecessor": "!old"}) is None
    assert layout.create_room_version({"room_version": "10"}) == "10"
    assert layout.create_room_version({}) == "1"


# --- binding


def test_binding_round_trips_through_content() -> None:
    full = binding(system_prompt="Be brief.", archived=True)
    assert full.to_content() == {
        "v": 1,
        "owner": ALICE,
        "space_id": SPACE,
        "agent": "echo",
        "platform_chat_id": "c1",
        "title": "Chat",
        "system_prompt": "Be brief.",
        "archived": True,
    }
    assert layout.parse_binding(full.to_content()) == full
    minimal = binding()
    assert "system_prompt" not in minimal.to_content()
    assert "archived" not in minimal.to_content()
    assert layout.parse_binding(minimal.to_content()) == minimal


def test_binding_without_platform_chat_id_is_the_older_layout() -> None:
    content = {"v": 1, "owner": ALICE, "space_id": SPACE, "agent": "echo", "title": "Chat"}
    parsed = layout.parse_binding(content)
    assert parsed is not None and parsed.platform_chat_id is None
    assert layout.parse_binding({**content, "platform_chat_id": None}) == parsed


def test_binding_keeps_the_rooms_streaming_choice() -> None:
    assert "stream" not in binding().to_content() and binding().stream is None  # the default
    for choice in (True, False):
        chosen = binding(stream=choice)
        assert chosen.to_content()["stream"] is choice
        assert layout.parse_binding(chosen.to_content()) == chosen
    # A preference of the wrong shape falls back to the default; the room keeps its binding.
    odd = layout.parse_binding({**binding().to_content(), "stream": "yes"})
    assert odd == binding()


def test_binding_ignores_unknown_keys() -> None:
    content = {**binding().to_content(), "org.future.key": [1, 2]}
    assert layout.parse_binding(content) == binding()


def test_binding_rejects_malformed_content() -> None:
    good = binding().to_content()
    bad = [
        {**good, "v": "1"},
        {**good, "owner": "alice"},
        {**good, "space_id": "space"},
        {**good, "agent": ""},
        {**good, "agent": 3},
        {**good, "title": None},
        {**good, "platform_chat_id": 42},
        {**good, "platform_chat_id": ""},
        {**good, "system_prompt": ["x"]},
        {**good, "archived": "yes"},
        {k: v for k, v in good.items() if k != "agent"},
        {},
        "binding",
    ]
    for content in bad:
        assert layout.parse_binding(content) is None, content


# --- space links


def test_space_child_needs_a_non_empty_via_and_empty_content_means_removed() -> None:
    assert layout.parse_space_child({"via": ["hs"], "order": "0001"}) == SpaceChild(("hs",), "0001")
    assert layout.parse_space_child({}) is None
    assert layout.parse_space_child({"via": []}) is None
    assert layout.parse_space_child({"via": "hs"}) is None
    assert layout.parse_space_child({"via": ["hs", 3]}) is None
    assert layout.parse_space_child({"via": [""]}) is None


def test_space_child_drops_a_bad_order_instead_of_the_link() -> None:
    for order in ("x" * 51, "tab\there", "ünïcode", "0001\n", 7, None):
        assert layout.parse_space_child({"via": ["hs"], "order": order}) == SpaceChild(("hs",))
    assert layout.parse_space_child({"via": ["hs"], "order": "~" * 50}).order == "~" * 50
    assert layout.parse_space_child({"via": ["hs"], "suggested": True}).suggested is True
    assert layout.parse_space_child({"via": ["hs"], "suggested": "yes"}).suggested is False


def test_a_space_parent_is_live_when_its_via_is_valid() -> None:
    assert layout.is_live_link(layout.space_parent_content("hs"))
    assert layout.is_live_link({"via": ["hs"], "canonical": 1})
    assert not layout.is_live_link({})
    assert not layout.is_live_link({"via": []})
    assert not layout.is_live_link({"via": [""]})


def test_order_keys_sort_like_their_numbers_and_are_valid_orders() -> None:
    numbers = [0, 1, 9, 10, 99, 1_732_000_000_000, 10**15]
    keys = [layout.order_key(n) for n in numbers]
    assert keys == sorted(keys)
    assert all(layout.is_valid_order(k) for k in keys)
    assert layout.order_key(-5) == layout.order_key(0)


def test_link_contents() -> None:
    assert layout.space_child_content("hs", "0001") == {"via": ["hs"], "order": "0001"}
    assert layout.space_child_content("hs") == {"via": ["hs"]}
    assert layout.space_parent_content("hs") == {"via": ["hs"], "canonical": True}
    assert layout.parse_space_child(layout.unlinked_content("lost")) is None  # still "removed"


def test_tombstone_parse() -> None:
    assert layout.parse_tombstone(layout.tombstone_content("!new", "moved")) == "!new"
    assert layout.parse_tombstone({"body": "x"}) is None


# --- memory and access


def test_memory_round_trips_and_rejects_non_string_notes() -> None:
    memory = Memory(notes=("likes tea", "lives in Lyon"))
    assert memory.to_content() == {"v": 1, "notes": ["likes tea", "lives in Lyon"]}
    assert layout.parse_memory(memory.to_content()) == memory
    assert layout.parse_memory({"v": 1, "notes": ["ok", 3]}) is None
    assert layout.parse_memory({"notes": []}) is None


def test_access_round_trips_and_skips_only_the_malformed_entries() -> None:
    decisions = AccessDecisions({ALICE: AccessDecision("approved", BOT, 1700)})
    content = decisions.to_content()
    assert content == {"users": {ALICE: {"state": "approved", "by": BOT, "ts": 1700}}}
    assert layout.parse_access(content) == decisions
    mixed = {
        "users": {
            **content["users"],
            "@bob:hs.example": {"state": "maybe", "by": BOT, "ts": 1},
            "carol": {"state": "blocked", "by": BOT, "ts": 1},
            "@dan:hs.example": {"state": "blocked", "by": BOT, "ts": "1"},
        }
    }
    assert layout.parse_access(mixed) == decisions
    assert layout.parse_access({"users": []}) is None
    assert decisions.state_of(ALICE) == "approved" and decisions.state_of(BOT) is None


# --- message markers


def test_turn_marker_found_at_top_level_or_in_new_content() -> None:
    marker = layout.turn_marker("c1", "echo")
    assert marker == {"org.surfaces.turn": {"platform_chat_id": "c1", "agent": "echo"}}
    expected = layout.TurnMarker("c1", "echo")
    assert layout.parse_turn_marker({"body": "hi", **marker}) == expected
    assert layout.parse_turn_marker({"m.new_content": {"body": "hi", **marker}}) == expected
    assert layout.parse_turn_marker({"org.surfaces.turn": {"platform_chat_id": "c1"}}) is None
    assert layout.parse_turn_marker({"body": "hi"}) is None


def test_reset_marker_round_trips() -> None:
    marker = layout.reset_marker("c2")
    assert marker == {"org.surfaces.reset": {"platform_chat_id": "c2"}}
    assert layout.parse_reset_marker(marker) == layout.ResetMarker("c2")
    assert layout.parse_reset_marker({"org.surfaces.reset": {"platform_chat_id": ""}}) is None


# --- createRoom payloads


def _events(request: dict) -> dict:
    return request["power_level_override"]["events"]


def test_space_request_carries_the_markers_and_invites_nobody() -> None:
    request = layout.space_create_request(ALICE, "Alice's agents", BOT, "hs.example", "12")
    assert request["creation_content"] == {
        "type": "m.space",
        "org.surfaces.kind": "space",
        "org.surfaces.owner": ALICE,
        "org.surfaces.v": 1,
    }
    assert request["name"] == "Alice's agents"
    assert request["preset"] is RoomCreatePreset.PRIVATE
    assert request["invitees"] == []
    assert request["room_version"] == "12"
    assert layout.parse_create_markers(request["creation_content"]) == RoomMarkers(
        "space", ALICE, 1
    )


def test_working_room_request_has_parent_and_binding_in_initial_state() -> None:
    request = layout.working_room_create_request(ALICE, SPACE, binding(), BOT, "hs.example", "12")
    assert request["creation_content"] == {
        "org.surfaces.kind": "working",
        "org.surfaces.owner": ALICE,
        "org.surfaces.v": 1,
    }
    assert request["initial_state"] == [
        {
            "type": "m.space.parent",
            "state_key": SPACE,
            "content": {"via": ["hs.example"], "canonical": True},
        },
        {"type": "org.surfaces.binding", "state_key": "", "content": binding().to_content()},
    ]
    assert request["name"] == "Chat"
    assert request["invitees"] == []
    encrypted = layout.working_room_create_request(
        ALICE, SPACE, binding(), BOT, "hs.example", "12", encrypted=True
    )
    assert encrypted["initial_state"][:2] == request["initial_state"]
    assert encrypted["initial_state"][2:] == [
        {"type": "m.room.encryption", "state_key": "", "content": {"algorithm": "m.megolm.v1.aes-sha2"}}
    ]


def test_v12_power_levels_never_list_the_bot() -> None:
    for version in ("12", "13", "org.matrix.hydra.11"):
        request = layout.working_room_create_request(ALICE, SPACE, binding(), BOT, "hs", version)
        assert request["power_level_override"]["users"] == {}
        assert _events(request)["m.room.tombstone"] == layout.CREATOR_ONLY_LEVEL


def test_older_versions_give_the_bot_100() -> None:
    for version in ("10", "11", "1"):
        request = layout.space_create_request(ALICE, "S", BOT, "hs", version)
        assert request["power_level_override"]["users"] == {BOT: 100}
        assert _events(request)["m.room.tombstone"] == 100


def test_only_the_bot_can_change_structure_and_the_owner_can_chat_and_invite() -> None:
    pl = layout.working_room_create_request(ALICE, SPACE, binding(), BOT, "hs", "11")[
        "power_level_override"
    ]
    for event_type in (
        "m.space.child",
        "m.space.parent",
        "m.room.power_levels",
        "m.room.tombstone",
        "org.surfaces.binding",
        "org.surfaces.memory",
        "m.room.name",
        "m.room.encryption",
    ):
        assert pl["events"][event_type] == 100, event_type
    assert pl["state_default"] == 100  # any other state (and future org.surfaces.* types) too
    assert pl["users_default"] == 0 and ALICE not in pl["users"]
    assert pl["events_default"] == 0  # the owner chats
    assert pl["invite"] == 0  # and invites


def test_creator_power_versions() -> None:
    assert layout.creators_have_infinite_power("12")
    assert layout.creators_have_infinite_power("org.matrix.hydra.11")
    assert not layout.creators_have_infinite_power("11")
    assert not layout.creators_have_infinite_power("org.matrix.msc3757.11")


def test_matrix_to_links_encode_the_id_and_add_via() -> None:
    assert layout.matrix_to("!abc:hs.example") == "https://matrix.to/#/%21abc%3Ahs.example"
    assert (
        layout.matrix_to("!abc", via=["hs.example"]) == "https://matrix.to/#/%21abc?via=hs.example"
    )
