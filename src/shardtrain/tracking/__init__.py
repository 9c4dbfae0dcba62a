"""What leaves a run: files in the run folder and W&B.

    report.py      Reporter: every rank-0 side effect of training (prints, progress bar,
                   metrics.jsonl, W&B, final.json, eval files) in one place
    wandb_run.py   how the W&B run starts: mode and credentials, init arguments (wandb agent
                   aware), metric definitions, the run's URL
    wandb_log.py   the last step a resumed W&B run already holds (online or offline)
    artifacts.py   the dataset (used, by reference) and model (latest/best) artifacts, and
                   `--checkpoint wandb:ENTITY/PROJECT/NAME:ALIAS`
    media.py       what is logged at the end of a run (predictions grid and table, confusion
                   matrix PNG and interactive chart, LR schedule, weights)
    histograms.py  per-layer parameter/gradient histograms and the weights-per-layer PNG
    plots.py       matplotlib figures (curves, confusion matrix, sample grids)
    compare.py     `shardtrain compare`: runs side by side (folders or W&B)
    sweep.py       `shardtrain sweep`: a grid of runs, then a comparison
"""
