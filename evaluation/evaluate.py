"""Chapter 7's third stage: how well does the fine-tuned model answer the test split?

``evaluate_run(run_dir)`` sends each test instruction through the run's base
model and its fine-tuned model (greedy, batched) and scores both; for a
preference-tuned (DPO) run, through three: base, fine-tuned (the parent run)
and aligned (``models=`` picks):

- NLL and perplexity of the reference response under each model, teacher-forced:
  an objective score that needs no judge (lower is better);
- ROUGE-L F1 of the generated response against the reference;
- whether the response ended with ``<|endoftext|>`` before the token limit;
- optionally the book's LLM-judge score from 0 to 100 (``evaluation.judge``);
- on preference data, how often the model gives the chosen answer a higher
  mean log-probability than the rejected one (``preference_accuracy``).

Results go to ``eval.jsonl`` (one row per example) and ``eval_summary.json`` in
the run folder. ``python -m evaluation RUN_DIR`` does the same headless.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from data import DatasetError, InstructionDataset, custom_collate_fn, extract_response, encode_prompt, load_instructions, split_instructions
from model import WeightsError, generate_batch, get_tokenizer, pick_device
from model.device import configure_runtime, describe
from model.fused import linear

from runstore.export import ExportError, check_destination, export_files, export_zip
from runstore.models import Models, run_config
from .judge import DEFAULT_MODEL, Judge, judge_help, summarize_scores
from training.cores import CoreShare
from training.dpo import file_sha256
from training.config import TrainConfig
from runstore import WEIGHTS, RunInfo, hold_runs, parent_folder, read_manifest, run_folder, utc_time, write_atomic
from data.preference import PreferenceDataset, collate_preferences, in_order_batches, load_preferences_if_any

EVAL_ROWS = "eval.jsonl"
EVAL_SUMMARY = "eval_summary.json"
MODELS = ("base", "tuned")
DPO_MODELS = ("base", "tuned", "aligned")  # aligned: the DPO run itself; tuned: the run it started from
SPLITS = ("train", "val", "test")
LOWER_IS_BETTER = ("nll", "perplexity")


class EvaluationStopped(Exception):
    """``should_stop()`` asked to stop; nothing was written."""


def generate_responses(model, records: list[dict], style: str, max_new_tokens: int, batch_size: int,
                       on_batch: Callable[[int], None] = lambda n: None) -> list[dict]:
    """Each record's greedy response, generated in batches of similar prompt length.

    ``ended``: the model emitted ``<|endoftext|>`` before ``max_new_tokens``.
    """
    tokenizer = get_tokenizer()
    prompts = [encode_prompt(r, tokenizer, style) for r in records]
    limit = min(max_new_tokens, model.config.block_size - 1)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[dict] = [{} for _ in records]
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        for i, ids in zip(batch, generate_batch(model, [prompts[i] for i in batch], max_new_tokens)):
            out[i] = {"response": extract_response(tokenizer.decode(ids), style), "new_tokens": len(ids), "ended": len(ids) < limit}
        on_batch(len(batch))
    return out


@torch.inference_mode()
def response_nll(model, records: list[dict], style: str = "alpaca", batch_size: int = 8,
                 on_batch: Callable[[int], None] = lambda n: None) -> list[tuple[float, int] | None]:
    """Per record: (summed negative log-likelihood, token count) of the reference response and its end token.

    Teacher-forced given the prompt: the book's batches with ``mask_prompt=True``,
    so exactly the response tokens and the end token are targets. None for a
    record too long for the context window.
    """
    dataset = InstructionDataset(records, style=style, max_length=model.config.block_size)
    device = model.transformer.wte.weight.device
    order = sorted(range(len(dataset)), key=lambda i: -dataset.lengths[i])
    out: list[tuple[float, int] | None] = [None] * len(records)
    for start in range(0, len(order), batch_size):
        items = [dataset[i] for i in order[start : start + batch_size]]
        inputs, targets = custom_collate_fn(items, mask_prompt=True)
        inputs, targets = inputs.to(device), targets.to(device)
        keep = targets != -100
        log_probs = target_log_probs(model.hidden_states(inputs)[keep], model.lm_head.weight, targets[keep])
        rows = keep.nonzero()[:, 0]
        sums = torch.zeros(len(items), dtype=torch.float64).index_add_(0, rows.cpu(), log_probs.cpu().double())  # no float64 on MPS
        for item, total, count in zip(items, sums.tolist(), keep.sum(1).tolist()):
            out[item["index"]] = (-total, count)
        on_batch(len(items))
    return out


def target_log_probs(h, weight, targets, rows: int = 128, vocab_block: int = 8192):
    """log p(target) for each hidden state: logits and log-softmax in fp32, a block of rows at a time.

    A bf16 logit near GPT-2's typical -100 is off by up to 0.25, so the head is
    multiplied in fp32; the weight is upcast a slice at a time (~25 MB), never whole.
    """
    out = []
    for hb, tb in zip(h.split(rows), targets.split(rows)):
        hb = hb.float()
        logits = torch.cat([linear(hb, w.float()) for w in weight.split(vocab_block)], dim=1)
        out.append(torch.log_softmax(logits, dim=-1).gather(1, tb[:, None]).squeeze(1))
    return torch.cat(out) if out else h.new_zeros(0, dtype=torch.float32)


class Progress:
    """Reports phase, done, total and the phase's ETA; raises ``EvaluationStopped`` when asked to stop."""

    def __init__(self, report: Callable[[dict], None] | None, should_stop: Callable[[], bool] | None,
                 cores: CoreShare | None = None, steps: int = 0):
        self.report, self.should_stop, self.cores, self.steps = report, should_stop, cores, steps
        self.step, self.start, self.times = 0, time.perf_counter(), {}

    def begin(self, phase: str, model: str, total: int) -> None:
        self.check()
        self.step += 1
        self.phase, self.model, self.total, self.done, self.t0 = phase, model, total, 0, time.perf_counter()
        self.emit()

    def advance(self, n: int = 1) -> None:
        self.done += n
        self.times[f"{self.model}: {self.phase}"] = time.perf_counter() - self.t0
        self.emit()
        self.check()

    def emit(self, done: int | None = None, total: int | None = None) -> None:
        done, total = (self.done, self.total) if done is None else (done, total)
        elapsed = time.perf_counter() - self.t0
        if self.report:
            self.report({"phase": self.phase, "model": self.model, "done": done, "total": total,
                         "eta_s": elapsed / done * (total - done) if done else None,
                         "step": self.step, "steps": self.steps, "elapsed_s": time.perf_counter() - self.start})

    def check(self) -> None:
        if self.should_stop and self.should_stop():
            raise EvaluationStopped("evaluation stopped; no results were written")
        if self.cores is not None:
            self.cores.check()


def evaluate_run(run_dir, data=None, split: str = "test", max_new_tokens: int = 128, batch_size: int = 8,
                 limit: int | None = None, judge=None, progress=None, should_stop=None, registry: Models | None = None,
                 models=None) -> dict:
    """Evaluate a run's base and fine-tuned model on a split of its data; returns ``{"summary", "rows"}``.

    ``progress(dict)`` gets ``phase`` (loading, generating, scoring, preferring, judging),
    ``model`` (base, tuned or aligned), ``done``, ``total``, ``eta_s`` (this phase's
    seconds left), ``step``/``steps`` (phase number) and ``elapsed_s``.
    ``should_stop()`` is asked between batches; stopping raises
    ``EvaluationStopped`` and leaves earlier results on disk as they were.
    ``judge``: a ``evaluation.judge.Judge`` or its URL, or None to skip judging.
    ``registry``: where the models are loaded and kept (the app's shared one); a private one by default.
    ``models``: which of base, tuned and (for a DPO run) aligned to score; default all
    of them. A DPO run is scored on its preference data unless ``data`` says otherwise,
    and preference data adds ``preference_accuracy`` and each row's ``preference_margin``.
    """
    run_dir = Path(run_dir)
    registry = registry or Models(capacity=1)
    judge = Judge(judge) if isinstance(judge, str) else judge
    config = run_config(run_dir)
    manifest = read_manifest(run_dir)
    if manifest.get("status") in ("stopped", "interrupted") and not RunInfo(run_dir, manifest).last_step:
        raise ValueError(f"{run_dir.name} stopped before its first step: nothing was trained (a preference-tuning run's "
                         "saved weights are still its parent's); resume it, then evaluate it")
    dpo = manifest.get("method") == "dpo"
    names = tuple(models or (DPO_MODELS if dpo else ("base", "tuned")))
    allowed = DPO_MODELS if dpo else ("base", "tuned")
    if not names or any(m not in allowed for m in names) or len(set(names)) != len(names):
        raise ValueError(f"models must be some of {', '.join(allowed)} for this run, got {', '.join(names) or 'none'}")
    weights_of = {"tuned": parent_folder(run_dir, manifest) if dpo else run_dir, "aligned": run_dir}
    left_out = {}
    if dpo and "tuned" in names and (why := parent_changed(weights_of["tuned"], manifest)):
        if models:
            raise ValueError(f"{run_dir.name}: {why}; score base and aligned alone (--models base,aligned)")
        names, left_out = tuple(n for n in names if n != "tuned"), {"tuned": why}
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    for setting, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size), ("limit", limit)):
        if value is not None and value < 1:
            raise ValueError(f"{setting} must be at least 1, got {value}")
    source = evaluation_data(manifest, data)
    preferences = load_preferences_if_any(source)
    records = getattr(split_instructions(preferences or load_instructions(source)), split)[:limit]
    if not records:
        raise ValueError(f"the {split} split of {source} is empty")
    started = utc_time()
    # The run's lock, and a preference-tuned run's parent's, shared: a resume of either (in any process) is refused and
    # the runs budget of an app on the same runs folder keeps them until the evaluation ends.
    read = [run_dir, *([weights_of["tuned"]] if dpo and "tuned" in names else [])]
    with hold_runs(read, shared=True, doing="evaluate it"), CoreShare(pick_device()) as cores:
        tracker = Progress(progress, should_stop, cores, steps=(4 if preferences else 3) * len(names) + (len(names) if judge else 0))
        for name in names:
            if name != "base":
                registry.tuned(weights_of[name])  # a run without weights fails now, before the base model downloads
        scorer = rouge()
        results: dict[str, list[dict]] = {}
        for name in names:
            tracker.begin("loading", name, 1)
            if name == "base":
                model = registry.base_of_run(run_dir, progress=lambda desc, done, total: tracker.emit(done, total))
            else:
                model = registry.tuned(weights_of[name])
            tracker.advance()
            device = describe(model.transformer.wte.weight.device, model.transformer.wte.weight.dtype)
            tracker.begin("generating", name, len(records))
            results[name] = generate_responses(model, records, config.style, max_new_tokens, batch_size, tracker.advance)
            tracker.begin("scoring", name, len(records))
            for record, result, nll in zip(records, results[name], response_nll(model, records, config.style, batch_size, tracker.advance)):
                mean = nll[0] / nll[1] if nll else None
                result.update(nll=mean, perplexity=perplexity(mean), target_tokens=nll[1] if nll else 0,
                              rouge_l=float(scorer.score(record["output"], result["response"])["rougeL"].fmeasure),
                              judge=None, judge_error=None)
            if preferences:
                tracker.begin("preferring", name, len(records))
                for result, margin in zip(results[name], preference_margins(model, records, config.style, batch_size, tracker.advance)):
                    result["preference_margin"] = margin
            del model
        if judge is not None:
            judge.failures_in_a_row = 0
            for name in names:
                tracker.begin("judging", name, len(records))
                for record, result in zip(records, results[name]):
                    result["judge"], result["judge_error"] = judge.score(record, result["response"])
                    tracker.advance()

        rows = [{"index": i, "instruction": r["instruction"], "input": r["input"], "output": r["output"],
                 **{name: results[name][i] for name in names}} for i, r in enumerate(records)]
        summary = {
            "models": list(names), "method": manifest.get("method", "sft"), "parent_run": manifest.get("parent_run"),
            "run": run_dir.name, "model": config.model, "data": source, "style": config.style, "split": split,
            "examples": len(rows), "limit": limit, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
            "judge": judge.describe() if judge is not None else None, "device": device, "started": started,
            "wall_time_s": time.perf_counter() - tracker.start, "time_s": tracker.times, "left_out": left_out,
            **{name: totals(results[name], judged=judge is not None) for name in names},
        }
        write_atomic(run_dir / EVAL_ROWS, "".join(json.dumps(row) + "\n" for row in rows))
        write_atomic(run_dir / EVAL_SUMMARY, json.dumps(summary, indent=2))
        return {"summary": summary, "rows": rows}


def evaluation_data(manifest: dict, data: str | None = None) -> str:
    """What an evaluation of a run scores on: ``data`` when given, else a preference-tuned run's preference data, else
    the data the run was fine-tuned on."""
    if data:
        return str(data)
    if manifest.get("method") == "dpo":
        return str(manifest["dpo"]["data"])
    return str((manifest.get("config") or {}).get("data") or TrainConfig.data)


def parent_changed(parent: Path, manifest: dict) -> str | None:
    """Why a DPO run's parent no longer holds the fine-tuned model it was aligned from (gone, or trained further), or None."""
    weights, name = Path(parent) / WEIGHTS, manifest.get("parent_run") or Path(parent).name
    if not weights.is_file():
        return f"its fine-tuned parent run {name} is gone"
    if manifest.get("parent_sha256") and file_sha256(weights) != manifest["parent_sha256"]:
        return (f"its fine-tuned parent run {name} has been trained further since, so it no longer holds "
                "the model this run was aligned from")
    return None


@torch.inference_mode()
def preference_margins(model, records: list[dict], style: str = "alpaca", batch_size: int = 8,
                       on_batch: Callable[[int], None] = lambda n: None) -> list[float | None]:
    """Per record: mean log-probability of the chosen answer minus that of the rejected one (None: too long)."""
    from training.dpo_loss import sequence_logprobs

    dataset = PreferenceDataset(records, style=style, max_length=model.config.block_size)
    device = model.transformer.wte.weight.device
    out: list[float | None] = [None] * len(records)
    for positions in in_order_batches(range(len(dataset)), batch_size):
        items = [dataset[i] for i in positions]
        logp = sequence_logprobs(model, collate_preferences(items).to(device)).view(-1, 2)
        for item, (chosen, rejected) in zip(items, logp.tolist()):
            out[item["index"]] = chosen - rejected
        on_batch(len(items))
    return out


def rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def perplexity(nll: float | None) -> float | None:
    """exp(mean NLL); None where it has no value or overflows a float."""
    return math.exp(nll) if nll is not None and nll < 700 else None


def totals(results: list[dict], judged: bool) -> dict:
    """One model's figures over all examples; NLL is token-weighted, so perplexity is the corpus perplexity."""
    tokens = sum(r["target_tokens"] for r in results)
    nll = sum(r["nll"] * r["target_tokens"] for r in results if r["nll"] is not None) / tokens if tokens else None
    ended = sum(r["ended"] for r in results)
    margins = [r["preference_margin"] for r in results if r.get("preference_margin") is not None]
    preference = {"preference_accuracy": sum(m > 0 for m in margins) / len(margins)} if margins else {}
    return {
        **preference,
        "nll": nll, "perplexity": perplexity(nll), "target_tokens": tokens,
        "too_long": sum(r["nll"] is None for r in results),
        "rouge_l": sum(r["rouge_l"] for r in results) / len(results),
        "ended": ended, "ended_share": ended / len(results),
        "new_tokens_mean": sum(r["new_tokens"] for r in results) / len(results),
        **(summarize_scores([r["judge"] for r in results]) if judged else {"judge_avg": None, "judge_scored": 0, "judge_unscored": 0}),
    }


def judge_gaps(summary: dict, rows: list[dict]) -> tuple[int, int, list[str]]:
    """(responses the judge left unscored, responses it was given, its distinct reasons) of a judged evaluation."""
    names = summary.get("models") or list(MODELS)
    unscored = sum(summary[n]["judge_unscored"] for n in names)
    reasons = list(dict.fromkeys(r[m]["judge_error"] for r in rows for m in names if r[m].get("judge_error")))
    return unscored, len(names) * len(rows), reasons


def load_eval(run_dir) -> dict | None:
    """The saved ``{"summary", "rows"}`` of a run's last evaluation, or None when it has none."""
    run_dir = Path(run_dir)
    try:
        summary = json.loads((run_dir / EVAL_SUMMARY).read_text())
        rows = [json.loads(line) for line in (run_dir / EVAL_ROWS).read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return None
    return {"summary": summary, "rows": rows}


def best_and_worst(rows: list[dict], key: str | Callable[[dict], float | None], n: int = 3,
                   lower_is_better: bool | None = None) -> tuple[list[dict], list[dict]]:
    """The ``n`` best rows (best first) and the ``n`` worst (worst first) by ``key``.

    ``key``: a path such as ``"tuned.rouge_l"`` or a function of a row. Unless
    told, lower is better for NLL and perplexity, higher for anything else;
    rows without a value are left out.
    """
    if callable(key):
        value, lower_better = key, bool(lower_is_better)
    else:
        parts = key.split(".")
        value = functools.partial(_dig, parts=parts)
        lower_better = parts[-1] in LOWER_IS_BETTER if lower_is_better is None else lower_is_better
    scored = [(v, row) for row in rows if (v := value(row)) is not None]
    scored.sort(key=lambda pair: pair[0], reverse=not lower_better)
    ranked = [row for _, row in scored]
    return ranked[:n], ranked[::-1][:n]


def _dig(row: dict, parts: list[str]):
    for part in parts:
        row = row.get(part) if isinstance(row, dict) else None
    return row


COLUMN_TITLES = {"base": "base", "tuned": "fine-tuned", "aligned": "aligned"}


def format_summary(summary: dict) -> str:
    """The table that the CLI prints: base vs fine-tuned, and aligned for a DPO run."""
    names = summary.get("models") or list(MODELS)
    totals_of = [summary[name] for name in names]

    def num(v, spec):
        return "n/a" if v is None else format(v, spec)

    def judge(t):
        if summary.get("judge") is None:
            return "n/a"
        avg = num(t["judge_avg"], ".1f")
        return avg + (f" ({t['judge_unscored']} unscored)" if t["judge_unscored"] else "")

    lines = [
        ("NLL of the reference", [num(t["nll"], ".3f") for t in totals_of]),
        ("perplexity", [num(t["perplexity"], ",.1f") for t in totals_of]),
        ("ROUGE-L F1", [num(t["rouge_l"], ".3f") for t in totals_of]),
        ("ended with <|endoftext|>", [f"{t['ended_share']:.0%}" for t in totals_of]),
        ("judge score (0-100)", [judge(t) for t in totals_of]),
    ]
    if all("preference_accuracy" in t for t in totals_of):
        lines.append(("chosen preferred to rejected", [f"{t['preference_accuracy']:.0%}" for t in totals_of]))
    head = (f"{summary['examples']} {summary['split']} examples of {summary['data']} ({summary['style']}), "
            f"up to {summary['max_new_tokens']} new tokens, {summary['wall_time_s']:.0f} s on {summary['device']}")
    width = max(len(label) for label, _ in lines)
    titles = [COLUMN_TITLES[name] for name in names]
    cols = [max(len(title), *(len(values[i]) for _, values in lines)) for i, title in enumerate(titles)]
    table = [f"{'':<{width}}  " + "  ".join(f"{t:>{c}}" for t, c in zip(titles, cols))]
    table += [f"{label:<{width}}  " + "  ".join(f"{v:>{c}}" for v, c in zip(values, cols)) for label, values in lines]
    notes = [f"{COLUMN_TITLES[name]} left out: {why}" for name, why in (summary.get("left_out") or {}).items()]
    return "\n".join([head, *table, *notes])


class ProgressBar:
    """One tqdm bar per phase."""

    def __init__(self):
        self.bar, self.key = None, None

    def __call__(self, event: dict) -> None:
        from tqdm import tqdm

        key = (event["step"], event["phase"], event["model"])
        if key != self.key:
            self.close()
            self.key = key
            self.bar = tqdm(total=event["total"], desc=f"[{event['step']}/{event['steps']}] {event['model']}: {event['phase']}", leave=False)
        self.bar.total = event["total"]
        self.bar.n = event["done"]
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m evaluation",
                                description="Evaluate a fine-tuning run: base vs fine-tuned on the test split (chapter 7.7 of the book).")
    p.add_argument("run_dir", help="a run made by python -m training: its name under the runs folder, or its folder")
    p.add_argument("--data", default=None, help="canonical, sample or a file (default: the run's data)")
    p.add_argument("--split", default="test", choices=SPLITS, help="which split of the data to score (default: test, as the book)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest answer each model may write (default: 128)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together (default: 8)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples")
    p.add_argument("--judge", metavar="URL", default=None, help="OpenAI-compatible endpoint, e.g. http://localhost:11434/v1 (Ollama)")
    p.add_argument("--judge-model", default=DEFAULT_MODEL, help=f"the judge's model name at --judge (default: {DEFAULT_MODEL})")
    p.add_argument("--judge-timeout", type=float, default=60.0, help="seconds per judge request")
    p.add_argument("--models", default=None, help="comma-separated, of base, tuned and (for a DPO run) aligned; default all")
    p.add_argument("--export", metavar="PATH.zip", default=None, help="also write the model as a Hugging Face zip")
    args = p.parse_args(argv)
    configure_runtime()
    if args.export and (Path(args.export).suffix != ".zip" or Path(args.export).is_dir()):
        p.error(f"--export {args.export}: give the path of a .zip file to write")
    try:
        run_dir = run_folder(args.run_dir)  # a run's name, as --resume takes it, or its folder
        judge = Judge(args.judge, args.judge_model, timeout=args.judge_timeout) if args.judge else None
        if args.export:
            export_files(run_dir)
            check_destination(args.export)
    except (ValueError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    bar = ProgressBar()
    try:
        result = evaluate_run(run_dir, data=args.data, split=args.split, max_new_tokens=args.max_new_tokens,
                              batch_size=args.batch_size, limit=args.limit, judge=judge, progress=bar,
                              models=args.models.split(",") if args.models else None)
        bar.close()
        print(format_summary(result["summary"]))
        print(f"saved {EVAL_ROWS} and {EVAL_SUMMARY} in {run_dir}")
        if judge is None:
            print(judge_help())
        elif (gaps := judge_gaps(result["summary"], result["rows"]))[0]:
            unscored, total, reasons = gaps
            print(f"warning: the judge left {unscored} of {total} responses unscored: {'; '.join(reasons[:2])}",
                  file=sys.stderr)
        if args.export:
            print(f"exported {export_zip(run_dir, args.export)}")
    except (FileNotFoundError, DatasetError, WeightsError, ExportError, ValueError) as e:
        bar.close()
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        bar.close()
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
