"""The quality guard for quantised served files: a good q8_0 passes, a deliberately broken file is refused
(by the guard itself and by `load_engine`), a file of another model is rejected, and the verdict is in
`engine.info`."""

from __future__ import annotations

import numpy as np
import pytest

from tomelab.engines.gguf_writer import write_gguf
from tomelab.engines.guard import model_from_gguf
from tomelab.errors import TomelabError

pytestmark = pytest.mark.e2e
N = 8  # conversations: enough for a paired CI, small enough for the shared 2 cores


@pytest.fixture(scope="module")
def base(smollm2_dir):
    from tomelab.engines.choice import load_for_inference

    return load_for_inference("smollm2-135m-instruct", dtype="float32")


@pytest.fixture(scope="module")
def files(tmp_path_factory, smollm2_dir):
    d = tmp_path_factory.mktemp("gguf")
    rng = np.random.default_rng(0)

    def noisy(name: str, a: np.ndarray) -> np.ndarray:  # weights with noise of 0.5x their own spread
        return a + rng.normal(0.0, 0.5 * float(a.std()), a.shape).astype(np.float32) if a.ndim == 2 else a

    return {"f16": write_gguf(smollm2_dir, d / "model-f16.gguf", "f16"),
            "q8_0": write_gguf(smollm2_dir, d / "model-q8_0.gguf", "q8_0"),
            "broken": write_gguf(smollm2_dir, d / "broken-q8_0.gguf", "q8_0", transform=noisy)}


def test_broken_file_is_refused_and_good_quantisation_served_with_its_verdict(tmp_home, base, files, monkeypatch) -> None:
    """Through `load_engine`, as the app loads: the broken q8_0 is refused with its numbers; the real q8_0
    is served and `engine.info` carries the guard's verdict and numbers."""
    import tomelab.engines.choice as inf
    import tomelab.engines.guard as guard_mod

    real = guard_mod.quality_guard
    # the IFEval leg's decision is tested in test_engine_lora.py; here the NLL leg decides
    monkeypatch.setattr(guard_mod, "quality_guard", lambda *a, **k: real(*a, **{**k, "n": N, "ifeval_n": 0}))
    monkeypatch.setattr(inf, "load_for_inference", lambda ref, dtype="float32": base)
    monkeypatch.setattr(inf, "pick_gguf", lambda ref, model, tok, t: files[t])
    monkeypatch.setattr(inf, "served_gguf", lambda ref, model, tok, t: (files[t], None))
    with pytest.raises(TomelabError, match="quality guard REFUSED") as err:
        inf.load_engine("smollm2-135m-instruct", engine="llama.cpp", gguf_type="broken", threads=1, slots=1)
    assert "CI" in str(err.value) and "nats" in str(err.value)
    ok = inf.load_engine("smollm2-135m-instruct", engine="llama.cpp", gguf_type="q8_0", threads=1, slots=1)
    g = ok.info["quality_guard"]
    assert g["passed"] and "PASS" in ok.info["engine_reason"] and g["n_items"] == N
    assert g["hi"] <= g["margin"] and abs(g["diff"]) < 0.01  # q8_0 of the same weights: nearly the same NLL
    bad = guard_mod.cached_guard(files["broken"], files["f16"], base[0], base[1])  # cached from the refusal
    assert not bad["passed"] and bad["lo"] > bad["margin"] and bad["diff"] > 0.1, bad


def test_a_file_of_another_model_is_rejected(base, tmp_path, smollm2_dir) -> None:
    model, _ = base
    wrong = write_gguf(smollm2_dir, tmp_path / "wrong.gguf", "f16",
                       transform=lambda n, a: a[:, :-32] if n.endswith("up_proj.weight") else a)
    with pytest.raises(TomelabError, match="does not fit the model"):
        model_from_gguf(wrong, model)
