"""Record mappers: one raw record of a source kind -> canonical messages and meta.

Each mapper returns (messages, meta) or raises `_BadRow(reason, detail)`, which the loader turns
into one quarantined row naming the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from curation.source_readers import _BadJson
from tomelab.schema import ROLE_MAP

if TYPE_CHECKING:
    from curation.sources import ColumnMapping

Mapper = Callable[[Any], tuple[list[dict[str, str]], dict[str, Any]]]

class _BadRow(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        self.reason, self.detail = reason, detail


def _need(rec: Any, key: str) -> Any:
    if not isinstance(rec, dict) or key not in rec:
        raise _BadRow("missing_field", f"field {key!r} is missing")
    return rec[key]


def _sharegpt_turns(turns: Any) -> list[dict[str, str]]:
    if turns is None:
        turns = []
    if not isinstance(turns, list):
        raise _BadRow("missing_field", "field 'conversations' is not a list")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise _BadRow("missing_field", f"turn {i} lacks 'from'/'value'")
        role = ROLE_MAP.get(str(t["from"]).strip().lower())
        if role is None:
            raise _BadRow("unknown_role", f"turn {i} has unknown role {t['from']!r}")
        out.append({"role": role, "content": t["value"] if isinstance(t["value"], str) else ""})
    return out


def _map_finetome(rec: Any) -> tuple[list[dict[str, str]], dict[str, Any]]:
    msgs = _sharegpt_turns(_need(rec, "conversations"))
    return msgs, {"orig_source": rec.get("source"), "score": rec.get("score")}


def _map_sharegpt(rec: Any) -> tuple[list[dict[str, str]], dict[str, Any]]:
    msgs = _sharegpt_turns(_need(rec, "conversations"))
    return msgs, {"orig_id": rec.get("id")}


def _instruction_input(instruction: str, inp: str) -> str:
    return f"{instruction.strip()}\n\n{inp.strip()}" if inp and inp.strip() else instruction.strip()


def _map_alpaca(rec: Any) -> tuple[list[dict[str, str]], dict[str, Any]]:
    instr, out = _need(rec, "instruction"), _need(rec, "output")
    user = _instruction_input(str(instr), str(rec.get("input") or ""))
    return [{"role": "user", "content": user}, {"role": "assistant", "content": str(out)}], {}


def _map_gsm8k(rec: Any) -> tuple[list[dict[str, str]], dict[str, Any]]:
    q, a = _need(rec, "question"), _need(rec, "answer")
    final = str(a).rsplit("####", 1)[-1].strip() if "####" in str(a) else None
    return [{"role": "user", "content": str(q)}, {"role": "assistant", "content": str(a)}], {"final_answer": final}


def _text(value: Any, what: str) -> str:
    """A text field as a string; a number, list or table would be stringified into training text."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _BadRow("bad_type", f"field {what} is {type(value).__name__}, not text")
    return value


def _map_generic(mapping: ColumnMapping) -> Mapper:
    def mapper(rec: Any) -> tuple[list[dict[str, str]], dict[str, Any]]:
        meta = {k: rec.get(k) for k in mapping.meta} if isinstance(rec, dict) else {}
        if mapping.id:
            meta["orig_id"] = _need(rec, mapping.id)
        if mapping.messages:
            turns = _need(rec, mapping.messages)
            if not isinstance(turns, list):
                raise _BadRow("missing_field", f"field {mapping.messages!r} is not a list")
            msgs = []
            for i, t in enumerate(turns):
                if not isinstance(t, dict) or mapping.role_key not in t or mapping.content_key not in t:
                    raise _BadRow("missing_field", f"turn {i} lacks {mapping.role_key!r}/{mapping.content_key!r}")
                role = ROLE_MAP.get(str(t[mapping.role_key]).strip().lower())
                if role is None:
                    raise _BadRow("unknown_role", f"turn {i} has unknown role {t[mapping.role_key]!r}")
                msgs.append({"role": role, "content": _text(t[mapping.content_key], f"turn {i} {mapping.content_key!r}")})
            return msgs, meta
        msgs = []
        if mapping.system and isinstance(rec, dict) and rec.get(mapping.system):
            msgs.append({"role": "system", "content": _text(rec[mapping.system], repr(mapping.system))})
        msgs.append({"role": "user", "content": _text(_need(rec, mapping.prompt), repr(mapping.prompt))})
        msgs.append({"role": "assistant", "content": _text(_need(rec, mapping.response), repr(mapping.response))})
        return msgs, meta

    return mapper


def _expand_self_instruct(records: Iterator[tuple[int, Any]]) -> Iterator[tuple[int, Any]]:
    """Self-instruct seed tasks hold several instances each: one row per instance."""
    for n, rec in records:
        if isinstance(rec, _BadJson) or not isinstance(rec, dict) or not isinstance(rec.get("instances"), list):
            yield n, rec if not isinstance(rec, dict) else {**rec, "_bad": "instances"}
            continue
        for j, inst in enumerate(rec["instances"]):
            yield n, {"instruction": rec.get("instruction", ""), "input": (inst or {}).get("input", ""),
                      "output": (inst or {}).get("output", ""), "task": rec.get("name"), "instance": j,
                      "task_id": rec.get("id")}


def _map_self_instruct(rec: Any) -> tuple[list[dict[str, str]], dict[str, Any]]:
    if isinstance(rec, dict) and rec.get("_bad"):
        raise _BadRow("missing_field", "field 'instances' is missing or not a list")
    msgs, _ = _map_alpaca(rec)
    return msgs, {"task": rec.get("task"), "task_id": rec.get("task_id"), "instance": rec.get("instance")}


_MAPPERS: dict[str, Mapper] = {
    "finetome": _map_finetome,
    "sharegpt": _map_sharegpt,
    "alpaca": _map_alpaca,
    "gsm8k": _map_gsm8k,
    "self_instruct": _map_self_instruct,
}
