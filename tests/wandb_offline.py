"""Read W&B offline runs back without a server: config, history, summary and media.

Offline runs (`WANDB_MODE=offline`) write `wandb/offline-run-<time>-<id>/run-<id>.wandb` and media
files, but no config.yaml or wandb-summary.json. The `.wandb` file is a leveldb-style record log
of `wandb_internal_pb2.Record` protos; wandb 0.31 writes it from Go (wandb-core) and ships no
Python reader (`wandb.sdk.internal.datastore` is gone), so the ~30-line framing reader is in
shardtrain.tracking.wandb_log (the trainer uses it to resume an offline run without gaps).

    run = read_offline_run("wandb/offline-run-20250101_120000-abc123")
    run.config["optim"]["max_lr"], run.history[-1]["_step"], run.summary["val/acc"]
    run.artifacts[0]["aliases"], run.metrics["val/acc"]["summary"], run.charts["cm"]

A resumed run (`wandb.init(id=..., resume="allow")` offline) starts another
`offline-run-*-<id>` folder (suffix `-1`, `-2` if the second matches) with its own `.wandb` file;
`read_offline_runs_by_id(root, id)` merges them in start-time order.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from shardtrain.errors import UserError
from shardtrain.tracking.wandb_log import read_records  # the record framing

MEDIA_TYPES = ("image-file", "images/separated", "table-file", "video-file", "audio-file",
               "html-file")


@dataclass
class OfflineRun:
    run_id: str
    project: str = ""
    name: str = ""
    group: str = ""
    tags: list[str] = field(default_factory=list)
    job_type: str = ""
    config: dict = field(default_factory=dict)  # without W&B's internal "_wandb" key
    history: list[dict] = field(default_factory=list)  # one dict per committed row, with "_step"
    summary: dict = field(default_factory=dict)
    media: list[dict] = field(default_factory=list)  # {"key", "step", "type", "path"} per item
    start_time: float = 0.0  # seconds since the epoch
    paths: list[Path] = field(default_factory=list)  # offline-run folders read, in order
    exited: bool = False  # an exit record was written (the process called finish())
    # logged artifacts, in order: {"name", "type", "aliases", "metadata", "use_after_commit",
    # "files": {path: {"digest", "size", "local_path" (a staged copy) or "ref" (a reference)}}}
    artifacts: list[dict] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)  # define_metric: name or glob -> definition
    charts: dict = field(default_factory=dict)  # custom charts: history key -> panel id


def find_offline_runs(root: Path) -> list[Path]:
    """Offline run folders (holding a run-*.wandb) under `root`, oldest first."""
    files = Path(root).rglob("run-*.wandb")
    folders = {p.parent for p in files if p.parent.name.startswith("offline-run-")}
    return sorted(folders, key=lambda p: (p.name.split("-")[2], p.name))


def read_offline_run(run_path: Path, wait_seconds: float = 0.0) -> OfflineRun:
    """One offline run folder (or its .wandb file) -> OfflineRun.

    Args:
        wait_seconds: poll up to this long for the exit record. `run.finish()` can return before
            wandb-core has flushed the file (seen with 0.31: an empty read right after finish).
    """
    run_path = Path(run_path)
    files = [run_path] if run_path.is_file() else sorted(run_path.glob("run-*.wandb"))
    if not files:
        raise UserError(f"no run-*.wandb file in {run_path}")
    deadline = time.monotonic() + wait_seconds
    while True:
        run = OfflineRun(run_id="")
        apply_records(run, read_records(files[0]), files[0].parent)
        if run.exited or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    run.paths = [files[0].parent]
    return run


def read_offline_runs_by_id(root: Path, run_id: str, wait_seconds: float = 0.0) -> OfflineRun:
    """Merge every offline segment of `run_id` under `root` (original + resumes), in start order.

    Segments are concatenated as they are: a step logged by two segments is an error here (the
    trainer must not send a step twice; W&B itself would keep the first row and drop the rest).
    """
    folders = [p for p in find_offline_runs(root) if (p / f"run-{run_id}.wandb").is_file()]
    if not folders:
        raise UserError(f"no offline run with id {run_id!r} under {root}")
    segments = [read_offline_run(p, wait_seconds) for p in folders]
    segments.sort(key=lambda r: (r.start_time, str(r.paths)))
    merged = segments[0]
    for seg in segments[1:]:
        if seg.history and merged.history and seg.history[0]["_step"] <= merged.history[-1][
                "_step"]:
            raise ValueError(f"segment {seg.paths[0].name} logs step {seg.history[0]['_step']} "
                             f"again (the previous one reached {merged.history[-1]['_step']})")
        merged.history += seg.history
        merged.media += seg.media
        merged.artifacts += seg.artifacts
        merged.metrics.update(seg.metrics)
        merged.charts.update(seg.charts)
        merged.config.update(seg.config)
        merged.summary.update(seg.summary)
        for name in ("project", "name", "group", "job_type"):
            setattr(merged, name, getattr(seg, name) or getattr(merged, name))
        merged.tags = seg.tags or merged.tags
        merged.paths += seg.paths
        merged.exited = seg.exited
    return merged


def apply_records(run: OfflineRun, records: list, folder: Path) -> None:
    """Fold a record stream into `run` (updates and removes applied in file order)."""
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            run.run_id, run.project, run.name = r.run_id, r.project, r.display_name
            run.group, run.job_type, run.tags = r.run_group, r.job_type, list(r.tags)
            run.start_time = r.start_time.seconds + r.start_time.nanos / 1e9
            apply_updates(run.config, r.config.update, r.config.remove)
            apply_updates(run.summary, r.summary.update, r.summary.remove)
        elif kind == "config":
            apply_updates(run.config, rec.config.update, rec.config.remove)
        elif kind == "summary":
            apply_updates(run.summary, rec.summary.update, rec.summary.remove)
        elif kind == "history":
            row: dict = {}
            apply_updates(row, rec.history.item, [])
            row.setdefault("_step", rec.history.step.num)
            run.history.append(row)
            run.media += media_items(row, folder)
        elif kind == "artifact":
            run.artifacts.append(artifact_dict(rec.artifact))
        elif kind == "metric":
            m = rec.metric
            run.metrics[m.name or m.glob_name] = {
                "step_metric": m.step_metric,
                "summary": sorted(f.name for f, v in m.summary.ListFields() if v is True)}
        elif kind == "exit":
            run.exited = True
    wandb_keys = run.config.get("_wandb", {})
    visualize = wandb_keys.get("value", wandb_keys).get("visualize", {})  # either form
    run.charts = {key: v["panel_config"]["panelDefId"] for key, v in visualize.items()}
    run.config = {k: unwrap(v) for k, v in run.config.items() if k != "_wandb"}
    for key in ("_wandb", "_runtime"):
        run.summary.pop(key, None)


def artifact_dict(a) -> dict:
    files = {}
    for entry in a.manifest.contents:
        files[entry.path] = {"digest": entry.digest, "size": entry.size,
                             **({"ref": entry.ref} if entry.ref else {}),
                             **({"local_path": entry.local_path} if entry.local_path else {})}
    return {"name": a.name, "type": a.type, "aliases": sorted(a.aliases),
            "metadata": json.loads(a.metadata or "{}"), "use_after_commit": a.use_after_commit,
            "files": files}


def apply_updates(target: dict, updates, removes) -> None:
    """Apply W&B `{key | nested_key: [...], value_json}` items to a nested dict."""
    for item in updates:
        keys = list(item.nested_key) or [item.key]
        node = target
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = json.loads(item.value_json)
    for item in removes:
        keys = list(item.nested_key) or [item.key]
        node = target
        for k in keys[:-1]:
            node = node.get(k, {})
        node.pop(keys[-1], None)


def unwrap(value):
    """Config values in W&B's `{"value": v, "desc": ...}` file form -> v (others unchanged)."""
    if isinstance(value, dict) and "value" in value and set(value) <= {"value", "desc"}:
        return value["value"]
    return value


def media_items(row: dict, folder: Path) -> list[dict]:
    """Images/tables/... referenced by a history row, with paths under the run's files/."""
    out = []
    for key, value in row.items():
        if isinstance(value, dict) and value.get("_type") in MEDIA_TYPES:
            # one file per item; a list of images ("images/separated") lists its "filenames"
            for path in value.get("filenames") or [value.get("path")]:
                out.append({"key": key, "step": row["_step"], "type": value["_type"],
                            "path": str(folder / "files" / path) if path else None})
    return out
