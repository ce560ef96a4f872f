"""The look: one theme, one stylesheet, the header and the footer. Passed to ``launch()`` (Gradio 6)."""
from __future__ import annotations

import gradio as gr

TRAIN_COLOR = "#4f46e5"
VAL_COLOR = "#ea580c"
PROMPT_COLOR = "#64748b"
RESPONSE_COLOR = "#4f46e5"
BASE_COLOR = "#94a3b8"
TUNED_COLOR = "#4f46e5"
ALIGNED_COLOR = "#059669"
MARGIN_COLOR = "#059669"
INK = "#64748b"  # the charts' text, and marks that are no series: readable on the light and the dark theme
GRID = "rgba(148, 163, 184, .25)"

THEME = gr.themes.Soft(
    primary_hue="indigo",
    secondary_hue="orange",
    neutral_hue="slate",
    font=("Inter", "ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "sans-serif"),
    font_mono=("JetBrains Mono", "ui-monospace", "SFMono-Regular", "Menlo", "monospace"),
)

def notice(text: str, kind: str = "info") -> str:
    """A message box: ``kind`` is "info", "ok" or "error"; ``text`` is HTML (escape user text first)."""
    return f'<div class="gi-notice {kind}">{text}</div>' if text else ""


HEADER = """
<div class="gi-header">
  <h1>Instruction fine-tuning GPT-2</h1>
  <p>Browse instruction–response pairs (the book's chapter 7 dataset, a bundled sample, or your own file),
  fine-tune GPT-2 on them while the loss draws itself, then ask the base model and the fine-tuned one
  the same question and compare their answers side by side.</p>
</div>
"""

FOOTER = """
<div class="gi-footer">
  Built on chapter 7 of Sebastian Raschka's <a href="https://github.com/rasbt/LLMs-from-scratch" target="_blank">
  <i>Build a Large Language Model (From Scratch)</i></a> (Manning, 2024).
  Instruction dataset from the book's repository, Apache-2.0 license. GPT-2 weights by OpenAI, MIT license.
</div>
"""

CSS = """
.gi-header { padding: 8px 4px 4px; }
.gi-header h1 { font-size: 1.6rem; font-weight: 700; margin: 0 0 4px; }
.gi-header p { color: var(--body-text-color-subdued); margin: 0; max-width: 62rem; line-height: 1.5; }
.gi-footer { color: var(--body-text-color-subdued); font-size: 0.85rem; text-align: center; padding: 16px 0 4px; }
.gi-footer a { color: inherit; }

.gi-notice { padding: 10px 14px; border-radius: 8px; line-height: 1.45; overflow-wrap: anywhere; }
.gi-notice.error { background: #fef2f2; color: #991b1b; border: 1px solid #fecaca; }
.gi-notice.info { background: var(--background-fill-secondary); color: var(--body-text-color-subdued);
                  border: 1px solid var(--border-color-primary); }
.gi-notice.ok { background: #f0fdf4; color: #166534; border: 1px solid #bbf7d0; }
.gi-notice b { font-weight: 600; }
.gi-notice .gi-more { margin-top: 4px; color: inherit; }
.gi-notice .gi-more summary { cursor: pointer; color: var(--color-accent); }

.gi-stat-row { display: flex; flex-wrap: wrap; gap: 10px; margin: 4px 0; }
.gi-stat { flex: 1 1 90px; padding: 10px 12px; border-radius: 8px; background: var(--background-fill-secondary);
        border: 1px solid var(--border-color-primary); }
.gi-stat .value { font-size: 1.35rem; font-weight: 700; font-variant-numeric: tabular-nums; }
.gi-stat .label { font-size: 0.8rem; color: var(--body-text-color-subdued); text-transform: uppercase; letter-spacing: .04em; }

.gi-meta { display: flex; flex-wrap: wrap; gap: 8px; align-items: center; margin-bottom: 8px; font-size: .9rem; }
.gi-pill { padding: 2px 10px; border-radius: 999px; background: var(--background-fill-secondary);
        border: 1px solid var(--border-color-primary); font-variant-numeric: tabular-nums; }
.gi-pill.train { background: #eef2ff; border-color: #c7d2fe; color: #3730a3; }
.gi-pill.val { background: #fff7ed; border-color: #fed7aa; color: #9a3412; }
.gi-pill.test { background: #f0fdf4; border-color: #bbf7d0; color: #166534; }
.gi-tokens { font-family: var(--font-mono); font-size: .85rem; line-height: 1.9; white-space: pre-wrap;
          word-break: break-word; padding: 12px; border-radius: 8px; border: 1px solid var(--border-color-primary);
          max-height: 420px; overflow-y: auto; }
.gi-tok { border-radius: 3px; padding: 1px 0; }
.gi-tok.trained { background: rgba(79, 70, 229, .16); color: #312e81; }
.gi-tok.trained.alt { background: rgba(79, 70, 229, .28); }
.gi-tok.masked { background: rgba(100, 116, 139, .10); color: #64748b; }
.gi-tok.masked.alt { background: rgba(100, 116, 139, .20); }
.gi-swatch { display: inline-block; width: 12px; height: 12px; border-radius: 3px; vertical-align: -1px; margin-right: 4px; }

.gi-progress { padding: 4px 0; }
.gi-track { height: 10px; border-radius: 999px; background: var(--background-fill-secondary);
                  border: 1px solid var(--border-color-primary); overflow: hidden; }
.gi-fill { height: 100%; background: linear-gradient(90deg, #6366f1, #4f46e5); transition: width .6s ease; }
.gi-fill.download { background: linear-gradient(90deg, #fb923c, #ea580c); }
.gi-progress-meta { display: flex; flex-wrap: wrap; gap: 6px 16px; margin-top: 6px; font-size: .88rem;
                 color: var(--body-text-color-subdued); font-variant-numeric: tabular-nums; }
.gi-progress-meta b { color: var(--body-text-color); font-weight: 600; }
.gi-status { font-weight: 600; text-transform: capitalize; }
.gi-status.training, .gi-status.evaluating, .gi-status.reference { color: #4f46e5; }
.gi-status.done { color: #15803d; }
.gi-status.failed { color: #b91c1c; }
.gi-status.stopped, .gi-status.stopping { color: #c2410c; }

.gi-sample { border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 12px 14px; overflow-wrap: anywhere; }
.gi-sample .instruction { font-weight: 600; margin-bottom: 8px; white-space: pre-wrap; max-height: 240px; overflow-y: auto; }
.gi-sample .response { white-space: pre-wrap; margin: 6px 0; max-height: 240px; overflow-y: auto; }
.gi-caption { font-size: .78rem; color: var(--body-text-color-subdued); font-variant-numeric: tabular-nums; margin-top: 4px; }
.gi-sample .gi-older { opacity: .6; font-size: .9rem; }
.gi-sample .gi-older-list { max-height: 180px; overflow-y: auto; }

.gi-diff { white-space: pre-wrap; overflow-wrap: anywhere; line-height: 1.6; padding: 12px; border-radius: 8px;
        border: 1px solid var(--border-color-primary); }
.gi-legend { margin-bottom: 6px; }
.gi-diff del, .gi-legend del { background: #fee2e2; color: #991b1b; text-decoration: line-through; border-radius: 3px; }
.gi-diff ins, .gi-legend ins { background: #dcfce7; color: #166534; text-decoration: none; border-radius: 3px; }
.gi-ref { border-left: 3px solid #16a34a; padding: 6px 12px; white-space: pre-wrap; overflow-wrap: anywhere; }
#base-output textarea, #tuned-output textarea { font-size: .95rem; line-height: 1.5; }

.gi-eval { width: 100%; border-collapse: collapse; margin: 6px 0 10px; font-variant-numeric: tabular-nums; border: 0 !important; }
.gi-eval tr { border: 0 !important; }
.gi-eval th, .gi-eval td { padding: 6px 10px !important; border: 0 !important; text-align: right;
                           border-bottom: 1px solid var(--border-color-primary) !important; background: none !important; }
.gi-eval th:first-child, .gi-eval td.gi-caption { text-align: left; font-weight: 400; }
.gi-eval tr:first-child th { font-weight: 600; }
.gi-limits { margin: 0; }
.gi-limits dt { margin-top: 8px; overflow-wrap: anywhere; }
.gi-limits dd { margin: 2px 0 0; color: var(--body-text-color-subdued); font-size: .9em; }
/* On a phone the scores keep their notes: closer cells, the notes wrap, and what is still too wide scrolls sideways. */
.gi-scroll { overflow-x: auto; }
@media (max-width: 600px) {
  .gi-stack-phone { flex-direction: column !important; }
  .gi-stack-phone > * { width: 100% !important; }
  .gi-eval th, .gi-eval td { padding: 5px 6px !important; }
  .gi-eval td.gi-caption { white-space: normal; min-width: 5em; }
}
/* The records tables' columns are shares of the table's width: on a phone the table keeps 860 px and scrolls sideways,
   rather than squeezing its text to a word a line. */
#dataset-table .table-container, #pref-table .table-container { overflow-x: auto; }
#dataset-table .table-wrap, #pref-table .table-wrap { min-width: 860px; }
#export-file .empty { min-height: 64px !important; height: 64px; }

/* One selector per .dark rule: Gradio scopes CSS by prefixing each selector and moves .dark before the first one only. */
.dark .gi-notice.error { background: #450a0a; color: #fecaca; border-color: #7f1d1d; }
.dark .gi-notice.ok { background: #052e16; color: #bbf7d0; border-color: #14532d; }
.dark .gi-pill.train { background: transparent; color: inherit; }
.dark .gi-pill.val { background: transparent; color: inherit; }
.dark .gi-pill.test { background: transparent; color: inherit; }
.dark .gi-tok.trained { color: #c7d2fe; }
.dark .gi-tok.masked { color: #94a3b8; }
.dark .gi-diff del { background: #7f1d1d; color: #fecaca; }
.dark .gi-legend del { background: #7f1d1d; color: #fecaca; }
.dark .gi-diff ins { background: #14532d; color: #bbf7d0; }
.dark .gi-legend ins { background: #14532d; color: #bbf7d0; }
"""
