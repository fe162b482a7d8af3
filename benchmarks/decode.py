"""Decode-path benchmark: does the cache allocate what it holds, and what does one decode step cost?

    python -m benchmarks.decode [--prompt 1000] [--new-tokens 32] [--compile [inductor] [aot_eager]]
                                [--compile-layers N ...] [--out-dir DIR]

On the `tiny` preset (CPU by default, fp32), four measurements, each labelled with how it is obtained:
1. allocation vs rows after `generate` with the default cache, `cache_implementation="static"` and "dynamic":
   `capacity_nbytes()` (bytes of the cache's allocated buffers) over `nbytes()` (rows held), goal 1.00;
2. bytes newly allocated during the FIRST decode step after the prompt, preallocated vs dynamic cache, and on the
   preallocated one the in-place step (what "auto" runs off CUDA and compiled) vs the prefix + chunk reference, in
   fp32 and bf16: counted at the dispatcher (every tensor an aten op creates, frees ignored), so a copy of the
   whole cache, or an upcast of its buffers, shows up;
3. aten ops dispatched per decoded token (all, and without views: the ops that would launch a kernel), eager,
   against transformers' `LlamaForCausalLM` with N*T layers of the same widths (a LoopLM unrolled), both on a
   preallocated cache: the launch count a GPU would pay without CUDA graphs;
4. milliseconds per token, eager vs `torch.compile` of the one-token step (`--compile [inductor] [aot_eager]`),
   median of the steps after the first; the first step's time is the compile, cold (inductor's on-disk caches off);
   `--compile-layers 24` repeats it with 24 layers of the same widths (compile time grows with the unrolled depth).
Nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch._dynamo
import torch._inductor.config
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from melt import override_backend

from . import common


class DispatchTally(TorchDispatchMode):
    """Counts aten ops and the bytes of the new storages they return (views and in-place results excluded)."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.compute_ops = 0  # ops that are not views or dtype queries: what would launch a kernel on a GPU
        self.new_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        self.compute_ops += not (func.is_view or func.overloadpacket is torch.ops.aten.promote_types)
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.new_bytes += t.untyped_storage().nbytes()
        return out


def allocation_after_generate(model, prompt: torch.Tensor, new_tokens: int) -> list[dict]:
    rows = []
    for implementation in (None, "static", "dynamic"):
        out = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, cache_implementation=implementation,
                             return_dict_in_generate=True, pad_token_id=0)
        cache = out.cache
        rows.append({"cache": implementation or "default", "rows_bytes": cache.nbytes(),
                     "allocated_bytes": cache.capacity_nbytes(),
                     "allocated_over_rows": round(cache.capacity_nbytes() / cache.nbytes(), 3)})
    return rows


@torch.no_grad()
def first_step_allocation(preset: str, prompt: torch.Tensor) -> list[dict]:
    """Bytes created by the first decode step after `prompt`: dynamic vs preallocated cache, and on the preallocated
    one the step the automatic backend takes off CUDA (in place: the token's row written into its column, SDPA over
    the buffers) vs the reference step (forced "eager": prefix + chunk rows, softmax in fp32), in fp32 and bf16."""
    rows = []
    cases = [("preallocated", "auto", torch.float32), ("preallocated", "eager", torch.float32),
             ("dynamic", "auto", torch.float32), ("preallocated", "auto", torch.bfloat16),
             ("preallocated", "eager", torch.bfloat16)]
    models = {dtype: common.build_model(preset, "melt", dtype=dtype) for dtype in (torch.float32, torch.bfloat16)}
    for kind, backend, dtype in cases:
        model = models[dtype]
        cache = model.new_cache(max_cache_len=prompt.shape[1] + 1) if kind == "preallocated" else model.new_cache()
        with override_backend(backend):
            token = model(prompt, cache=cache, logits_to_keep=1).logits.argmax(-1)
            with DispatchTally() as tally:
                model(token, cache=cache)
        step = "dynamic" if kind == "dynamic" else ("in place" if backend == "auto" else "prefix + chunk (reference)")
        rows.append({"cache": kind, "step": step, "dtype": str(dtype).removeprefix("torch."),
                     "cache_rows_bytes": cache.nbytes(), "allocated_in_step_bytes": tally.new_bytes,
                     "allocated_in_step_over_rows": round(tally.new_bytes / cache.nbytes(), 3)})
    return rows


@torch.no_grad()
def ops_per_token(preset: str, context: int) -> list[dict]:
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.cache_utils import StaticCache

    rows = []
    # bf16 too: the dtype a GPU decodes in, where every cast between it and fp32 is one more launch.
    for dtype in (torch.float32, torch.bfloat16):
        for name in ("melt", "looplm"):
            model = common.build_model(preset, name, dtype=dtype)
            cache = model.new_cache(max_cache_len=context + 1)
            model(torch.randint(1, 100, (1, context)), cache=cache)
            with DispatchTally() as tally:
                model(torch.randint(1, 100, (1, 1)), cache=cache)
            cfg = model.config
            rows.append({"model": name, "dtype": str(dtype).removeprefix("torch."), "layers": cfg.num_hidden_layers,
                         "loops": cfg.num_loops, "aten_ops": tally.ops, "compute_ops": tally.compute_ops})
    kw = common.model_kwargs(preset, "melt")
    llama_cfg = LlamaConfig(
        vocab_size=kw["vocab_size"], hidden_size=kw["hidden_size"], intermediate_size=kw["intermediate_size"],
        num_hidden_layers=kw["num_hidden_layers"] * kw["num_loops"], num_attention_heads=kw["num_attention_heads"],
        num_key_value_heads=kw["num_key_value_heads"], head_dim=kw["head_dim"], max_position_embeddings=context + 8,
    )
    llama = LlamaForCausalLM(llama_cfg).eval()
    cache = StaticCache(config=llama_cfg, max_cache_len=context + 1)
    llama(torch.randint(1, 100, (1, context)), cache=cache)
    with DispatchTally() as tally:
        llama(torch.randint(1, 100, (1, 1)), cache=cache, position_ids=torch.tensor([[context]]))
    rows.append({"model": "llama (N*T layers)", "dtype": "float32", "layers": llama_cfg.num_hidden_layers, "loops": 1,
                 "aten_ops": tally.ops, "compute_ops": tally.compute_ops})
    return rows


COMPILERS = {
    "inductor": "compiled (inductor, fullgraph)",
    # What torch.compile's "cudagraphs" backend builds before it captures (CUDA only): the traced graph, unfused.
    "aot_eager": "traced (dynamo + AOT autograd, fullgraph)",
}


@torch.no_grad()
def ms_per_token(model, prompt: torch.Tensor, steps: int, compilers: list[str]) -> list[dict]:
    rows = []
    for backend in [None, *compilers]:
        name, step = "eager", model
        if backend is not None:
            # torch.compile only wraps; the compile happens at the first step, so forget earlier graphs right here.
            torch._dynamo.reset()
            name, step = COMPILERS[backend], torch.compile(model, fullgraph=True, dynamic=False, backend=backend)
        cache = model.new_cache(max_cache_len=prompt.shape[1] + steps + 1)
        token = model(prompt, cache=cache, logits_to_keep=1).logits.argmax(-1)
        times = []
        # A cold compile: inductor's on-disk caches would turn a second run's first step into a cache read.
        with torch._inductor.config.patch(force_disable_caches=True):
            for _ in range(steps):
                start = time.perf_counter()
                token = step(token, cache=cache).logits.argmax(-1)
                times.append(time.perf_counter() - start)
        rows.append({"step": name, "layers": model.config.num_hidden_layers, "loops": model.config.num_loops,
                     "first_step_s": round(times[0], 3), "ms_per_token": round(1e3 * statistics.median(times[1:]), 3)})
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny"])
    parser.add_argument("--prompt", type=int, default=1000, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--compile", nargs="*", choices=list(COMPILERS), default=None, metavar="BACKEND",
                        help="also time the torch.compile'd step: inductor (the default) and/or aot_eager (the graph "
                             "the 'cudagraphs' backend captures on CUDA; unfused here)")
    parser.add_argument("--compile-layers", type=int, nargs="*", default=[], metavar="N",
                        help="also time the compiled steps of the same widths with N layers (compile time against "
                             "depth: the Ouro-1.4B shape unrolls 24 layers x 4 loops)")
    parser.add_argument("--out-dir", default=None, help="directory for the JSON (default runs/benchmarks)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    device = torch.device("cpu")
    model = common.build_model(args.preset, "melt")
    prompt = torch.randint(1, 100, (1, args.prompt))
    result = {
        "machine": common.machine_info(device),
        "preset": args.preset,
        "prompt": args.prompt,
        "allocation_after_generate": allocation_after_generate(model, prompt, args.new_tokens),
        "first_decode_step": first_step_allocation(args.preset, prompt),
        "ops_per_token": ops_per_token(args.preset, context=64),
    }
    compilers = [] if args.compile is None else (args.compile or ["inductor"])
    result["ms_per_token"] = ms_per_token(model, prompt, args.new_tokens, compilers)
    for layers in args.compile_layers:
        deeper = common.build_model(args.preset, "melt", num_hidden_layers=layers)
        result["ms_per_token"] += ms_per_token(deeper, prompt, args.new_tokens, compilers)
    for title, key in (("allocated (buffers) vs rows held after generate", "allocation_after_generate"),
                       ("bytes allocated by the first decode step (dispatcher count)", "first_decode_step"),
                       ("aten ops per decoded token (eager)", "ops_per_token"),
                       ("ms per token (CPU)", "ms_per_token")):
        print(title)
        common.print_table(result[key], list(result[key][0]))
    json_path, _ = common.result_paths("decode", args.preset, device, args.out_dir)
    common.write_json(json_path, result)
    print(f"wrote {json_path}")
    return result


if __name__ == "__main__":
    main()
