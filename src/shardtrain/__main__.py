"""`python -m shardtrain ...` is the same as the `shardtrain` console script."""

from shardtrain.cli import main

if __name__ == "__main__":
    main()
