"""shardtrain: pack image datasets into WebDataset shards and train BN-ResNets with Accelerate."""

__version__ = "0.1.0"
