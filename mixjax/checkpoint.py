"""Read Hugging Face safetensors checkpoints slice by slice, straight onto the devices that hold each slice.

A small reader of the safetensors format (8-byte header length, JSON header, raw little-endian data) that
memory-maps each file, so that a device's slice reads only its own bytes, and that knows the dtypes numpy lacks
(bfloat16, float8) through ml_dtypes. DeepSeek's block-quantised FP8 weights (`weight` in float8_e4m3fn with a
`weight_scale_inv` per 128x128 block) are dequantised on load.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from mixjax.models.layers import Source

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class CheckpointError(ValueError):
    pass


class SafetensorsFile:
    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n > 100_000_000:
                raise CheckpointError(f"{path}: not a safetensors file (header length {n})")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
        header.pop("__metadata__", None)
        self.tensors = header
        self.data_offset = 8 + n
        self._mmap = None

    def array(self, name: str) -> np.ndarray:
        """A lazy (memory-mapped) view of a tensor; slicing it reads only the bytes it needs."""
        info = self.tensors[name]
        if info["dtype"] not in DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        start, end = info["data_offsets"]
        dtype = np.dtype(DTYPES[info["dtype"]])
        shape = tuple(info["shape"])
        if end - start != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"{self.path}: tensor {name} has {end - start} bytes for shape {shape}")
        if self.data_offset + end > self._mmap.size:
            raise CheckpointError(f"{self.path}: tensor {name} runs past the end of the file (truncated?)")
        raw = self._mmap[self.data_offset + start:self.data_offset + end]
        return raw.view(dtype).reshape(shape)


class Checkpoint:
    """All tensors of a checkpoint directory: model.safetensors, or shards listed in model.safetensors.index.json."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.dir}: no *.safetensors files")
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, SafetensorsFile] = {}
        self.bytes_read = 0  # parameter bytes this process has read (read_slice), in the model's dtypes
        self.slices_read = 0
        for name in files:
            path = self.dir / name
            if not path.is_file():
                raise CheckpointError(f"{self.dir}: shard {name} listed in the index is missing")
            sf = SafetensorsFile(path)
            self.files[name] = sf
            for t in sf.tensors:
                self.where[t] = sf
        q = self._quant_config()
        self.fp8_block = tuple(q.get("weight_block_size", (128, 128))) if q.get("quant_method") == "fp8" else None

    def _quant_config(self) -> dict:
        cfg = self.dir / "config.json"
        return (json.loads(cfg.read_text()).get("quantization_config") or {}) if cfg.is_file() else {}

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._info(name)["shape"])

    def _info(self, name: str):
        if name not in self.where:
            raise CheckpointError(f"{self.dir}: tensor {name} is missing from the checkpoint")
        return self.where[name].tensors[name]

    def tensor(self, name: str) -> np.ndarray:
        """The tensor as stored (lazy), except FP8 weights, which come back dequantised to float32."""
        self._info(name)
        arr = self.where[name].array(name)
        if arr.dtype in (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2)):
            return self._dequantise(name, arr)
        return arr

    def _dequantise(self, name: str, arr: np.ndarray) -> np.ndarray:
        scale_name = name + "_scale_inv"
        if scale_name not in self.where:
            raise CheckpointError(f"{self.dir}: FP8 tensor {name} has no {scale_name}")
        scale = np.asarray(self.where[scale_name].array(scale_name), dtype=np.float32)
        bs0, bs1 = self.fp8_block or (128, 128)
        rows, cols = arr.shape
        want = (math.ceil(rows / bs0), math.ceil(cols / bs1))
        if scale.shape != want:
            raise CheckpointError(f"{self.dir}: {scale_name} has shape {scale.shape}, expected {want} for blocks "
                                  f"of {bs0}x{bs1} over {arr.shape}")
        full = np.repeat(np.repeat(scale, bs0, axis=0), bs1, axis=1)[:rows, :cols]
        return arr.astype(np.float32) * full


def _hf_view(ckpt: Checkpoint, name: str, src: Source, want: tuple[int, ...]) -> np.ndarray:
    """The tensor in mixjax's layout (transposed, heads repeated, vocabulary padded), still lazy where possible."""
    arr = ckpt.tensor(name)
    if (src.transpose or src.repeat_heads is not None) and arr.ndim != 2:
        raise CheckpointError(f"tensor {name} has shape {arr.shape}; expected a 2-D linear weight")
    # heads are blocks of HF's first axis; a tensor whose rows do not split into heads is named by the shape check
    if src.repeat_heads is not None and arr.shape[0] % src.repeat_heads[0] == 0:
        head_dim, reps = src.repeat_heads
        heads = arr.shape[0] // head_dim
        arr = np.repeat(np.asarray(arr).reshape(heads, head_dim, arr.shape[1]), reps, axis=0).reshape(
            heads * reps * head_dim, arr.shape[1])
    if src.transpose:
        arr = arr.T
    if arr.shape != want:
        padded = arr.ndim == len(want) and arr.shape[0] < want[0] and arr.shape[1:] == want[1:] or (
            arr.ndim == 2 and arr.shape[0] == want[0] and arr.shape[1] < want[1])
        if not padded:
            stored = ckpt.shape(name)
            raise CheckpointError(f"tensor {name} has shape {stored}; the model expects "
                                  f"{tuple(reversed(want)) if src.transpose else want}")
        arr = np.pad(np.asarray(arr), [(0, w - s) for w, s in zip(want, arr.shape)])  # vocabulary padding
    return arr


def _fused_block(ckpt: Checkpoint, src: Source, shape: tuple[int, ...], index) -> np.ndarray:
    """The block `index` of a fused weight (`Source.parts`): only the rows of the parts that the block covers are
    read. Along the output axis, shard piece s holds each part's s-th block of width/shards in turn."""
    ax = 1 if src.transpose else 0  # the output axis in mixjax's layout
    if sum(p.width for p in src.parts) != shape[ax]:
        raise ValueError(f"{src.name}: parts of widths {[p.width for p in src.parts]} for a weight of shape {shape}")
    start, stop, step = index[ax].indices(shape[ax])
    assert step == 1, index
    pieces, pos = [], 0
    for s in range(src.shards):
        for part in src.parts:
            n = part.width // src.shards
            lo, hi = max(start, pos), min(stop, pos + n)
            if lo < hi:
                view = _hf_view(ckpt, part.name, part, tuple(part.width if a == ax else d for a, d in enumerate(shape)))
                idx = list(index)
                idx[ax] = slice(s * n + lo - pos, s * n + hi - pos)
                pieces.append(np.asarray(view[tuple(idx)]))
            pos += n
    return np.concatenate(pieces, axis=ax)


def read_slice(ckpt: Checkpoint, src: Source, shape: tuple[int, ...], index, dtype) -> np.ndarray:
    """The block `index` (a tuple of slices of the global `shape`) of the parameter described by `src`."""
    if src.parts:
        out = _fused_block(ckpt, src, shape, index).astype(dtype)
    elif src.experts is not None:
        experts = range(src.experts)[index[0]]
        parts = [np.asarray(_hf_view(ckpt, src.name.format(e=e), src, shape[1:])[index[1:]]) for e in experts]
        out = np.stack(parts).astype(dtype)
    else:
        out = np.asarray(_hf_view(ckpt, src.name, src, shape)[index]).astype(dtype)
    ckpt.bytes_read += out.nbytes
    ckpt.slices_read += 1
    return out


def is_param(x) -> bool:
    return isinstance(x, nnx.Param)


def load_params(ckpt: Checkpoint, abstract_state, shardings, progress: bool = True):
    """Fill an abstract parameter state from the checkpoint. Every device reads only its own block.

    jax.make_array_from_callback asks only for the blocks of this process's (addressable) devices, so that on a
    multi-host mesh each process reads only the slices its devices hold; a block that several local devices share
    (replicated over some mesh axes) is read once. `ckpt.bytes_read` counts what was read.

    abstract_state: nnx.State of Params holding ShapeDtypeStructs; shardings: the same tree of Shardings.
    Returns the state with global jax.Arrays laid out by `shardings`."""
    leaves, treedef = jax.tree.flatten(abstract_state, is_leaf=is_param)
    sh_leaves = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    total = sum(math.prod(v.shape) for v in leaves)
    out = []
    with tqdm(total=total, unit="param", unit_scale=True, desc="loading weights", disable=not progress) as bar:
        for var, sharding in zip(leaves, sh_leaves):
            src: Source = var.get_metadata()["source"]
            shape = tuple(var.shape)
            want_dtype = var.get_value().dtype  # the model chose it (float32 for routers, the serving dtype elsewhere)
            blocks: dict = {}  # index -> block, for the local devices that hold the same block

            def block(idx, src=src, shape=shape, dt=want_dtype, blocks=blocks):
                key = tuple((s.start, s.stop, s.step) if isinstance(s, slice) else s for s in idx)
                if key not in blocks:
                    blocks[key] = read_slice(ckpt, src, shape, idx, dt)
                return blocks[key]

            arr = jax.make_array_from_callback(shape, sharding, block)
            out.append(var.replace(arr))
            bar.update(math.prod(shape))
    return jax.tree.unflatten(treedef, out)
