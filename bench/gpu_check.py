"""Checks on one CUDA GPU, offline: parity with transformers, Phi-2's training in 24 GiB, decoding speed, the CLIs.

On a machine with one CUDA GPU, torch and transformers installed (`pip install -e ".[test]"`):

    python bench/gpu_check.py --out results/          # writes results/gpu_check.json; under 8 minutes on an H200
    python bench/gpu_check.py --device cpu --out /tmp/check   # smoke mode: every section on tiny shapes, seconds

It never downloads anything: every model has random weights, built from a config (transformers is only the
reference, built from the same config), and the end-to-end run uses the bundled data and `--model tiny`.
On CUDA the whole process is capped at 24 GiB of GPU memory (torch.cuda.set_per_process_memory_fraction),
the budget of the GPU the project targets, whatever the GPU has (the cap is on torch's allocator: the CUDA
context's few hundred MB come on top, as they would on the 24 GB card). Sections, each recorded in the JSON with
its results, whether its checks passed, its seconds, and on failure the error (the script goes on):

  a_parity       logits of phi2.load_model on a checkpoint written by transformers' save_pretrained against
                 transformers' PhiForCausalLM, on a 4-layer full-width random Phi-2, in fp32 and bf16
  b_stage1_step  the full 32-layer Phi-2 (random bf16 weights) with rank-32 LoRA, one training step at batch
                 4 x 512 with and without gradient checkpointing: tokens/s, model FLOPs utilisation, peak memory
  c_stage2_step  a cached stage-2 step: the head adapter (full copy, and a rank-64 update) on ~2000 answer rows
  d_decoding     greedy decoding of 128 new tokens at batch 1 and 8: ours (eager; compiled where the API has it)
                 and transformers' generate on the same weights, beside the memory-bandwidth bound
  e_end_to_end   train_sft.py (--model tiny), train_head.py and generate.py through their main(), --device as given;
                 a stage-1 run paused half-way and resumed, against the uninterrupted one (no further from it than
                 a second uninterrupted run); fp16
  f_serving      serve.py's decoding engine on a 2-layer full-width Phi-2 with a head: 16 requests one at a time,
                 then all at once (half through the head), tokens/s and whether each batched row equals its
                 solo decode (issue 15's goal: 16 at once at least 4x one at a time)

--smoke (implied on a CPU) runs every section on tiny shapes in fp32, in a few seconds. The exit status is 0
when every section passed, 1 otherwise; the JSON is rewritten after each section, so a run cut short keeps
what it finished.
"""

import contextlib
import dataclasses
import gc
import io
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch

import lora
import phi2
from head_adapter import HeadAdapter
from phi2.files import write_atomic
from phi2.weights import hf_to_ours
from support import cli, hardware

GiB = 2**30
MEMORY_CAP = 24 * GiB  # the user's GPU
SECTIONS = ("a", "b", "c", "d", "e", "f")
# --smoke: a 2-layer cut of the tiny preset, small enough that every section takes a second or two on a CPU
SMOKE_CONFIG = phi2.Phi2Config.from_name("tiny", n_layer=2, n_embd=64, intermediate_size=256, vocab_size=512,
                                         block_size=128, resid_pdrop=0.1)
SMOKE_NAME = "smoke (tiny preset cut to 2 layers, 64 wide, vocab 512)"
# Dense bf16 tensor-core peaks (FLOP/s, fp32 accumulation, no sparsity) from the vendor's data sheets, for
# model FLOPs utilisation; the first name contained in the device's name wins. Unknown GPUs get the measured
# large-GEMM rate only.
PEAK_BF16 = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("A100", 312e12),
             ("L40S", 362e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("L4", 121e12)]


def parse_args(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--device", default="cuda", help=f"where to compute: {hardware.DEVICES}; a CPU implies --smoke")
    p.add_argument("--precision", default="auto", choices=hardware.PRECISIONS,
                   help="precision of sections b-e (a always runs fp32 and bf16); auto: bf16 on a GPU that has it, "
                        "fp32 on a CPU")
    p.add_argument("--out", required=True, help="folder for gpu_check.json (created if needed)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, a few seconds in all (implied on a CPU)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="sections to run")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------- helpers


class Context:
    """The resolved hardware, smoke or not, and the timing and memory helpers every section uses."""

    def __init__(self, hw: hardware.Hardware, smoke: bool):
        self.hw, self.dev, self.smoke = hw, hw.device, smoke
        self.cuda = hw.device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.dev)

    def timed(self, fn) -> float:
        self.sync()
        t = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t

    def reset_peak(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.dev)

    def peak_gib(self):
        """Peak torch.cuda.max_memory_allocated since reset_peak, in GiB (None on a CPU)."""
        return round(torch.cuda.max_memory_allocated(self.dev) / GiB, 3) if self.cuda else None

    def free(self):
        """Give back the device memory of what was dropped (a CPU run needs no collection)."""
        if self.cuda:
            gc.collect()
            torch.cuda.empty_cache()


def build(config: phi2.Phi2Config, dtype, device, seed=0) -> phi2.Phi2:
    """A random-init model built straight on device (phi2.build_model only builds on the CPU)."""
    with torch.device("meta"):
        model = phi2.Phi2(config)
    model = model.to(dtype).to_empty(device=device)
    model.init_weights(torch.Generator(device=device).manual_seed(seed))
    return model


def _peak(gib):
    return "" if gib is None else f", peak {gib} GiB allocated"


def big_config(ctx) -> phi2.Phi2Config:
    return SMOKE_CONFIG if ctx.smoke else phi2.Phi2Config.from_name("phi-2")


def config_name(ctx, full="phi-2 (32 layers)"):
    return SMOKE_NAME if ctx.smoke else full


def max_abs(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def transformers_module():
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


# ------------------------------------------------------------------------------------------ sections


@torch.no_grad()
def section_a(ctx, res):
    """Parity: our loader and forward pass against transformers on a checkpoint transformers wrote."""
    transformers = transformers_module()
    config = SMOKE_CONFIG if ctx.smoke else phi2.Phi2Config.from_name("phi-2", n_layer=4)
    ids = torch.randint(0, config.vocab_size, (2, 16 if ctx.smoke else 64),
                        generator=torch.Generator().manual_seed(0)).to(ctx.dev)
    res.update(config=config_name(ctx, "phi-2, n_layer=4 (full width)"), tokens=list(ids.shape))
    folder = Path(tempfile.mkdtemp(prefix="gpu_check_parity_"))
    try:
        torch.manual_seed(0)
        hf = transformers.PhiForCausalLM(transformers.PhiConfig(**config.to_hf_dict())).eval()
        hf.save_pretrained(folder, max_shard_size="1GB")
        hf = hf.to(ctx.dev)
        exact = hf(ids).logits.float()  # the fp32 truth
        ours = phi2.load_model(folder, dtype=torch.float32, device=ctx.dev)
        fp32 = max_abs(ours(ids), exact)
        res["fp32"] = {"max_abs_dlogit": fp32, "limit": 1e-4}
        print(f"  max |dlogit| fp32 {fp32:.2e}")
        ours = hf = None  # freed now, not at the end of the function
        ctx.free()
        # as tests/test_model.py does: hf.to(bfloat16) would also round transformers' rotary inv_freq buffer
        hf = transformers.PhiForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(ctx.dev).eval()
        ref = hf(ids).logits.float()
        hf = None  # freed now, not at the end of the function
        ctx.free()
        ours = phi2.load_model(folder, dtype=torch.bfloat16, device=ctx.dev)
        out = ours(ids).float()
        ours = None  # freed now, not at the end of the function
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        ctx.free()
    scale = exact.abs().max().item()
    bf16 = {"ours_vs_transformers": max_abs(out, ref), "ours_vs_fp32": max_abs(out, exact),
            "transformers_vs_fp32": max_abs(ref, exact), "max_abs_logit_fp32": scale}
    res["bf16"] = {**bf16, "limit": "ours_vs_fp32 <= 1.5 x transformers_vs_fp32 and ours_vs_transformers <= "
                                    "0.02 x max_abs_logit_fp32 (the criteria of tests/test_model.py)"}
    res["passed"] = bool(fp32 <= 1e-4 and bf16["ours_vs_fp32"] <= 1.5 * bf16["transformers_vs_fp32"]
                         and bf16["ours_vs_transformers"] <= 0.02 * scale)
    print(f"  bf16: ours vs transformers {bf16['ours_vs_transformers']:.3g}; against fp32, ours "
          f"{bf16['ours_vs_fp32']:.3g}, transformers {bf16['transformers_vs_fp32']:.3g}")



def gemm_rate(ctx, dtype) -> float:
    """FLOP/s of a large square matmul in dtype: what this device reaches on the best case."""
    n = 256 if ctx.smoke else 8192
    a = torch.randn(n, n, device=ctx.dev, dtype=dtype)
    b = torch.randn(n, n, device=ctx.dev, dtype=dtype)
    a @ b
    reps = 2 if ctx.smoke else 20
    t = ctx.timed(lambda: [a @ b for _ in range(reps)])
    return 2 * n**3 * reps / t


def peak_flops(ctx):
    if not ctx.cuda:
        return None, None
    name = torch.cuda.get_device_name(ctx.dev)
    return next(((k, v) for k, v in PEAK_BF16 if k in name), (None, None))


def section_b(ctx, res):
    """Stage 1: one LoRA training step of the full Phi-2, with and without gradient checkpointing."""
    config, dtype = big_config(ctx), ctx.hw.dtype
    B, T, masked = (2, 64, 16) if ctx.smoke else (4, 512, 100)
    warmup, steps = (1, 2) if ctx.smoke else (2, 5)
    model = build(config, dtype, ctx.dev)
    lora.inject(model, rank=32, alpha=64.0, dropout=0.05)
    params = lora.trainable_parameters(model)
    optimizer = torch.optim.AdamW(params.values(), lr=1e-5, fused=True)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (B, T), generator=gen)
    labels = ids.clone()
    labels[:, :masked] = -100  # the prompt: no target
    ids = hardware.to_device(ids, ctx.dev)  # labels stay on the CPU, as in train_sft.py

    n_lora = sum(p.numel() for p in params.values())
    n_head = sum(p.numel() for n, p in model.named_parameters() if n.startswith("lm_head."))
    n_body = sum(p.numel() for n, p in model.named_parameters()
                 if "lora_" not in n and not n.startswith(("lm_head.", "embed_tokens.")))
    rows_in, rows_head = B * (T - 1), int((labels[:, 1:] != -100).sum())
    res.update({"config": config_name(ctx), "dtype": str(dtype).removeprefix("torch."),
               "batch": [B, T], "masked_prefix": masked, "lora": {"rank": 32, "alpha": 64, "dropout": 0.05},
               "params": {"body_non_embedding": n_body, "lm_head": n_head, "lora": n_lora},
               "memory_cap_gib": MEMORY_CAP / GiB if ctx.cuda else None,
               "flops_formula": ("per step: (4 + 2 * checkpointing) * N_body * B*(T-1) + 4 * N_head * answer_rows. "
                                 "2N per token forward, 2N backward for the activation gradients (the frozen "
                                 "base's weight gradients are skipped), and 2N more for the blocks' recomputation "
                                 "under checkpointing; the LM head runs once, on answer rows only. LoRA's own "
                                 "FLOPs, the attention scores (T^2) and the embedding are left out, so MFU is a "
                                 "slight under-count. tokens/s counts B*T input tokens."),
                   "median_of": steps, "warmup_steps": warmup})
    gemm = gemm_rate(ctx, dtype)
    name, peak = peak_flops(ctx)
    res["device_gemm_tflops"] = round(gemm / 1e12, 2)
    res["device_peak_tflops"] = None if peak is None else {"name": name, "tflops": peak / 1e12}

    def step():
        with ctx.hw.autocast():
            loss, n = model.loss(ids, labels)
        (loss / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach() / n

    model.train()
    ok = True
    for checkpointing in (True, False):
        key = "checkpointing" if checkpointing else "no_checkpointing"
        model.gradient_checkpointing = checkpointing
        ctx.free()
        ctx.reset_peak()
        losses, times = [], []
        try:
            for _ in range(warmup + steps):
                box = []
                times.append(ctx.timed(lambda: box.append(step())))
                losses.append(box[0].item())
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)  # the memory itself comes back at the next ctx.free()
            res[key] = {"fits": False, "result": f"did not fit in {MEMORY_CAP // GiB} GiB",
                        "peak_before_failure_gib": ctx.peak_gib()}
            print(f"  {key}: did not fit in {MEMORY_CAP // GiB} GiB")
            ok = ok and not checkpointing  # with checkpointing it must fit
            continue
        s = statistics.median(times[warmup:])
        flops = (4 + 2 * checkpointing) * n_body * rows_in + 4 * n_head * rows_head
        r = {"fits": True, "seconds_per_step": round(s, 4), "tokens_per_s": round(B * T / s, 1),
             "model_tflops_per_s": round(flops / s / 1e12, 3), "mfu_of_measured_gemm": round(flops / s / gemm, 4),
             "mfu_of_peak": None if peak is None else round(flops / s / peak, 4),
             "peak_allocated_gib": ctx.peak_gib(), "losses": [round(x, 4) for x in losses]}
        r["finite"] = all(x == x and abs(x) != float("inf") for x in losses)
        ok = ok and r["finite"]
        res[key] = r
        mfu = r["mfu_of_peak"] if r["mfu_of_peak"] is not None else r["mfu_of_measured_gemm"]
        print(f"  {key}: {s:.3f} s/step, {r['tokens_per_s']:.0f} tokens/s, MFU {mfu:.1%}"
              f"{'' if peak else ' (of the measured GEMM rate)'}{_peak(r['peak_allocated_gib'])}")
    model = optimizer = params = None  # freed now, not at the end of the function
    ctx.free()
    res["passed"] = ok


def section_c(ctx, res):
    """Stage 2: one step of the head adapter on cached answer-row hidden states (the model stays resident)."""
    config, dtype = big_config(ctx), ctx.hw.dtype
    N = 64 if ctx.smoke else 2000
    warmup, steps = (1, 2) if ctx.smoke else (2, 5)
    model = build(config, dtype, ctx.dev).requires_grad_(False).eval()
    gen = torch.Generator(device=ctx.dev).manual_seed(0)
    h = torch.randn(N, config.n_embd, device=ctx.dev, dtype=dtype, generator=gen)  # as train_head caches them
    next_ids = torch.randint(0, config.vocab_size, (N,), device=ctx.dev, generator=gen)
    res.update({"config": config_name(ctx, "phi-2 (32 layers, resident)"), "rows": N,
                "hidden_dtype": str(dtype).removeprefix("torch."), "head_dtype": "float32",
                "memory_cap_gib": MEMORY_CAP / GiB if ctx.cuda else None, "median_of": steps})
    ok = True
    for rank in (None, 64):
        key = "full_head" if rank is None else f"rank{rank}_head"
        ctx.free()
        ctx.reset_peak()
        head = HeadAdapter(model.lm_head, rank, dtype=torch.float32)
        params = [p for p in head.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)
        losses = []

        def step():
            with ctx.hw.autocast():
                loss = head.loss(h, next_ids)
            (loss / N).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach() / N)

        times = [ctx.timed(step) for _ in range(warmup + steps)]
        values = [x.item() for x in losses]
        s = statistics.median(times[warmup:])
        res[key] = {"seconds_per_step": round(s, 4), "trainable_params": sum(p.numel() for p in params),
                    "peak_allocated_gib": ctx.peak_gib(), "losses": [round(x, 4) for x in values],
                    "finite": all(x == x and abs(x) != float("inf") for x in values)}
        ok = ok and res[key]["finite"]
        print(f"  {key}: {s:.4f} s/step on {N} rows{_peak(res[key]['peak_allocated_gib'])}")
        head = optimizer = params = None  # freed now, not at the end of the function
    model = h = next_ids = None  # freed now, not at the end of the function
    ctx.free()
    res["passed"] = ok


def copy_bandwidth(ctx) -> float:
    """Bytes/s moved by a device-to-device copy of a 1 GiB tensor (read + write: 2 bytes per byte copied)."""
    n = (64 if ctx.smoke else 1024) * 2**20
    x = torch.ones(n, dtype=torch.uint8, device=ctx.dev)
    y = torch.empty_like(x)
    y.copy_(x)
    times = [ctx.timed(lambda: y.copy_(x)) for _ in range(3 if ctx.smoke else 10)]
    return 2 * n / statistics.median(times)


@torch.no_grad()
def section_d(ctx, res):
    """Greedy decoding: ours (eager, compiled) against transformers, and a batch's rows against their solo runs."""
    from phi2.generation import compiled, generate
    config, dtype = big_config(ctx), ctx.hw.dtype
    n_new, prompt_len = (8, 8) if ctx.smoke else (128, 64)
    reps = 1 if ctx.smoke else 3
    batches = (1, 8)
    model = build(config, dtype, ctx.dev).requires_grad_(False).eval()  # plain: no LoRA layers
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    bandwidth = copy_bandwidth(ctx)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, config.vocab_size, (max(batches), prompt_len), generator=gen)
    res.update({"config": config_name(ctx), "dtype": str(dtype).removeprefix("torch."),
                "prompt_tokens": prompt_len, "new_tokens": n_new, "best_of": reps,
                "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1), "weight_bytes_per_step": weight_bytes,
                "rates": ("end_to_end: B * new / t(new), prefill included; decode: B * (new - 1) / (t(new) - t(1)), "
                          "the prefill cancelled out; bound: B * copy_bandwidth / weight_bytes_per_step (every "
                          "weight but the embedding read once per step; the KV cache left out), where "
                          "copy_bandwidth counts the bytes read plus the bytes written by a 1 GiB "
                          "device-to-device copy"),
                "memory_cap_gib": MEMORY_CAP / GiB if ctx.cuda else None})

    def rates(run) -> dict:
        """{B: {end_to_end, decode, of_bound}} for run(B, n_new) -> number of new tokens per row."""
        out = {}
        for B in batches:
            got = run(B, n_new)  # warm-up
            if got != n_new:
                raise RuntimeError(f"made {got} new tokens per row, not {n_new}")
            t_n = min(ctx.timed(lambda: run(B, n_new)) for _ in range(reps))
            t_1 = min(ctx.timed(lambda: run(B, 1)) for _ in range(reps))
            decode = B * (n_new - 1) / (t_n - t_1) if t_n > t_1 else None
            bound = B * bandwidth / weight_bytes
            out[f"batch_{B}"] = {"end_to_end_tok_s": round(B * n_new / t_n, 1),
                                 "decode_tok_s": None if decode is None else round(decode, 1),
                                 "bound_tok_s": round(bound, 1),
                                 "decode_of_bound": None if decode is None else round(decode / bound, 3)}
        return out

    def ours(B, n, **kw):
        completions = generate(model, prompts[:B].tolist(), n, **kw)
        return min(len(c.ids) for c in completions)

    res["ours_eager"] = rates(ours)
    print("  ours eager:   " + _rates_line(res["ours_eager"]))
    ours_ids = generate(model, prompts[:1].tolist(), n_new)[0].ids
    # batch invariance: each row of a batch of 8 prompts of mixed lengths gives its solo decode, bit for bit
    mixed = [p[:prompt_len - i * prompt_len // 9] for i, p in enumerate(prompts.tolist())]
    batched = [c.ids for c in generate(model, mixed, n_new)]
    res["batch_rows_equal_to_solo"] = sum(ids == generate(model, [p], n_new)[0].ids for p, ids in zip(mixed, batched))
    print(f"  {res['batch_rows_equal_to_solo']}/{len(mixed)} rows of a batch of {len(mixed)} equal their solo decode")

    # compiled: inductor on the device; in smoke mode aot_eager, which runs the same static-cache graph in seconds
    backend = "aot_eager" if ctx.smoke else "inductor"
    decode = compiled(backend)
    t = time.perf_counter()
    ours(1, n_new, decode=decode)
    warm = time.perf_counter() - t
    res["ours_compiled_backend"] = backend
    res["ours_compiled"] = {"first_call_seconds": round(warm, 2), **rates(lambda B, n: ours(B, n, decode=decode))}
    print("  ours compiled: " + _rates_line(res["ours_compiled"]))

    transformers = transformers_module()
    hf = hf_model(transformers, config, dtype, ctx.dev)
    sd = model.state_dict()
    hf.load_state_dict({name: sd[ours_name] for name, ours_name in hf_to_ours(config.n_layer).items()}, strict=True)
    sd = None  # freed now, not at the end of the function
    hf.generation_config.eos_token_id = None
    device_prompts = prompts.to(ctx.dev)

    def theirs(B, n):
        ids = device_prompts[:B]
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
        return out.shape[1] - ids.shape[1]

    with torch.inference_mode():
        res["transformers"] = rates(theirs)
        one = device_prompts[:1]
        hf_ids = hf.generate(one, attention_mask=torch.ones_like(one), max_new_tokens=n_new, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, prompt_len:].tolist()
    print("  transformers: " + _rates_line(res["transformers"]))
    same = next((i for i, (a, b) in enumerate(zip(ours_ids, hf_ids)) if a != b), min(len(ours_ids), len(hf_ids)))
    res["greedy_ids_agree_for_first"] = same  # informative: half-precision rounding can flip a near-tie
    res["speedup_vs_transformers"] = {
        k: round(res["ours_eager"][k]["decode_tok_s"] / res["transformers"][k]["decode_tok_s"], 3)
        for k in res["ours_eager"]
        if res["ours_eager"][k]["decode_tok_s"] and res["transformers"][k]["decode_tok_s"]}
    model = hf = None  # freed now, not at the end of the function
    ctx.free()
    res["passed"] = res["batch_rows_equal_to_solo"] == len(mixed)


def hf_model(transformers, config, dtype, device):
    """transformers' PhiForCausalLM built in dtype straight on device (no fp32 copy, no CPU detour)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            hf = transformers.PhiForCausalLM(transformers.PhiConfig(**config.to_hf_dict()))
    finally:
        torch.set_default_dtype(old)
    return hf.eval()


def _rates_line(r):
    return ", ".join(f"B={k.removeprefix('batch_')}: {v['decode_tok_s']} tok/s decode "
                     f"({v['end_to_end_tok_s']} end to end, bound {v['bound_tok_s']})" for k, v in r.items()
                     if k.startswith("batch_"))


def section_e(ctx, res):
    """The CLIs end to end on the tiny preset, on the device: stage 1, stage 2, generation."""
    import generate as generate_cli
    import train_head
    import train_sft
    dev, precision = str(ctx.dev), ctx.hw.precision
    on = ["--device", dev, "--precision", precision]
    sft_steps, head_steps, new = (2, 2, 8) if ctx.smoke else (20, 10, 16)
    folder = Path(tempfile.mkdtemp(prefix="gpu_check_e2e_"))
    res.update(device=dev, precision=precision)

    def sft(run_dir, *more):
        return ["--model", "tiny", "--run-dir", str(folder / run_dir), "--max-steps", str(sft_steps), "--batch-size",
                "4", "--grad-accum", "1", *on, *more]
    half = max(1, sft_steps // 2)
    steps = [  # (name, module, argv, the steps it needs to have passed)
        ("train_sft", train_sft, sft("sft"), ()),
        ("train_head", train_head, ["--target", "concise", "--data", str(ROOT / "data/targets/concise.jsonl"),
                                    "--lora", str(folder / "sft" / "best"), "--out",
                                    str(folder / "concise.safetensors"), "--run-dir", str(folder / "head"),
                                    "--max-steps", str(head_steps), "--batch-size", "4", "--grad-accum", "1", *on],
         ("train_sft",)),
        ("generate", generate_cli, ["--lora", str(folder / "sft" / "best"), "--head",
                                    str(folder / "concise.safetensors"), *on, "--max-new-tokens", str(new),
                                    "--json", "Write a poem"], ("train_head",)),
        # paused half-way and resumed, and a control run: the resumed run's weights differ from the first run's
        # by no more than the control's do (0 where the device's kernels are deterministic; compared below)
        ("train_sft_pause", train_sft, sft("again", "--stop-after", str(half)), ()),
        ("train_sft_resume", train_sft, ["--run-dir", str(folder / "again"), "--resume"], ("train_sft_pause",)),
        ("train_sft_control", train_sft, sft("control"), ()),
        # fp16 with its gradient scaler, the path of GPUs without bf16 (T4, V100)
        ("train_sft_fp16", train_sft, sft("fp16", "--precision", "fp16"), ()),
    ]
    expected = {"train_sft": sft_steps, "train_head": head_steps, "train_sft_pause": half,
                "train_sft_resume": sft_steps, "train_sft_control": sft_steps, "train_sft_fp16": sft_steps}
    ok = True
    try:
        for name, module, argv, needs in steps:
            if not all(res.get(n, {}).get("passed") for n in needs):
                res[name] = {"passed": False, "error": f"not run: needs {', '.join(needs)}"}
                print(f"  {name}: not run (needs {', '.join(needs)})")
                ok = False
                continue
            out, err = io.StringIO(), io.StringIO()
            t = time.perf_counter()
            try:
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                    result = module.main(module.parse_args(argv))
            except (Exception, SystemExit) as e:
                res[name] = {"passed": False, "seconds": round(time.perf_counter() - t, 2),
                             "error": f"{type(e).__name__}: {e}", "stderr_tail": err.getvalue()[-2000:]}
                print(f"  {name}: FAILED ({type(e).__name__}: {e})")
                ok = False
                continue
            r = {"passed": True, "seconds": round(time.perf_counter() - t, 2), "argv": argv}
            if name == "generate":
                r["passed"] = len(result) == 1 and result[0]["target"] == "concise"
                r["record"] = {k: result[0][k] for k in ("output", "new_tokens", "finish", "tokens_per_s")} \
                    if result else None
            else:
                r["steps"] = result["step"]
                r["best_val_loss"] = result["best_val_loss"]
                r["passed"] = result["step"] == expected[name]
            ok = ok and r["passed"]
            res[name] = r
            print(f"  {name}: {'ok' if r['passed'] else 'FAILED'} in {r['seconds']} s")
            result = None  # freed now, not at the end of the function
        if all(res.get(n, {}).get("passed") for n in ("train_sft", "train_sft_resume", "train_sft_control")):
            from safetensors.torch import load_file
            first, resumed, control = (load_file(folder / run / "last" / "adapter_model.safetensors")
                                       for run in ("sft", "again", "control"))
            res["resume_max_abs_diff"] = max(max_abs(first[k], resumed[k]) for k in first)
            res["control_max_abs_diff"] = max(max_abs(first[k], control[k]) for k in first)
            ok = ok and res["resume_max_abs_diff"] <= res["control_max_abs_diff"]
            print(f"  against the first run: resumed max abs diff {res['resume_max_abs_diff']:.3g}, a second "
                  f"uninterrupted run {res['control_max_abs_diff']:.3g}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        ctx.free()
    res["passed"] = ok


class _NoText:
    """A tokenizer for ids only: no EOS, no text (rows run to their length, as throughput needs), no template."""
    eos_id = -1

    @staticmethod
    def encode(text):
        return []

    @staticmethod
    def decode(ids):
        return ""


def section_f(ctx, res):
    """Serving: serve.py's engine on 16 requests one at a time, all at once, and 4 rows at a time (joining)."""
    from serving.engine import Engine, Request
    config = SMOKE_CONFIG if ctx.smoke else phi2.Phi2Config.from_name("phi-2", n_layer=2)
    dtype = ctx.hw.dtype
    model = build(config, dtype, ctx.dev).eval().requires_grad_(False)
    head = HeadAdapter(model.lm_head, dtype=dtype).eval().requires_grad_(False)
    with torch.no_grad():
        head.adapter.weight.add_(0.02 * torch.randn_like(head.adapter.weight))
    engine = Engine(model, _NoText(), {"base": None, "t": head})

    def decode(requests):  # on this thread, to the end
        engine.queue.extend(requests)
        engine.run()

    new, B = (8, 16) if ctx.smoke else (64, 16)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, config.vocab_size, (int(n),), generator=generator).tolist()
               for n in torch.randint(16, 48, (B,), generator=generator)]
    jobs_of = lambda rows: [Request(prompts[r], "t" if r % 2 else "base", new) for r in rows]  # noqa: E731
    decode(jobs_of([0]))  # warm-up
    solo_ids, solo_seconds = [], 0.0
    for r in range(B):
        jobs = jobs_of([r])
        solo_seconds += ctx.timed(lambda: decode(jobs))
        solo_ids.append(jobs[0].out)
    jobs = jobs_of(range(B))
    batch_seconds = ctx.timed(lambda: decode(jobs))
    equal = sum(job.out == ids for job, ids in zip(jobs, solo_ids))
    # continuous batching: 4 rows at a time, rows of 4 lengths, each next job joining as a row leaves
    engine.max_batch, lengths = 4, [new - (new // 4) * (r % 4) for r in range(B)]
    staggered = [Request(prompts[r], "t" if r % 2 else "base", lengths[r]) for r in range(B)]
    decode(staggered)
    joined = sum(job.out == ids[:n] for job, ids, n in zip(staggered, solo_ids, lengths))  # greedy: a prefix
    one, together = B * new / solo_seconds, B * new / batch_seconds
    res.update(config=config_name(ctx, "phi-2 with 2 layers (full width)"), dtype=str(dtype), requests=B,
               new_tokens=new, one_at_a_time_tok_s=round(one, 1), all_at_once_tok_s=round(together, 1),
               ratio=round(together / one, 2), goal_4x=together / one >= 4, rows_equal_to_solo=equal,
               joining_rows_equal_to_solo=joined)
    print(f"  16 requests of {new} tokens: one at a time {one:.1f} tok/s, all at once {together:.1f} tok/s "
          f"({together / one:.1f}x; goal 4x); {equal}/{B} batched rows equal their solo decode; {joined}/{B} "
          "rows joining and leaving 4 at a time do")
    res["passed"] = equal == B and joined == B  # a reply depends only on its request, in every precision


RUNNERS = {"a": ("a_parity", section_a), "b": ("b_stage1_step", section_b), "c": ("c_stage2_step", section_c),
           "d": ("d_decoding", section_d), "e": ("e_end_to_end", section_e), "f": ("f_serving", section_f)}


# ---------------------------------------------------------------------------------------------- main


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(ctx) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "hardware": ctx.hw.to_dict(),
           "smoke": ctx.smoke, "threads": torch.get_num_threads()}
    try:
        env["transformers"] = transformers_module().__version__
    except ImportError:
        env["transformers"] = None
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.dev)
        env.update(device_name=props.name, total_memory_gib=round(props.total_memory / GiB, 2),
                   cuda=torch.version.cuda, capability=f"{props.major}.{props.minor}",
                   memory_cap_gib=MEMORY_CAP / GiB, memory_fraction=round(min(1.0, MEMORY_CAP / props.total_memory), 4),
                   matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    else:
        env.update(device_name=cpu_name(), memory_cap_gib=None)
    return env


def main(args) -> dict:
    hw = hardware.resolve(args.device, args.precision)
    if hw.device.type == "cpu" and args.precision == "auto":
        hw = dataclasses.replace(hw, precision="fp32", reason="smoke run on a CPU: fp32")
    ctx = Context(hw, smoke=args.smoke or hw.device.type == "cpu")
    if hw.device.type == "cpu":
        torch.set_num_threads(1)  # tiny shapes: a second thread only adds synchronisation, worst on a busy machine
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu_check.json"
    print(f"gpu_check: {hw.describe()}{' (smoke mode: tiny shapes)' if ctx.smoke else ''}", flush=True)
    if ctx.cuda:
        total = torch.cuda.get_device_properties(hw.device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, MEMORY_CAP / total), hw.device)
        print(f"  GPU memory capped at {MEMORY_CAP / GiB:.0f} GiB of {total / GiB:.1f} GiB", flush=True)

    report = {"script": "bench/gpu_check.py", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "environment": environment(ctx), "sections": {}, "passed": None, "seconds": None}
    t0 = time.perf_counter()
    for key in SECTIONS:
        if key not in args.sections:
            continue
        name, fn = RUNNERS[key]
        print(f"\n({key}) {name}: {fn.__doc__.splitlines()[0]}", flush=True)
        torch.manual_seed(0)
        t = time.perf_counter()
        entry = {"passed": False, "error": None}
        result = {}  # the section fills it as it goes: what it measured before a failure is kept
        try:
            fn(ctx, result)
            entry["passed"] = bool(result.pop("passed"))
        except Exception as e:  # recorded; the next section runs
            result.pop("passed", None)
            entry.update(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:])
            print(f"  FAILED: {type(e).__name__}: {e}", flush=True)
        entry.update(result)
        ctx.free()
        entry["seconds"] = round(time.perf_counter() - t, 2)
        report["sections"][name] = entry
        print(f"  -> {'passed' if entry['passed'] else 'FAILED'} in {entry['seconds']} s", flush=True)
        report["seconds"] = round(time.perf_counter() - t0, 2)
        write_atomic(path, json.dumps(report, indent=2) + "\n")  # after each section: a cut-short run keeps it

    report["passed"] = all(s["passed"] for s in report["sections"].values())
    report["seconds"] = round(time.perf_counter() - t0, 2)
    write_atomic(path, json.dumps(report, indent=2) + "\n")
    print(f"\n{'all sections passed' if report['passed'] else 'SOME SECTIONS FAILED'}: "
          + ", ".join(f"{n} {'ok' if s['passed'] else 'FAILED'}" for n, s in report["sections"].items())
          + f"; {report['seconds']:.0f} s; wrote {path}")
    return report


if __name__ == "__main__":
    report = cli.run("gpu_check.py", main, parse_args)
    sys.exit(0 if report["passed"] else 1)
