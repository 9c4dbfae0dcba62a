"""bench/results/*.json -> the markdown performance table of the main README.

    .venv/bin/python bench/report.py [--quick]      # prints the table (quick: *-quick.json)
Benchmarks whose results file is missing are left out.
"""

from __future__ import annotations

import argparse
import json
import sys

from common import RESULTS


def load(name: str, quick: bool) -> dict | None:
    path = RESULTS / (f"{name}-quick.json" if quick else f"{name}.json")
    return json.loads(path.read_text()) if path.exists() else None


def fmt_s(t) -> str:
    return f"{t:.0f} s" if t is not None else "not reached"


def at(t) -> str:
    return f"at {t:.0f} s" if t is not None else "not reached"


def loader_rows(r: dict) -> list[str]:
    fm, fr, w = r["fashion_mnist_28"], r["fruits_100_jpg"], r["workers"]
    ips, rat = fm["images_per_sec"], fm["ratio_vs_imagefolder_png"]
    base = f"torchvision ImageFolder PNG + per-sample PIL aug: {ips['imagefolder_png']:,} img/s"
    rows = [
        f"| loader, FashionMNIST 28 px, npy shards, {w} workers (no model) | "
        f"{ips['shard_npy']:,} img/s | {base} | **{rat['shard_npy']:.1f}x** | ≥ 3x |",
        f"| loader, FashionMNIST 28 px, png shards, {w} workers | {ips['shard_png']:,} img/s | "
        f"same | **{rat['shard_png']:.1f}x** | ≥ 3x |",
        f"| loader, npy shards, 1 worker vs {w} | {ips['shard_npy_1worker']:,} img/s | "
        f"{ips['shard_npy']:,} img/s ({w} workers) | "
        f"{ips['shard_npy_1worker'] / ips['shard_npy']:.2f}x | |",
    ]
    fi, frat = fr["images_per_sec"], fr["ratio_vs_imagefolder_jpg"]
    rows.append(f"| loader, 100 px JPEG ({fr['samples']:,} generated, Fruits-360-sized), "
                f"{w} workers | {fi['shard_jpg']:,} img/s | ImageFolder JPEG: "
                f"{fi['imagefolder_jpg']:,} img/s | **{frat['shard_jpg']:.1f}x** | |")
    mem = r["peak_memory_mb"]
    (a, ma), (b, mb) = sorted(mem.items(), key=lambda kv: int(kv[0].split("_")[0]))
    rows.append(f"| loader peak memory (main + {w} workers; PSS, RSS in brackets), "
                f"{b.replace('_', ' ')} vs {a.replace('_', ' ')} | {mb['pss']:,.0f} MB "
                f"({mb['rss']:,.0f}) | {ma['pss']:,.0f} MB ({ma['rss']:,.0f}) | "
                f"{mb['pss'] / ma['pss']:.2f}x | flat |")
    return rows


def overhead_rows(r: dict) -> list[str]:
    s, q = r["steps_per_sec"], r["ratio_vs_bare_channels_last"]
    prec = {"no": "fp32", "bf16": "bf16 autocast"}[r.get("precision", "no")]
    rows = [f"| trainer loop vs bare PyTorch loop (resnet9 16-128, batch 256, {prec}, Adam, "
            f"clip 0.1, in-memory batch, 1 process) | {s['shardtrain_loop']:.2f} steps/s | "
            f"{s['bare_channels_last']:.2f} steps/s | **{q['shardtrain_loop']:.3f}** | ≥ 0.97 |"]
    if r.get("precision", "no") != "no":
        return rows
    rows.append(f"| channels_last vs NCHW (bare loop, CPU, fp32) | "
                f"{s['bare_channels_last']:.2f} steps/s | {s['bare_nchw']:.2f} steps/s | "
                f"{1 / q['bare_nchw']:.2f}x | keep if > 1 |")
    if "bare_other_precision_channels_last" in s:
        rows.append(f"| bf16 autocast vs fp32 (bare loop, this CPU has AMX) | "
                    f"{s['bare_other_precision_channels_last']:.2f} steps/s | "
                    f"{s['bare_channels_last']:.2f} steps/s | "
                    f"**{q['bare_other_precision_channels_last']:.2f}x** | keep if > 1 |")
    if "bare_compiled_channels_last" in s:
        rows.append(f"| torch.compile vs eager (bare loop, CPU, fp32) | "
                    f"{s['bare_compiled_channels_last']:.2f} steps/s | "
                    f"{s['bare_channels_last']:.2f} steps/s | "
                    f"{q['bare_compiled_channels_last']:.2f}x | keep if > 1 |")
    return rows


def verdict(target: str, ok: bool | None, contended: bool = False) -> str:
    """The target column: the target and whether this run met it."""
    if ok is None:
        return target
    note = " (contended run)" if contended else ""
    return f"{target}: {'met' if ok else '**not met**'}{note}"


def tta_rows(r: dict) -> list[str]:
    base = r.get("tutorial")
    if not base:
        return []
    t_base, end_base = base["time_to"]["0.93"], base["epochs"][-1]["time"]
    rows = []
    best_runs = r["best"]["runs"] if "best" in r else []  # summarised in one row below
    for name, v in r.items():
        if name in ("tutorial", "best", *best_runs):
            continue
        what = f"`{v['recipe']}` {' '.join(v.get('overrides', []))}".strip()
        last = v["epochs"][-1]
        tta = " with flip TTA" if last["epoch"] == "final+tta" else ""
        final = f"final {last['test_acc']:.4f}{tta} at {last['time']:.0f} s"
        ratio = v.get("ratio_t93_vs_tutorial")
        claimed = "t93_met" in v  # the bench judged this run against the target
        target = verdict(f"≤ {v['t93_target']:g}", v["t93_met"], v.get("contended", False)) \
            if claimed else ""
        rows.append(
            f"| time to 93% test acc, full FashionMNIST: {what} ({v['world_size']} proc) vs "
            f"tutorial recipe | {fmt_s(v['time_to']['0.93'])} ({final}) | {fmt_s(t_base)} "
            f"(final {base['final_test_acc']:.4f} at {end_base:.0f} s) | "
            f"{f'**{ratio}**' if claimed else ratio} | {target} |")
    best = r.get("best")
    if best:
        n = len(best["final_test_acc"])
        rows.append(
            f"| `fashion-mnist-best` test acc without TTA, full FashionMNIST, 2 proc, {n} seeds "
            f"(mean ± std, range), within the tutorial's whole run ({end_base:.0f} s) | "
            f"**{best['mean']:.4f}** ± {best['std']:.4f} ({best['min']:.4f}-{best['max']:.4f}), "
            f"last run ended at {best['max_end_time']:.0f} s | tutorial: "
            f"{base['final_test_acc']:.4f} at {end_base:.0f} s | | "
            f"{verdict('≥ 0.945 within the time', best['met'], best['contended'])} |")
    return rows


def jpeg_rows(r: dict) -> list[str]:
    p, w = r["photos"], r["workers"]
    ips, rat = p["images_per_sec"], p["ratio_vs_imagefolder"]
    what = (f"loader, {p['samples']:,} generated photographs (~500x375 JPEG q90) → "
            f"RandomResizedCrop {r['size']} + flip + colour jitter, batch {r['batch']}, "
            f"{w} workers")
    rows = [f"| {what}: shard loader vs torchvision ImageFolder + PIL | {ips['shard']:,} img/s | "
            f"{ips['imagefolder']:,} img/s | **{rat['shard']:.2f}x** | "
            f"{verdict('≥ 2x', rat['shard'] >= 2.0)} |"]
    cpu, spread = p.get("cpu_ms_per_image"), p["all_rates"]
    if cpu:  # what contention distorts least, and the spread of the per-round ratios
        rounds = [a / b for a, b in zip(spread["shard"], spread["imagefolder"])]
        rows.append(f"| the same: CPU time of the whole process tree per image (per-round "
                    f"wall ratios {min(rounds):.2f}-{max(rounds):.2f}x) | {cpu['shard']} ms | "
                    f"{cpu['imagefolder']} ms | {p['cpu_ratio_imagefolder_vs']['shard']:.2f}x | |")
    if "timm" in ips:
        q = p["ratio_shard_vs_timm"]
        rows.append(f"| the same: shard loader vs timm `create_loader` | {ips['shard']:,} img/s | "
                    f"{ips['timm']:,} img/s | **{q:.2f}x** | {verdict('≥ 1x', q >= 1.0)} |")
    for k in ips:
        if k.startswith("shard_max"):
            rows.append(f"| the same, shards packed with `--max-size {k[9:]}` vs ImageFolder on "
                        f"the full-size files | {ips[k]:,} img/s | {ips['imagefolder']:,} img/s "
                        f"| {rat[k]:.2f}x | |")
    mem = r.get("memory_mb")
    if mem:
        (a, ma), (b, mb) = sorted(mem.items(), key=lambda kv: int(kv[0].split("_")[0]))
        when = f", run of {r['memory_from']}" if r.get("memory_from") else ""
        for part, label in (("pack", "`shardtrain pack` (main + workers)"),
                            ("loader", f"shard loader, 40 batches (main + {w} workers)")):
            q = mb[part]["pss"] / ma[part]["pss"]
            rows.append(f"| peak memory (PSS, RSS in brackets) of {label}: {b.split('_')[0]} vs "
                        f"{a.split('_')[0]} JPEGs{when} | {mb[part]['pss']:,.0f} MB "
                        f"({mb[part]['rss']:,.0f}) | {ma[part]['pss']:,.0f} MB "
                        f"({ma[part]['rss']:,.0f}) | {q:.2f}x | "
                        f"{verdict('flat (≤ 1.1x)', q <= 1.1)} |")
    return rows


def pack_rows(r: dict) -> list[str]:
    rows = []
    for fmt in ("npy", "png"):
        m = r[fmt]["median"]
        s, t = m["shardtrain"], m["tar"]
        rows.append(f"| `shardtrain pack` FashionMNIST IDX → {fmt} shards ({r[fmt]['images']:,} "
                    f"images) vs plain tarfile writer | {s['images_per_sec']:,.0f} img/s, "
                    f"{s['mb_per_sec']:.1f} MB/s | {t['images_per_sec']:,.0f} img/s, "
                    f"{t['mb_per_sec']:.1f} MB/s | **{r[fmt]['ratio_shardtrain_vs_tar']:.2f}x** "
                    f"| ≥ 0.5x |")
    return rows


def scaling_rows(r: dict) -> list[str]:
    i = r["images_per_sec"]
    best1 = max(i["1p_w1"], i["1p_w2"])
    return [f"| `shardtrain train` 2 CPU processes vs 1 (fashion-mnist-resnet9, "
            f"{r['steps']} steps) | {i['2p_w1']:,.0f} img/s | {best1:,.0f} img/s "
            f"(1 worker: {i['1p_w1']:,.0f}, 2 workers: {i['1p_w2']:,.0f}) | "
            f"**{r['ratio_2p_vs_1p']:.2f}x** | |"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    lines = ["| benchmark (2 shared CPU cores, no GPU) | shardtrain | baseline | ratio | target |",
             "|---|---|---|---|---|"]
    for name, rows in (("loader", loader_rows), ("trainer_overhead", overhead_rows),
                       ("trainer_overhead-bf16", overhead_rows), ("time_to_accuracy", tta_rows),
                       ("loader_jpeg", jpeg_rows),
                       ("pack", pack_rows), ("scaling", scaling_rows)):
        r = load(name, args.quick)
        if r is not None:
            lines += rows(r)
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
