"""`tomelab chat`: serve the Gradio chat app (the same as `python app.py`)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from tomelab.errors import TomelabError

APP_FILE = Path(__file__).resolve().parent.parent / "app.py"


def load_app_module() -> ModuleType:
    """Import the top-level app.py (it lives beside the package, not inside it)."""
    if not APP_FILE.is_file():
        raise TomelabError(f"{APP_FILE} not found: `tomelab chat` runs from a source checkout (pip install -e .).")
    if "tomelab_app" in sys.modules:
        return sys.modules["tomelab_app"]
    spec = importlib.util.spec_from_file_location("tomelab_app", APP_FILE)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["tomelab_app"] = mod  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules["tomelab_app"]
        raise
    return mod


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="serve the Gradio chat app (winner vs base) on 127.0.0.1")
    # app.py imports gradio, torch and polars (the Lab) only inside its functions, so this stays fast for `--help`
    load_app_module().add_arguments(p)
    p.set_defaults(func=_chat)


def _chat(args: argparse.Namespace) -> int:
    app = load_app_module()
    return app.serve(app.config_from_args(args))
