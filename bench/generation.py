"""Decoding speed: phi2.generation.generate against transformers' generate, same weights, same run.

    python bench/generation.py [--reps 5] [--configs small phi-2-2layer] [--device auto] [--precision auto]

Also whether each row of a batch of 8 prompts of mixed lengths equals its solo decode (it must, in every
precision). Greedy decoding, 64 prompt tokens and 128 new ones, at batch 1 and 8, on a small config (hidden 512,
4 layers, 8 heads, partial_rotary_factor 0.5, vocab 51200) and on a full-width 2-layer Phi-2, both models
with their weights in the precision --precision resolves to (the README's table is one run with
--precision bf16 and one with fp32), on --device (2 threads on a CPU). The first line printed says which
device and precision ran, and why. Decode tokens/s = B * 127 / (t(128 new) - t(1 new)), so the prefill
cancels out; each time is the best of --reps runs after a warm-up, ours and transformers' taking turns so
that both see the same machine. Prefill latency is one 512-token prompt. "of bound" is tokens/s as a
fraction of the memory-bandwidth bound: bytes of weights a decode step reads (every Linear; the embedding
only reads B rows) over the read bandwidth measured here on the device (1 GiB; from DRAM on a CPU). It can
pass 100% when weights stay in the last-level cache between steps (260 MB on the CPU the README's figures
come from: the whole small config fits).
"""

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import phi2
from phi2.generation import generate
from support import cli, hardware

CONFIGS = {
    "small": phi2.Phi2Config(n_layer=4, n_head=8, n_kv_head=8, n_embd=512, intermediate_size=2048,
                             vocab_size=51200, rotary_dim=32),
    "phi-2-2layer": phi2.Phi2Config.from_name("phi-2", n_layer=2),
}


def synchronize(device: torch.device):
    """Wait for the device's queued work, so that a timer around it measures the work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def read_bandwidth(device: torch.device, gib=1.0, reps=5):
    """Streaming read bandwidth of device in bytes/s: the median time to sum a large fp32 buffer."""
    x = torch.ones(int(gib * 2**30) // 4, device=device)
    times = []
    for _ in range(reps + 1):
        synchronize(device)
        t = time.perf_counter()
        x.sum()
        synchronize(device)
        times.append(time.perf_counter() - t)
    return x.numel() * 4 / statistics.median(times[1:])


def weight_bytes_per_step(model):
    """Bytes of weights one decode step reads: every Linear's weight and bias."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)


def parse_args(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--reps", type=cli.positive_int, default=5, help="timed runs of each setting (the best counts)")
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS), help="model configs to run")
    p.add_argument("--batches", nargs="+", type=cli.positive_int, default=[1, 8], help="decode batch sizes")
    cli.add_hardware_args(p)
    return p.parse_args(argv)


def main(args):
    hw = hardware.resolve(args.device, args.precision)
    print(hw.describe(), flush=True)  # what this run measured on, before anything else
    import transformers
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(2)
    bandwidth = read_bandwidth(hw.device)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} CPU threads, read bandwidth {bandwidth / 1e9:.1f} GB/s on {hw.device}\n")

    def best_times(fns: dict) -> dict:
        """Best seconds of each function over --reps; one warm-up each, then the functions take turns
        (interference from the rest of the machine only ever slows a run down)."""
        for fn in fns.values():
            fn()
        times = {name: [] for name in fns}
        for _ in range(args.reps):
            for name, fn in fns.items():
                synchronize(hw.device)
                t = time.perf_counter()
                fn()
                synchronize(hw.device)
                times[name].append(time.perf_counter() - t)
        return {name: min(t) for name, t in times.items()}

    rows = []
    for cname in args.configs:
        config = CONFIGS[cname]
        with tempfile.TemporaryDirectory() as folder:
            torch.manual_seed(0)
            transformers.PhiForCausalLM(transformers.PhiConfig(**config.to_hf_dict())).save_pretrained(folder)
            ours = phi2.load_model(folder, dtype=hw.dtype, device=hw.device)
            hf = transformers.PhiForCausalLM.from_pretrained(folder, dtype=hw.dtype).to(hw.device).eval()
            bound_step = weight_bytes_per_step(ours) / bandwidth  # seconds per step if bandwidth-bound

            def run_ours(ids, n):
                return lambda: generate(ours, ids.tolist(), n)  # generate puts the ids on the model's device

            def run_hf(ids, n):
                kw = dict(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
                ids = ids.to(hw.device)
                mask = torch.ones_like(ids)
                return lambda: torch.inference_mode()(hf.generate)(ids, attention_mask=mask, **kw)

            # batch invariance: each row of a batch of 8 prompts of 15 to 64 tokens against its solo decode
            mixed = [torch.randint(0, config.vocab_size, (64 - 7 * i,)).tolist() for i in range(8)]
            batched = [c.ids for c in generate(ours, mixed, 32)]
            same = sum(ids == generate(ours, [p], 32)[0].ids for p, ids in zip(mixed, batched))
            print(f"{cname:13s} {hw.precision:5s} rows equal to solo: {same}/8 (a batch of 8 mixed lengths, 32 new "
                  "tokens)", flush=True)
            for B in args.batches:
                ids = torch.randint(0, config.vocab_size, (B, 64))
                t = best_times({(name, n): run(ids, n) for name, run in (("ours", run_ours), ("transformers", run_hf))
                                for n in (128, 1)})
                rates = {name: B * 127 / (t[name, 128] - t[name, 1]) for name in ("ours", "transformers")}
                row = (cname, hw.precision, f"decode B={B}", rates["ours"], rates["transformers"],
                       rates["ours"] / rates["transformers"], rates["ours"] / (B / bound_step))
                rows.append(row)
                _print_row(row)
            ids = torch.randint(0, config.vocab_size, (1, 512))
            t = best_times({"ours": run_ours(ids, 1), "transformers": run_hf(ids, 1)})
            t_ours, t_hf = t["ours"], t["transformers"]
            row = (cname, hw.precision, "prefill 512", t_ours * 1e3, t_hf * 1e3, t_hf / t_ours, None)
            rows.append(row)
            _print_row(row)
            ours = hf = None  # freed now, not at the end of the function

    print("\n| config | dtype | setting | ours | transformers | speed-up | of bound |\n|---|---|---|---|---|---|---|")
    for cname, dname, setting, a, b, ratio, frac in rows:
        unit = "ms" if setting.startswith("prefill") else "tok/s"
        frac = "" if frac is None else f"{frac:.0%}"
        print(f"| {cname} | {dname} | {setting} | {a:.1f} {unit} | {b:.1f} {unit} | {ratio:.2f}x | {frac} |")


def _print_row(row):
    cname, dname, setting, a, b, ratio, frac = row
    unit = "ms" if setting.startswith("prefill") else "tok/s"
    bound = "" if frac is None else f"  ({frac:.0%} of the bandwidth bound)"
    print(f"{cname:13s} {dname:5s} {setting:12s} ours {a:8.1f} {unit}  transformers {b:8.1f} {unit}  "
          f"x{ratio:.2f}{bound}", flush=True)


if __name__ == "__main__":
    cli.run("generation.py", main, parse_args)
