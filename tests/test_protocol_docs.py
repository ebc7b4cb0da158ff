"""docs/protocol.md embeds the transition tables; they must match the code."""

from pathlib import Path

from protocol.bidding.describe import transitions_markdown


def test_protocol_doc_lists_the_current_transitions() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text()
    assert transitions_markdown() in doc, "run: python -m protocol.bidding.describe --write"
