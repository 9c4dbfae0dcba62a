"""What leaves a run: files in the run folder and W&B.

    report.py   Reporter: every rank-0 side effect of training (prints, progress bar,
                metrics.jsonl, W&B, final.json, eval files) in one place
    media.py    the images logged at the end of a run (predictions, confusion, LR schedule)
    plots.py    matplotlib figures (curves, confusion matrix, sample grids)
    compare.py  `shardtrain compare`: runs side by side (folders or W&B)
    sweep.py    `shardtrain sweep`: a grid of runs, then a comparison
"""
