"""Rebuild a correct fast tokenizer from a GGUF file's tokenizer metadata.

Why: transformers 5.3's GGUF tokenizer conversion is broken for both offline base models here.
For SmolLM2 (GGUF model `gpt2`, pre-tokenizer `smollm`) it builds a Metaspace tokenizer that
inserts `<|endoftext|>` between words and prepends `<|im_start|>` as BOS; for Gemma-3 (SentencePiece
BPE stored as tokens + scores) it builds a Unigram model that splits text into single characters.
Both silently wreck training and evaluation. So we build the `tokenizers` pipeline explicitly, the
way the hub's tokenizer.json files are built, and tests pin known tokenisations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CONTROL, USER_DEFINED = 3, 4  # GGUF token types that are special tokens


def _fields(gguf_path: Path) -> dict[str, Any]:
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


def tokenizer_from_gguf(gguf_path: str | Path, *, chat_template: str | None = None) -> Any:
    """A `PreTrainedTokenizerFast` equivalent to the model's original tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    f = _fields(Path(gguf_path))
    tokens: list[str] = list(f["tokenizer.ggml.tokens"])
    types: list[int] = list(f.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    kind = f["tokenizer.ggml.model"]

    def tok(key: str) -> str | None:
        i = f.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None else None

    bos, eos, unk, pad = tok("bos"), tok("eos"), tok("unknown"), tok("padding")
    add_bos = bool(f.get("tokenizer.ggml.add_bos_token", False))

    if kind == "gpt2":  # byte-level BPE (SmolLM2, GPT-2 family)
        vocab = {t: i for i, t in enumerate(tokens)}
        merges = [tuple(m.split(" ", 1)) for m in f["tokenizer.ggml.merges"]]
        backend = Tokenizer(BPE(vocab, merges, fuse_unk=False))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if f.get("tokenizer.ggml.pre") == "smollm":  # SmolLM splits every digit on its own
            backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        else:
            backend.pre_tokenizer = byte_level
        backend.decoder = decoders.ByteLevel()
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    elif kind == "llama":  # SentencePiece BPE stored as tokens + scores (Gemma, Llama-2)
        scores: list[float] = list(f["tokenizer.ggml.scores"])
        vocab = {t: i for i, t in enumerate(tokens)}
        backend = Tokenizer(BPE(vocab, _spm_merges(tokens, scores, types), unk_token=unk, fuse_unk=True, byte_fallback=True))
        if f.get("tokenizer.ggml.add_space_prefix", False):
            backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        else:
            backend.normalizer = normalizers.Replace(" ", "▁")
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
        if add_bos and bos is not None:
            bos_id = vocab[bos]
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
            )
    else:
        raise ValueError(f"{gguf_path}: unsupported GGUF tokenizer model {kind!r}")

    # Control tokens are special (skipped when decoding with skip_special_tokens); user-defined
    # pieces (Gemma's runs of newlines, spaces and tabs) are matched whole, before BPE, as
    # SentencePiece does, but are ordinary text.
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types)
         if ty == CONTROL]
    )
    backend.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types)
         if ty == USER_DEFINED]
    )
    tok_obj = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        pad_token=pad if pad is not None else eos,
        clean_up_tokenization_spaces=False,
    )
    template = chat_template or f.get("tokenizer.chat_template")
    if template:
        tok_obj.chat_template = template
    return tok_obj


def _spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges recovered from a SentencePiece vocabulary, as transformers' SentencePieceExtractor
    does: every split of a piece into two known pieces is a merge, ranked by the piece's score."""
    ids = {t: i for i, t in enumerate(tokens)}
    normal = [i for i, ty in enumerate(types) if ty == 1]
    merges: list[tuple[float, int, int, str, str]] = []
    for i in normal:
        piece = tokens[i]
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            li, ri = ids.get(left), ids.get(right)
            if li is not None and ri is not None:
                merges.append((-scores[i], li, ri, left, right))
    merges.sort()
    return [(m[3], m[4]) for m in merges]
