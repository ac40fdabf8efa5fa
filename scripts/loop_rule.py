"""Choose and check the loop-extrapolation rule of the eval engines (`loop_repeats`, `loop_min_tokens`;
tomelab/engines/loops.py).

    # 1. decode the config's IFEval prompts fully (no rule), keep every answer's token ids, choose a rule:
    .venv/bin/python scripts/loop_rule.py choose --config configs/eval/ifeval-full-ct2.toml
    # 2. evaluate with the chosen rule, then compare its answers with step 1's full decoding:
    .venv/bin/tomelab eval smollm2-135m-instruct --config configs/eval/ifeval-full-ct2-loops.toml
    .venv/bin/python scripts/loop_rule.py check artifacts/evals/base/smollm2-135m-instruct/ifeval.jsonl
    # another engine (llama.cpp): its own eval with the rule off is the reference
    .venv/bin/python scripts/loop_rule.py check LOOPS/ifeval.jsonl --reference FULL/ifeval.jsonl

choose: step 1 runs the config's engine, batches and prompts exactly as `tomelab eval` does, with the rule off,
and caches the answers' ids (`artifacts/bench/loop_rule-<run key>.json`). The prompts are split in halves by a
hash of their id. On the validation half every rule of a grid (repeats x min tokens) is replayed over the
decoded answers. A stopped answer is *changed* when its written-out cycle differs from what full decoding
wrote (the model later broke out of the loop: greedy int8 loops drift), and a changed answer may get another
IFEval verdict. The chosen rule saves the most decoded tokens with no IFEval verdict changed on validation; the
test half then reports its changed answers and verdicts, with an exact one-sided 95% upper bound on the rate of
prompts whose verdict changes, and its savings.
check: an eval's answers against step 1's full decoding (or `--reference`): identical answers, and the paired
difference of IFEval prompt- and instruction-level accuracy, strict and loose (95% bootstrap CI over prompts),
with its MDE.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPEATS = (2, 3, 4, 5, 6, 8)
MIN_TOKENS = (8, 16, 32, 48, 64, 96, 128)


def _ids_path(model: str) -> Path:
    from eval.evaluate import run_key
    from tomelab.paths import home

    return home() / "bench" / f"loop_rule-{run_key(model).replace('/', '__')}.json"


def _half(pid: str) -> str:
    return "val" if int(hashlib.sha256(f"loop-rule:{pid}".encode()).hexdigest(), 16) % 2 == 0 else "test"


def _decode_fully(model: str, cfg, limit: int | None) -> dict:
    """The config's IFEval answers decoded to their end (rule off), as `tomelab eval` batches them."""
    from eval.evaluate import _generation_engine
    from eval.generate import generate_greedy_batched
    from eval.sets import load_ifeval, stable_subset

    path = _ids_path(model)
    items = stable_subset(load_ifeval(cfg.ifeval.path or None).items, None)[: limit or cfg.ifeval.limit]
    key = {"model": model, "items": len(items), "batch": cfg.batch_size, "type": cfg.ct2_compute_type,
           "max_new_tokens": cfg.ifeval.max_new_tokens, "workers": cfg.engine_workers}
    if path.is_file() and (cached := json.loads(path.read_text(encoding="utf-8"))).get("key") == key:
        print(f"full decoding read from {path} (delete it to decode again)")
        return cached
    engine = _generation_engine(model, cfg)
    ids: dict[str, list[int]] = {}
    t0 = time.perf_counter()
    texts = generate_greedy_batched(engine, [(it.id, it.messages) for it in items], max_new_tokens=cfg.ifeval.max_new_tokens,
                                    batch_size=cfg.batch_size, desc="full decoding", answer_ids=ids)
    out = {"key": key, "seconds": round(time.perf_counter() - t0, 1), "ids": ids, "texts": texts}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out), encoding="utf-8")
    return out


def _replay(answers: dict[str, list[int]], limit: int, rule, verdicts_change=None) -> dict:
    """What `rule` does to fully decoded `answers`: how many it stops, how many of those it changes (the
    written-out cycle differs from what decoding wrote), how many of the changed ones get another IFEval
    verdict (`verdicts_change(id, written_out_ids)`), and the decoded tokens it saves (every stop saves)."""
    from tomelab.engines.loops import first_loop

    stops = changed = flipped = saved = 0
    for pid, toks in answers.items():
        w = first_loop(toks, rule)
        if w.period is None:
            continue
        stops += 1
        saved += limit - w.loop_from
        out = w.complete(limit)
        if out != toks:
            changed += 1
            flipped += bool(verdicts_change and verdicts_change(pid, out))
    total = sum(len(t) for t in answers.values())
    return {"stops": stops, "changed": changed, "verdicts_changed": flipped, "saved_tokens": saved,
            "saved_frac": saved / max(1, total)}


def _upper95(k: int, n: int) -> float:
    """Exact (Clopper-Pearson) one-sided 95% upper bound on a rate seen k times in n."""
    from scipy.stats import beta

    return 1.0 if n == 0 or k >= n else float(beta.ppf(0.95, k + 1, n - k))


def _verdict_check(model: str, texts: dict[str, str]):
    """`verdicts_change(id, ids)`: does the answer `ids` get any other IFEval verdict (prompt or instruction
    level, strict or loose) than the fully decoded text?"""
    from eval.sets import load_ifeval, score_ifeval
    from training.load import describe, load_base_tokenizer

    tok = load_base_tokenizer(describe(model)["base"] or model)
    items = {it.id: it for it in load_ifeval().items}
    keys = ("prompt_strict", "prompt_loose", "inst_strict", "inst_loose")
    full: dict[str, dict] = {}

    def verdicts_change(pid: str, ids: list[int]) -> bool:
        if pid not in full:
            full[pid] = score_ifeval(items[pid], texts[pid])
        new = score_ifeval(items[pid], tok.decode(ids, skip_special_tokens=True).strip())
        return any(new[k] != full[pid][k] for k in keys)

    return verdicts_change


def choose(args: argparse.Namespace) -> int:
    from eval.config import EvalConfig
    from tomelab.config import load_config
    from tomelab.engines.loops import LoopRule

    cfg = load_config(args.config, EvalConfig)
    cfg.loop_repeats = 0
    full = _decode_fully(args.model, cfg, args.limit)
    limit = full["key"]["max_new_tokens"]
    halves = {h: {p: t for p, t in full["ids"].items() if _half(p) == h} for h in ("val", "test")}
    at_limit = sum(len(t) >= limit for t in full["ids"].values())
    total = sum(len(t) for t in full["ids"].values())
    flips = _verdict_check(args.model, full["texts"])
    print(f"{args.model}: {len(full['ids'])} IFEval prompts fully decoded in {full['seconds']} s, {total} tokens; "
          f"{at_limit} answers reach the {limit}-token limit; validation {len(halves['val'])}, test {len(halves['test'])}")
    print("\nvalidation half, every rule (changed: the written-out cycle differs from full decoding; verdicts: a changed "
          "answer gets another IFEval verdict)")
    print("| repeats | min tokens | stops | answers changed | verdicts changed | decoded tokens saved |")
    print("|---|---|---|---|---|---|")
    best = None
    for r in REPEATS:
        for m in MIN_TOKENS:
            v = _replay(halves["val"], limit, LoopRule(r, m), flips)
            print(f"| {r} | {m} | {v['stops']} | {v['changed']} | {v['verdicts_changed']} | {v['saved_tokens']} "
                  f"({100 * v['saved_frac']:.1f}%) |")
            if v["verdicts_changed"] == 0 and (best is None or v["saved_tokens"] > best[1]["saved_tokens"]):
                best = (LoopRule(r, m), v)
    if best is None:
        print("every rule of the grid changes an IFEval verdict on validation: keep loop_repeats = 0")
        return 1
    rule = best[0]
    t = _replay(halves["test"], limit, rule, flips)
    a = _replay(full["ids"], limit, rule, flips)
    print(f"\nchosen on validation: loop_repeats = {rule.min_repeats}, loop_min_tokens = {rule.min_tokens} "
          f"(most decoded tokens saved, {100 * best[1]['saved_frac']:.1f}%, with no IFEval verdict changed)")
    n = len(halves["test"])
    print(f"test half ({n} prompts): {t['stops']} answers stopped, {t['changed']} of them changed, "
          f"{t['verdicts_changed']} with another IFEval verdict (rate <= {100 * _upper95(t['verdicts_changed'], n):.1f}% "
          f"of prompts at 95%); {100 * t['saved_frac']:.1f}% of the decoded tokens saved")
    print(f"all prompts: {a['stops']} stopped, {a['changed']} changed, {a['verdicts_changed']} verdicts changed, "
          f"{100 * a['saved_frac']:.1f}% of the decoded tokens saved (the time saved is the real run's to measure)")
    return 0


def check(args: argparse.Namespace) -> int:
    from eval.sets import ifeval_paired, load_ifeval, score_ifeval

    def outputs(path: str) -> dict[str, str]:
        rows = {}
        for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
            try:
                rec = json.loads(line)
                rows[rec["id"]] = rec["output"]
            except (json.JSONDecodeError, KeyError, TypeError):
                print(f"{path}: row {n} is not an eval record with 'id' and 'output'; pass an ifeval.jsonl written by "
                      "`tomelab eval`", file=sys.stderr)
                raise SystemExit(2) from None
        return rows

    ref = args.reference or str(_ids_path(args.model))
    for path in (args.eval_jsonl, ref):
        if not Path(path).is_file():
            print(f"{path} does not exist: pass an ifeval.jsonl of `tomelab eval`, and run `choose` first or pass "
                  "--reference", file=sys.stderr)
            return 2
    full = outputs(ref) if args.reference else json.loads(Path(ref).read_text(encoding="utf-8"))["texts"]
    fast = {i: t for i, t in outputs(args.eval_jsonl).items() if i in full}
    if not fast:
        print(f"{args.eval_jsonl}: no answer shares an id with the full decoding; run `choose` with the same config "
              "first, or pass --reference")
        return 2
    items = {it.id: it for it in load_ifeval().items}
    ids = sorted(fast)
    same = sum(fast[i] == full[i] for i in ids)
    print(f"{args.eval_jsonl} vs full decoding: {same}/{len(ids)} identical answers")
    sa = [score_ifeval(items[i], fast[i]) for i in ids]
    sb = [score_ifeval(items[i], full[i]) for i in ids]
    for metric, m in ifeval_paired(sa, sb, names=("loops", "full")).items():
        ci = m.diff
        print(f"  {metric}: full {m.mean_b:.2f}, loops {m.mean_a:.2f}; loops - full {ci.estimate:+.2f} points, 95% CI "
              f"[{ci.lo:+.2f}, {ci.hi:+.2f}], MDE {ci.mde:.2f}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="base name or run dir")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("choose", help="decode fully, choose a rule on validation prompts, report it on test prompts")
    c.add_argument("--config", default="configs/eval/ifeval-full-ct2.toml", help="eval TOML (engine = ctranslate2)")
    c.add_argument("--limit", type=int, default=None, help="IFEval prompts (default: the config's)")
    k = sub.add_parser("check", help="an eval's answers against the full decoding of `choose`")
    k.add_argument("eval_jsonl", help="ifeval.jsonl of a `tomelab eval` run with the rule on")
    k.add_argument("--reference", default=None,
                   help="ifeval.jsonl of the same eval with the rule off (default: the full decoding of `choose`)")
    args = ap.parse_args()
    return choose(args) if args.cmd == "choose" else check(args)


if __name__ == "__main__":
    raise SystemExit(main())
