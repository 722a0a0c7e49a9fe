#!/usr/bin/env python
"""Write an ImageFolder as webdataset tar shards with an index, for --data_path (crossmae-make-shards).

    .venv/bin/python tools/make_shards.py /data/imagenet/train /data/imagenet-shards --shard_size 1000
"""
import sys

from pretrain.cli import make_shards

if __name__ == "__main__":
    sys.exit(make_shards())
