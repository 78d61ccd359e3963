"""CIFAR-10 to a GPU machine in parts of at most 64 MiB, losslessly, and a synthetic stand-in.

    python scripts/cifar_parts.py pack SRC DEST [--limit BYTES]  # SRC holds cifar-10-batches-py
    python scripts/cifar_parts.py unpack DEST/p1 ... OUT_ROOT   # verifies SHA256SUMS
    python scripts/cifar_parts.py synthetic OUT_ROOT [--per-batch N]

pack keeps every file byte for byte: each batch file is split into the pickle bytes around its
image block (kept as they are) and the block itself, [N, 3, 32, 32] uint8, which is stored as
prediction residuals: each pixel minus the LOCO-I median predictor of its left, upper and
upper-left neighbours (mod 256), the G and B residuals minus those of the previous channel,
zigzag-coded, then xz (LZMA2). Measured (results/gpu/PACKING.md): plain xz -9e keeps 75.0% of
data_batch_1, xz after a left-neighbour delta filter 70.0%, this 55.9% of its pixels; the whole
set, 185,877,469 bytes, packs into 103,402,971 (55.6%): two parts of 49.3 MiB instead of three.
A device call carries the repository's working tree with the part (64 MiB together; the tree was
22.5 MiB in session 43, mostly committed run records), so pack puts the files, in order, into
the fewest parts under `--limit` (scripts/gpu_table6.sh passes 64 MiB less the tree, less 2 MiB).
unpack inverts it and checks every file's SHA-256 against the sums written at packing before
anything trains.
Only the standard library and numpy: the GPU image has no zstandard.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import pickle
import pickletools
import sys
from pathlib import Path

import numpy as np

FILES = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
         "test_batch", "batches.meta"]  # fmt: skip
PART_LIMIT = 62 * 2**20  # 64 MiB a call carries, less the repository that travels with it
PRESET = 9 | lzma.PRESET_EXTREME  # xz -9e: the smallest parts; tests pass a faster preset
SIDE, CHANNELS = 32, 3


class PackError(RuntimeError):
    """A part that is missing, damaged or not from this packing; the message says which."""


def image_block(raw: bytes) -> tuple[int, int]:
    """(offset, length) of the one string in a CIFAR batch pickle that holds the pixels,
    found by walking the pickle's opcodes (nothing is unpickled, so nothing can run)."""
    for op, arg, pos in pickletools.genops(raw):
        if isinstance(arg, (bytes, str)) and len(arg) >= SIDE * SIDE * CHANNELS * 100:
            n = len(arg)
            start = raw.find(arg if isinstance(arg, bytes) else arg.encode("latin-1"), pos)
            if start < 0 or op.name not in ("BINSTRING", "BINBYTES", "BINUNICODE"):
                break
            return start, n
    raise PackError("no image block found: not a CIFAR-10 python batch file")


def _median_prediction(x: np.ndarray) -> np.ndarray:
    """LOCO-I predictor of every pixel of x [N, C, H, W] (int16) from its causal neighbours."""
    a = np.zeros_like(x)
    a[..., :, 1:] = x[..., :, :-1]  # left
    b = np.zeros_like(x)
    b[..., 1:, :] = x[..., :-1, :]  # up
    c = np.zeros_like(x)
    c[..., 1:, 1:] = x[..., :-1, :-1]  # up-left
    hi, lo = np.maximum(a, b), np.minimum(a, b)
    return np.where(c >= hi, lo, np.where(c <= lo, hi, a + b - c))


def encode(images: np.ndarray) -> bytes:
    """uint8 [N, 3, 32, 32] -> residual bytes (same count), see the module docstring."""
    x = images.astype(np.int16)
    r = (x - _median_prediction(x)) & 255
    r[:, 1:] = (r[:, 1:] - r[:, :-1]) & 255  # inter-channel, from the unmodified residuals
    s = r.astype(np.uint8).view(np.int8).astype(np.int16)
    return np.where(s >= 0, 2 * s, -2 * s - 1).astype(np.uint8).tobytes()


def decode(data: bytes, n: int) -> np.ndarray:
    z = np.frombuffer(data, np.uint8).reshape(n, CHANNELS, SIDE, SIDE).astype(np.int16)
    r = np.where(z % 2 == 0, z // 2, -(z + 1) // 2) & 255
    r = np.cumsum(r, axis=1) & 255  # undo the inter-channel differences
    x = np.zeros((n, CHANNELS, SIDE + 1, SIDE + 1), np.int16)  # a zero row/column of padding
    for i in range(SIDE):  # raster order: each pixel's neighbours are decoded before it
        for j in range(SIDE):
            a, b, c = x[:, :, i + 1, j], x[:, :, i, j + 1], x[:, :, i, j]
            hi, lo = np.maximum(a, b), np.minimum(a, b)
            p = np.where(c >= hi, lo, np.where(c <= lo, hi, a + b - c))
            x[:, :, i + 1, j + 1] = (p + r[:, :, i, j]) & 255
    return x[:, :, 1:, 1:].astype(np.uint8)


def pack_file(raw: bytes, *, preset: int = PRESET) -> bytes:
    """One file -> one xz stream of a JSON header line, the bytes around the image block and the
    encoded block (files with no block, like batches.meta, are stored as they are)."""
    try:
        start, length = image_block(raw)
    except PackError:
        head = {"block": None}
        return lzma.compress(json.dumps(head).encode() + b"\n" + raw, preset=preset)
    n = length // (SIDE * SIDE * CHANNELS)
    images = np.frombuffer(raw, np.uint8, length, start).reshape(n, CHANNELS, SIDE, SIDE)
    head = {"block": [start, length], "images": n, "size": len(raw)}
    rest = raw[:start] + raw[start + length :]
    body = json.dumps(head).encode() + b"\n" + rest + encode(images)
    return lzma.compress(body, preset=preset)


def unpack_file(packed: bytes) -> bytes:
    body = lzma.decompress(packed)
    line, _, body = body.partition(b"\n")
    head = json.loads(line)
    if head["block"] is None:
        return body
    start, length = head["block"]
    rest_len = head["size"] - length
    rest, data = body[:rest_len], body[rest_len:]
    pixels = decode(data, head["images"]).tobytes()
    return rest[:start] + pixels + rest[start:]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pack(
    src: Path, dest: Path, *, parts: int | None = None, limit: int = PART_LIMIT,
    preset: int = PRESET,
) -> list[Path]:  # fmt: skip
    """Pack SRC/cifar-10-batches-py into DEST/p1..pN (files in order), each part with
    SHA256SUMS of all the original files and at most `limit` bytes: the fewest such parts, or
    with `parts` given, that many of about equal size."""
    root = src / "cifar-10-batches-py"
    missing = [f for f in FILES if not (root / f).is_file()]
    if missing:
        raise PackError(f"{root}: missing {', '.join(missing)}")
    packed, sums = {}, []
    for name in FILES:
        raw = (root / name).read_bytes()
        blob = pack_file(raw, preset=preset)
        if unpack_file(blob) != raw:  # never ship a packing that does not invert
            raise PackError(f"{root / name}: packing did not round-trip")
        packed[name], sums = blob, [*sums, f"{sha256(raw)}  {name}"]
    sums_text = "\n".join(sums) + "\n"
    room = limit - len(sums_text.encode())
    too_big = [n for n in FILES if len(packed[n]) > room]
    if too_big:
        raise PackError(f"{root / too_big[0]} packs to {len(packed[too_big[0]]):,} bytes, more "
                        f"than a part may hold ({limit:,}): make the working tree that travels "
                        "with it smaller")  # fmt: skip
    groups = _fill(packed, room) if parts is None else _share(packed, parts)
    dirs = [dest / f"p{i + 1}" for i in range(len(groups))]
    for d, names in zip(dirs, groups, strict=True):
        d.mkdir(parents=True, exist_ok=True)
        for name in names:
            (d / f"{name}.xz").write_bytes(packed[name])
        (d / "SHA256SUMS").write_text(sums_text)
        size = sum(f.stat().st_size for f in d.iterdir())
        if size > limit:
            raise PackError(f"{d}: {size:,} bytes, over the {limit:,} a part may hold; "
                            "leave --parts out to get as many as fit")  # fmt: skip
    return dirs


def _fill(packed: dict[str, bytes], room: int) -> list[list[str]]:
    """The files in order, a new part whenever the next one would not fit: the fewest parts
    of consecutive files."""
    groups: list[list[str]] = [[]]
    filled = 0
    for name in FILES:
        if groups[-1] and filled + len(packed[name]) > room:
            groups, filled = [*groups, []], 0
        groups[-1].append(name)
        filled += len(packed[name])
    return groups


def _share(packed: dict[str, bytes], parts: int) -> list[list[str]]:
    """The files in order over `parts` parts of about equal size."""
    total = sum(map(len, packed.values()))
    groups: list[list[str]] = [[] for _ in range(parts)]
    i, filled = 0, 0
    for name in FILES:
        if filled + len(packed[name]) > total / parts * 1.05 and i < parts - 1:
            i, filled = i + 1, 0
        groups[i].append(name)
        filled += len(packed[name])
    return [g for g in groups if g]


def unpack(parts: list[Path], out_root: Path, *, require_all: bool = True) -> Path:
    """Rebuild cifar-10-batches-py under out_root from the parts given, each file checked
    against SHA256SUMS before it is put in place; files rebuilt there by an earlier call (one
    part per call) are kept and checked again, and not decoded again when their part is given
    once more (the machine keeps the parts carried before). require_all: every file must be
    there."""
    dest = out_root / "cifar-10-batches-py"
    dest.mkdir(parents=True, exist_ok=True)
    sums: dict[str, str] = {}
    for part in parts:
        if not (part / "SHA256SUMS").is_file():
            raise PackError(f"{part}: no SHA256SUMS; not a part made by `cifar_parts.py pack`")
        for line in (part / "SHA256SUMS").read_text().splitlines():
            digest, name = line.split(maxsplit=1)
            sums[name] = digest
    for part in parts:
        for f in sorted(part.glob("*.xz")):
            name = f.name[: -len(".xz")]
            if (dest / name).is_file() and sha256((dest / name).read_bytes()) == sums.get(name):
                continue  # rebuilt by an earlier call, whose part stays on the machine
            data = unpack_file(f.read_bytes())
            if sha256(data) != sums.get(name):
                raise PackError(f"{f} does not match SHA256SUMS: pack and carry it again")
            tmp = dest / f".{name}.tmp"
            tmp.write_bytes(data)
            tmp.replace(dest / name)  # atomic: a killed call leaves no half-written file
    for name, digest in sums.items():
        path = dest / name
        if not path.is_file():
            if require_all:
                raise PackError(f"{path} missing: carry and unpack every part (p1, p2, ...)")
            continue
        if sha256(path.read_bytes()) != digest:
            raise PackError(f"{path} does not match SHA256SUMS: pack and carry the parts again")
    return dest


def synthetic(out_root: Path, *, per_batch: int = 10000, seed: int = 0) -> Path:
    """Random uint8 images and labels in CIFAR-10's python layout: step times do not depend on
    pixels, and a GPU machine needs no download (nothing outside it can be reached)."""
    dest = out_root / "cifar-10-batches-py"
    dest.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in FILES[:-1]:
        batch = {
            "batch_label": name,
            "labels": rng.integers(0, 10, per_batch).tolist(),
            "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            "filenames": [f"{i}.png" for i in range(per_batch)],
        }
        with open(dest / name, "wb") as f:
            pickle.dump(batch, f, protocol=4)  # 3+: bytes stay bytes (2 needs _codecs, refused)
    with open(dest / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f, protocol=4)
    return dest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack")
    a.add_argument("src")
    a.add_argument("dest")
    a.add_argument("--parts", type=int, help="this many parts (default: the fewest under --limit)")
    a.add_argument("--limit", type=int, default=PART_LIMIT, help="bytes a part may hold")
    a.add_argument("--preset", type=int, default=PRESET, help="xz preset (default -9e)")
    b = sub.add_parser("unpack")
    b.add_argument("paths", nargs="+", help="part directories, then the output root")
    b.add_argument("--partial", action="store_true", help="parts still to come: no file missing")
    c = sub.add_parser("synthetic")
    c.add_argument("out_root")
    c.add_argument("--per-batch", type=int, default=10000)
    args = p.parse_args(argv)
    try:
        if args.cmd == "pack":
            dirs = pack(Path(args.src), Path(args.dest), parts=args.parts, limit=args.limit,
                        preset=args.preset)  # fmt: skip
            for d in dirs:
                size = sum(f.stat().st_size for f in d.iterdir())
                print(f"{d}: {size:,} bytes ({size / 2**20:.1f} MiB)")
        elif args.cmd == "unpack":
            if len(args.paths) < 2:
                p.error("give the part directories, then the output root")
            parts, root = [Path(x) for x in args.paths[:-1]], Path(args.paths[-1])
            out = unpack(parts, root, require_all=not args.partial)
            print(f"{out}: every file there matches SHA256SUMS")
        else:
            print(synthetic(Path(args.out_root), per_batch=args.per_batch))
    except (PackError, OSError, lzma.LZMAError, ValueError) as e:
        print(f"cifar_parts: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
