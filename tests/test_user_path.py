"""A new user's path on a folder of mixed JPEG/PNG images: pack -> train -> eval -> predict."""

from __future__ import annotations

import struct
import zlib

import numpy as np
from PIL import Image

from helpers import RUNS, read_json, run_shardtrain

pytestmark = RUNS  # real training subprocesses


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
    # good and bad files together: each bad one is an error line, the good ones still predicted
    bad = {src / "cats" / "notes.txt": "cannot decode image",
           png_bomb(tmp_path / "bomb.png"): "decompression bomb",
           huge_file(tmp_path / "huge.jpg"): "file larger than 64 MB",
           tmp_path / "missing.png": "no such file"}
    both = run_shardtrain(["predict", "--checkpoint", out, images[0], *bad, images[2]],
                          check=False)
    assert both.returncode == 1 and "Traceback" not in both.stderr, both.stderr
    good = both.stdout.strip().splitlines()
    assert [x.split(":")[0] for x in good] == [str(images[0]), str(images[2])]
    assert good == [lines[0], lines[2]]  # the same predictions as without the bad files
    errors = both.stderr.strip().splitlines()
    assert errors == [x for x in errors if ": error: " in x] and len(errors) == len(bad)
    for line, (path, reason) in zip(errors, bad.items()):
        assert line.startswith(f"{path}: error: ") and reason in line, line


def png_bomb(path):
    """A PNG header claiming 20000 x 20000 px (4e8 > 2 x PIL's MAX_IMAGE_PIXELS) in ~60 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)  # 8-bit gray
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def huge_file(path):
    """64 MB + 1 byte, sparse (no disk used): refused by its size before anything is read."""
    with open(path, "wb") as f:
        f.truncate(64 * 2**20 + 1)
    return path
