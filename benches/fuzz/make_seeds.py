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


def mat_element(kind, data):
    """A MATLAB 5 data element: type, length, data padded to 8 bytes."""
    return struct.pack("<II", kind, len(data)) + data + bytes(-len(data) % 8)


def mat_matrix(name, dims, array_class, kind, data):
    body = mat_element(6, bytes([array_class]) + bytes(7))
    body += mat_element(5, b"".join(struct.pack("<i", d) for d in dims))
    body += mat_element(1, name.encode())
    body += mat_element(kind, data)
    return mat_element(14, body)


def svhn_mat():
    """An uncompressed SVHN-layout file: X uint8 [32, 32, 3, 1], y double [1, 1] = 10."""
    header = b"MATLAB 5.0 MAT-file, fuzz seed".ljust(116) + bytes(8) + b"\x00\x01IM"
    x = mat_matrix("X", [32, 32, 3, 1], 9, 2, bytes(i % 256 for i in range(3072)))
    return header + x + mat_matrix("y", [1, 1], 6, 9, struct.pack("<d", 10.0))


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
    write(seeds / "svhn_mat" / "scipy_compressed", Path(repo, "tests/data/svhn_tiny.mat").read_bytes())
    write(seeds / "svhn_mat" / "plain", svhn_mat())
    record100 = bytes([2, 11]) + bytes(i % 256 for i in range(RECORD - 1))
    names = b"".join(f"class{i}\n".encode() for i in range(100))
    write(seeds / "cifar100" / "with_names", split(record100 * 2, names))
    write(seeds / "cifar100" / "standard_names", split(record100, b""))
    labels = npy("|u1", [5], bytes([0, 1, 2, 3, 4]))
    fog = npy("|u1", [5, 32, 32, 3], bytes(i % 251 for i in range(5 * 3072)))
    write(seeds / "cifar10_c" / "five_images", split(labels, fog))
    for spec in sorted(Path(repo, "models").glob("*.toml")):
        write(seeds / "model_spec" / spec.name, spec.read_bytes())


if __name__ == "__main__":
    main(*sys.argv[1:])
