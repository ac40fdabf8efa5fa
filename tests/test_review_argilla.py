"""Review against the real Argilla 2.8 server (scripts/argilla.sh start): push -> annotator
submissions through the REST API as a non-owner user -> pull -> apply, with exact row checks.

Needs the server. With TOMELAB_ARGILLA_REQUIRED=1 (CI) a missing server FAILS; in a plain local run
the module is skipped with the reason."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import httpx
import polars as pl
import pytest

from curation.review.apply import apply_review
from curation.review.client import (
    ArgillaTarget,
    check_server,
    connect,
    dataset_name,
    find_dataset,
    local_server_dir,
    read_env_file,
    resolve_target,
)
from curation.review.config import ReviewConfig
from curation.review.data import make_embedder, review_dir, variant_embeddings
from curation.review.pull import pull
from curation.review.push import push
from test_review_fixtures import make_variant
from tomelab import paths
from tomelab.schema import row_id

pytestmark = pytest.mark.argilla


def _server_or_reason() -> str | None:
    try:
        target = resolve_target()
        check_server(target, timeout_s=3)
    except Exception as e:  # noqa: BLE001 - any failure means "no server"
        return f"Argilla server not available ({e}). Start it with `scripts/argilla.sh start`."
    return None


_REASON = _server_or_reason()
if _REASON and not os.environ.get("TOMELAB_ARGILLA_REQUIRED"):
    pytest.skip(_REASON, allow_module_level=True)


@pytest.fixture(scope="module")
def server() -> ArgillaTarget:
    if _REASON:
        pytest.fail(f"TOMELAB_ARGILLA_REQUIRED is set but: {_REASON}")
    return resolve_target()


@pytest.fixture(scope="module")
def annotator_key() -> str:
    creds = read_env_file(local_server_dir() / "credentials.env")
    key = os.environ.get("TOMELAB_ARGILLA_ANNOTATOR_API_KEY") or creds.get("TOMELAB_ARGILLA_ANNOTATOR_API_KEY")
    assert key, "no annotator key: scripts/argilla.sh creates one in .argilla/credentials.env"
    return key


@pytest.fixture
def variant(tmp_home: Path, shared_data: Path, server: ArgillaTarget):
    """A fresh variant and its Argilla dataset, deleted afterwards."""
    name = f"t{uuid.uuid4().hex[:8]}"
    df = make_variant(name, shared_data, n=16)
    yield name, df
    client = connect(server)
    ds = find_dataset(client, ReviewConfig(), name)
    if ds is not None:
        ds.delete()


def submit(target: ArgillaTarget, key: str, ds_name: str, answers: dict[str, dict]) -> None:
    """Submit responses as an annotator, the way the UI does (annotators cannot list via the SDK)."""
    with httpx.Client(base_url=target.url, headers={"X-Argilla-Api-Key": key}, timeout=30) as h:
        me = h.get("/api/v1/me").json()
        assert me["role"] == "annotator"
        ds = [d for d in h.get("/api/v1/me/datasets").json()["items"] if d["name"] == ds_name]
        assert ds, f"annotator cannot see {ds_name}"
        r = h.post(f"/api/v1/me/datasets/{ds[0]['id']}/records/search", params={"limit": 1000}, json={})
        r.raise_for_status()
        by_ext = {it["record"]["external_id"]: it["record"]["id"] for it in r.json()["items"]}
        for ext, values in answers.items():
            body = {"status": "submitted", "values": {q: {"value": v} for q, v in values.items()}}
            rr = h.post(f"/api/v1/records/{by_ext[ext]}/responses", json=body)
            assert rr.status_code == 201, rr.text


def test_push_label_pull_apply_exact_rows(variant, server, annotator_key, tmp_home):
    name, df = variant
    cfg = ReviewConfig(n=8, strategy="low-score", seed=0, embed_model="minilm")
    st = push(name, cfg, server)
    assert st.kept == 8 and st.extra["records_in_dataset"] == 8
    pushed = pl.read_parquet(review_dir(name) / "pushed.parquet")["id"].to_list()
    # low-score: the 8 lowest quality_score rows, in ascending order
    expected = df.sort("quality_score")["id"].to_list()[:8]
    assert sorted(pushed) == sorted(expected)

    # what a reviewer sees: fields, every score as metadata, suggestions, and a searchable vector
    import argilla as rg

    ds = find_dataset(connect(server), cfg, name)
    probe = df.filter(pl.col("id") == expected[5]).row(0, named=True)
    vec = variant_embeddings(df.filter(pl.col("id") == expected[5]), make_embedder("minilm"))[0]
    hits = list(ds.records(query=rg.Query(similar=rg.Similar(name="embedding", value=vec.tolist())), limit=3, with_vectors=True))
    top, similarity = hits[0]  # a similarity query yields (record, score)
    assert top.id == expected[5] and similarity == pytest.approx(1.0, abs=1e-3) and len(top.vectors["embedding"]) == 384
    assert [h[1] for h in hits] == sorted((h[1] for h in hits), reverse=True)
    assert top.fields["response"] == probe["messages"][-1]["content"]
    assert top.fields["why_flagged"].startswith("low-score: quality_score=")  # why the reviewer sees this row
    assert top.metadata["quality_score"] == pytest.approx(probe["quality_score"]) and top.metadata["ifd"] == pytest.approx(probe["ifd"])
    assert top.metadata["source"] == "alpaca" and top.metadata["flagged_by"] == "low-score"
    assert top.suggestions["decision"].value in ("keep", "drop") and top.suggestions["quality"].value in range(1, 6)

    drop_a, drop_b, fix, keep = expected[0], expected[1], expected[2], expected[3]
    submit(
        server,
        annotator_key,
        dataset_name(cfg, name),
        {
            drop_a: {"decision": "drop", "quality": 1},
            drop_b: {"decision": "drop"},
            fix: {"decision": "keep", "quality": 4, "corrected_response": "A corrected answer."},
            keep: {"decision": "keep", "quality": 5},
        },
    )
    pulled = pull(name, cfg, server)
    assert pulled.kept == 4 and pulled.extra["new_or_updated"] == 4
    resp = pl.read_parquet(review_dir(name) / "responses.parquet")
    assert set(resp["annotator"]) == {"annotator"}
    assert dict(zip(resp["id"], resp["decision"])) == {drop_a: "drop", drop_b: "drop", fix: "keep", keep: "keep"}
    assert resp["updated_at"].null_count() == 0

    # pulling again is idempotent: same file content, nothing new
    again = pull(name, cfg, server)
    assert again.extra["new_or_updated"] == 0
    assert pl.read_parquet(review_dir(name) / "responses.parquet").equals(resp)

    st = apply_review(name, cfg, cards_dir=tmp_home / "cards")
    out = paths.variants_dir() / f"{name}-reviewed"
    train = pl.read_parquet(out / "train.parquet")
    dropped = pl.read_parquet(out / "dropped.parquet")
    assert set(dropped.filter(pl.col("stage") == "human_review")["id"]) == {drop_a, drop_b}
    assert train.height == df.height - 2
    assert drop_a not in train["id"].to_list() and fix not in train["id"].to_list()
    fixed = train.filter(pl.col("human_label") == "corrected").row(0, named=True)
    assert fixed["messages"][-1]["content"] == "A corrected answer."
    assert fixed["id"] == row_id(fixed["messages"])
    assert st.extra["changes"]["human_drop"] == 2 and st.extra["changes"]["human_correction"] == 1
    card = (tmp_home / "cards" / f"{name}-reviewed.md").read_text()
    assert "| human: drop | 2 |" in card and "| human: corrected response | 1 |" in card


def test_push_twice_does_not_duplicate_and_keeps_labels(variant, server, annotator_key, capsys):
    from tomelab.cli import main

    name, df = variant
    cfg = ReviewConfig(n=6, strategy="random", seed=1, embed_model="minilm")
    push(name, cfg, server)
    first = pl.read_parquet(review_dir(name) / "pushed.parquet")["id"].to_list()
    submit(server, annotator_key, dataset_name(cfg, name), {first[0]: {"decision": "drop"}})
    capsys.readouterr()
    # the same rows again, through the CLI the user types
    rc = main(["review", "push", "--variant", name, "--n", "6", "--strategy", "random", "--seed", "1", "--embed-model", "minilm"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stage"] == "review_push" and out["extra"]["records_in_dataset"] == 6
    assert sorted(pl.read_parquet(review_dir(name) / "pushed.parquet")["id"]) == sorted(first)
    st = push(name, ReviewConfig(n=8, strategy="random", seed=1, embed_model="minilm"), server)  # a superset
    assert st.extra["records_in_dataset"] == len(set(first) | set(pl.read_parquet(review_dir(name) / "pushed.parquet")["id"]))
    pulled = pull(name, cfg, server)
    resp = pl.read_parquet(review_dir(name) / "responses.parquet")
    assert pulled.kept == 1 and resp["id"].to_list() == [first[0]] and resp["decision"].to_list() == ["drop"]
