"""The one canonical row schema every source is normalised to.

A row is `id` (content hash of the messages), `source` (the configured source name),
`messages` (a list of {role, content} with role in system|user|assistant) and `meta`
(a JSON string with whatever the source had besides: its original id, score, sub-source...).
`meta` is JSON rather than a struct because every source carries different fields.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

import pyarrow as pa

ROLES = ("system", "user", "assistant")

# ShareGPT/FineTome speaker names -> canonical role.
ROLE_MAP = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "assistant": "assistant",
}

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])
ROW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("messages", pa.list_(MESSAGE_TYPE)),
        ("meta", pa.string()),
    ]
)

def row_id(messages: Iterable[dict[str, str]]) -> str:
    """Stable content hash of a conversation: same messages, same id, whatever the source."""
    blob = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def validate_messages(messages: list[dict[str, str]]) -> tuple[str, str] | None:
    """Return (reason, detail) if the conversation is unusable for SFT, else None.

    A usable conversation is: an optional leading system turn, then strictly alternating
    user/assistant turns, ending with an assistant turn, with no empty content.
    """
    if not messages:
        return "empty_conversation", "no turns"
    for i, m in enumerate(messages):
        if m["role"] not in ROLES:
            return "unknown_role", f"turn {i} has role {m['role']!r}"
        if not isinstance(m["content"], str) or not m["content"].strip():
            return "empty_turn", f"turn {i} ({m['role']}) is empty"
    body = messages[1:] if messages[0]["role"] == "system" else messages
    if not body:
        return "empty_conversation", "only a system turn"
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            return "non_alternating", f"turn {i + len(messages) - len(body)} is {m['role']}, expected {expected}"
    if body[-1]["role"] != "assistant":
        return "no_final_assistant", f"last turn is {body[-1]['role']}"
    return None


def make_row(source: str, messages: list[dict[str, str]], meta: dict[str, Any]) -> dict[str, Any]:
    """A canonical row (dict) from validated messages."""
    return {
        "id": row_id(messages),
        "source": source,
        "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
        "meta": json.dumps(meta, ensure_ascii=False, default=str),
    }


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def conversation_text(messages: list[dict[str, str]]) -> str:
    """All turns joined, for hashing, dedup and decontamination."""
    return "\n".join(m["content"] for m in messages)
