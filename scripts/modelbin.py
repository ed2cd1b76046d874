#!/usr/bin/python3
"""modelbin.py: read and write fastgen's model.bin (safetensors layout) from Python with numpy."""

import json
import math
import mmap
import os
import sys

import numpy as np

FORMAT_NAME = "fastgen"
FORMAT_VERSION = "1"
DATA_ALIGN = 4096    # the data section starts at a multiple of this (file offset)
TENSOR_ALIGN = 1     # no gaps between tensors: strict safetensors readers refuse holes in the buffer
MAX_HEADER = 100 << 20  # a header larger than 100 MiB is certainly corrupt

# safetensors dtype name -> (stored numpy dtype, bytes per element)
DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # raw bits; decoded to float32 on read
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
}
FLOAT_DTYPES = ("F32", "BF16", "F16")

CONFIG_KEYS = {
    "dim": int, "hidden_dim": int, "n_layers": int, "n_heads": int, "n_kv_heads": int,
    "head_dim": int, "vocab_size": int, "max_seq_len": int, "norm_eps": float,
    "rope_theta": float, "tie_embeddings": bool, "bos_id": int, "eos_id": int,
}


class ModelBinError(Exception):
    """A model.bin that cannot be read or written; the message names the file and the problem."""


# ----------------------------------------------------------------------------- conversions

def bf16_bits_to_f32(bits):
    """uint16 bf16 bit patterns -> float32 (exact)."""
    bits = np.asarray(bits, dtype=np.uint16)
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(x):
    """float32 -> uint16 bf16 bit patterns, round to nearest even; NaN stays a (quiet) NaN."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = x.view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
    out = rounded.astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    return out


def encode_floats(x, dtype):
    """float array -> bytes of the given stored dtype (F32/F16/BF16)."""
    if dtype == "F32":
        return np.ascontiguousarray(x, dtype="<f4").tobytes()
    if dtype == "F16":
        return np.ascontiguousarray(np.asarray(x, dtype=np.float32).astype("<f2")).tobytes()
    if dtype == "BF16":
        return f32_to_bf16_bits(x).astype("<u2").tobytes()
    raise ModelBinError("cannot encode floats as %r (want one of %s)" % (dtype, ", ".join(FLOAT_DTYPES)))


def round_to_dtype(x, dtype):
    """What x reads back as after being stored in dtype (float32 result)."""
    x = np.asarray(x, dtype=np.float32)
    if dtype == "F32":
        return x.copy()
    if dtype == "F16":
        return x.astype(np.float16).astype(np.float32)
    if dtype == "BF16":
        return bf16_bits_to_f32(f32_to_bf16_bits(x)).reshape(x.shape)
    raise ModelBinError("unknown float dtype %r" % (dtype,))


# ----------------------------------------------------------------------------- config

def normalize_config(config):
    """A copy of config with every required key present and of the right JSON type."""
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise ModelBinError("config is missing %s" % ", ".join(missing))
    out = {}
    for k, t in CONFIG_KEYS.items():
        v = config[k]
        if t is bool:
            if not isinstance(v, (bool, np.bool_)):
                raise ModelBinError("config %s must be a bool, got %r" % (k, v))
            out[k] = bool(v)
        elif t is int:
            if isinstance(v, (bool, np.bool_)) or int(v) != v:
                raise ModelBinError("config %s must be an integer, got %r" % (k, v))
            out[k] = int(v)
        else:
            out[k] = float(v)
    for k in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
              "vocab_size", "max_seq_len"):
        if out[k] <= 0:
            raise ModelBinError("config %s must be positive, got %d" % (k, out[k]))
    if out["n_heads"] % out["n_kv_heads"]:
        raise ModelBinError("config n_heads (%d) is not a multiple of n_kv_heads (%d)"
                            % (out["n_heads"], out["n_kv_heads"]))
    if out["head_dim"] % 2:
        raise ModelBinError("config head_dim (%d) must be even for RoPE" % out["head_dim"])
    # keep any extra keys the caller added (e.g. for future model kinds), after the known ones
    for k, v in config.items():
        if k not in out:
            out[k] = v
    return out


def expected_shapes(config):
    """name -> shape of every weight tensor a model with this config has (tokenizer excluded)."""
    c = config
    d, hd, hid, v = c["dim"], c["head_dim"], c["hidden_dim"], c["vocab_size"]
    q, kv = c["n_heads"] * hd, c["n_kv_heads"] * hd
    shapes = {"tok_embeddings.weight": [v, d]}
    for i in range(c["n_layers"]):
        p = "layers.%d." % i
        shapes[p + "attention_norm.weight"] = [d]
        shapes[p + "attention.wq.weight"] = [q, d]
        shapes[p + "attention.wk.weight"] = [kv, d]
        shapes[p + "attention.wv.weight"] = [kv, d]
        shapes[p + "attention.wo.weight"] = [d, q]
        shapes[p + "ffn_norm.weight"] = [d]
        n_experts = c.get("n_experts", 0)
        if n_experts:  # Mixtral: a router and n_experts SwiGLU experts instead of w1/w2/w3
            shapes[p + "feed_forward.gate.weight"] = [n_experts, d]
            for e in range(n_experts):
                q_ = p + "feed_forward.experts.%d." % e
                shapes[q_ + "w1.weight"] = [hid, d]
                shapes[q_ + "w2.weight"] = [d, hid]
                shapes[q_ + "w3.weight"] = [hid, d]
            continue
        shapes[p + "feed_forward.w1.weight"] = [hid, d]
        shapes[p + "feed_forward.w2.weight"] = [d, hid]
        shapes[p + "feed_forward.w3.weight"] = [hid, d]
    shapes["norm.weight"] = [d]
    if not c["tie_embeddings"]:
        shapes["output.weight"] = [v, d]
    return shapes


# ----------------------------------------------------------------------------- writing

def _align(n, a):
    return (n + a - 1) // a * a


def write_model_streaming(path, config, entries, tokenizer_bytes=None, quantization="none",
                          extra_metadata=None):
    """Write model.bin one tensor at a time.

    entries: list of (name, dtype, shape, produce) where produce() returns an iterable of array
    chunks (C order, any float type for F32/F16/BF16, raw values for integer dtypes) whose sizes
    add up to prod(shape). Only one chunk is held at a time. The tokenizer, when given, is added
    last as the U8 tensor "tokenizer.model". Writes <path>.tmp and renames it into place.
    """
    config = normalize_config(config)
    entries = list(entries)
    if tokenizer_bytes is not None:
        tok = np.frombuffer(bytes(tokenizer_bytes), dtype=np.uint8)
        entries.append(("tokenizer.model", "U8", [tok.size], lambda: [tok]))

    metadata = {"format": FORMAT_NAME, "version": FORMAT_VERSION,
                "config": json.dumps(config), "quantization": quantization}
    for k, v in (extra_metadata or {}).items():
        metadata[str(k)] = str(v)
    header = {"__metadata__": metadata}
    plan = []
    offset = 0
    for name, dtype, shape, produce in entries:
        if name in header:
            raise ModelBinError("%s: tensor %r given twice" % (path, name))
        if dtype not in DTYPES:
            raise ModelBinError("%s: tensor %r: unknown dtype %r" % (path, name, dtype))
        shape = [int(s) for s in shape]
        if any(s < 0 for s in shape):
            raise ModelBinError("%s: tensor %r: negative dimension in %s" % (path, name, shape))
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        begin = _align(offset, TENSOR_ALIGN)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, begin + nbytes]}
        plan.append((name, dtype, shape, produce, begin, nbytes))
        offset = begin + nbytes

    hjson = json.dumps(header, separators=(",", ":")).encode("utf-8")
    padded = _align(8 + len(hjson), DATA_ALIGN) - 8
    hjson += b" " * (padded - len(hjson))

    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(len(hjson).to_bytes(8, "little"))
            f.write(hjson)
            pos = 0
            for name, dtype, shape, produce, begin, nbytes in plan:
                if begin > pos:
                    f.write(b"\0" * (begin - pos))
                written = 0
                for chunk in produce():
                    if dtype in FLOAT_DTYPES:
                        data = encode_floats(chunk, dtype)
                    else:
                        data = np.ascontiguousarray(chunk, dtype=DTYPES[dtype]).tobytes()
                    f.write(data)
                    written += len(data)
                if written != nbytes:
                    raise ModelBinError("%s: tensor %r %s %s: produced %d bytes, expected %d"
                                        % (path, name, dtype, shape, written, nbytes))
                pos = begin + nbytes
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_model(path, config, tensors, dtype="F32", tokenizer_bytes=None, dtypes=None,
                check_names=True):
    """Write a whole model held in memory.

    tensors: name -> array (float arrays are stored as `dtype`; integer arrays keep their type
    unless `dtypes` names one). dtypes: optional name -> dtype overrides. Tensor order follows the
    dict; the tokenizer goes last. With check_names, the names and shapes must be exactly those
    the config calls for.
    """
    if dtype not in FLOAT_DTYPES:
        raise ModelBinError("dtype must be one of %s, got %r" % (", ".join(FLOAT_DTYPES), dtype))
    config = normalize_config(config)
    dtypes = dict(dtypes or {})
    if check_names:
        want = expected_shapes(config)
        have = {k: list(np.shape(v)) for k, v in tensors.items() if k != "tokenizer.model"}
        missing = sorted(set(want) - set(have))
        extra = sorted(set(have) - set(want))
        if missing or extra:
            raise ModelBinError("%s: tensors do not match the config: missing %s, unexpected %s"
                                % (path, missing or "none", extra or "none"))
        for k in want:
            if want[k] != have[k]:
                raise ModelBinError("%s: tensor %r: expected shape %s, got %s"
                                    % (path, k, want[k], have[k]))
    entries = []
    for name, arr in tensors.items():
        if name == "tokenizer.model" and tokenizer_bytes is not None:
            raise ModelBinError("%s: tokenizer given both as a tensor and as tokenizer_bytes" % path)
        a = np.asarray(arr)
        if name in dtypes:
            dt = dtypes[name]
        elif a.dtype.kind == "f":
            dt = dtype
        else:
            dt = {np.dtype(v).newbyteorder("="): k for k, v in DTYPES.items() if k != "BF16"}.get(
                a.dtype.newbyteorder("="))
            if dt is None:
                raise ModelBinError("%s: tensor %r: cannot store numpy dtype %s" % (path, name, a.dtype))
        entries.append((name, dt, list(a.shape), (lambda a=a: [a.reshape(-1)])))
    write_model_streaming(path, config, entries, tokenizer_bytes=tokenizer_bytes)


# ----------------------------------------------------------------------------- reading

def read_header(path):
    """(header dict, data section file offset, file size) after validating the layout."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            if size < 8:
                raise ModelBinError("%s: file is %d bytes, too short for a safetensors header" % (path, size))
            n = int.from_bytes(f.read(8), "little")
            if n == 0 or n > MAX_HEADER or 8 + n > size:
                raise ModelBinError("%s: header length %d is not sane for a %d-byte file" % (path, n, size))
            raw = f.read(n)
    except OSError as e:
        raise ModelBinError("%s: cannot read: %s" % (path, e)) from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ModelBinError("%s: header is not valid JSON: %s" % (path, e)) from e
    if not isinstance(header, dict):
        raise ModelBinError("%s: header JSON is not an object" % path)
    data_start = 8 + n
    data_size = size - data_start
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ModelBinError("%s: __metadata__ must be an object of strings" % path)
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = "%s: tensor %r" % (path, name)
        if not isinstance(info, dict):
            raise ModelBinError("%s: entry is not an object" % where)
        dt = info.get("dtype")
        if dt not in DTYPES:
            raise ModelBinError("%s: unknown dtype %r" % (where, dt))
        shape = info.get("shape")
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise ModelBinError("%s: bad shape %r" % (where, shape))
        offs = info.get("data_offsets")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise ModelBinError("%s: bad data_offsets %r" % (where, offs))
        b, e = offs
        if not 0 <= b <= e <= data_size:
            raise ModelBinError("%s: data_offsets [%d, %d] outside the %d-byte data section"
                                % (where, b, e, data_size))
        want = math.prod(shape) * DTYPES[dt].itemsize
        if e - b != want:
            raise ModelBinError("%s: %s %s needs %d bytes, data_offsets span %d"
                                % (where, dt, shape, want, e - b))
        spans.append((b, e, name))
    spans = sorted(s for s in spans if s[1] > s[0])  # empty tensors overlap nothing
    end, last = 0, None
    for b, e, name in spans:
        if b < end:
            raise ModelBinError("%s: tensors %r and %r overlap" % (path, last, name))
        if e > end:
            end, last = e, name
    return header, data_start, size


# ----------------------------------------------------------------------------- quantized matrices

def _group_size(path, name, scales, rows, cols):
    """Columns per group from NAME.scales [rows, cols/group]; a multiple of 32 dividing cols."""
    if scales.ndim != 2 or scales.shape[0] != rows or scales.shape[1] < 1:
        raise ModelBinError("%s: tensor %r: shape %s, expected [%d, columns / group]"
                            % (path, name + ".scales", list(scales.shape), rows))
    groups = scales.shape[1]
    if cols % groups or (cols // groups) % 32:
        raise ModelBinError("%s: tensor %r: %d groups per row do not split %d columns into groups of a "
                            "multiple of 32" % (path, name, groups, cols))
    return cols // groups


def dequantize(path, name, tensors):
    """float32 [rows, cols] of the quantized matrix NAME, from tensors (raw, as stored):
      int8: NAME I8 [rows, cols], NAME.scales F32 [rows] (w = q * s[r]) or [rows, cols/g]
            (w = q * s[r][c // g]);
      int4: NAME U8 [rows, cols/2], two q per byte, low nibble = even column; NAME.scales F32 and
            either NAME.zeros U8 (w = (q - z) * s) or NAME.mins F32 (w = q * s + m), [rows, cols/g].
    Computed in float64, rounded once to float32."""
    q = tensors[name]
    scales = tensors.get(name + ".scales")
    zeros, mins = tensors.get(name + ".zeros"), tensors.get(name + ".mins")
    if scales is None:
        raise ModelBinError("%s: quantized tensor %r has no %r" % (path, name, name + ".scales"))
    if scales.dtype != np.float32 or (mins is not None and mins.dtype != np.float32):
        raise ModelBinError("%s: tensor %r: scales and minimums must be F32" % (path, name))
    if q.ndim != 2:
        raise ModelBinError("%s: tensor %r: quantized matrices are 2-D, found %s" % (path, name, list(q.shape)))
    s = scales.astype(np.float64)
    if q.dtype == np.int8:
        if zeros is not None or mins is not None:
            raise ModelBinError("%s: tensor %r is int8, which takes no zero points or minimums" % (path, name))
        rows, cols = q.shape
        if s.ndim == 1:
            if s.shape[0] != rows:
                raise ModelBinError("%s: tensor %r: shape %s, expected [%d]" % (path, name + ".scales", list(s.shape), rows))
            w = q.astype(np.float64) * s[:, None]
        else:
            g = _group_size(path, name, s, rows, cols)
            w = q.astype(np.float64) * np.repeat(s, g, axis=1)
        return w.astype(np.float32)
    if q.dtype != np.uint8:
        raise ModelBinError("%s: tensor %r: dtype %s is not a quantized format" % (path, name, q.dtype))
    if (zeros is None) == (mins is None):
        raise ModelBinError("%s: int4 tensor %r needs exactly one of %r and %r"
                            % (path, name, name + ".zeros", name + ".mins"))
    rows, cols = q.shape[0], q.shape[1] * 2
    g = _group_size(path, name, s, rows, cols)
    levels = np.empty((rows, cols), dtype=np.float64)
    levels[:, 0::2] = q & 0xF
    levels[:, 1::2] = q >> 4
    other = zeros if zeros is not None else mins
    if list(other.shape) != list(s.shape):
        raise ModelBinError("%s: tensor %r: shape %s, expected %s" % (path, name + (".zeros" if zeros is not None else ".mins"),
                                                                    list(other.shape), list(s.shape)))
    s_full = np.repeat(s, g, axis=1)
    if zeros is not None:
        w = (levels - np.repeat(zeros.astype(np.float64), g, axis=1)) * s_full
    else:
        w = levels * s_full + np.repeat(mins.astype(np.float64), g, axis=1)
    return w.astype(np.float32)


def dequantize_all(path, tensors, dtypes):
    """Replaces every quantized matrix (I8/U8 with a NAME.scales companion) by its float32 values and
    drops the companions; returns the names dequantized."""
    names = [k for k in tensors if dtypes[k] in ("I8", "U8") and k + ".scales" in tensors]
    for name in names:
        tensors[name] = dequantize(path, name, tensors)
    for name in names:
        for c in (".scales", ".zeros", ".mins"):
            tensors.pop(name + c, None)
    return names


# ----------------------------------------------------------------------------- reading

def read_model(path, check_format=True, dequantize_matrices=True):
    """(config dict, metadata dict, tensors dict name -> numpy array).

    BF16 and F16 tensors come back as float32, F32 as read-only float32 views of the mapped
    file, U8 (the tokenizer) as uint8. With dequantize_matrices, quantized matrices (int8, int4)
    come back as float32 values (see dequantize) and their companion tensors are left out. With
    check_format, the metadata must say this is a fastgen version-1 file with a valid config and
    the tensors the config calls for.
    """
    header, data_start, size = read_header(path)
    meta = dict(header.get("__metadata__", {}))
    config = None
    if "config" in meta:
        try:
            config = json.loads(meta["config"])
        except ValueError as e:
            raise ModelBinError("%s: metadata config is not valid JSON: %s" % (path, e)) from e
    if check_format:
        if meta.get("format") != FORMAT_NAME:
            raise ModelBinError("%s: metadata format is %r, expected %r" % (path, meta.get("format"), FORMAT_NAME))
        if meta.get("version") != FORMAT_VERSION:
            raise ModelBinError("%s: metadata version is %r, this reader knows %r"
                                % (path, meta.get("version"), FORMAT_VERSION))
        if not isinstance(config, dict):
            raise ModelBinError("%s: metadata has no config object" % path)
        try:
            config = normalize_config(config)
        except ModelBinError as e:
            raise ModelBinError("%s: %s" % (path, e)) from e
    tensors = {}
    if size > data_start:
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    else:
        mm = b""
    for name, info in header.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        dt, shape = info["dtype"], info["shape"]
        raw = np.frombuffer(mm, dtype=DTYPES[dt], count=math.prod(shape), offset=data_start + b) \
            if e > b else np.zeros(0, dtype=DTYPES[dt])
        if dt == "BF16":
            arr = bf16_bits_to_f32(raw)
        elif dt == "F16":
            arr = raw.astype(np.float32)
        else:
            arr = raw
        tensors[name] = arr.reshape(shape)
    dequantized = set()
    if dequantize_matrices:
        dequantized = set(dequantize_all(path, tensors, {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}))
    if check_format:
        want = expected_shapes(config)
        for k, shp in want.items():
            if k not in tensors:
                raise ModelBinError("%s: tensor %r is missing" % (path, k))
            if list(tensors[k].shape) != shp:
                raise ModelBinError("%s: tensor %r: expected shape %s, found %s"
                                    % (path, k, shp, list(tensors[k].shape)))
            if header[k]["dtype"] not in FLOAT_DTYPES and k not in dequantized:
                raise ModelBinError("%s: tensor %r: dtype %s is not a float type this reader handles"
                                    % (path, k, header[k]["dtype"]))
    return config, meta, tensors


def tensor_dtypes(path):
    """name -> stored dtype string, from the header alone."""
    header, _, _ = read_header(path)
    return {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}


if __name__ == "__main__":
    # `modelbin.py FILE`: print the config and a table of tensors.
    if len(sys.argv) != 2:
        sys.exit("usage: modelbin.py MODEL.bin")
    cfg, md, ts = read_model(sys.argv[1], check_format=False, dequantize_matrices=False)  # as stored
    dts = tensor_dtypes(sys.argv[1])
    print("metadata:", {k: v for k, v in md.items() if k != "config"})
    print("config:", json.dumps(cfg))
    for k, v in ts.items():
        print("  %-40s %-5s %s" % (k, dts[k], list(v.shape)))
