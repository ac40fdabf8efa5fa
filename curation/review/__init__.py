"""Human review of a variant in a real Argilla 2.x server: push, pull, apply.

`push` sends a chosen slice of a variant's rows to an Argilla dataset (record id = row id, so a
second push updates instead of duplicating), with keep/drop, a 1-5 quality rating and an optional
corrected response as questions, curation scores as metadata and suggestions, and the embedding as
a vector for similarity search in the UI. `pull` stores every submitted response in
`<variant>/review/responses.parquet`, merging with earlier pulls so no label is ever lost.
`apply` (offline) turns those labels into a new variant `<name>-reviewed`, optionally extending them
to unlabelled rows through nearest labelled neighbours, and writes its data card.

One module per job (import from the module; this file imports nothing, so the CLI's `--help`, which
needs only `ReviewConfig`, stays light):

* `config`: `ReviewConfig`, `load_review_config`, the vocabulary (`DECISIONS`, `STRATEGIES`, `REVIEW_STAGE`,
  `SCORE_DIRECTION`, `NOT_SCORES`);
* `client`: the server (`resolve_target`, `ArgillaTarget`, `check_server`, `connect`, `dataset_name`, `find_dataset`);
* `data`: a variant's rows, scores and embeddings (`load_variant`, `score_columns`, `make_embedder`,
  `variant_embeddings`, `review_dir`, `pushed_variants`);
* `selection`: which rows (`select_rows`, `suggestions_for`);
* `push`: `push`, `build_settings`; `pull`: `pull`, `fetch_responses`, `merge_responses`, `RESPONSE_COLUMNS`;
* `labels`: resolution and propagation (`resolve_labels`, `knn_vote`, `propagation_agreement`);
* `apply`: `apply_review`. The reviewed variant's card is `curation.card.review_card`.
"""
