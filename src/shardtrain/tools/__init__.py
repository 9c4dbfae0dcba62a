"""Commands around a trained model; training never imports them.

    inference.py  `shardtrain eval` (a split, exact) and `shardtrain predict` (image files)
    export.py     `shardtrain export`: ONNX / TorchScript with the normalisation inside
    show.py       `shardtrain show`: a PNG grid of samples, raw or augmented as trained
    lr_find.py    `shardtrain lr-find`: the learning-rate range test
"""
