#!/usr/bin/env python3
"""Writes the seed inputs of the fuzz targets: small valid files of each format, so that the
fuzzer starts from inputs that reach deep into the readers. Standard library only.

    python3 benches/fuzz/make_seeds.py SEED_DIR CHECKPOINT REPO

CHECKPOINT is a small checkpoint written by `whvi train` (benches/fuzz.sh makes one); REPO is
the repository root, whose models/*.toml seed the spec reader.
"""
import gzip
import io
import struct
import sys
import tarfile
from pathlib import Path

RECORD = 3073


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def split(first, second):
    """The two-file layout the targets read: a little-endian u16 length, then both parts."""
    return struct.pack("<H", len(first)) + first + second


def records(labels):
    return b"".join(bytes([label]) + bytes((label * 31 + i) % 256 for i in range(RECORD - 1))
                    for label in labels)


META = b"airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n"


def cifar_tar():
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        members = [("batches.meta.txt", META)]
        members += [(f"data_batch_{i}.bin", records([i, 9 - i])) for i in range(1, 6)]
        members += [("test_batch.bin", records([0, 1, 2]))]
        for name, data in members:
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def idx(dims, data):
    return bytes([0, 0, 8, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims) + data


def npy(descr, shape, data, version=1):
    shape_text = f"({shape[0]},)" if len(shape) == 1 else "(" + ", ".join(map(str, shape)) + ")"
    header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_text}, }}"
    prefix = 10 if version == 1 else 12
    padded = -(-(prefix + len(header) + 1) // 64) * 64 - prefix
    header = header.ljust(padded - 1).encode() + b"\n"
    size = struct.pack("<H", len(header)) if version == 1 else struct.pack("<I", len(header))
    return b"\x93NUMPY" + bytes([version, 0]) + size + header + data


def main(seed_dir, checkpoint, repo):
    seeds = Path(seed_dir)
    write(seeds / "checkpoint" / "lenet5.safetensors", Path(checkpoint).read_bytes())
    write(seeds / "cifar10_batch" / "plain", split(b"\x00" + records([3, 4])[1:], META))
    write(seeds / "cifar10_batch" / "gzipped", split(b"\x01" + records([5])[1:], b""))
    tar = cifar_tar()
    write(seeds / "cifar10_tar" / "archive.tar", tar)
    write(seeds / "cifar10_tar_gz" / "archive.tar.gz", gzip.compress(tar))
    images = idx([2, 28, 28], bytes(i % 256 for i in range(2 * 28 * 28)))
    write(seeds / "idx" / "pair", split(images, idx([2], bytes([3, 9]))))
    probs = struct.pack("<12f", *([0.5, 0.25, 0.25] * 4))
    write(seeds / "npy" / "probs_f32", npy("<f4", [4, 3], probs))
    write(seeds / "npy" / "samples_f64", npy("<f8", [2, 2, 3], struct.pack("<12d", *([1/3] * 12))))
    write(seeds / "npy" / "labels_i64", npy("<i8", [4], struct.pack("<4q", 0, 1, 2, 1)))
    write(seeds / "npy" / "labels_u1_v2", npy("|u1", [3], bytes([2, 0, 1]), version=2))
    write(seeds / "npy" / "bool", npy("|b1", [2], bytes([1, 0])))
    for spec in sorted(Path(repo, "models").glob("*.toml")):
        write(seeds / "model_spec" / spec.name, spec.read_bytes())


if __name__ == "__main__":
    main(*sys.argv[1:])
