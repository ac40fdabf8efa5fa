"""Gradio chat serving the ablation's winner on CPU, side by side with the base model, and the Lab.

`python app.py --results DIR` serves the winner of that results folder; `python app.py` offers every
winner under results/ and the artefact home's results/, newest first. It binds 127.0.0.1 and serves:
* Chat: stream an answer from the picked model (a winner by default, else the base model, with a
  banner giving the true reason), keeping the conversation in the model's chat template;
* Compare: one prompt, two models (winner vs base by default), each with its tokens/s;
* Lab: the leaderboard, data cards, kept and dropped rows, two variants side by side, the review link
  (`tomelab.lab_ui`), all read from the artefacts.
The page is up at once: the served model loads on transformers in a background thread while faster
engines are converted and checked (progress in the info panel), then swapped in.
Requests go through Gradio's queue with a concurrency limit; over-long conversations are cut
to fit the context with a visible note (see `tomelab.engines.chat.fit_prompt`). Up to `--slots`
requests reach a llama.cpp engine together (the queue lets at least that many through) and are
decoded in its parallel slots; flags are generated from `AppConfig` (`tomelab.cli_flags`).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tomelab.cli_flags import add_dataclass_args, dataclass_overrides, option
from tomelab.config import load_config
from tomelab.engines.chat import DEFAULT_SYSTEM_PROMPT, ChatEngine, GenerationSettings, StreamEvent, default_threads
from tomelab.engines.choice import AUTO_ORDER
from tomelab.engines.pool import EnginePool
from tomelab.errors import TomelabError
from tomelab.serving import (
    ModelEntry,
    Winner,
    banner,
    cards_dirs,
    default_roots,
    discover_winners,
    display_path,
    find_results_dirs,
    load_winner,
    model_entries,
    resolve_results_dir,
)

log = logging.getLogger("tomelab.app")

DEFAULT_BASE = "smollm2-135m-instruct"
ENGINES = ("auto", "transformers", *AUTO_ORDER)  # tomelab.engines.choice.load_engine's choices
EXAMPLES = (
    "What is the capital of France?",
    "Give me three tips for a good night's sleep.",
    "Write a haiku about autumn.",
    "Explain photosynthesis to a ten-year-old.",
)


@dataclass
class AppConfig:
    """Serving settings: the fields of an app TOML (`--config`), each also a flag (`tomelab.cli_flags`)."""

    host: str = option("127.0.0.1", "bind address (127.0.0.1: this machine only)")
    port: int = option(7860, "port")
    share: bool = option(False, "also create a public gradio.live link (off unless asked)")
    engine: str = option("auto", "inference runtime; auto = the fastest that passes its check (greedy match with "
                         "transformers fp32; the quality guard for quantised GGUFs)", choices=ENGINES)
    threads: int = option(0, "CPU threads for generation (0: all cores this process may use)")
    slots: int = option(4, "requests one model's llama.cpp engine decodes together (parallel slots, continuous batching)")
    replicas: int = option(0, "llama.cpp servers per model, one thread each, sharing the slots and the requests "
                           "(0: one per core; 1: one server with --threads)")
    base: str = option(DEFAULT_BASE, "base model served when there is no winner, and the compare partner")
    results_dir: str = option("", "serve the winner of this results folder (winner.json, leaderboard.csv; `home:x` "
                              "allowed); default: offer every winner under results/ and the artefact home's results/",
                              flag="--results")
    data_cards_dir: str = option("data_cards", "folder of the data cards shown in the info panel and the Lab")
    concurrency_limit: int = option(0, "generations running at once, the rest wait in the queue "
                                    "(0: as many as --slots, so concurrent chats are batched)", flag="--concurrency")
    max_queue: int = option(64, "requests waiting beyond that are refused with 'queue full'")
    max_loaded_models: int = option(3, "models kept loaded at once")
    context_length: int = option(2048, "context window of one request, in tokens")
    temperature: float = option(0.7, "temperature the page starts with (0 = greedy)")
    top_p: float = option(0.9, "top-p the page starts with")
    max_new_tokens: int = option(256, "answer length (new tokens) the page starts with")
    max_new_tokens_limit: int = option(1024, "longest answer the page allows")
    system_prompt: str = option(DEFAULT_SYSTEM_PROMPT, "system prompt the page starts with")
    examples: list[str] = option(default_factory=lambda: list(EXAMPLES), cli=False)

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.concurrency_limit < 0 or self.max_queue < 1 or self.slots < 1 or self.replicas < 0:
            raise ValueError("slots and max_queue must be >= 1, concurrency_limit and replicas >= 0 (0: as many as "
                             "slots / one replica per core)")
        if self.engine != "transformers" and 0 < self.concurrency_limit < self.slots:
            raise ValueError(f"concurrency_limit {self.concurrency_limit} < slots {self.slots}: llama.cpp's slots would "
                             "never all be used; raise it (0 = as many as slots) or lower slots")

    @property
    def queue_concurrency(self) -> int:
        """Generations Gradio's queue runs at once: at least `slots`, so they reach llama.cpp together."""
        return self.concurrency_limit or self.slots


# --------------------------------------------------------------------------- discovery (tomelab.serving)


def discover(cfg: AppConfig) -> tuple[list[ModelEntry], list[Winner], Path | None]:
    """(picker entries, winners found, the explicit results folder or None).

    `--results DIR` serves DIR's winner; without it every winner under results/ and the artefact
    home's results/ is offered, newest first. The first entry is what the page serves."""
    explicit = resolve_results_dir(cfg.results_dir) if cfg.results_dir else None
    winners = [load_winner(explicit)] if explicit is not None else discover_winners(default_roots())
    return model_entries(winners, cfg.base), winners, explicit


def info_markdown(entry: ModelEntry, cfg: AppConfig, cards: list[Path]) -> str:
    """The info panel: what the model is, its leaderboard scores with CIs, its data card."""
    from tomelab import lab  # polars: imported here so `tomelab --help` (which loads this file) stays fast

    parts = [f"**{entry.key}**", f"- loads from: `{display_path(entry.ref)}`"]
    if entry.kind == "base":
        parts.append("- base model, not fine-tuned by tomelab")
    else:
        parts.append(f"- variant `{entry.variant}`, base `{entry.base}`, seed {entry.seed}")
    system = lab.BASE_ROW if entry.kind == "base" else entry.leaderboard_system  # a sweep's row is its arm
    rows = lab.leaderboard_rows(entry.results_dir, system)
    if rows and entry.results_dir is not None:
        parts.append(f"\n**Leaderboard** (`{display_path(entry.results_dir / 'leaderboard.csv')}`, row `{system}`; "
                     "the CI is over items and seeds)\n")
        parts.append(lab.rows_markdown(rows))
    elif entry.metrics:
        flat = {k: v for k, v in entry.metrics.items() if isinstance(v, (int, float, str))}
        if flat:
            parts.append("\n**Metrics** " + ", ".join(f"{k}={v}" for k, v in list(flat.items())[:8]))
    if entry.variant:
        body, _ = lab.card(entry.variant, cards)
        lines = body.splitlines()
        parts.append("\n**Data card** (excerpt; the whole card is in Lab → Data)\n\n" + "\n".join(lines[:16]).strip())
    return "\n".join(parts)


# --------------------------------------------------------------------------- serving


class ModelPool(EnginePool):
    """`EnginePool` with the app's settings: engine, threads, context length, models kept loaded."""

    def __init__(self, cfg: AppConfig, entries: list[ModelEntry]):
        super().__init__(entries, engine=cfg.engine, threads=cfg.threads or None, context_length=cfg.context_length,
                         max_loaded=cfg.max_loaded_models, engine_slots=cfg.slots,
                         engine_replicas=min(cfg.replicas or default_threads(), cfg.slots))


def _settings(cfg: AppConfig, temperature: float, top_p: float, max_new_tokens: float, system_prompt: str) -> GenerationSettings:
    return GenerationSettings(
        temperature=float(temperature), top_p=float(top_p),
        max_new_tokens=max(1, min(int(max_new_tokens), cfg.max_new_tokens_limit)),
        system_prompt=system_prompt if system_prompt is not None else cfg.system_prompt,
    )


def _stats_line(ev: StreamEvent, engine: ChatEngine) -> str:
    first = f"{ev.first_token_s:.2f}s" if ev.first_token_s is not None else "-"
    line = f"`{engine.label}` · {engine.engine_name} · {ev.n_tokens} tokens · first token {first} · **{ev.tokens_per_s:.1f} tok/s**"
    if ev.done:
        line += f" · done ({ev.finish_reason or 'stop'})"
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


def build_app(cfg: AppConfig, pool: ModelPool, banner_md: str, results_dirs: list[Path], lab_default: Path | None) -> Any:
    """The Gradio Blocks UI (not launched): Chat, Compare and the Lab."""
    import gradio as gr

    from tomelab.lab_ui import build_lab

    keys = list(pool.entries)
    default_key = keys[0]
    base_key = next(k for k, e in pool.entries.items() if e.kind == "base")
    cards = cards_dirs(cfg.data_cards_dir)

    def engine_for(key: str) -> Iterator[ChatEngine | None]:
        """None while the model loads (the caller shows that), then its engine."""
        slot = pool.start(key)
        if not slot.ready.is_set():
            yield None
        yield pool.get(key)

    def chat(message: str, history: list[dict], model_key: str, temperature: float, top_p: float,
             max_new_tokens: float, system_prompt: str) -> Iterator[tuple[list[dict], str, str]]:
        """Stream one answer into the chat history."""
        history = _history_pairs(history)
        message = (message or "").strip()
        if not message:
            yield history, "", "Type a message first."
            return
        settings = _settings(cfg, temperature, top_p, max_new_tokens, system_prompt)
        shown = history + [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        for engine in engine_for(model_key):
            if engine is None:
                yield shown, "", f"Loading `{model_key}`… (progress in the info panel)"
        status, ev = "", None
        for ev in engine.stream_chat(history, message, settings):
            shown[-1]["content"] = ev.text
            status = _stats_line(ev, engine)
            yield shown, "", status
        if ev is not None and ev.note:
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
        pool.start(key_b)  # load the right one while the left one answers
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
        slot = pool.start(key)
        return slot.markdown() + "\n\n" + info_markdown(pool.entries[key], cfg, cards)

    def tick(k: str, ka: str, kb: str) -> tuple[str, str, str, Any]:
        """Refresh the info panels while engines load or are checked; stop once all are settled."""
        return show_info(k), show_info(ka), show_info(kb), gr.Timer(active=pool.busy())

    with gr.Blocks(title="tomelab chat") as demo:
        gr.Markdown("# tomelab chat")
        gr.Markdown(banner_md, elem_id="banner")
        with gr.Accordion("Generation settings", open=False):
            with gr.Row():
                temperature = gr.Slider(0.0, 1.5, value=cfg.temperature, step=0.05, label="temperature (0 = greedy)")
                top_p = gr.Slider(0.05, 1.0, value=cfg.top_p, step=0.05, label="top-p")
                max_new = gr.Slider(8, cfg.max_new_tokens_limit, value=cfg.max_new_tokens, step=8, label="max new tokens")
            system = gr.Textbox(value=cfg.system_prompt, label="system prompt", lines=2)
        timer = gr.Timer(1.0, active=True)
        with gr.Tab("Chat", elem_id="chat-tab"):
            with gr.Row():
                with gr.Column(scale=3):
                    picker = gr.Dropdown(keys, value=default_key, label="model", elem_id="picker")
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
            picker.change(lambda k: ([], "", show_info(k), gr.Timer(active=True)), picker, [bot, status, info, timer],
                          api_name=False)
        with gr.Tab("Compare", elem_id="compare-tab"):
            with gr.Row():
                pick_a = gr.Dropdown(keys, value=default_key, label="left model")
                pick_b = gr.Dropdown(keys, value=base_key, label="right model")
            cbox = gr.Textbox(placeholder="One prompt for both models…", show_label=False)
            cbtn = gr.Button("Compare", variant="primary")
            with gr.Row():
                with gr.Column():
                    bot_a = gr.Chatbot(label="left", height=360)
                    stat_a = gr.Markdown()
                    info_a = gr.Markdown()
                with gr.Column():
                    bot_b = gr.Chatbot(label="right", height=360)
                    stat_b = gr.Markdown()
                    info_b = gr.Markdown()
            gr.Examples(cfg.examples, inputs=cbox)
            cinputs = [cbox, pick_a, pick_b, temperature, top_p, max_new, system]
            cbtn.click(compare, cinputs, [bot_a, stat_a, bot_b, stat_b], api_name="compare")
            cbox.submit(compare, cinputs, [bot_a, stat_a, bot_b, stat_b], api_name=False)
            pick_a.change(lambda k: (show_info(k), gr.Timer(active=True)), pick_a, [info_a, timer], api_name=False)
            pick_b.change(lambda k: (show_info(k), gr.Timer(active=True)), pick_b, [info_b, timer], api_name=False)
        fill_lab, lab_in, lab_out = build_lab(results_dirs, lab_default, cards)
        # the info panels poll outside the queue's concurrency limit, so a long generation never delays them
        timer.tick(tick, [picker, pick_a, pick_b], [info, info_a, info_b, timer], api_name=False,
                   concurrency_limit=None, show_progress="hidden")
        demo.load(fill_lab, lab_in, lab_out, api_name=False, concurrency_limit=None)
    demo.queue(default_concurrency_limit=cfg.queue_concurrency, max_size=cfg.max_queue)
    return demo


def create(cfg: AppConfig, *, preload: bool = True) -> Any:
    """Discover winners and models, start loading the served one (in the background) and build the UI."""
    entries, winners, explicit = discover(cfg)
    pool = ModelPool(cfg, entries)
    if preload:
        pool.start(entries[0].key)
    results_dirs = find_results_dirs(default_roots())
    served = entries[0].winner.results_dir if entries[0].winner is not None else None
    lab_default = explicit or served or (winners[0].results_dir if winners else None)
    demo = build_app(cfg, pool, banner(winners, entries[0], explicit), results_dirs, lab_default)
    demo.tomelab_pool = pool  # for tests and the CLI: what is served, and how far loading got
    return demo


# --------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="app TOML (fields of AppConfig); flags override it")
    add_dataclass_args(p, AppConfig)


def config_from_args(args: argparse.Namespace) -> AppConfig:
    cfg = load_config(args.config, AppConfig) if args.config else AppConfig()
    try:
        return dataclasses.replace(cfg, **dataclass_overrides(args, AppConfig))
    except ValueError as e:
        raise TomelabError(f"bad flag value: {e}") from None


def serve(cfg: AppConfig) -> int:
    demo = create(cfg, preload=False)
    log.info("serving on http://%s:%d (share=%s)", cfg.host, cfg.port, cfg.share)
    kw = {}
    if "_frontend" in inspect.signature(demo.launch).parameters:
        # Gradio's start-up probe of its own page gives up after one 3 s timeout and then refuses to
        # start: on a busy machine (training on every core) that kills a server that works fine
        kw["_frontend"] = False
    demo.launch(server_name=cfg.host, server_port=cfg.port, share=cfg.share, show_error=True, prevent_thread_lock=True, **kw)
    # the model loads (in the background) once the server is up, so the page comes first
    demo.tomelab_pool.start(next(iter(demo.tomelab_pool.entries)))
    demo.block_thread()
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
