"""The run store: runs on disk (one folder each), listing, recovery, export, and their models loaded for inference.

Never imports gradio.
"""
from .locks import RunBusy, RunLock, busy_message, hold_run, hold_runs, in_use
from .store import (CHECKPOINT, MANIFEST, METRICS, STATUSES, WEIGHTS, RunInfo, RunWriter, claim_run_dir, find_run, list_recovered,
                    list_runs, load_run, new_run_dir, parent_folder, process_owner, prune_runs, read_manifest, read_metrics, recover_run, recover_runs, run_folder,
                    runs_root, utc_time, write_atomic)

__all__ = ["CHECKPOINT", "MANIFEST", "METRICS", "STATUSES", "WEIGHTS", "RunBusy", "RunInfo", "RunLock", "RunWriter", "busy_message",
           "claim_run_dir", "find_run", "hold_run", "hold_runs", "in_use", "list_recovered", "list_runs", "load_run", "new_run_dir", "parent_folder", "process_owner", "prune_runs", "read_manifest", "read_metrics", "recover_run", "recover_runs",
           "run_folder", "runs_root", "utc_time", "write_atomic"]
