#!/usr/bin/env python3
"""Regenerates the CIFAR-10 sample embedded in whvi (src/data/cifar10_sample_{train,test}.bin.gz).

Usage:
    python3 -m pip install pillow numpy
    python3 /work/shared/data/cifar10/make_bin.py /tmp/cifar10      # official binary layout
    python3 benches/make_cifar10_sample.py /tmp/cifar10/cifar-10-batches-bin src/data

The source is "CIFAR-10 (JPEG copy)": the real CIFAR-10 images, re-encoded once as JPEG by the
public mirror they were taken from, written back in the official binary record format
(1 label byte + 1024 R + 1024 G + 1024 B bytes, row-major) by make_bin.py.

Selection (no randomness): walk data_batch_1.bin .. data_batch_5.bin in file order and keep the
first 100 records of each class (1,000 train images); walk test_batch.bin and keep the first
50 records of each class (500 test images). Kept records stay in file order, which make_bin.py
already shuffled with a fixed seed. Each set is gzip-compressed (level 9, mtime 0, so the
output is byte-for-byte reproducible).
"""
import gzip
import os
import sys

RECORD = 3073


def pick(paths, per_class):
    counts = [0] * 10
    out = []
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        assert len(data) % RECORD == 0, path
        for i in range(0, len(data), RECORD):
            label = data[i]
            if counts[label] < per_class:
                counts[label] += 1
                out.append(data[i:i + RECORD])
    assert counts == [per_class] * 10, counts
    return b"".join(out)


def write(path, payload):
    with open(path, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=raw, mtime=0) as f:
            f.write(payload)
    print("wrote", path, os.path.getsize(path), "bytes")


def main(src, dst):
    train = pick([os.path.join(src, f"data_batch_{i}.bin") for i in range(1, 6)], 100)
    test = pick([os.path.join(src, "test_batch.bin")], 50)
    write(os.path.join(dst, "cifar10_sample_train.bin.gz"), train)
    write(os.path.join(dst, "cifar10_sample_test.bin.gz"), test)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
