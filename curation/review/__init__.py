"""Human review of a variant in a real Argilla 2.x server: push, pull, apply.

`push` sends a chosen slice of a variant's rows to an Argilla dataset (record id = row id, so a
second push updates instead of duplicating), with keep/drop, a 1-5 quality rating and an optional
corrected response as questions, curation scores as metadata and suggestions, and the embedding as
a vector for similarity search in the UI. `pull` stores every submitted response in
`<variant>/review/responses.parquet`, merging with earlier pulls so no label is ever lost.
`apply` (offline) turns those labels into a new variant `<name>-reviewed`, optionally extending them
to unlabelled rows through nearest labelled neighbours, and writes its data card.

Modules: `config` (settings, vocabulary), `client` (the server), `data` (a variant's rows, scores,
embeddings), `selection` (which rows), `push`, `pull`, `labels` (resolution, propagation), `apply`.
"""

from curation.card import review_card as data_card
from curation.review.apply import apply_review
from curation.review.client import (
    ArgillaTarget,
    check_server,
    connect,
    count_records,
    dataset_name,
    find_dataset,
    local_server_dir,
    read_env_file,
    resolve_target,
)
from curation.review.config import (
    DECISIONS,
    NOT_SCORES,
    RESPONSE_COLUMNS,
    REVIEW_STAGE,
    SCORE_DIRECTION,
    STRATEGIES,
    ReviewConfig,
    Strategy,
    load_review_config,
)
from curation.review.data import (
    last_assistant,
    load_variant,
    make_embedder,
    numeric_metadata_columns,
    primary_score,
    pushed_variants,
    render_prompt,
    review_dir,
    score_columns,
    variant_dir,
    variant_embeddings,
)
from curation.review.labels import knn_vote, load_responses, propagation_agreement, resolve_labels
from curation.review.pull import fetch_responses, merge_responses, pull
from curation.review.push import build_settings, push
from curation.review.selection import select_rows, suggestions_for

__all__ = [
    "DECISIONS", "NOT_SCORES", "RESPONSE_COLUMNS", "REVIEW_STAGE", "SCORE_DIRECTION", "STRATEGIES", "ArgillaTarget",
    "ReviewConfig", "Strategy", "apply_review", "build_settings", "check_server", "connect", "count_records", "data_card",
    "dataset_name", "fetch_responses", "find_dataset", "knn_vote", "last_assistant", "load_responses",
    "load_review_config", "load_variant", "local_server_dir", "make_embedder", "merge_responses",
    "numeric_metadata_columns", "primary_score", "propagation_agreement", "pull", "push", "pushed_variants",
    "read_env_file", "render_prompt", "resolve_labels", "resolve_target", "review_dir", "score_columns", "select_rows",
    "suggestions_for", "variant_dir", "variant_embeddings",
]
