"""The run store: runs on disk (one folder each), listing, loading, recovery and export. Never imports gradio."""
from .store import MANIFEST, METRICS, WEIGHTS, RunInfo, RunWriter, find_run, list_runs, load_run, new_run_dir, read_manifest, read_metrics, runs_root, write_atomic

__all__ = ["MANIFEST", "METRICS", "WEIGHTS", "RunInfo", "RunWriter", "find_run", "list_runs", "load_run", "new_run_dir",
           "read_manifest", "read_metrics", "runs_root", "write_atomic"]
