"""Server limits, set by environment variables and shown in the app: what one visitor may ask of a shared server.

On a Hugging Face Space (``SPACE_ID`` set) the defaults are stricter: a few
epochs, an hour of training per run, no local paths, 20 GB of saved runs,
220 examples an evaluation.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields


def limit(default, env: str, help: str, space=None):
    return field(default=default, metadata={"env": env, "help": help, "space": space})


@dataclass(frozen=True)
class Limits:
    max_epochs: int = limit(100, "GPT2_INSTRUCT_MAX_EPOCHS", "most epochs one run may ask for", space=3)
    max_steps: int | None = limit(None, "GPT2_INSTRUCT_MAX_STEPS", "most optimizer steps one run may take (none: no limit)")
    max_wall_minutes: float | None = limit(None, "GPT2_INSTRUCT_MAX_WALL_MINUTES",
                                           "a run stops and saves after this long, loading and evaluations included (none: no limit)", space=60.0)
    models: tuple[str, ...] | None = limit(None, "GPT2_INSTRUCT_MODELS",
                                           "comma-separated presets / Hub ids a visitor may train (none: any)")
    local_paths: bool = limit(True, "GPT2_INSTRUCT_LOCAL_PATHS", "whether a visitor may type a server path as the model",
                              space=False)
    memory_gb: float | None = limit(None, "GPT2_INSTRUCT_MEMORY_GB",
                                    "memory a run may use (none: what the machine has available now)")
    runs_gb: float | None = limit(None, "GPT2_INSTRUCT_RUNS_GB",
                                  "disk the saved runs may fill: starting a run drops the oldest ended ones (none: no limit)",
                                  space=20.0)
    eval_examples: int | None = limit(None, "GPT2_INSTRUCT_EVAL_EXAMPLES",
                                      "most test examples one evaluation scores (none: all it asks for)", space=220)
    uploads_mb: float = limit(200.0, "GPT2_INSTRUCT_UPLOADS_MB", "uploaded datasets kept, oldest dropped first")
    exports_mb: float = limit(500.0, "GPT2_INSTRUCT_EXPORTS_MB", "export zips kept, oldest dropped first")
    files_max_age_hours: float = limit(24.0, "GPT2_INSTRUCT_FILES_MAX_AGE_HOURS",
                                       "uploads, exports and Gradio's cached files older than this go")
    datasets_in_memory: int = limit(8, "GPT2_INSTRUCT_DATASETS_IN_MEMORY", "parsed datasets shared by all visitors")
    session_minutes: float = limit(120.0, "GPT2_INSTRUCT_SESSION_MINUTES", "the server forgets a visitor's dataset choice after this (a Start opens it again from the browser's copy)")

    @classmethod
    def from_env(cls, env=None) -> "Limits":
        """Each limit from its variable, else the Space default on a Space, else the default."""
        env = os.environ if env is None else env
        on_space = bool(env.get("SPACE_ID"))
        values = {}
        for f in fields(cls):
            raw = env.get(f.metadata["env"], "").strip()
            if not raw:
                space = f.metadata["space"]
                values[f.name] = space if on_space and space is not None else f.default
                continue
            values[f.name] = parse(f, raw)
        return cls(**values)

    def rows(self) -> list[tuple[str, str, str]]:
        """(variable, value, meaning) for each limit: what the app shows."""
        out = []
        for f in fields(self):
            value = getattr(self, f.name)
            shown = "none" if value is None else ", ".join(value) if isinstance(value, tuple) else \
                ("yes" if value else "no") if isinstance(value, bool) else f"{value:g}"
            out.append((f.metadata["env"], shown, f.metadata["help"]))
        return out


def parse(f, raw: str):
    name = f.metadata["env"]
    if raw.lower() in ("none", "off", "unlimited") and "None" in str(f.type):
        return None
    if isinstance(f.default, bool):
        if raw.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise ValueError(f"{name} must be 1 or 0, got {raw!r}")
        return raw.lower() in ("1", "true", "yes", "on")
    if "tuple" in str(f.type):
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    kind = int if "int" in str(f.type) else float
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{name} must be a {'whole ' if kind is int else ''}number, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{name} must be above 0, got {raw!r}")
    return value
