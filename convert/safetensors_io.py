"""Zero-copy reading of HF safetensors checkpoints, one shard at a time.

The ``safetensors`` package's numpy backend cannot represent bfloat16, the dtype of most Qwen checkpoints, so
tensors are read here as numpy memmaps (bfloat16 through ml_dtypes). A memmap keeps only the pages being copied
resident, which is what bounds conversion's peak memory to about one shard.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted: the message names the file or tensors at fault."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shard: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the shard
    nbytes: int


def absolute_path(path: str | Path) -> Path:
    """``path`` with ``~`` expanded, made absolute (Orbax refuses relative paths); symlinks are kept."""
    return Path(os.path.abspath(Path(path).expanduser()))


def checkpoint_dir(path: str | Path) -> Path:
    """``absolute_path(path)``, which must be an existing directory: a clear error naming what it is otherwise."""
    resolved = absolute_path(path)
    if resolved.is_file():
        raise CheckpointError(f"{resolved} is a file, not a directory: pass the checkpoint directory (the one "
                              "holding config.json)")
    if not resolved.is_dir():
        raise CheckpointError(f"checkpoint directory {resolved} does not exist")
    return resolved


def shard_files(hf_dir: Path) -> list[Path]:
    """The shards of a checkpoint, in a stable order; every shard the index names must exist."""
    index = hf_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from e
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (hf_dir / n).is_file()]
        if missing:
            raise CheckpointError(f"missing shard(s) listed in {INDEX_FILE}: {', '.join(missing)}")
        return [hf_dir / n for n in names]
    if (hf_dir / SINGLE_FILE).is_file():
        return [hf_dir / SINGLE_FILE]
    found = sorted(hf_dir.glob("*.safetensors"))
    if found:
        return found
    raise CheckpointError(f"no safetensors weights in {hf_dir} (expected {SINGLE_FILE} or {INDEX_FILE})")


def read_header(shard: Path) -> list[TensorInfo]:
    size = shard.stat().st_size
    with shard.open("rb") as f:
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise CheckpointError(f"corrupt safetensors file {shard.name}: shorter than its 8-byte header length")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > size - 8:
            raise CheckpointError(f"corrupt safetensors file {shard.name}: header length {header_len} exceeds "
                                  f"file size {size}")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"corrupt safetensors file {shard.name}: unreadable header ({e})") from e
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    infos = []
    for name, meta in header.items():
        try:
            dtype, shape, (begin, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"corrupt safetensors file {shard.name}: bad entry for {name!r}") from e
        if dtype not in DTYPES:
            raise CheckpointError(f"{shard.name}: tensor {name!r} has unsupported dtype {dtype}")
        expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[dtype]).itemsize
        if begin < 0 or end - begin != expected:
            raise CheckpointError(
                f"corrupt safetensors file {shard.name}: tensor {name!r} ({dtype} {list(shape)}) needs {expected} "
                f"bytes but the header gives it the data range [{begin}, {end})")
        if data_start + end > size:
            raise CheckpointError(
                f"corrupt safetensors file {shard.name} (truncated?): tensor {name!r} ends at byte {data_start + end} "
                f"by its header, but the file has {size} bytes")
        infos.append(TensorInfo(name, shard, dtype, shape, data_start + begin, end - begin))
    return infos


def read_tensors(shard: Path, infos: list[TensorInfo]) -> Iterator[tuple[TensorInfo, np.ndarray]]:
    """(info, read-only memmap view) for each tensor of one shard, in file order."""
    mm = np.memmap(shard, dtype=np.uint8, mode="r")
    for info in sorted(infos, key=lambda i: i.offset):
        raw = mm[info.offset : info.offset + info.nbytes]
        yield info, raw.view(DTYPES[info.dtype]).reshape(info.shape)
    del mm
