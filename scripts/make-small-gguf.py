#!/usr/bin/env python3
"""Writes the first N layers of a GGUF Llama model as a model of its own.

The GPU runner's correctness check compares `oscar run/ppl --device cuda`
with the CPU runner on the same file. The GPU machine is reached through a
64 MiB transfer, too small for SmolLM2-135M (93 MB), so the check carries the
model's embedding, output norm and first N transformer blocks: real weights,
a shallower model. Nothing is downloaded; the input comes from
scripts/get-model.sh.

usage: make-small-gguf.py IN.gguf OUT.gguf [N_LAYERS]
"""
import sys

import gguf
import numpy as np


def main():
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    src, dst = sys.argv[1], sys.argv[2]
    n_layers = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    r = gguf.GGUFReader(src)
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    w = gguf.GGUFWriter(dst, arch)
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vt = f.types[0]
        if name == f"{arch}.block_count":
            w.add_uint32(name, n_layers)
            continue
        if vt == gguf.GGUFValueType.ARRAY:
            et = f.types[-1]
            if et == gguf.GGUFValueType.STRING:
                vals = [bytes(f.parts[i]).decode("utf-8", "surrogateescape") for i in f.data]
            else:
                vals = [f.parts[i].tolist()[0] for i in f.data]
            w.add_array(name, vals)
        elif vt == gguf.GGUFValueType.STRING:
            w.add_string(name, bytes(f.parts[-1]).decode("utf-8", "surrogateescape"))
        else:
            w.add_key_value(name, f.parts[-1].tolist()[0], vt)
    kept = 0
    for t in r.tensors:
        if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= n_layers:
            continue
        # t.data is the byte matrix for quantised types and the values for
        # float ones; the writer derives the logical shape from it
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
        kept += 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"{dst}: {arch}, {n_layers} layers, {kept} tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
