"""The Gradio app: a header, one tab per module in ``TABS``, a footer.

A tab module has ``TITLE`` and ``build(shared)``; adding a tab is one line in
``TABS``. ``Shared`` holds the engine (all process-wide state lives there) and
what tabs exchange: the visitor's dataset reference, the browser's client id,
the latest finished run (its change refreshes run lists), and what lets one tab
open something in another: the Tabs and the Playground's ``open_example``.
A tab that follows a job polls while it is shown (``Shared.poll_while_shown``);
the first such tab (Train) polls while a tab without its own poll is shown, since
its poll tells every tab when a run has finished: an open browser costs the
server one poll a second, whichever tab it shows.
Nothing here loads data or models: that happens on first use.
"""
from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import gradio as gr

from data import MAX_FILE_BYTES
from engine import Engine

from . import align_tab, dataset_tab, evaluate_tab, playground_tab, train_tab
from .theme import CSS, FOOTER, HEADER, THEME
from .widgets import keep_or_fill

TABS = (dataset_tab, train_tab, playground_tab, evaluate_tab, align_tab)  # the book's order (DPO is its bonus material); a phone shows the first three


@dataclass
class Shared:
    engine: Engine
    app: gr.Blocks
    dataset: gr.State  # per visitor: a reference {"source", "name", "sha256", "count"}; records live in the engine
    client_id: gr.BrowserState  # random id kept in localStorage: who may stop the run it started
    runs_changed: gr.State  # {"run", "job"}: the latest finish of a run seen by this visitor (widgets.run_finished)
    open_run: gr.State  # {"run", "at"}: a button asked the Playground to open that run
    remembered: gr.BrowserState | None = None  # this browser's last dataset reference: outlives ``dataset``'s expiry
    tabs: gr.Tabs | None = None  # an output of gr.Tabs(selected=<title in lower case>) switches tab
    playground: tuple = ()  # the Playground's components that ``open_example`` fills, set by its build
    prompt_view: tuple = ()  # the Dataset tab's (mask box, prompt format), which the Train tab's follow and lead
    open_example: Callable | None = None  # (record, run name, note) -> values for ``playground``, set by its build
    tab: gr.Tab | None = None  # the tab being built
    timers: dict = field(default_factory=dict)  # tab id -> its polling gr.Timer; one is active at a time

    def poll_while_shown(self, fn: Callable, inputs: list, outputs: list, **options) -> None:
        """Run ``fn`` on page load, when the tab being built is opened, and every ``POLL_SECONDS`` while it is
        shown (the first tab to ask: also while a tab that does not poll is shown, as the page opens on one)."""
        timer = gr.Timer(POLL_SECONDS, active=not self.timers)
        self.timers[self.tab.id] = timer
        quiet = dict(api_visibility="private", concurrency_limit=None, show_progress="hidden")
        timer.tick(fn, inputs, outputs, **{**quiet, **options})
        for trigger in (self.app.load, self.tab.select):
            trigger(fn, inputs, outputs, **quiet)

    def relist_when_shown(self, picker: gr.Dropdown, choices: Callable[[], list], fill: Callable, inputs: list,
                          outputs: list) -> None:
        """Opening the tab being built lists the runs in ``picker`` as they are now (``choices()``): since the page
        loaded, runs may have finished or been deleted by the server's runs budget. Only the list changes, not the
        choice nor what it shows; with no run picked (or the picked one gone), ``fill(*inputs)`` gives ``picker`` and
        ``outputs`` afresh (a run that has finished since, or the note that one is training now). (Not when the picker
        itself is opened: Gradio redraws a list that is open badly.)"""
        def shown(current, *values):
            return keep_or_fill(choices(), current, lambda: fill(*values), len(outputs))

        self.tab.select(shown, [picker, *inputs], [picker, *outputs], api_visibility="private",
                        concurrency_limit=None, show_progress="hidden")


POLL_SECONDS = 1.0
# Gradio summarises its log of events with pandas after every event, by default over the last 10,000:
# ~2 ms of every poll on a fresh server and more as the log fills. Once per 1,000 events is enough.
GRADIO_ENV = {"GRADIO_ANALYTICS_CACHE_FREQUENCY": "1000", "GRADIO_ANALYTICS_MAX_EVENTS": "1000"}


def shown_timers(shown: str, ids: list[str]) -> tuple:
    polling = shown if shown in ids else ids[0]
    return tuple(gr.Timer(active=tab_id == polling) for tab_id in ids)


def ensure_client_id(current: str | None):
    return gr.skip() if current else secrets.token_hex(16)


def build_app(engine: Engine) -> gr.Blocks:
    """The app's page, every tab driving ``engine``."""
    for name, value in GRADIO_ENV.items():
        os.environ.setdefault(name, value)  # read when the queue is made, below
    engine.look_for_weights()
    hours = engine.limits.files_max_age_hours
    with gr.Blocks(title="Instruction fine-tuning GPT-2", delete_cache=(3600, int(hours * 3600))) as demo:
        gr.HTML(HEADER)
        dataset = gr.State(None, time_to_live=engine.limits.session_minutes * 60)
        shared = Shared(engine, demo, dataset, gr.BrowserState(None, storage_key="gpt2-instruct-client"), gr.State(None),
                        gr.State(None))
        demo.load(ensure_client_id, shared.client_id, shared.client_id, api_visibility="private",
                  concurrency_limit=None, show_progress="hidden")
        # On a phone the five tabs wrap onto a second line instead of hiding the Playground behind a "..." menu.
        with gr.Tabs(overflow_behavior="wrap") as shared.tabs:
            tabs = []
            for tab in TABS:
                with gr.Tab(tab.TITLE, id=tab.TITLE.lower(), elem_id=f"tab-{tab.TITLE.lower()}") as shared.tab:
                    tab.build(shared)
                tabs.append(shared.tab)
        ids = list(shared.timers)
        for tab in tabs:
            tab.select(partial(shown_timers, tab.id, ids), None, [shared.timers[i] for i in ids], api_visibility="private",
                       concurrency_limit=None, show_progress="hidden")
        gr.HTML(FOOTER)
    demo.queue(default_concurrency_limit=1)
    return demo


def launch_options() -> dict:
    """What ``launch()`` needs besides host and port: the look (Gradio 6 takes it here) and the upload cap. Gradio's
    run history stays off: it would keep every call's inputs in the browser's storage, the Hub token and the judge's
    API key among them (their boxes promise they are never saved), and its footer link "Runs" is not the app's runs."""
    return {"theme": THEME, "css": CSS, "max_file_size": MAX_FILE_BYTES, "run_history": False}
