"""Gradio chat serving the ablation's winner on CPU, side by side with the base model.

`python app.py` (or `tomelab chat`) binds 127.0.0.1 and serves:
* Chat: stream an answer from the picked model (the winner by default, else the base model,
  with a banner saying so), keeping the conversation in the model's chat template;
* Compare: one prompt, two models (winner vs base by default), each with its tokens/s;
* per-model info: variant, data card excerpt, leaderboard scores with CIs.
Requests go through Gradio's queue with a concurrency limit; over-long conversations are cut
to fit the context with a visible note (see `tomelab.inference.fit_prompt`).
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from tomelab import paths
from tomelab.config import load_config
from tomelab.errors import TomelabError
from tomelab.inference import DEFAULT_SYSTEM_PROMPT, ChatEngine, GenerationSettings, StreamEvent, load_engine
from tomelab.io import read_json

log = logging.getLogger("tomelab.app")

DEFAULT_BASE = "smollm2-135m-instruct"
ENGINES = ("auto", "transformers", "llama.cpp", "ctranslate2")  # tomelab.inference.load_engine's choices
EXAMPLES = (
    "What is the capital of France?",
    "Give me three tips for a good night's sleep.",
    "Write a haiku about autumn.",
    "Explain photosynthesis to a ten-year-old.",
)


@dataclass
class AppConfig:
    """Serving settings; every field is also a `python app.py` flag."""

    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False  # a public gradio.live link only when asked
    engine: str = "auto"  # auto | transformers | llama.cpp | ctranslate2
    threads: int = 0  # 0: all cores this process may use
    base: str = DEFAULT_BASE  # served when there is no winner, and the compare partner
    results_dir: str = "results"
    data_cards_dir: str = "data_cards"
    concurrency_limit: int = 2  # generations running at once (the rest wait in the queue)
    max_queue: int = 64  # requests waiting beyond that are refused with "queue full"
    max_loaded_models: int = 3
    context_length: int = 2048
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 256
    max_new_tokens_limit: int = 1024
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    examples: list[str] = field(default_factory=lambda: list(EXAMPLES))

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.concurrency_limit < 1 or self.max_queue < 1:
            raise ValueError("concurrency_limit and max_queue must be >= 1")


@dataclass
class ModelEntry:
    """One model the picker offers: a display key, what to load, and what to show about it."""

    key: str
    ref: str
    kind: str  # winner | run | base
    variant: str | None = None
    base: str | None = None
    seed: Any = None
    metrics: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- discovery


def read_winner(results_dir: Path) -> dict | None:
    """`results/winner.json`, or None when the ablation has not picked one yet."""
    p = results_dir / "winner.json"
    if not p.is_file():
        return None
    try:
        w = read_json(p)
    except ValueError as e:
        raise TomelabError(f"{p}: not valid JSON ({e}). Re-run `tomelab ablate` to rewrite it.") from None
    missing = [k for k in ("variant", "base", "run_dir") if k not in w]
    if missing:
        raise TomelabError(f"{p}: missing field(s) {', '.join(missing)}. Re-run `tomelab ablate` to rewrite it.")
    return _locate_winner_run(w, p)


def _locate_winner_run(w: dict, source: Path) -> dict | None:
    """winner.json is committed but runs are not: find the run on this machine, or serve the base model.

    A run recorded under another checkout's absolute path is looked up again under this machine's
    `runs/<variant>/<base>/<seed>/`; if it was never trained here the app falls back to the base model
    (with the banner) instead of failing."""
    ref = w.get("model_dir") or w["run_dir"]
    if any(Path(r).exists() for r in (w.get("model_dir"), w["run_dir"]) if r):
        return w
    local = paths.runs_dir() / w["variant"] / w["base"] / str(w.get("seed"))
    if (local / "adapter").exists() or (local / "config.json").exists():
        return {**w, "run_dir": str(local), "model_dir": None}
    log.warning("%s names run %s, which is not on this machine (train it with `make demo` or `tomelab ablate`); "
                "serving the base model", source, ref)
    return None


def finished_runs(runs_dir: Path) -> list[ModelEntry]:
    """Run dirs `<variant>/<base>/<seed>/` that hold metrics.json (training + eval finished)."""
    out = []
    for m in sorted(runs_dir.glob("*/*/*/metrics.json")):
        run = m.parent
        try:
            metrics = read_json(m)
        except ValueError:
            log.warning("skipping %s: unreadable metrics.json", run)
            continue
        variant, base, seed = run.parent.parent.name, run.parent.name, run.name
        out.append(ModelEntry(f"run: {variant} / {base} / seed {seed}", str(run), "run", variant, base, seed,
                              metrics if isinstance(metrics, dict) else {}))
    return out


def discover_models(cfg: AppConfig) -> tuple[list[ModelEntry], dict | None]:
    """The picker's list (winner first, then the base, then every finished run) and the winner."""
    winner = read_winner(Path(cfg.results_dir))
    entries: list[ModelEntry] = []
    if winner:
        ref = winner.get("model_dir") or winner["run_dir"]
        entries.append(ModelEntry(f"winner: {winner['variant']} / {winner['base']} / seed {winner.get('seed')}", str(ref),
                                  "winner", winner["variant"], winner["base"], winner.get("seed"), winner.get("metrics") or {}))
    base = winner["base"] if winner else cfg.base
    entries.append(ModelEntry(f"base: {base}", base, "base", None, base))
    if base != cfg.base:
        entries.append(ModelEntry(f"base: {cfg.base}", cfg.base, "base", None, cfg.base))
    winner_run = Path(winner["run_dir"]).resolve() if winner else None
    entries += [e for e in finished_runs(paths.runs_dir()) if Path(e.ref).resolve() != winner_run]
    return entries, winner


def banner_markdown(winner: dict | None, cfg: AppConfig) -> str:
    if winner is None:
        return (
            f"### ⚠️ No winner yet: serving the base model `{cfg.base}`\n"
            f"`{cfg.results_dir}/winner.json` does not exist. Run the ablation (`tomelab ablate`) to pick a "
            f"fine-tuned winner; until then this app serves the **base model**."
        )
    return (
        f"### Serving the winner: `{winner['variant']}` on `{winner['base']}` (seed {winner.get('seed')})\n"
        f"Chosen by: {winner.get('rule', 'n/a')}"
    )


BASE_LEADERBOARD_ROW = "base (untouched)"  # eval.ablate.BASE_ROW: the untouched base model's rows


def leaderboard_rows(results_dir: Path, system: str | None) -> list[dict[str, str]]:
    """This system's rows of `leaderboard.csv` (long format: one row per system x metric, see eval.ablate)."""
    p = results_dir / "leaderboard.csv"
    if system is None or not p.is_file():
        return []
    with p.open(newline="", encoding="utf-8") as f:
        return [r for r in csv.DictReader(f) if r.get("system") == system]


def _num(v: str | None, fmt: str = "{:.3f}") -> str:
    try:
        return fmt.format(float(v)) if v not in (None, "") else "-"
    except ValueError:
        return str(v)


def leaderboard_markdown(rows: list[dict[str, str]]) -> str:
    """Mean, 95% bootstrap CI and the paired difference to the baseline, one line per metric."""
    out = ["| metric | mean | 95% CI | vs baseline [95% CI] | seeds |", "|---|---|---|---|---|"]
    for r in rows:
        ci = f"[{_num(r.get('ci_lo'))}, {_num(r.get('ci_hi'))}]" if r.get("ci_lo") not in (None, "") else "-"
        d = r.get("delta_vs_baseline")
        delta = (f"{_num(d, '{:+.3f}')} [{_num(r.get('delta_lo'), '{:+.3f}')}, {_num(r.get('delta_hi'), '{:+.3f}')}]"
                 if d not in (None, "") else "-")
        out.append(f"| {r.get('metric')} | {_num(r.get('mean'))} | {ci} | {delta} | {r.get('n_seeds', '-')} |")
    return "\n".join(out)


def data_card_excerpt(cards_dir: Path, variant: str | None, max_lines: int = 20) -> str | None:
    if variant is None:
        return None
    p = cards_dir / f"{variant}.md"
    if not p.is_file():
        return None
    lines = p.read_text(encoding="utf-8").splitlines()
    if lines and lines[0].strip() == "---":  # skip the YAML front matter of HF-style cards
        end = next((i for i, line in enumerate(lines[1:], 1) if line.strip() == "---"), 0)
        lines = lines[end + 1 :]
    body = [line for line in lines if not line.startswith("![")][:max_lines]
    return "\n".join(body).strip()


def info_markdown(entry: ModelEntry, cfg: AppConfig, engine: ChatEngine | None = None) -> str:
    """The info panel: what the model is, its data card, its leaderboard scores with CIs."""
    parts = [f"**{entry.key}**", f"- loads from: `{entry.ref}`"]
    if entry.kind == "base":
        parts.append("- base model, not fine-tuned by tomelab")
    else:
        parts.append(f"- variant `{entry.variant}`, base `{entry.base}`, seed {entry.seed}")
    if engine is not None:
        parts.append(f"- engine: {engine.engine_name} ({engine.info.get('engine_reason', '')})")
    system = BASE_LEADERBOARD_ROW if entry.kind == "base" else entry.variant
    rows = leaderboard_rows(Path(cfg.results_dir), system)
    if rows:
        parts.append(f"\n**Leaderboard** (`{cfg.results_dir}/leaderboard.csv`, row `{system}`; the CI is over items and seeds)\n")
        parts.append(leaderboard_markdown(rows))
    elif entry.metrics:
        flat = {k: v for k, v in entry.metrics.items() if isinstance(v, (int, float, str))}
        if flat:
            parts.append("\n**Metrics** " + ", ".join(f"{k}={v}" for k, v in list(flat.items())[:8]))
    card = data_card_excerpt(Path(cfg.data_cards_dir), entry.variant)
    if card:
        parts.append(f"\n**Data card** (`{cfg.data_cards_dir}/{entry.variant}.md`, excerpt)\n\n{card}")
    elif entry.variant:
        parts.append(f"\n_No data card at `{cfg.data_cards_dir}/{entry.variant}.md`._")
    return "\n".join(parts)


# --------------------------------------------------------------------------- serving


class ModelPool:
    """Loads engines on first use and keeps the most recent few (loading takes seconds)."""

    def __init__(self, cfg: AppConfig, entries: list[ModelEntry]):
        self.cfg = cfg
        self.entries = {e.key: e for e in entries}
        self._engines: dict[str, ChatEngine] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> ChatEngine:
        if key not in self.entries:
            raise TomelabError(f"unknown model {key!r}; pick one of: {', '.join(self.entries)}")
        with self._lock:
            if key not in self._engines:
                e = self.entries[key]
                log.info("loading %s from %s", key, e.ref)
                self._engines[key] = load_engine(
                    e.ref, engine=self.cfg.engine, label=key, threads=self.cfg.threads or None,  # type: ignore[arg-type]
                    context_length=self.cfg.context_length,
                )
                while len(self._engines) > self.cfg.max_loaded_models:
                    self._engines.pop(next(iter(self._engines)))
            return self._engines[key]


def _settings(cfg: AppConfig, temperature: float, top_p: float, max_new_tokens: float, system_prompt: str) -> GenerationSettings:
    return GenerationSettings(
        temperature=float(temperature), top_p=float(top_p),
        max_new_tokens=max(1, min(int(max_new_tokens), cfg.max_new_tokens_limit)),
        system_prompt=system_prompt if system_prompt is not None else cfg.system_prompt,
    )


def _stats_line(ev: StreamEvent, engine: ChatEngine) -> str:
    first = f"{ev.first_token_s:.2f}s" if ev.first_token_s is not None else "-"
    line = f"`{engine.label}` · {engine.engine_name} · {ev.n_tokens} tokens · first token {first} · **{ev.tokens_per_s:.1f} tok/s**"
    if ev.note:
        line += f"\n\n⚠️ **Truncated:** {ev.note}"
    return line


def _history_pairs(history: list[dict]) -> list[dict[str, str]]:
    """Chatbot messages as plain role/content dicts (Gradio may add metadata or content lists)."""
    out = []
    for m in history or []:
        content = m.get("content")
        if isinstance(content, list):  # gradio 6 may return [{"type": "text", "text": ...}]
            content = "".join(c.get("text", "") for c in content if isinstance(c, dict))
        if isinstance(content, str):
            out.append({"role": m.get("role", "user"), "content": content})
    return out


def build_app(cfg: AppConfig, pool: ModelPool, winner: dict | None) -> Any:
    """The Gradio Blocks UI (not launched)."""
    import gradio as gr

    keys = list(pool.entries)
    default_key = keys[0]
    base_key = next(k for k, e in pool.entries.items() if e.kind == "base")

    def chat(message: str, history: list[dict], model_key: str, temperature: float, top_p: float,
             max_new_tokens: float, system_prompt: str) -> Iterator[tuple[list[dict], str, str]]:
        """Stream one answer into the chat history."""
        history = _history_pairs(history)
        message = (message or "").strip()
        if not message:
            yield history, "", "Type a message first."
            return
        engine = pool.get(model_key)
        settings = _settings(cfg, temperature, top_p, max_new_tokens, system_prompt)
        shown = history + [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        status = ""
        for ev in engine.stream_chat(history, message, settings):
            shown[-1]["content"] = ev.text
            status = _stats_line(ev, engine)
            yield shown, "", status
        if ev.note:
            gr.Warning(ev.note)

    def compare(message: str, key_a: str, key_b: str, temperature: float, top_p: float, max_new_tokens: float,
                system_prompt: str) -> Iterator[tuple[list[dict], str, list[dict], str]]:
        """The same prompt to two models, one after the other so each gets the whole CPU for its tok/s."""
        message = (message or "").strip()
        if not message:
            yield [], "Type a message first.", [], ""
            return
        settings = _settings(cfg, temperature, top_p, max_new_tokens, system_prompt)
        a_hist = [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        b_hist = [{"role": "user", "content": message}, {"role": "assistant", "content": "(waiting for the left model)"}]
        a_stat = b_stat = ""
        ea = pool.get(key_a)
        for ev in ea.stream_chat([], message, settings):
            a_hist[-1]["content"], a_stat = ev.text, _stats_line(ev, ea)
            yield a_hist, a_stat, b_hist, b_stat
        eb = pool.get(key_b)
        b_hist[-1]["content"] = ""
        for ev in eb.stream_chat([], message, settings):
            b_hist[-1]["content"], b_stat = ev.text, _stats_line(ev, eb)
            yield a_hist, a_stat, b_hist, b_stat

    def show_info(key: str) -> str:
        e = pool.entries[key]
        return info_markdown(e, cfg, pool._engines.get(key))

    with gr.Blocks(title="tomelab chat") as demo:
        gr.Markdown("# tomelab chat")
        gr.Markdown(banner_markdown(winner, cfg), elem_id="banner")
        with gr.Accordion("Generation settings", open=False):
            with gr.Row():
                temperature = gr.Slider(0.0, 1.5, value=cfg.temperature, step=0.05, label="temperature (0 = greedy)")
                top_p = gr.Slider(0.05, 1.0, value=cfg.top_p, step=0.05, label="top-p")
                max_new = gr.Slider(8, cfg.max_new_tokens_limit, value=cfg.max_new_tokens, step=8, label="max new tokens")
            system = gr.Textbox(value=cfg.system_prompt, label="system prompt", lines=2)
        with gr.Tab("Chat"):
            with gr.Row():
                with gr.Column(scale=3):
                    picker = gr.Dropdown(keys, value=default_key, label="model")
                    bot = gr.Chatbot(label="conversation", height=420, elem_id="chatbot")
                    with gr.Row():
                        box = gr.Textbox(placeholder="Ask something…", show_label=False, scale=5, elem_id="msg")
                        send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                    status = gr.Markdown(elem_id="status")
                    gr.Examples(cfg.examples, inputs=box)
                    clear = gr.Button("Clear conversation")
                with gr.Column(scale=2):
                    info = gr.Markdown(show_info(default_key), elem_id="info")
            inputs = [box, bot, picker, temperature, top_p, max_new, system]
            send.click(chat, inputs, [bot, box, status], api_name="chat")
            box.submit(chat, inputs, [bot, box, status], api_name=False)
            clear.click(lambda: ([], ""), None, [bot, status], api_name=False)
            picker.change(lambda k: ([], "", show_info(k)), picker, [bot, status, info], api_name=False)
        with gr.Tab("Compare"):
            with gr.Row():
                pick_a = gr.Dropdown(keys, value=default_key, label="left model")
                pick_b = gr.Dropdown(keys, value=base_key, label="right model")
            cbox = gr.Textbox(placeholder="One prompt for both models…", show_label=False)
            cbtn = gr.Button("Compare", variant="primary")
            with gr.Row():
                with gr.Column():
                    bot_a = gr.Chatbot(label="left", height=360)
                    stat_a = gr.Markdown()
                    info_a = gr.Markdown(show_info(default_key))
                with gr.Column():
                    bot_b = gr.Chatbot(label="right", height=360)
                    stat_b = gr.Markdown()
                    info_b = gr.Markdown(show_info(base_key))
            gr.Examples(cfg.examples, inputs=cbox)
            cinputs = [cbox, pick_a, pick_b, temperature, top_p, max_new, system]
            cbtn.click(compare, cinputs, [bot_a, stat_a, bot_b, stat_b], api_name="compare")
            cbox.submit(compare, cinputs, [bot_a, stat_a, bot_b, stat_b], api_name=False)
            pick_a.change(show_info, pick_a, info_a, api_name=False)
            pick_b.change(show_info, pick_b, info_b, api_name=False)
    demo.queue(default_concurrency_limit=cfg.concurrency_limit, max_size=cfg.max_queue)
    return demo


def create(cfg: AppConfig, *, preload: bool = True) -> Any:
    """Discover models, load the default one (so the first chat is fast) and build the UI."""
    entries, winner = discover_models(cfg)
    pool = ModelPool(cfg, entries)
    if preload:
        pool.get(entries[0].key)
    return build_app(cfg, pool, winner)


# --------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="app TOML (fields of AppConfig); flags override it")
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=None, help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="also create a public gradio.live link (off by default)")
    p.add_argument("--engine", choices=ENGINES, default=None,
                   help="inference runtime; auto = the fastest whose greedy output matches transformers fp32")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for generation (default: all)")
    p.add_argument("--base", default=None, help=f"base model to serve/compare (default {DEFAULT_BASE})")
    p.add_argument("--results", dest="results_dir", default=None, help="where winner.json and leaderboard.csv are")
    p.add_argument("--concurrency", dest="concurrency_limit", type=int, default=None, help="generations at once (default 2)")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=None, help="default answer length")


def config_from_args(args: argparse.Namespace) -> AppConfig:
    cfg = load_config(args.config, AppConfig) if args.config else AppConfig()
    for name in ("host", "port", "engine", "threads", "base", "results_dir", "concurrency_limit", "max_new_tokens"):
        v = getattr(args, name, None)
        if v is not None:
            setattr(cfg, name, v)
    if args.share:
        cfg.share = True
    try:
        cfg.__post_init__()
    except ValueError as e:
        raise TomelabError(f"bad flag value: {e}") from None
    return cfg


def serve(cfg: AppConfig) -> int:
    demo = create(cfg)
    log.info("serving on http://%s:%d (share=%s)", cfg.host, cfg.port, cfg.share)
    demo.launch(server_name=cfg.host, server_port=cfg.port, share=cfg.share, show_error=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    p = argparse.ArgumentParser(prog="app.py", description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return serve(config_from_args(args))
    except TomelabError as e:
        print(f"app.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
