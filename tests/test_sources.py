"""Source loaders: one small fixture per format, quarantine conservation, truncation recovery,
and the real shared data's row counts."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.sources import (
    ColumnMapping,
    SourceConfig,
    load_source,
    load_sources_config,
    sharegpt_package_file,
    stream_json_array,
)
from tomelab.errors import ConfigError, DataError
from tomelab.schema import row_id, validate_messages


def conv(*turns):
    return [{"from": f, "value": v} for f, v in turns]


FINETOME_ROWS = [
    {"conversations": conv(("human", "What is 2+2?"), ("gpt", "4.")), "source": "infini", "score": 5.1},
    {"conversations": conv(("system", "Be brief."), ("human", "Hi"), ("gpt", "Hello!")), "source": "x", "score": 4.0},
    {"conversations": [], "source": "x", "score": 1.0},  # empty conversation
    {"conversations": conv(("human", "Q"), ("gpt", "")), "source": "x", "score": 2.0},  # empty turn
    {"conversations": conv(("human", "Q"), ("robot", "A")), "source": "x", "score": 2.0},  # unknown role
    {"conversations": conv(("human", "Q"), ("gpt", "A"), ("human", "more?")), "source": "x", "score": 2.0},
    {"conversations": conv(("gpt", "A"), ("human", "Q"), ("gpt", "A2")), "source": "x", "score": 2.0},
]
EXPECTED_REASONS = {
    "empty_conversation": 1,
    "empty_turn": 1,
    "unknown_role": 1,
    "no_final_assistant": 1,
    "non_alternating": 1,
}


def _write_jsonl(path: Path, rows, extra_lines=()):
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return path


def test_finetome_jsonl_quarantine_conserves_rows(tmp_path):
    p = _write_jsonl(tmp_path / "ft.jsonl", FINETOME_ROWS, extra_lines=['{"conversations": [ broken'])
    r = load_source(SourceConfig(name="finetome", kind="finetome", path=str(p)))
    assert r.stats.rows_in == 8
    assert r.stats.kept == 2
    assert r.stats.rows_in == r.stats.kept + len(r.quarantine)
    assert r.stats.dropped == dict(sorted({**EXPECTED_REASONS, "bad_json": 1}.items()))
    bad = next(q for q in r.quarantine if q["reason"] == "bad_json")
    assert bad["row"] == 8 and bad["file"] == str(p)  # 1-based line number of the broken line
    unknown = next(q for q in r.quarantine if q["reason"] == "unknown_role")
    assert unknown["row"] == 5 and "robot" in unknown["detail"]
    rows = r.table.to_pylist()
    assert rows[0]["messages"] == [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}]
    assert rows[1]["messages"][0]["role"] == "system"
    meta = json.loads(rows[0]["meta"])
    assert meta["score"] == 5.1 and meta["orig_source"] == "infini" and meta["row"] == 1
    assert rows[0]["id"] == row_id(rows[0]["messages"])


def test_finetome_parquet_matches_jsonl(tmp_path):
    good = FINETOME_ROWS[:2]
    pq.write_table(pa.Table.from_pylist(good), tmp_path / "ft.parquet")
    _write_jsonl(tmp_path / "ft.jsonl", good)
    a = load_source(SourceConfig(name="ft", kind="finetome", path=str(tmp_path / "ft.parquet")))
    b = load_source(SourceConfig(name="ft", kind="finetome", path=str(tmp_path / "ft.jsonl")))
    assert a.table.column("id").to_pylist() == b.table.column("id").to_pylist()
    assert a.stats.kept == 2


def test_sharegpt_truncated_file_recovers_whole_records(tmp_path):
    records = [{"id": f"c{i}_0", "conversations": conv(("human", f"q{i} \u00e9 \u4e2d"), ("gpt", f"a{i}"))} for i in range(5)]
    full = json.dumps(records, ensure_ascii=False)
    cut = full.index('{"id": "c4_0"') + 20  # inside the last record
    p = tmp_path / "sg.json"
    p.write_text(full[:cut], encoding="utf-8")
    with pytest.warns(UserWarning, match="truncated") as w:
        recs = list(stream_json_array(p, chunk_chars=64))  # tiny chunks exercise the buffer joins
    assert [r["id"] for _, r in recs] == ["c0_0", "c1_0", "c2_0", "c3_0"]
    offset = w[0].message.offset
    assert p.read_bytes()[:offset].decode().rstrip().endswith("}")  # byte offset of the last whole record
    r = load_source(SourceConfig(name="sg", kind="sharegpt", path=str(p)))
    assert r.stats.kept == 4 and r.warnings and "byte" in r.warnings[0]


def test_alpaca_gsm8k_self_instruct_fixtures(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([
        {"instruction": "Summarise", "input": "Long text", "output": "Short."},
        {"instruction": "Say hi", "input": "", "output": "Hi"},
        {"instruction": "Empty", "input": "", "output": ""},
    ]))
    a = load_source(SourceConfig(name="alpaca", kind="alpaca", path=str(tmp_path / "a.json")))
    assert a.stats.kept == 2 and a.stats.dropped == {"empty_turn": 1}
    assert a.table.to_pylist()[0]["messages"][0]["content"] == "Summarise\n\nLong text"

    _write_jsonl(tmp_path / "g.jsonl", [{"question": "1+1?", "answer": "2\n#### 2"}, {"question": "no answer"}])
    g = load_source(SourceConfig(name="gsm8k", kind="gsm8k", path=str(tmp_path / "g.jsonl")))
    assert g.stats.kept == 1 and g.stats.dropped == {"missing_field": 1}
    assert json.loads(g.table.to_pylist()[0]["meta"])["final_answer"] == "2"

    _write_jsonl(tmp_path / "s.jsonl", [
        {"id": "t1", "name": "n", "instruction": "Add", "instances": [{"input": "1 2", "output": "3"}, {"input": "2 2", "output": "4"}]},
        {"id": "t2", "name": "m", "instruction": "X"},
    ])
    s = load_source(SourceConfig(name="si", kind="self_instruct", path=str(tmp_path / "s.jsonl")))
    assert s.stats.kept == 2 and s.stats.dropped == {"missing_field": 1}
    assert s.stats.rows_in == s.stats.kept + s.stats.n_dropped


def test_generic_mapping_prompt_response_and_messages(tmp_path):
    _write_jsonl(tmp_path / "p.jsonl", [{"q": "Why?", "a": "Because.", "sys": "Be kind", "uid": 7}])
    cfg = SourceConfig(name="gen", kind="generic", path=str(tmp_path / "p.jsonl"),
                       columns=ColumnMapping(prompt="q", response="a", system="sys", id="uid"))
    row = load_source(cfg).table.to_pylist()[0]
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
    assert json.loads(row["meta"])["orig_id"] == 7

    pq.write_table(pa.Table.from_pylist([{"chat": [{"speaker": "user", "text": "a"}, {"speaker": "assistant", "text": "b"}]}]),
                   tmp_path / "m.parquet")
    cfg = SourceConfig(name="gen2", kind="generic", path=str(tmp_path / "m.parquet"),
                       columns=ColumnMapping(messages="chat", role_key="speaker", content_key="text"))
    assert load_source(cfg).table.to_pylist()[0]["messages"][1] == {"role": "assistant", "content": "b"}


def test_generic_needs_mapping_and_sources_config_errors(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text('[[sources]]\nname = "g"\nkind = "generic"\npath = "x.jsonl"\n')
    with pytest.raises(ConfigError, match="columns"):
        load_sources_config(p)
    p.write_text('[[sources]]\nname = "g"\nkind = "parquetz"\n')
    with pytest.raises(ConfigError, match=r"sources\[0\]\.kind|sources.*kind"):
        load_sources_config(p)
    p.write_text('[[sources]]\nname = "a"\nkind = "alpaca"\n[[sources]]\nname = "a"\nkind = "gsm8k"\n')
    with pytest.raises(ConfigError, match="unique"):
        load_sources_config(p)


def test_missing_and_empty_files_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_source(SourceConfig(name="x", kind="gsm8k", path=str(tmp_path / "nope.jsonl")))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="has no rows"):
        load_source(SourceConfig(name="x", kind="gsm8k", path=str(tmp_path / "empty.jsonl")))


def test_validate_messages_rules():
    u, a, s = ({"role": r, "content": "x"} for r in ("user", "assistant", "system"))
    assert validate_messages([s, u, a, u, a]) is None
    assert validate_messages([u, a, s, u, a])[0] == "non_alternating"
    assert validate_messages([u, u, a])[0] == "non_alternating"
    assert validate_messages([s])[0] == "empty_conversation"


def test_real_shared_data_row_counts(shared_data):
    """The real files: 5,000 Alpaca, 7,473 GSM8K train, and 17,671 whole ShareGPT records."""
    counts = {}
    for kind in ("alpaca", "gsm8k", "sharegpt"):
        r = load_source(SourceConfig(name=kind, kind=kind))
        counts[kind] = r.stats.rows_in
        assert r.stats.rows_in == r.stats.kept + r.stats.n_dropped
    assert counts == {"alpaca": 5000, "gsm8k": 7473, "sharegpt": 17671}
    last = None
    with pytest.warns(UserWarning, match="truncated at|truncated:"):
        for _, rec in stream_json_array(sharegpt_package_file()):
            last = rec
    assert last["id"] == "hlWUIwT_0"


# ------------------------------------------------------------------------------- issue 16: silent loss at load


def _reasons(r):
    return [(q["reason"], q["row"]) for q in r.quarantine]


def test_non_utf8_bytes_are_quarantined_never_replaced(tmp_path):
    good = [json.dumps({"conversations": conv(("human", f"q{i}"), ("gpt", f"a{i}"))}).encode() for i in range(3)]
    bad = json.dumps({"conversations": conv(("human", "caf\u00e9"), ("gpt", "x"))}).encode().replace(b"\\u00e9", b"\xe9")
    p = tmp_path / "ft.jsonl"
    p.write_bytes(b"\n".join([good[0], bad, good[1], good[2]]) + b"\n")
    r = load_source(SourceConfig(name="ft", kind="finetome", path=str(p)))
    assert _reasons(r) == [("bad_encoding", 2)] and r.stats.kept == 3 and r.stats.dropped == {"bad_encoding": 1}
    assert "0xe9" in r.quarantine[0]["detail"]
    assert "\ufffd" not in json.dumps(r.table.column("messages").to_pylist(), ensure_ascii=False)

    # .json arrays (alpaca) and streamed ShareGPT: only the record holding the byte is quarantined
    rows = [{"instruction": "i\u00e9" if i == 1 else f"i{i}", "input": "", "output": "o"} for i in range(3)]
    pj = tmp_path / "a.json"
    pj.write_bytes(json.dumps(rows, ensure_ascii=False).encode().replace("\u00e9".encode(), b"\xe9"))
    r = load_source(SourceConfig(name="a", kind="alpaca", path=str(pj)))
    assert _reasons(r) == [("bad_encoding", 2)] and r.stats.kept == 2
    recs = [{"id": f"c{i}", "conversations": conv(("human", "\u00e9" if i == 1 else "q"), ("gpt", "a"))} for i in range(4)]
    raw = json.dumps(recs, ensure_ascii=False).encode().replace("\u00e9".encode(), b"\xe9")
    ps = tmp_path / "sg.json"
    ps.write_bytes(raw[:-30])  # truncated inside the last record: byte offsets must still be exact
    with pytest.warns(UserWarning, match="truncated") as w:
        got = list(stream_json_array(ps, chunk_chars=16))
    assert [type(r).__name__ for _, r in got] == ["dict", "_BadJson", "dict"]
    assert raw[: w[0].message.offset].rstrip().endswith(b"}") and raw[w[0].message.offset:].startswith(b", {")


def test_sharegpt_json_with_a_top_level_object_is_refused(tmp_path):
    p = tmp_path / "sg.json"
    p.write_text(json.dumps({"meta": {"n": 1}, "data": [{"conversations": conv(("human", "q"), ("gpt", "a"))}]}))
    with pytest.raises(DataError, match="expected a JSON array of records at the top level.*JSON object"):
        load_source(SourceConfig(name="sg", kind="sharegpt", path=str(p)))
    p.write_text("  ")
    with pytest.raises(DataError, match="file is empty"):
        list(stream_json_array(p))


def test_generic_non_text_is_bad_type_and_pathological_lines_are_quarantined(tmp_path):
    p = tmp_path / "g.parquet"
    pq.write_table(pa.table({"q": ["a", "b"], "a": [1, 2]}), p)  # numbers where text belongs
    r = load_source(SourceConfig(name="g", kind="generic", path=str(p), columns=ColumnMapping(prompt="q", response="a")))
    assert _reasons(r) == [("bad_type", 1), ("bad_type", 2)]
    ok = json.dumps({"conversations": conv(("human", "q"), ("gpt", "a"))})
    pl_ = tmp_path / "x.jsonl"
    pl_.write_text("\n".join([ok, "[" * 200_000, '{"score": ' + "9" * 5000 + "}", ok]) + "\n")
    r = load_source(SourceConfig(name="x", kind="finetome", path=str(pl_)))
    assert _reasons(r) == [("bad_json", 2), ("bad_json", 3)] and r.stats.kept == 2


def test_corrupt_parquet_is_one_clear_error(tmp_path):
    p = tmp_path / "c.parquet"
    p.write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="not a readable parquet file"):
        load_source(SourceConfig(name="c", kind="finetome", path=str(p)))
