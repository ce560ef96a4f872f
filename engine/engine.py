"""The one object behind the app and the CLIs: jobs, the run store, the models kept loaded, shared datasets, limits.

``app.py`` makes one ``Engine`` and hands it to every tab; the tabs start,
stop and draw, and keep no process-wide state of their own. Long tasks run as
``Job``s in lanes: ``train`` (fine-tuning and preference tuning, one at a
time) and ``evaluate`` (one at a time).
"""
from __future__ import annotations

import dataclasses
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

import psutil
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from evaluation.evaluate import evaluate_run, evaluation_data
from model import HUB_PRESETS, PRESETS, GPTConfig
from model.device import configure_runtime
from model.weights import WeightsError, hub_cached, hub_unreachable, read_config, resolve
from runstore import RunInfo, find_run, list_recovered, prune_runs, runs_root
from runstore.export import export_zip
from runstore.locks import busy_message
from runstore.store import recover_runs
from training.calibrate import Calibration, EpochShape, Projection, cached, calibrate, data_shape, projection
from training.config import ConfigError, TrainConfig
from training.estimate import ACTIVATION_BYTES, GB, PREFERENCE_ACTIVATION_BYTES, activations_gb, estimate_for
from training.events import Progress, Status
from training.checkpoint import resume_config
from training.loop import check_data, resume_run, train
from training.dpo import DPOConfig, base_config, check_dpo, is_dpo_run, resume_dpo, resume_dpo_config, train_dpo
from data.preference import PreferenceDataset, load_preferences, split_preferences
from data import DatasetError, cache, load_instructions, longest_row

from .datasets import BUILT_IN, Datasets, prune_folder
from .jobs import SCALARS_ONLY, Job, JobError, idle_snapshot
from .limits import Limits
from runstore.models import Models
from .public import scrub

LANES = ("train", "evaluate")
PREFERENCE = "preference tuning"  # the kind of a DPO job in the ``train`` lane


@dataclasses.dataclass(frozen=True)
class Claims:
    """What a job uses, known before it starts: the runs it reads or trains (kept from the runs budget), those it trains
    (no job in the other lane may use them meanwhile), its data files (kept from the uploads budget), and what it
    does, for a refusal ("resume it")."""
    runs: frozenset = frozenset()
    writes: frozenset = frozenset()
    files: frozenset = frozenset()
    doing: str = "start it"

    @classmethod
    def of(cls, runs=(), writes=(), files=(), doing: str = "start it") -> "Claims":
        return cls(frozenset(runs) | frozenset(writes), frozenset(writes), frozenset(str(f) for f in files), doing)


def available_memory_gb() -> float:
    """Memory a new run may take now: what the OS has available, capped by this container's cgroup limit."""
    available = psutil.virtual_memory().available
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available / GB


class Engine:
    def __init__(self, limits: Limits | None = None, root: Path | None = None, exports: Path | None = None,
                 loopback: bool = True):
        configure_runtime()
        self.limits = limits or Limits.from_env()
        self.root = Path(root) if root else runs_root()
        self.exports = Path(exports) if exports else Path(tempfile.gettempdir()) / "gpt2-instruct-exports"
        self.loopback = loopback  # only then may a blank Hub token or a judge use the host's credentials
        self.models = Models()
        self.datasets = Datasets(self.limits.datasets_in_memory, self.limits.uploads_mb, self.limits.files_max_age_hours,
                                 in_use=self.files_in_use)
        self._jobs: dict[str, Job | None] = dict.fromkeys(LANES)
        self._claims: dict[str, Claims] = {lane: Claims() for lane in LANES}
        self._lock = threading.Lock()
        self.recovered = recover_runs(self.root)
        self._suggestion: str | None = None
        self._shapes: OrderedDict[tuple, EpochShape | str] = OrderedDict()  # project_run's (or why not), the latest few
        self._measuring: str | None = None  # the preset being timed by ``measure``

    def look_for_weights(self) -> None:
        """Find, in the background, whether GPT-2 124M can be loaded here (cached, or the Hub answers)."""
        def look():
            self._suggestion = "gpt2" if hub_cached("gpt2") or hub_unreachable() is None else "tiny"

        threading.Thread(target=look, name="look-for-weights", daemon=True).start()

    def suggested_model(self) -> str:
        """The model a new visitor's form starts with: GPT-2 124M when its weights can be had, else the offline tiny
        demo; the first preset this server allows when it allows neither."""
        allowed = self.allowed_presets()
        wanted = self._suggestion or "tiny"
        return wanted if wanted in allowed else allowed[0]

    def why_suggested(self, model: str) -> str:
        """Why a new visitor's form starts with ``model`` and not GPT-2 124M, in words ("" for GPT-2 124M)."""
        if model == "gpt2":
            return ""
        if not self.allows("gpt2"):
            return "this server does not offer GPT-2 124M (GPT2_INSTRUCT_MODELS)"
        if self._suggestion is None:
            return ("this server is still finding out whether GPT-2's weights can be had (cached, or from the Hugging "
                    "Face Hub): reload the page in a moment to start from GPT-2 if they can")
        return ("GPT-2's weights are not on this server and the Hugging Face Hub cannot be reached, so the demo trains "
                "offline")

    def allowed_presets(self) -> list[str]:
        """The presets this server trains (``GPT2_INSTRUCT_MODELS`` names them or their Hub ids); all when it names none."""
        allowed = [p for p in PRESETS if self.allows(p)]
        return allowed or list(PRESETS)

    def allows(self, model: str) -> bool:
        models = self.limits.models
        return models is None or model in models or HUB_PRESETS.get(model, model) in models

    # Estimates

    @staticmethod
    def calibration(preset: str, lora_rank: int = 0) -> Calibration | None:
        """The expected epoch of a preset and method as last measured on this machine, or None."""
        return cached(preset, lora_rank) if preset in PRESETS else None

    def measure(self, preset: str, lora_rank: int = 0) -> Calibration:
        """Time a few real training steps of a preset and method (seconds to a minute) and cache the result.

        It runs alone, since anything else training or evaluating would skew both: ``JobError`` while a job
        runs or another measurement does, and no job starts until it has ended.
        """
        if preset not in PRESETS:
            raise ConfigError(f"only the presets ({', '.join(PRESETS)}) can be measured, not {preset!r}")
        if not self.allows(preset):
            raise ConfigError(f"this server trains only {', '.join(self.limits.models)}; {preset!r} is not measured here")
        self.admit(TrainConfig(model=preset, random_init=True, lora_rank=lora_rank))
        known = None if self.loopback else cached(preset, lora_rank)
        if known is not None:  # a server others can reach measures each once: repeated clicks would keep every job out
            return known
        with self._lock:
            busy = next((job for job in self._jobs.values() if job is not None and job.active), None)
            if busy is not None:
                title = busy.snapshot(since=SCALARS_ONLY)["title"]
                article = "an" if title[:1] in "aeiou" else "a"
                raise JobError(f"{article} {title} is running: measure once it has ended, so that neither slows the other")
            if self._measuring:
                raise JobError(f"{self._measuring} is being measured already; its result shows here in a moment")
            self._measuring = preset
        try:
            return calibrate(preset, lora_rank, refresh=True)
        finally:
            with self._lock:
                self._measuring = None

    def project_run(self, calibration: Calibration, ref: dict | None, config: TrainConfig | None = None) -> Projection:
        """A run on a visitor's data (the bundled sample when none is chosen) at a calibration's measured costs: one
        epoch at the loop's defaults, or ``config``'s epochs, steps and batches. Each data's batches are counted once
        per model and batching (size, grouping, prompt masking, format and max length). ``ValueError`` says why there is none (too few
        records for a batch, an upload that has left the server)."""
        run = config or TrainConfig(model=calibration.model, random_init=True)  # the loop's defaults, declared once
        key = (ref["sha256"] if ref else "sample", run.model, run.batch_size, run.grouped, run.mask_prompt, run.style,
               run.max_length)
        with self._lock:
            shape = self._shapes.get(key)
        if shape is None:
            records = self.datasets.records(ref) if ref else self.datasets.shared("sample", lambda: load_instructions("sample"))
            try:  # an upload that has left the server raised above, not kept: uploaded again, it has the same key
                shape = data_shape(records, run)
            except ValueError as e:  # too few records for a batch: the data's own, kept
                shape = str(e)
            with self._lock:
                self._shapes[key] = shape
                while len(self._shapes) > 16:
                    self._shapes.popitem(last=False)
        if isinstance(shape, str):
            raise ValueError(shape)
        return projection(calibration, shape, config)

    def last_trained(self, preset: str, lora_rank: int = 0,
                     calibration: Calibration | None = None) -> tuple[RunInfo, Projection | None] | None:
        """The newest fine-tuning run of a preset and method that trained to its end here, on the device and precision
        a run would take now: what it really took, beside the estimate. With the preset's ``calibration``, what that
        estimate projects for the same run (its own settings on the bundled sample or the book's data; None for an
        upload)."""
        from model.device import describe, pick_device, pick_dtype

        device = pick_device()
        here = describe(device, pick_dtype(device))
        for run in self.runs():
            m, config = run.manifest, run.manifest.get("config") or {}
            if (run.status == "done" and m.get("method") != "dpo" and config.get("model") == preset
                    and config.get("lora_rank", 0) == lora_rank and m.get("processes", 1) == 1
                    and m.get("device") == here and m.get("train_time_s")):
                break
        else:
            return None
        data = m.get("data") or {}
        if calibration is None or data.get("source") not in ("canonical", "sample"):
            return run, None
        ref = None if data["source"] == "sample" else {"source": "canonical", "sha256": data.get("sha256")}
        try:
            return run, self.project_run(calibration, ref, TrainConfig.from_dict(config))
        except (ConfigError, ValueError, KeyError):
            return run, None

    # Runs

    def runs(self) -> list[RunInfo]:
        """This server's runs, newest first; one whose process died since it was listed (a command line killed) shows
        as interrupted, resumable, at once."""
        return list_recovered(self.root)

    def run(self, name: str | None) -> RunInfo:
        """A run of this server by its name; ``ValueError`` for anything else (paths are never accepted)."""
        if name and "/" in str(name):  # the message would show its last part alone (paths are cut in what visitors see)
            raise ValueError(f"runs are named, never given as paths (e.g. {Path(str(name)).name}): pick one from the list")
        run = find_run(str(name or ""), self.root) if name else None
        if run is None:
            raise ValueError(f"{name} is not a run on this server: pick one from the list" if name else
                             "no run is picked: pick one from the list")
        return run

    def finished_run(self, name: str | None) -> RunInfo:
        run = self.run(name)
        if not run.has_weights or run.status not in ("done", "stopped", "interrupted"):
            raise ValueError(f"{run.name} is not a finished run with saved weights: pick one from the list")
        if not run.last_step:
            raise ValueError(f"{run.name} stopped before its first step: nothing was trained; pick one from the list")
        return run

    def export(self, name: str) -> Path:
        """The run's Hugging Face zip: built once per saved model and reused; old exports are dropped."""
        run = self.finished_run(name)
        weights = run.path / "model.safetensors"
        dest = self.exports / f"{run.name}-hf.zip"
        if not (dest.is_file() and dest.stat().st_mtime >= weights.stat().st_mtime):
            self.exports.mkdir(parents=True, exist_ok=True)
            prune_folder(self.exports, self.limits.exports_mb * 2**20, self.limits.files_max_age_hours * 3600)
            export_zip(run.path, dest)
        return dest

    # Jobs

    def snapshot(self, lane: str, since: int = 0) -> dict:
        job = self._jobs[lane]
        return job.snapshot(since) if job is not None else idle_snapshot()

    def job(self, lane: str) -> Job | None:
        return self._jobs[lane]

    def stop(self, lane: str, owner: str | None) -> bool:
        job = self._jobs[lane]
        return job.stop(owner) if job is not None else False

    def shutdown(self, timeout: float | None = None) -> list[str]:
        """The server is going away: stop every running job at its next boundary and wait until each has saved
        (a checkpoint to resume from). Returns what each job it stopped says at its end."""
        with self._lock:
            jobs = [job for job in self._jobs.values() if job is not None and job.active]
        stopped = [job for job in jobs if job.stop(reason="the server is shutting down")]
        for job in stopped:
            job.wait(timeout)
        return [f"{snap['title']}: {snap['message']}" for snap in (job.snapshot(since=SCALARS_ONLY) for job in stopped)]

    def _launch(self, lane: str, job: Job, claims: Claims = Claims()) -> Job:
        """Start ``job`` in its lane when the lane is free and the other lane's job does not use a run this one trains,
        or train one this one uses (the second is refused here, not failed by the run's lock once started); a new run
        first makes room on disk (``make_room``), keeping the runs it ``claims``."""
        with self._lock:
            if self._measuring:
                raise JobError(f"the expected epoch of {self._measuring} is being measured on this machine (seconds to a "
                               "minute): start once it has ended, so that neither slows the other")
            current = self._jobs[lane]
            if current is not None and current.active:
                raise JobError(f"{running(current.snapshot(since=SCALARS_ONLY))}; wait for it or stop it first")
            for _, theirs in self._active_claims(but=lane):
                if clash := sorted(claims.writes & theirs.runs):
                    raise JobError(busy_message(clash[0], doing=claims.doing))
                if clash := sorted(theirs.writes & claims.runs):
                    raise JobError(busy_message(clash[0], shared=True, doing=claims.doing))
            if lane == "train":
                self.make_room(claims.runs)
            self._jobs[lane], self._claims[lane] = job, claims
            return job.start()

    def _active_claims(self, but: str | None = None) -> list[tuple[Job, Claims]]:
        return [(job, self._claims[lane]) for lane, job in self._jobs.items()
                if lane != but and job is not None and job.active]

    def resuming(self) -> set[str]:
        """The runs a job of this server is resuming: until it has loaded, their manifests still say stopped or
        interrupted, and no one is to be offered them for another resume."""
        return {name for _, claims in self._active_claims() for name in claims.writes}

    def files_in_use(self) -> set[str]:
        """The data files of the jobs going on (the uploads budget keeps them)."""
        return {file for _, claims in self._active_claims() for file in claims.files}

    def make_room(self, uses: frozenset[str] | tuple[str, ...] = ()) -> list[str]:
        """Within ``runs_gb``, the oldest ended runs deleted (``prune_runs``): never one a job is using or in ``uses``."""
        if self.limits.runs_gb is None:
            return []
        busy = set(uses)
        for job, claims in self._active_claims():
            busy |= {job.snapshot(since=SCALARS_ONLY).get("run"), *claims.runs}
        return prune_runs(self.root, self.limits.runs_gb * GB, keep=busy - {None})

    def require_data(self, run: RunInfo, data: str, doing: str) -> None:
        """``DatasetError`` up front when the file a run trained on has left this server (an upload, dropped by age or
        for space: the same file uploaded again comes back under the same name); built-in sources pass."""
        if data in BUILT_IN or data == "preference" or Path(data).is_file():
            return
        path = Path(data)
        if path.parent.resolve() != self.datasets.uploads_dir.resolve():
            raise DatasetError(f"{run.name} was trained on {public_data(data)}, which is no longer on this server: "
                               f"it is needed to {doing}")
        hours = self.limits.files_max_age_hours
        raise DatasetError(f"{run.name} was trained on an uploaded file, {path.name.split('-', 1)[-1]}, that is no longer on "
                           f"this server (uploads are kept {hours:g} hours at most and dropped first when space runs "
                           f"short): upload the same file again, then {doing}")

    def check_training(self, config: TrainConfig) -> TrainConfig:
        """The config within this server's limits, its data checked and its memory admitted; errors say which limit."""
        limits = self.limits
        if config.model not in PRESETS and not is_hub_id(config.model):
            if not limits.local_paths:
                raise ConfigError("local paths are turned off on this server: choose a preset or a Hugging Face Hub id "
                                  "(e.g. openai-community/gpt2)")
            check_local_model(config.model)
        if not self.allows(config.model):
            raise ConfigError(f"this server trains only {', '.join(limits.models)}; {config.model!r} is not allowed")
        if config.epochs > limits.max_epochs:
            raise ConfigError(f"epochs: this server allows at most {limits.max_epochs}, got {config.epochs}")
        changes = {}
        if limits.max_steps is not None and (config.max_steps or 10**9) > limits.max_steps:
            changes["max_steps"] = limits.max_steps
        if limits.max_wall_minutes is not None:
            cap = limits.max_wall_minutes * 60
            changes["max_wall_s"] = min(config.max_wall_s or cap, cap)
        config = dataclasses.replace(config, **changes) if changes else config
        self.admit(config, check_data(config)[1].train)
        return config

    def admit(self, config: TrainConfig, records: list[dict] | None = None, longest: int | None = None,
              per_token: int = ACTIVATION_BYTES) -> None:
        """Refuse a run whose memory estimate exceeds what is available, before anything is allocated. The estimate
        counts the longest training row: of ``records`` (the run's training records), or ``longest`` when known."""
        model_config = known_shape(config.model)
        if model_config is None:
            return
        if records is not None:
            longest = training_row(model_config, config, records)
        needed = memory_needed(model_config, config, longest, per_token)
        available = self.memory_available()
        held = self.models.held_gb()
        if available < needed <= available + held:  # the models loaded to compare and evaluate make the difference
            self.models.release()
            available, held = self.memory_available(), 0.0
        if needed > available:
            method = "LoRA" if config.lora_rank else "full fine-tuning"
            hint = "a smaller model" if config.lora_rank else "LoRA (rank 16 needs far less) or a smaller model"
            rows_note = ""
            if needed > memory_needed(model_config, config):
                rows_note = f" at batch {config.batch_size} with training examples of up to {longest:,} tokens"
                hint = f"a smaller batch size or max length, {hint}"
            beside = f" beside the {held:.1f} GB of models loaded to compare and evaluate" if held >= 0.05 else ""
            raise ConfigError(f"not enough memory: {config.model} with {method} needs about {needed:.1f} GB{rows_note}, "
                              f"and {available:.1f} GB is available on this server{beside}; try {hint}")

    def memory_available(self) -> float:
        """GB a new run may take: ``GPT2_INSTRUCT_MEMORY_GB`` less what the models loaded for the Playground and the
        evaluation hold, or, without it, what the machine has available now (which those models already take from)."""
        if self.limits.memory_gb is None:
            return available_memory_gb()
        return max(0.0, self.limits.memory_gb - self.models.held_gb())

    @staticmethod
    def memory_estimate(config: TrainConfig, records: list[dict] | None = None) -> float | None:
        """GB a fine-tuning run is expected to peak at, with the activations of its training ``records`` when given;
        None when the model's size cannot be known before loading it."""
        model_config = known_shape(config.model)
        if model_config is None:
            return None
        return memory_needed(model_config, config, training_row(model_config, config, records) if records else None)

    def start_training(self, config: TrainConfig, owner: str | None = None) -> Job:
        """Check the limits, the data and the memory, then fine-tune in the ``train`` lane."""
        config = self.check_training(config.validate())
        if config.out is None:
            self.root.mkdir(parents=True, exist_ok=True)
        public = {**config.to_dict(), "data": public_data(config.data), "out": None}
        def work(hooks) -> None:  # the run's summary reaches watchers through its Finished event, without its path
            train(config, hooks, root=self.root)

        return self._launch("train", Job("fine-tuning", work, owner, "fine-tuning run", public), Claims.of(files=[config.data]))

    def resume_training(self, name: str, owner: str | None = None) -> Job:
        """Continue a stopped or interrupted run from its checkpoint, in the ``train`` lane, under today's wall-time limit
        and memory check (its other settings were checked against the limits when it started).

        A preference-tuning run resumes as one (its trainer, its job kind).
        """
        run = self.run(name)
        changes = {}
        if self.limits.max_wall_minutes is not None:
            changes["max_wall_s"] = self.limits.max_wall_minutes * 60
        if is_dpo_run(run.path):
            return self.resume_preference(run, owner, changes)
        config = resume_config(run.path, **changes)
        self.require_data(run, config.data, "resume it")
        self.admit(config, still_readable(lambda: check_data(config)[1].train))

        def work(hooks) -> None:
            resume_run(run.path, hooks, **changes)

        public = {**config.to_dict(), "data": public_data(config.data), "out": None}
        return self._launch("train", Job("fine-tuning", work, owner, "fine-tuning run", public),
                            Claims.of(writes=[run.name], files=[config.data], doing="resume it"))

    def store_preference_upload(self, upload: str | Path) -> str:
        """A visitor's preference file checked (``DatasetError`` names a bad record) and kept with the uploads."""
        load_preferences(Path(upload))
        stored = cache.store_upload(upload)
        stored.touch()
        self.datasets.prune(keep=stored)
        return str(stored)

    def preference_records(self) -> list[dict]:
        """The book's preference pairs, from the cache (downloaded once), parsed once and shared by every visitor."""
        path = cache.preference_path()
        return self.datasets.shared(f"preference:{path.stat().st_mtime_ns}", lambda: load_preferences(path))

    def preference_config(self, parent_name: str, **settings) -> tuple[DPOConfig, RunInfo]:
        """The DPO settings for a finished fine-tuned run of this server, within its limits; errors say which limit."""
        run = self.finished_run(parent_name)
        if is_dpo_run(run.path):
            raise ValueError(f"{run.name} is already preference-tuned: pick the fine-tuned run it started from")
        given = sorted({"parent", "out", "device"} & set(settings))
        if given:
            raise ConfigError(f"{', '.join(given)}: set by the server, not by a visitor")
        data = str(settings.get("data", "preference"))
        uploads = self.datasets.uploads_dir.resolve()
        if data != "preference" and Path(data).resolve().parent != uploads:
            raise ConfigError("data: the book's preference pairs (\"preference\") or a file uploaded here")
        config = DPOConfig(parent=str(run.path), **settings)
        if config.epochs > self.limits.max_epochs:
            raise ConfigError(f"epochs: this server allows at most {self.limits.max_epochs}, got {config.epochs}")
        changes = {}
        if self.limits.max_steps is not None and (config.max_steps or 10**9) > self.limits.max_steps:
            changes["max_steps"] = self.limits.max_steps
        if self.limits.max_wall_minutes is not None:
            cap = self.limits.max_wall_minutes * 60
            changes["max_wall_s"] = min(config.max_wall_s or cap, cap)
        config = dataclasses.replace(config, **changes) if changes else config
        self.admit_preference(config, run.manifest, check_dpo(config, self.root)[3].train)
        return config, run

    def admit_preference(self, config: DPOConfig, parent_manifest: dict, pairs: list[dict] | None) -> None:
        """Admit preference tuning as its parent's model at its own batch size, with its longest training pair as the
        longest row (a pair is one row: prompt, chosen and rejected); on the model alone when ``pairs`` is None."""
        sft = dataclasses.replace(base_config(parent_manifest), lora_rank=config.lora_rank, batch_size=config.batch_size)
        longest = None
        if pairs is not None:
            context = (known_shape(sft.model) or GPTConfig()).block_size
            rows = PreferenceDataset(pairs, style=sft.style, max_length=min(config.max_length or context, context))
            longest = max(rows.lengths, default=None)
        self.admit(sft, longest=longest, per_token=PREFERENCE_ACTIVATION_BYTES)

    def start_preference(self, parent_name: str, owner: str | None = None, **settings) -> Job:
        """Align a finished fine-tuned run with preference data (DPO) in the ``train`` lane: the parent by name only."""
        config, run = self.preference_config(parent_name, **settings)
        public = preference_public(config, run.name, run.manifest.get("config") or {})

        def work(hooks) -> None:  # the summary reaches watchers through its Finished event, without its path
            train_dpo(config, hooks, root=self.root)

        return self._launch("train", Job(PREFERENCE, work, owner, "preference-tuning run", public),
                            Claims.of(runs=[run.name], files=[config.data], doing="align from it"))

    def resume_preference(self, run: RunInfo, owner: str | None, changes: dict) -> Job:
        """Continue a stopped or interrupted DPO run from its checkpoint, in the ``train`` lane."""
        config = resume_dpo_config(run.path, **changes)
        self.require_data(run, config.data, "resume it")
        pairs = still_readable(lambda: split_preferences(load_preferences(config.data)).train)
        self.admit_preference(config, run.manifest, pairs)
        public = preference_public(config, run.manifest["parent_run"], run.manifest.get("config") or {})

        def work(hooks) -> None:
            resume_dpo(run.path, hooks, **changes)

        return self._launch("train", Job(PREFERENCE, work, owner, "preference-tuning run", public),
                            Claims.of(runs=[run.manifest["parent_run"]], writes=[run.name], files=[config.data],
                                      doing="resume it"))

    def run_training(self, config: TrainConfig, hooks=None) -> dict:
        """Fine-tune in the foreground (the CLI): the same limits and checks as a job, then the loop."""
        return train(self.check_training(config.validate()), hooks, root=self.root)

    def evaluation_limit(self, limit: int | None) -> int | None:
        """The examples an evaluation asking for ``limit`` (None: all of them) scores on this server: a whole test split
        of Alpaca's 52,002 records is 5,200 examples, hours of a lane that every visitor shares."""
        cap = self.limits.eval_examples
        return limit if cap is None or (limit is not None and limit <= cap) else cap

    def start_evaluation(self, name: str, owner: str | None = None, **settings) -> Job:
        """Score a finished run's base and fine-tuned model in the ``evaluate`` lane; on a server that others can
        reach, a judge as ``Judge.for_visitors`` allows it."""
        if settings.get("judge") is not None and not self.loopback:
            settings["judge"] = settings["judge"].for_visitors()
        settings["limit"] = self.evaluation_limit(settings.get("limit"))
        run = self.finished_run(name)
        data = evaluation_data(run.manifest, settings.get("data"))
        if not settings.get("data"):
            self.require_data(run, data, "evaluate it")

        def work(hooks):
            hooks.on_event(Status("evaluating", f"Evaluating {run.name}"))
            return evaluate_run(run.path, progress=lambda p: hooks.on_event(Progress(p)), should_stop=hooks.should_stop,
                                registry=self.models, **settings)

        job = Job("evaluation", work, owner, "evaluation", {"run": run.name, **{k: str(v) for k, v in settings.items()}})
        parent = [run.manifest["parent_run"]] if run.manifest.get("method") == "dpo" else []
        return self._launch("evaluate", job, Claims.of(runs=[run.name, *parent], files=[data], doing="evaluate it"))


def still_readable(read) -> list[dict] | None:
    """A resumed run's training records as ``read()`` gives them, or None when its data has left the server
    (the run's own start then says so, and it is admitted on its model alone)."""
    try:
        return read()
    except (DatasetError, ValueError, OSError):
        return None


def known_shape(model: str) -> GPTConfig | None:
    """A model's shape before loading it: a preset's, a local checkpoint's config, or a Hub id named like a preset."""
    try:
        name = model.rsplit("/", 1)[-1]
        if model in PRESETS:
            return GPTConfig.from_name(model)
        if Path(model).expanduser().exists():
            weights, config_file = resolve(model)
            return read_config(config_file, weights)
        return GPTConfig.from_name(name) if name in PRESETS else None  # e.g. openai-community/gpt2-medium
    except (WeightsError, ValueError, OSError):
        return None


def training_row(model_config: GPTConfig, config: TrainConfig, records: list[dict]) -> int | None:
    """The longest row fine-tuning reads of ``records``: records past the context are skipped, the rest cut at max length."""
    context = model_config.block_size
    longest = longest_row(records, config.style, context)
    return min(longest, config.max_length or context) if longest else None


def memory_needed(model_config: GPTConfig, config: TrainConfig, longest: int | None = None,
                  per_token: int = ACTIVATION_BYTES) -> float:
    """GB a run of this shape peaks at: the model's estimate, plus the activations of batches whose longest row is
    ``longest`` tokens beyond the book's batches (``activations_gb``)."""
    e = estimate_for(model_config)
    extra = activations_gb(model_config, config.batch_size, longest, per_token) if longest else 0.0
    return (e.lora_gb if config.lora_rank else e.full_gb) + extra


def check_local_model(name: str) -> None:
    """``ConfigError`` for a model path with no weights on this server's disk, before a job starts: else the run was
    "Started" and failed while loading. A folder must hold model.safetensors; a file must be one."""
    shown = name if len(name) <= 120 else name[:120] + "…"
    path = Path(name).expanduser()
    try:
        if not (path.is_dir() or path.is_file()):
            raise ConfigError(f"model path {shown}: no such file or folder on this server (and not a Hugging Face Hub "
                              "id, owner/name)")
        resolve(path)
    except OSError as e:
        raise ConfigError(f"model path {shown}: {e.strerror or e}") from None
    except WeightsError as e:
        raise ConfigError(f"model path {e}") from None


def is_hub_id(name: str) -> bool:
    """Whether ``resolve`` would look ``name`` up on the Hugging Face Hub: a well-formed repo id naming nothing on
    this server's disk (``runs/<run>`` is a valid id, and a folder relative to the app's)."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return not name.endswith(".safetensors") and not Path(name).expanduser().exists()


def running(snap: dict) -> str:
    """'an evaluation is already running (evaluating, phase 2 / 6)', for a refusal to start another job."""
    title, progress = snap["title"], snap.get("progress")
    if progress and "steps" in progress:  # an evaluation counts phases, not steps
        where = f"phase {progress['step']} / {progress['steps']}"
    else:
        where = f"step {snap['step']}/{snap['total_steps']}"
    return f"{'an' if title.startswith(tuple('aeiou')) else 'a'} {title} is already running ({snap['status']}, {where})"


def preference_public(config: DPOConfig, parent_name: str, parent_config: dict) -> dict:
    """A DPO job's settings as a visitor may see them: the parent by name, no server path."""
    return {**config.to_dict(), "parent": parent_name, "data": public_data(config.data), "out": None,
            "model": parent_config.get("model"), "random_init": parent_config.get("random_init", False)}


def public_data(source: str) -> str:
    """A data source as a visitor may see it."""
    return scrub(str(source)) if source not in ("canonical", "sample") else source
