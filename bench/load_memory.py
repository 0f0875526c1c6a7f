"""Peak resident memory while loading a Phi-2-sized checkpoint, against its size on disk.

    python bench/load_memory.py [--dir /tmp/phi2-random-32layer] [--dtype bf16] [--with-transformers]

Writes a random-weight 32-layer Phi-2 in microsoft/phi-2's layout (two shards + index) unless --dir already
holds one, then loads it in a fresh process and reports that process's peak RSS (ru_maxrss), with and
without the memory the process had after `import torch` and before loading, and once more after one element
of every weight page has been read (a memory-mapping loader such as transformers' defers its reads to that
point). The goal is < 1.3x the size on disk. --with-transformers measures from_pretrained on the same files.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from support import cli

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

LOAD_OURS = """
import resource, sys, time, torch, phi2
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
model = phi2.load_model(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for p in model.parameters():  # read one element per page, as a first forward pass would
    p.detach().view(-1)[::1024].float().sum()
print(base, loaded, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter() - t)
"""

LOAD_HF = """
import resource, sys, time, torch, transformers
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
model = transformers.PhiForCausalLM.from_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for p in model.parameters():  # read one element per page, as a first forward pass would
    p.detach().view(-1)[::1024].float().sum()
print(base, loaded, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter() - t)
"""

MAKE = """
import sys, torch, phi2
model = phi2.build_model("phi-2", dtype=getattr(torch, sys.argv[2]))
phi2.save_hf_checkpoint(model, sys.argv[1], max_shard_bytes=5_000_000_000)  # two shards, as released
"""


def measure(script, folder, dtype):
    out = subprocess.run([sys.executable, "-c", script, str(folder), dtype], check=True, capture_output=True,
                         text=True).stdout.split()
    base, loaded, touched = (int(kb) * 1024 for kb in out[:3])
    return base, loaded, touched, float(out[3])


def parse_args(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--dir", default="/tmp/phi2-random-32layer",
                   help="the checkpoint folder: a random 32-layer Phi-2 is written there unless it already holds one")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="dtype of the checkpoint and of the load")
    p.add_argument("--with-transformers", action="store_true",
                   help="also measure transformers' from_pretrained on the same files")
    return p.parse_args(argv)


def main(args):
    folder, dtype = Path(args.dir), DTYPES[args.dtype]

    if not (folder / "model.safetensors.index.json").exists():
        print(f"writing a random 32-layer Phi-2 ({args.dtype}) to {folder} ...", flush=True)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", MAKE, str(folder), dtype], check=True)
        print(f"  written in {time.perf_counter() - t:.0f} s")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    disk = sum((folder / f).stat().st_size for f in set(index["weight_map"].values()))
    print(f"checkpoint: {len(index['weight_map'])} tensors in {len(set(index['weight_map'].values()))} shards, "
          f"{disk / 1e9:.2f} GB on disk, loading as {dtype}")

    rows = [("phi2.load_model", LOAD_OURS)]
    if args.with_transformers:
        rows.append(("transformers from_pretrained", LOAD_HF))
    print(f"{'loader':30s} {'peak RSS at load':>17s} {'/ disk':>7s} {'minus import':>13s} "
          f"{'after touching all weights':>27s} {'time':>6s}")
    for name, script in rows:
        base, loaded, touched, seconds = measure(script, folder, dtype)
        print(f"{name:30s} {loaded / 1e9:14.2f} GB {loaded / disk:6.2f}x {(loaded - base) / disk:12.2f}x "
              f"{touched / 1e9:16.2f} GB ({touched / disk:.2f}x) {seconds:5.1f}s")


if __name__ == "__main__":
    cli.run("load_memory.py", main, parse_args)
