"""How the Reporter starts its W&B run: mode and credentials, init arguments, metric definitions.

Mode: WANDB_MODE decides when set (online | offline | disabled). Otherwise the run is online when
wandb would find credentials for the server it talks to (WANDB_API_KEY, an identity token file,
an api_key setting, or a netrc entry for that host, which is what `wandb login` and
`wandb login --host https://wandb.example.com` write for a self-hosted server), else offline
rather than blocking on a login prompt; `wandb sync RUN_DIR/wandb/offline-run-*` uploads later.

Under `wandb agent` (WANDB_SWEEP_ID set) W&B owns the run id, project and entity: wandb.init
ignores ours (with a warning), so they are not passed, and the Reporter adopts `run.id` after
init so that final.json, checkpoints and `--resume` point at the agent's run.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def wandb_mode_from_env() -> str:
    """'online' with credentials, else 'offline', unless WANDB_MODE says otherwise."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if has_credentials() else "offline"


def has_credentials() -> bool:
    """Whether wandb.init would find credentials for its server (base_url from WANDB_BASE_URL
    or the settings `wandb login --host` writes), looked up the way wandb itself does."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:
        from wandb.sdk import wandb_setup
        from wandb.sdk.lib.wbauth import wbnetrc

        settings = wandb_setup.singleton().settings
        return bool(settings.api_key or wbnetrc.read_netrc_auth(host=settings.base_url))
    except Exception:  # unreadable netrc, malformed key, a wandb without these: stay offline
        return False


def agent_ids() -> tuple[str, str] | None:
    """(sweep id, run id) when running under `wandb agent`, else None."""
    sweep, run = os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
    return (sweep, run) if sweep and run else None


def default_run_dir(recipe: str) -> Path:
    """runs/sweep-SWEEP/RUN under an agent (one folder per agent run), else runs/RECIPE-TIME."""
    ids = agent_ids()
    if ids:
        return Path("runs") / f"sweep-{ids[0]}" / ids[1]
    return Path("runs") / f"{Path(recipe).stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def init_kwargs(cfg, run_id: str, run_dir: Path, mode: str) -> dict:
    """wandb.init arguments (besides project and config, which accelerate passes)."""
    import wandb

    kwargs = {
        "resume": "allow", "dir": str(run_dir), "mode": mode,
        "name": cfg.log.name or f"{Path(cfg.recipe).stem}-{time.strftime('%Y%m%d-%H%M%S')}",
        "group": cfg.log.group or Path(cfg.recipe).stem, "tags": cfg.log.tags,
        "job_type": cfg.log.job_type,
        "settings": wandb.Settings(init_timeout=10, silent=True),
    }
    if agent_ids() is None:  # under an agent W&B assigns them (and would warn about ours)
        kwargs.update(id=run_id, entity=cfg.log.entity or None)
    elif not cfg.log.name:
        kwargs.pop("name")  # keep the agent's run name
    return kwargs


def define_metrics(run) -> None:
    """Epoch as the x-axis of every val/* chart; val/acc summarised by its max, val/loss by its
    min (what a sweep's `metric:` and the runs table then show)."""
    run.define_metric("epoch")
    run.define_metric("val/*", step_metric="epoch")
    run.define_metric("val/acc", step_metric="epoch", summary="max")
    run.define_metric("val/loss", step_metric="epoch", summary="min")


def run_banner(run, run_dir: Path) -> str:
    """One line: the run's URL online; where it lies and how to upload it offline."""
    if not run.offline and run.url:
        return f"W&B run {run.name}: {run.url}"
    return (f"W&B run {run.id} (offline) in {run_dir / 'wandb'}; upload: "
            f"wandb sync {run_dir / 'wandb'}/offline-run-*-{run.id}")
