"""Plotly figures: the live loss chart, the token-length histogram, base against fine-tuned. Plain data in, figures out."""
from __future__ import annotations

import json
import statistics

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .theme import ALIGNED_COLOR, BASE_COLOR, GRID, INK, MARGIN_COLOR, PROMPT_COLOR, RESPONSE_COLOR, TRAIN_COLOR, TUNED_COLOR, VAL_COLOR

OVERLAY_COLORS = ("#0891b2", "#9333ea", "#65a30d", "#db2777", "#ca8a04", "#475569")
HOVER = "step %{customdata[0]} · epoch %{customdata[1]:.2f}<br>%{x:,} tokens<br>%{fullData.name}: %{y:.3f}<extra></extra>"


def smooth(values: list[float], weight: float | None = None) -> list[float]:
    """TensorBoard-style exponential moving average with bias correction, so the first points are not dragged to 0.

    The default weight grows with the number of points: a short run is barely smoothed, a long one up to 0.8.
    """
    if weight is None:
        weight = min(0.8, max(0.0, 1 - 8 / max(1, len(values))))
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def base_layout(fig: go.Figure, height: int = 380, **axes) -> go.Figure:
    fig.update_layout(
        template="plotly_white",
        paper_bgcolor="rgba(0,0,0,0)",  # the block's own background shows through, light or dark
        plot_bgcolor="rgba(0,0,0,0)",
        height=height,
        margin=dict(l=56, r=16, t=36, b=48),
        legend=dict(orientation="h", yanchor="bottom", y=1.01, xanchor="left", x=0, font=dict(size=12)),
        font=dict(family="Inter, system-ui, sans-serif", size=12, color=INK),
        hoverlabel=dict(font_size=12),
        modebar=dict(bgcolor="rgba(0,0,0,0)", color=INK, activecolor=TRAIN_COLOR, remove=["select2d", "lasso2d"]),
        uirevision="keep",
        **axes,
    )
    fig.update_xaxes(gridcolor=GRID, zeroline=False)
    fig.update_yaxes(gridcolor=GRID, zeroline=False)
    return fig


def add_title(fig: go.Figure, title: str | None) -> None:
    """A small title at the top left, above the legend: Plotly's mode bar takes the top right while the mouse is over
    the chart."""
    if title:
        fig.update_layout(title=dict(text=title, font=dict(size=13), x=0, xanchor="left", pad=dict(l=8), y=0.995,
                                     yanchor="top"), margin=dict(t=fig.layout.margin.t + 20))


def empty_figure(message: str, height: int = 380) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, font=dict(size=14, color="#94a3b8"), xref="paper", yref="paper", x=0.5, y=0.5)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return base_layout(fig, height)


def _points(history: list[dict], key: str) -> tuple[list, list, list]:
    rows = [r for r in history if r.get(key) is not None]
    return [r["tokens_seen"] for r in rows], [r[key] for r in rows], [[r["step"], r["epoch"]] for r in rows]


def add_run(fig: go.Figure, history: list[dict], name: str | None = None, color: str | None = None) -> None:
    """One run's curves: raw train loss (light), smoothed train loss, validation loss with markers.

    ``name`` set means an overlaid past run: drawn dashed and quieter, raw line left out. The live run's traces
    (``name`` None) go without their points: the browser fills them from the message's rows (``live_chart.js``),
    which carry the same points: sent twice, they doubled a long run's message (1.2 MB for 6,500 steps).
    """
    live = name is None  # the live run's traces are tagged: the browser fills them and adds its new points to them
    x, y, custom = ([], [], []) if live else _points(history, "train_loss")
    vx, vy, vcustom = ([], [], []) if live else _points(history, "val_loss")
    prefix = f"{name} · " if name else ""
    train_color, val_color = (color, color) if color else (TRAIN_COLOR, VAL_COLOR)
    if live:
        fig.add_trace(go.Scatter(x=x, y=y, customdata=custom, name="train loss (raw)", mode="lines", meta="live-raw",
                                 line=dict(color=train_color, width=1), opacity=0.28, hovertemplate=HOVER,
                                 showlegend=False))
    if x or live:
        fig.add_trace(go.Scatter(x=x, y=smooth(y), customdata=custom, name=f"{prefix}train loss",
                                 mode="lines", line=dict(color=train_color, width=2.5 if not name else 1.5,
                                                         dash="dash" if name else "solid", shape="spline", smoothing=0.6),
                                 hovertemplate=HOVER, meta="live-train" if live else None))
    if vx or live:
        fig.add_trace(go.Scatter(x=vx, y=vy, customdata=vcustom, name=f"{prefix}validation loss", mode="lines+markers",
                                 line=dict(color=val_color, width=2 if not name else 1.5, dash="dot" if name else "solid"),
                                 marker=dict(size=7 if not name else 5, line=dict(width=1.5, color="white")), hovertemplate=HOVER,
                                 meta="live-val" if live else None))


def mark_baseline(fig: go.Figure, history: list[dict]) -> None:
    """A marker and a label on the step-0 losses: the model before any training."""
    first = next((r for r in history if r.get("step") == 0), None)
    if first is None:
        return
    ys = [v for v in (first.get("train_loss"), first.get("val_loss")) if v is not None]
    if not ys:
        return
    fig.add_trace(go.Scatter(x=[0] * len(ys), y=ys, mode="markers", name="before training",
                             marker=dict(symbol="diamond", size=11, color=INK, line=dict(width=1.5, color="white")),
                             customdata=[[0, 0.0]] * len(ys), hovertemplate="before training<br>loss %{y:.3f}<extra></extra>"))
    fig.add_annotation(x=0, y=max(ys), text="before training", showarrow=True, arrowhead=0, ax=48, ay=-22,
                       font=dict(size=11, color=INK), arrowcolor=INK)


def loss_figure(history: list[dict], overlays: list[tuple[str, list[dict]]] = (), title: str | None = None) -> go.Figure:
    """Train and validation loss against tokens seen, with past runs overlaid."""
    if not history and not overlays:
        return empty_figure("Press Start to fine-tune:<br>the loss will draw itself here.")
    fig = go.Figure()
    for i, (name, past) in enumerate(overlays):
        add_run(fig, past, name=name, color=OVERLAY_COLORS[i % len(OVERLAY_COLORS)])
    if history:
        add_run(fig, history)
        mark_baseline(fig, history)
    fig = base_layout(fig, xaxis_title="tokens seen", yaxis_title="loss")
    # Overlays wrap the legend across the top, where a horizontal mode bar would cover its last entry on hover.
    fig.update_layout(modebar_orientation="v", margin_r=40)
    add_title(fig, title)
    return fig


def live_rows(history: list[dict]) -> list[list]:
    """The rows the browser needs to extend the live chart: tokens seen, step, epoch, train loss, validation loss,
    validation reward margin (preference tuning; None otherwise)."""
    return [[r.get("tokens_seen"), r.get("step"), r.get("epoch"), r.get("train_loss"), r.get("val_loss"),
             r.get("val_reward_margin")] for r in history]


def preference_figure(history: list[dict], title: str | None = None) -> go.Figure:
    """DPO loss on train and validation pairs (left axis) and the validation reward margin (right axis)."""
    if not history:
        return empty_figure("Press Start to align: the DPO loss<br>and the reward margin will draw themselves here.")
    fig = go.Figure()
    add_run(fig, history)
    for trace in fig.data:
        trace.name = trace.name.replace("loss", "DPO loss")
    fig.add_trace(go.Scatter(x=[], y=[], customdata=[], name="validation reward margin", mode="lines+markers",
                             yaxis="y2", line=dict(color=MARGIN_COLOR, width=2, dash="dash"), marker=dict(size=6),
                             hovertemplate=HOVER, meta="live-margin"))
    fig = base_layout(fig, xaxis_title="tokens seen", yaxis_title="DPO loss (ln 2 = 0.693 at the start)",
                      yaxis2=dict(title="reward margin", overlaying="y", side="right", showgrid=False, zeroline=True))
    fig.update_layout(margin=dict(l=56, r=56, t=36, b=48))
    add_title(fig, title)
    return fig


def live_figure_message(key: str, history: list[dict], overlays=(), title: str | None = None,
                        figure: go.Figure | None = None) -> str:
    """The whole live chart, once per run or overlay choice: the figure (the loss chart unless given), whose live
    traces come empty, and the rows the browser fills them from."""
    figure = json.loads((figure or loss_figure(history, overlays, title)).to_json())
    return json.dumps({"key": key, "figure": figure, "rows": live_rows(history)})


def live_rows_message(key: str, history: list[dict]) -> str:
    """Only the rows a visitor has not got yet."""
    return json.dumps({"key": key, "rows": live_rows(history)})


def length_histogram(stats: dict) -> go.Figure:
    """Token counts per record, prompt against response, overlaid.

    The counts go as arrays of the smallest unsigned type that holds them, which Plotly checks at once and sends as
    packed binary: as lists it checked each value, 1.4 s of loading 52,002 records here, and sent them as text.
    """
    prompt, response = stats.get("prompt_tokens", []), stats.get("response_tokens", [])
    if not prompt:
        return empty_figure("No records", height=300)
    fig = go.Figure()
    for values, name, color in ((prompt, "prompt", PROMPT_COLOR), (response, "response", RESPONSE_COLOR)):
        counts = np.asarray(values, dtype=np.min_scalar_type(max(values)))
        fig.add_trace(go.Histogram(x=counts, name=f"{name} (median {statistics.median(values):.0f})", marker_color=color,
                                   opacity=0.65, nbinsx=40, hovertemplate="%{x} tokens: %{y} records<extra></extra>"))
    fig = base_layout(fig, height=300, barmode="overlay", xaxis_title="tokens per record", yaxis_title="records")
    fig.update_layout(bargap=0.04)
    add_title(fig, "Token lengths: prompt vs response")  # in the figure, so that the legend goes under it on a phone
    fig.update_xaxes(rangemode="nonnegative")  # one distinct length would otherwise centre its bin on an axis from -20
    return fig


def evaluation_figure(summary: dict) -> go.Figure:
    """Base against fine-tuned (and aligned, for a preference-tuned run): the higher-is-better scores on one 0-100 axis, perplexity in a panel of its own.

    Perplexity is apart because lower is better and its scale is the
    vocabulary's (about 50,000 for random weights, ~10 for a tuned GPT-2).
    """
    scores = [("ROUGE-L F1 ×100", "rouge_l", 100, "%{y:.1f}"), ("ended on its own (%)", "ended_share", 100, "%{y:.0f}%")]
    if summary.get("judge"):
        scores.append(("judge score (0-100)", "judge_avg", 1, "%{y:.1f}"))
    fig = make_subplots(rows=1, cols=2, column_widths=[0.7, 0.3], horizontal_spacing=0.05)
    if all("preference_accuracy" in summary[k] for k in summary.get("models") or ("base", "tuned")):
        scores.append(("chosen preferred (%)", "preference_accuracy", 100, "%{y:.0f}%"))
    models = {"base": ("base", BASE_COLOR), "tuned": ("fine-tuned", TUNED_COLOR), "aligned": ("aligned", ALIGNED_COLOR)}
    keys = list(summary.get("models") or ("base", "tuned"))
    text_size = 12 if len(keys) < 3 else 10  # three bars a group: labels of "100%" or "2,945.8" ran into each other
    for key, (name, color) in ((k, models[k]) for k in keys):
        totals = summary[key]
        ys = [None if totals.get(k) is None else totals[k] * scale for _, k, scale, _ in scores]
        fig.add_trace(go.Bar(x=[label for label, *_ in scores], y=ys, name=name, marker_color=color, legendgroup=key,
                             texttemplate=[t for *_, t in scores], textposition="outside", cliponaxis=False,
                             textfont_size=text_size, hovertemplate=f"{name}<br>%{{x}}: %{{y:.2f}}<extra></extra>"), row=1, col=1)
        fig.add_trace(go.Bar(x=["perplexity"], y=[totals.get("perplexity")], name=name, marker_color=color, legendgroup=key,
                             showlegend=False, texttemplate="%{y:.3s}", textposition="outside", cliponaxis=False,
                             textfont_size=text_size,
                             hovertemplate=f"{name}<br>perplexity %{{y:,.2f}}<extra></extra>"), row=1, col=2)
    fig = base_layout(fig, height=340, barmode="group", bargap=0.25)
    # What is better goes on the outer axes, not in titles over the panels: on a phone those ran into each other.
    fig.update_yaxes(range=[0, 110], title_text="score · higher is better", row=1, col=1)
    top = max((summary[k].get("perplexity") or 0 for k in keys), default=0)
    fig.update_yaxes(range=[0, top * 1.15 or 1], title_text="lower is better", side="right", row=1, col=2)
    fig.update_layout(legend=dict(xanchor="left", x=0, y=1.02), margin=dict(t=40, r=64))
    return fig
