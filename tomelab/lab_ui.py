"""The Lab tab's Gradio layout over `tomelab.lab` (call `build_lab` inside a `gr.Blocks`)."""

# no `from __future__ import annotations`: Gradio reads `gr.SelectData` from the live annotation
from pathlib import Path
from typing import Any

from tomelab import lab
from tomelab.serving import display_path


def _image(path: str) -> Any:
    """A PNG as a PIL image: Gradio then serves its own copy, wherever the artefact lives."""
    from PIL import Image

    with Image.open(path) as im:
        return im.copy()


def build_lab(results_dirs: list[Path], default: Path | None, cards: list[Path]) -> tuple[Any, list, list]:
    """Lay the Lab tab out; returns (fn, inputs, outputs) for the app's `demo.load` that fills it."""
    import gradio as gr

    by_name = {display_path(d): d for d in results_dirs}
    if default is not None:
        by_name = {display_path(default): default, **by_name}
    choices = list(by_name)

    def rdir(name: str | None) -> Path | None:
        return by_name.get(name or "")

    def variant_choices(name: str | None) -> list[str]:
        return lab.variants(rdir(name), cards)

    first = choices[0] if choices else None
    vnames = variant_choices(first)

    with gr.Tab("Lab", elem_id="lab"):
        gr.Markdown("Why the winner won, read from the artefacts (nothing is recomputed here).")
        folder = gr.Dropdown(choices, value=first, label="results folder (one ablation)", elem_id="lab-results")
        with gr.Tabs():
            with gr.Tab("Leaderboard", elem_id="lab-leaderboard"):
                rule = gr.Markdown(elem_id="lab-rule")
                table = gr.Dataframe(label="leaderboard.csv: every row, with CIs (and MDE when reported)",
                                     interactive=False, wrap=True, elem_id="lab-table", max_height=420)
                summary = gr.Markdown(elem_id="lab-summary")
                gallery = gr.Gallery(label="plots", columns=2, height=480, object_fit="contain", format="png",
                                     elem_id="lab-plots")
            with gr.Tab("Data", elem_id="lab-data"):
                dvar = gr.Dropdown(vnames, value=vnames[0] if vnames else None, label="variant", elem_id="lab-data-variant")
                funnel = gr.Image(label="funnel", type="pil", format="png", interactive=False, height=300,
                                  elem_id="lab-funnel")
                card_md = gr.Markdown(elem_id="lab-card")
            with gr.Tab("Rows", elem_id="lab-rows"):
                with gr.Row():
                    rvar = gr.Dropdown(vnames, value=vnames[0] if vnames else None, label="variant", elem_id="lab-rows-variant")
                    which = gr.Radio(["kept", "dropped"], value="kept", label="rows", elem_id="lab-rows-which")
                    reason = gr.Dropdown([], value=None, label="dropped by (reason, stage: rows)", allow_custom_value=True,
                                         elem_id="lab-rows-reason")
                with gr.Row():
                    search = gr.Textbox(label="search (text, id, stage, reason, detail)", scale=4, elem_id="lab-rows-search")
                    page = gr.Number(value=1, minimum=1, precision=0, label="page", scale=1, elem_id="lab-rows-page")
                    go = gr.Button("Show", scale=1, elem_id="lab-rows-go")
                note = gr.Markdown(elem_id="lab-rows-note")
                detail = gr.Markdown(elem_id="lab-rows-detail")
                rows = gr.Dataframe(interactive=False, wrap=True, elem_id="lab-rows-table", max_height=520)
            with gr.Tab("Side by side", elem_id="lab-side"):
                with gr.Row():
                    a = gr.Dropdown(vnames, value=vnames[0] if vnames else None, label="left variant", elem_id="lab-side-a")
                    b = gr.Dropdown(vnames, value=vnames[1] if len(vnames) > 1 else None, label="right variant", elem_id="lab-side-b")
                    src = gr.Dropdown([], value=None, label="source", allow_custom_value=True, elem_id="lab-side-source")
                side_note = gr.Markdown(elem_id="lab-side-note")
                with gr.Row():
                    left = gr.Dataframe(interactive=False, wrap=True, label="left", elem_id="lab-side-left")
                    right = gr.Dataframe(interactive=False, wrap=True, label="right", elem_id="lab-side-right")
            with gr.Tab("Review", elem_id="lab-review"):
                review = gr.Markdown(elem_id="lab-review-md")
                check = gr.Button("Check the Argilla server again")

    def show_folder(name: str | None) -> tuple[Any, ...]:
        d = rdir(name)
        if d is None:
            return "_No results folder found: run `make demo`._", None, "", [], *([gr.update()] * 4)
        vs = variant_choices(name)
        upd = gr.update(choices=vs)
        return (lab.winner_markdown(d), lab.leaderboard(d), lab.leaderboard_md(d),
                [(_image(p), cap) for p, cap in lab.plots(d)], upd, upd, upd, upd)

    def show_card(name: str | None) -> tuple[str, Any]:
        body, png = lab.card(name, cards)
        return body, _image(png) if png else None

    def show_rows(name: str | None, kind: str, why: str | None, text: str, pg: float | None) -> tuple[Any, str, Any, str]:
        """A page of kept or dropped rows; picking a drop reason switches to the dropped rows."""
        if kind == "dropped" or why:
            df, msg = lab.dropped_rows(name, why or "", text or "", int(pg or 1))
            return df, msg, gr.update(value="dropped"), ""
        df, msg = lab.kept_rows(name, text or "", "", int(pg or 1))
        return df, msg, gr.update(value="kept"), ""

    def pick_variant(name: str | None) -> Any:
        return gr.update(choices=[""] + lab.drop_reasons(name), value="")

    def pick_row(name: str | None, evt: gr.SelectData) -> str:
        row = evt.row_value if evt is not None else None
        return lab.row_markdown(name, str(row[0])) if row else ""

    def sources_for(va: str | None, vb: str | None) -> Any:
        return gr.update(choices=[""] + lab.sources([v for v in (va, vb) if v]), value="")

    def show_side(va: str | None, vb: str | None, source: str | None) -> tuple[Any, Any, str]:
        l_df, r_df, msg = lab.side_by_side(va, vb, source or "")
        return (gr.update(value=l_df, label=f"{va or '-'}"), gr.update(value=r_df, label=f"{vb or '-'}"), msg)

    folder_out = [rule, table, summary, gallery, dvar, rvar, a, b]
    folder.change(show_folder, folder, folder_out, api_name=False)
    gr.on([dvar.change], show_card, dvar, [card_md, funnel], api_name=False)
    rows_in = [rvar, which, reason, search, page]
    rvar.change(pick_variant, rvar, reason, api_name=False)
    gr.on([go.click, search.submit, which.input, reason.change, rvar.change, page.submit], show_rows, rows_in,
          [rows, note, which, detail], api_name=False)
    rows.select(pick_row, rvar, detail, api_name=False)
    gr.on([a.change, b.change], sources_for, [a, b], src, api_name=False)
    gr.on([a.change, b.change, src.change], show_side, [a, b, src], [left, right, side_note], api_name=False)
    check.click(lambda: lab.review_markdown(), None, review, api_name=False)

    def initial(name: str | None, dv: str | None, va: str | None, vb: str | None, rv: str | None) -> tuple[Any, ...]:
        """Every view filled once the page loads (reads files: fast, and not in the HTML the server sends)."""
        f = show_folder(name)
        return (*f[:4], *show_card(dv), *show_rows(rv, "kept", "", "", 1)[:2], pick_variant(rv), *show_side(va, vb, ""),
                sources_for(va, vb), lab.review_markdown())

    return initial, [folder, dvar, a, b, rvar], [rule, table, summary, gallery, card_md, funnel, rows, note, reason,
                                                 left, right, side_note, src, review]
