"""A new user's path on a folder of mixed JPEG/PNG images: pack -> train -> eval -> predict."""

from __future__ import annotations

import numpy as np
from PIL import Image

from helpers import read_json, run_shardtrain


def make_mixed_folder(root):
    """2 classes of photos in mixed formats, sizes and modes (RGB JPEG, RGBA PNG, gray, CMYK)."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(["cats", "dogs"]):
        d = root / name
        d.mkdir(parents=True)
        for i in range(24):
            h, w = rng.integers(20, 48, 2)
            arr = rng.integers(0, 100, (h, w, 3)).astype(np.uint8)
            arr[..., c * 2] += 150
            img = Image.fromarray(arr)
            kind = i % 4
            if kind == 0:
                img.save(d / f"{i}.jpg", quality=90)
            elif kind == 1:
                img.convert("RGBA").save(d / f"{i}.png")
            elif kind == 2:
                img.convert("CMYK").save(d / f"{i}.jpeg")
            else:
                img.save(d / f"{i}.PNG")
    (root / "cats" / "notes.txt").write_text("not an image")
    return root


def test_pack_train_eval_predict_on_mixed_images(tmp_path, tiny_recipe):
    src = make_mixed_folder(tmp_path / "photos")
    shards = tmp_path / "shards"
    packed = run_shardtrain(["pack", src, shards, "--image-size", "24", "--val-fraction", "0.25",
                             "--shard-size", "10"])
    assert "1 skipped" in packed.stdout + packed.stderr
    info = run_shardtrain(["info", shards])
    assert "cats" in info.stdout and "dogs" in info.stdout
    run_shardtrain(["verify", shards])
    out = tmp_path / "run"
    run_shardtrain(["train", "--recipe", tiny_recipe, "--data", shards, "--out", out,
                    "data.batch_size=8", "train.epochs=2"])
    ev = run_shardtrain(["eval", "--checkpoint", out, "--data", shards, "--split", "val"])
    assert "val: acc=" in ev.stdout
    report = read_json(out / "eval-val.json")
    assert report["samples"] == 12 and set(report["per_class_acc"]) == {"cats", "dogs"}
    assert (out / "eval-val.png").is_file()
    images = [src / "cats" / "0.jpg", src / "dogs" / "2.jpeg", src / "dogs" / "1.png"]
    pred = run_shardtrain(["predict", "--checkpoint", out / "model.safetensors", *images])
    lines = pred.stdout.strip().splitlines()
    assert len(lines) == 3 and all(("cats (" in x or "dogs (" in x) for x in lines)
    bad = run_shardtrain(["predict", "--checkpoint", out, src / "cats" / "notes.txt"],
                         check=False)
    assert bad.returncode == 1 and "error" in bad.stderr and "Traceback" not in bad.stderr
