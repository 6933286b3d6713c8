"""Safetensors checkpoints (single file or sharded), read through a memory map.

Tensors are views into the mapped file: nothing is copied until a slice is quantized from it, and
`release(name)` drops the tensor's pages from this process again, so that loading a model reads
the f16 file once while holding little more than its Q8_0 copy.
"""
from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import numpy as np

from client.errors import UserError

_DTYPES = {"F32": (np.float32, "f32"), "F16": (np.float16, "f16"), "BF16": (np.uint16, "bf16")}
_PAGE = mmap.PAGESIZE
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14+


class _File:
    def __init__(self, path: Path):
        self.path = path
        try:
            self.fh = open(path, "rb")
            size = path.stat().st_size
        except OSError as e:
            raise UserError(f"{path}: cannot open ({e.strerror}); check the model folder")
        head = self.fh.read(8)
        if len(head) < 8:
            raise UserError(f"{path}: {size} bytes, too short for a safetensors file; re-download it")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 << 20):
            raise UserError(f"{path}: header length {n} exceeds the file ({size} bytes): "
                            "not a safetensors file or truncated; re-download it")
        try:
            header = json.loads(self.fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{path}: corrupt safetensors header; re-download the file")
        header.pop("__metadata__", None)
        self.base = 8 + n
        self.mm = mmap.mmap(self.fh.fileno(), 0, access=mmap.ACCESS_READ)
        self.tensors = {}
        for name, t in header.items():
            dt = t.get("dtype")
            if dt not in _DTYPES:
                raise UserError(f"{path}: tensor {name} has dtype {dt}; supported: F32, F16, BF16")
            a, b = t["data_offsets"]
            shape = tuple(t["shape"])
            need = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[dt][0]).itemsize
            if b - a != need:
                raise UserError(f"{path}: tensor {name} shape {list(shape)} needs {need} bytes, "
                                f"header says {b - a}; the file is corrupt")
            if self.base + b > size:
                raise UserError(f"{path}: truncated ({size} bytes, tensor {name} ends at byte "
                                f"{self.base + b}); re-download the file")
            self.tensors[name] = (dt, shape, self.base + a, need)


class Checkpoint:
    """name -> tensor view. `raw(name)` gives (array, kind) with kind in f32/f16/bf16; bf16 arrives
    as its uint16 bit pattern (numpy has no bfloat16)."""

    def __init__(self, model_dir: Path):
        model_dir = Path(model_dir)
        index = model_dir / "model.safetensors.index.json"
        single = model_dir / "model.safetensors"
        if index.is_file():
            try:
                wmap = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
                raise UserError(f"{index}: corrupt index ({e}); re-download it")
            files = {f: _File(model_dir / f) for f in sorted(set(wmap.values()))}
            self._where = {n: files[f] for n, f in wmap.items()}
            for n, f in self._where.items():
                if n not in f.tensors:
                    raise UserError(f"{index}: names {n} in {f.path.name}, which does not hold it")
        elif single.is_file():
            f = _File(single)
            self._where = {n: f for n in f.tensors}
        else:
            raise UserError(f"{model_dir}: no model.safetensors or model.safetensors.index.json; "
                            "point MODEL_DIR at a Hugging Face model folder")
        self.files = sorted({id(f): f for f in self._where.values()}.values(), key=lambda f: f.path)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[1][1]

    def _entry(self, name):
        if name not in self._where:
            raise UserError(f"{self.files[0].path.parent}: tensor {name} is missing from the "
                            "checkpoint; it is incomplete or not a LLaMA model")
        f = self._where[name]
        return f, f.tensors[name]

    def raw(self, name: str, shape: tuple[int, ...] | None = None) -> tuple[np.ndarray, str]:
        f, (dt, shp, off, nbytes) = self._entry(name)
        if shape is not None and tuple(shp) != tuple(shape):
            raise UserError(f"{f.path}: tensor {name} has shape {list(shp)}, config.json implies "
                            f"{list(shape)}; the config and weights do not match")
        np_dtype, kind = _DTYPES[dt]
        arr = np.frombuffer(f.mm, dtype=np_dtype, count=nbytes // np.dtype(np_dtype).itemsize,
                            offset=off).reshape(shp)
        return arr, kind

    def f32(self, name: str, shape=None) -> np.ndarray:
        arr, kind = self.raw(name, shape)
        if kind == "bf16":
            return (arr.astype(np.uint32) << 16).view(np.float32)
        return arr.astype(np.float32)

    def _advise(self, name: str, advice: int, rows=None) -> None:
        f, (_, shape, off, nbytes) = self._entry(name)
        if rows is not None:  # rows [r0, r1) of a row-major tensor: one contiguous byte range
            row_bytes = nbytes // shape[0]
            off, nbytes = off + rows[0] * row_bytes, (rows[1] - rows[0]) * row_bytes
        if nbytes <= 0:
            return
        start = off // _PAGE * _PAGE
        f.mm.madvise(advice, start, min(len(f.mm) - start, off + nbytes - start))

    def populate(self, name: str, rows=None) -> None:
        """Map the tensor's pages (or those of rows [r0, r1)) in one call, reading them ahead:
        faster than faulting them in one by one while quantizing."""
        try:
            self._advise(name, _MADV_POPULATE_READ, rows)
        except OSError:  # older kernels
            self._advise(name, mmap.MADV_WILLNEED, rows)

    def release(self, name: str, rows=None) -> None:
        """Drop the tensor's pages (or those of rows [r0, r1)) from this process; they stay in
        the OS file cache."""
        self._advise(name, mmap.MADV_DONTNEED, rows)
