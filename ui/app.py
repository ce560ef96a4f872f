"""The Gradio app: a header, one tab per module in ``TABS``, a footer.

A tab module has ``TITLE`` and ``build(shared)``; adding a tab is one line in
``TABS``. ``Shared`` holds the engine (all process-wide state lives there) and
what tabs exchange: the visitor's dataset reference, the browser's client id,
the latest finished run (its change refreshes run lists), and what lets one tab
open something in another: the Tabs and the Playground's ``open_example``.
Nothing here loads data or models: that happens on first use.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Callable

import gradio as gr

from data import MAX_FILE_BYTES
from engine import Engine

from . import align_tab, dataset_tab, evaluate_tab, playground_tab, train_tab
from .theme import CSS, FOOTER, HEADER, THEME

TABS = (dataset_tab, train_tab, align_tab, playground_tab, evaluate_tab)


@dataclass
class Shared:
    engine: Engine
    app: gr.Blocks
    dataset: gr.State  # per visitor: a reference {"source", "name", "sha256", "count"}; records live in the engine
    client_id: gr.BrowserState  # random id kept in localStorage: who may stop the run it started
    runs_changed: gr.State  # name of the latest finished run seen by this visitor
    tabs: gr.Tabs | None = None  # an output of gr.Tabs(selected=<title in lower case>) switches tab
    playground: tuple = ()  # the Playground's components that ``open_example`` fills, set by its build
    open_example: Callable | None = None  # (record, run name, note) -> values for ``playground``, set by its build


def ensure_client_id(current: str | None):
    return gr.skip() if current else secrets.token_hex(16)


def build_app(engine: Engine) -> gr.Blocks:
    """The app's page, every tab driving ``engine``."""
    engine.look_for_weights()
    hours = engine.limits.files_max_age_hours
    with gr.Blocks(title="Instruction fine-tuning GPT-2", delete_cache=(3600, int(hours * 3600))) as demo:
        gr.HTML(HEADER)
        dataset = gr.State(None, time_to_live=engine.limits.session_minutes * 60)
        shared = Shared(engine, demo, dataset, gr.BrowserState(None, storage_key="gpt2-instruct-client"), gr.State(None))
        demo.load(ensure_client_id, shared.client_id, shared.client_id, api_visibility="private",
                  concurrency_limit=None, show_progress="hidden")
        with gr.Tabs() as shared.tabs:
            for tab in TABS:
                with gr.Tab(tab.TITLE, id=tab.TITLE.lower(), elem_id=f"tab-{tab.TITLE.lower()}"):
                    tab.build(shared)
        gr.HTML(FOOTER)
    demo.queue(default_concurrency_limit=1)
    return demo


def launch_options() -> dict:
    """What ``launch()`` needs besides host and port: the look (Gradio 6 takes it here) and the upload cap."""
    return {"theme": THEME, "css": CSS, "max_file_size": MAX_FILE_BYTES}
