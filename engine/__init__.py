"""The engine behind the app and the CLIs: jobs, the run store, the models kept loaded, shared datasets, limits.

Never imports gradio.
"""
from .engine import Engine, available_memory_gb, public_data
from .jobs import ACTIVE, ENDED, SCALARS_ONLY, Job, JobError
from .limits import Limits

__all__ = ["Engine", "Job", "JobError", "Limits", "ACTIVE", "ENDED", "SCALARS_ONLY", "available_memory_gb", "public_data"]
