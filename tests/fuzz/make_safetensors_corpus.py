#!/usr/bin/env python3
"""Writes the seed corpus of tests/fuzz/fuzz_safetensors.c into
tests/fuzz/corpus_safetensors/: valid files (every dtype, metadata, scalars,
empty tensors, unsorted headers, misaligned data) and broken ones (one per
check the reader makes). Valid files whose last byte is 0x5a also exercise
the harness's writer round trip. Plain Python, no numpy:

    python3 tests/fuzz/make_safetensors_corpus.py
"""
import json
import os
import struct

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus_safetensors")
SIZES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "BOOL": 1, "U8": 1, "I8": 1,
         "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8,
         "F8_E5M2": 1, "F8_E4M3": 1}


def raw(header_text, data=b""):
    h = header_text.encode() if isinstance(header_text, str) else header_text
    return struct.pack("<Q", len(h)) + h + data


def valid(tensors, metadata=None, pad=True, last=None):
    """tensors: list of (name, dtype, shape); data bytes are a ramp."""
    header, offset = {}, 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape in tensors:
        n = SIZES[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape,
                        "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":"))
    if pad:
        text += " " * (-len(text) % 8)
    data = bytearray((i * 37 + 11) & 0xFF for i in range(offset))
    if last is not None and data:
        data[-1] = last
    return raw(text, bytes(data))


def main():
    os.makedirs(OUT, exist_ok=True)
    files = {
        "valid-f32": valid([("w", "F32", [3, 4])]),
        "valid-f32-roundtrip": valid([("w", "F32", [3, 4]), ("b", "F32", [4])],
                                     {"format": "pt"}, last=0x5A),
        "valid-all-dtypes": valid([(d, d, [2, 3]) for d in SIZES], last=0x5A),
        "valid-half": valid([("h", "F16", [5]), ("b", "BF16", [2, 2]),
                             ("d", "F64", [3])], last=0x5A),
        "valid-scalar-empty": valid([("s", "F32", []), ("e", "F32", [0, 4]),
                                     ("z", "I8", [0])]),
        "valid-metadata": valid([], {"a": "1", "masa.config": "{\"x\":[1,2]}"}),
        "valid-empty": raw("{}      "),
        "valid-unpadded-misaligned": valid([("m", "F32", [3])], pad=False),
        "valid-unicode-names": valid([("\u00e9t\u00e9.\u4e2d", "F16", [2])], last=0x5A),
        "valid-model": valid([(f"model.layers.{l}.self_attn.{p}_proj.weight", "F32", [4, 4])
                              for l in range(3) for p in "qkvo"]),
        "valid-reordered-header": raw(
            '{"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]},'
            '"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', bytes(8)),
        "model-masa": valid(
            [("masa.q.group0.atoms", "F32", [2, 4, 4]), ("masa.q.group0.coefficients", "F32", [3, 2]),
             ("masa.q.layer1.lowrank_a", "F32", [4, 2]), ("masa.q.layer1.lowrank_b", "F32", [2, 4]),
             ("masa.o.layer0.weight", "F32", [4, 4]), ("masa.o.layer1.weight", "F32", [4, 4]),
             ("masa.o.layer2.weight", "F32", [4, 4]),
             ("masa.v.layer0.lowrank_a", "F32", [4, 1]), ("masa.v.layer0.lowrank_b", "F32", [1, 4]),
             ("masa.v.layer1.lowrank_a", "F32", [4, 1]), ("masa.v.layer1.lowrank_b", "F32", [1, 4]),
             ("masa.v.layer2.lowrank_a", "F32", [4, 1]), ("masa.v.layer2.lowrank_b", "F32", [1, 4]),
             ("masa.calib.layer0.qkv.matrix", "F64", [4, 4]), ("masa.calib.layer0.qkv.rows", "U64", [])],
            {"masa.model": json.dumps({
                "format_version": 1, "n_layers": 3, "projections": {
                    "q": {"kind": "masa", "d_in": 4, "d_out": 4, "groups": [[0, 3, 2]], "ranks": [0, 2, 0]},
                    "o": {"kind": "dense", "d_in": 4, "d_out": 4, "ranks": [0, 0, 0]},
                    "v": {"kind": "lowrank", "d_in": 4, "d_out": 4, "ranks": [1, 1, 1]}},
                "calibration": ["layer0.qkv"]}, separators=(",", ":"))}),
        "model-bad-groups": valid(
            [("masa.q.group0.atoms", "F32", [1, 2, 2]), ("masa.q.group0.coefficients", "F32", [1, 1])],
            {"masa.model": '{"format_version":1,"n_layers":2,"projections":{"q":{"kind":"masa",'
                           '"d_in":2,"d_out":2,"groups":[[0,1,1]],"ranks":[0,0]}}}'}),
        "bad-short": b"\x08\x00\x00",
        "bad-length-past-end": struct.pack("<Q", 100) + b"{}",
        "bad-length-cap": struct.pack("<Q", 100000001) + b"{}",
        "bad-not-brace": raw(" {}"),
        "bad-json": raw('{"a":'),
        "bad-trailing": raw('{} x'),
        "bad-duplicate": raw('{"a":{"dtype":"F32","shape":[],"data_offsets":[0,4]},'
                             '"a":{"dtype":"F32","shape":[],"data_offsets":[4,8]}}', bytes(8)),
        "bad-utf8": raw(b'{"\xff":{}}'),
        "bad-dtype": raw('{"a":{"dtype":"F31","shape":[1],"data_offsets":[0,4]}}', bytes(4)),
        "bad-negative-dim": raw('{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}', bytes(4)),
        "bad-size-mismatch": raw('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}', bytes(4)),
        "bad-overflow": raw('{"a":{"dtype":"F64","shape":[4294967296,4294967296],'
                            '"data_offsets":[0,8]}}', bytes(8)),
        "bad-hole": raw('{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', bytes(8)),
        "bad-overlap": raw('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                           '"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}', bytes(12)),
        "bad-trailing-data": raw('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', bytes(6)),
        "bad-out-of-range": raw('{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}', bytes(8)),
        "bad-metadata-value": raw('{"__metadata__":{"a":1}}'),
        "bad-offsets-reversed": raw('{"a":{"dtype":"U8","shape":[0],"data_offsets":[4,0]}}', bytes(4)),
        "bad-deep-nesting": raw("{" + '"a":' + "[" * 3000 + "]" * 3000 + "}"),
    }
    for name, data in files.items():
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(data)
    print(f"{len(files)} files in {OUT}")


if __name__ == "__main__":
    main()
