"""Benchmark the MELT Triton kernels on a CUDA GPU: `python -m benchmarks.kernels`.

`python -m benchmarks.kernels --aot` needs no GPU: it compiles every kernel x production config x
variant x dtype for sm_80 and sm_90 ahead of time (`melt_kernels.aot`) and tabulates, per kernel,
config and target, the shared memory per block, the registers per thread and the spill bytes (from
`ptxas -v`), and the tensor-core instruction family in the PTX (`wgmma` on sm_90, `mma` on sm_80,
`none` where the dots run on FMA units: fp32 with exact dots, element-wise kernels). Writes
benchmarks/results/kernels_aot.json and .png. Nothing is asserted.

- Gated update (memory-bound): achieved GB/s of the forward and backward launchers, next to the
  bandwidth of a device copy (`torch.clone`) moving the same number of bytes in the same run.
- Chunk attention, forward and backward, B=1, H=16, D=128, bf16, C in {1, 64, 500} queries over
  P in {1K, 8K, 32K} prefix rows read in place from a cache buffer. Compared on equal work with
  PyTorch SDPA (flash backend requested, bottom-right causal via `causal_lower_right`), timing
  only the SDPA call on an already concatenated K/V, and with "concatenate prefix + SDPA", whose
  time includes the concatenation. TFLOP/s count the visible (query, key) pairs only: 4 * D flops
  per pair forward, 2.5x that backward.

Prints a table, writes runs/benchmarks/kernels_<device>.json and .png (machine info, torch and
triton versions included; files written via `benchmarks.common`). Timings are medians of
`triton.testing.do_bench`; nothing is asserted. Without a GPU it says so and exits with status 1.
"""

from __future__ import annotations

import argparse
import sys

import torch

from . import common

GATED_SHAPES = [(1, 500, 2048), (8, 500, 2048), (32, 500, 2048)]  # [B, C, hidden] (Ouro-1.4B hidden)
ATTN_CHUNKS = [1, 64, 500]
ATTN_PREFIXES = [1024, 8192, 32768]
ATTN_B, ATTN_H, ATTN_D = 1, 16, 128
DTYPE = torch.bfloat16


def _bench_ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def bench_gated_update() -> list[dict]:
    from melt_kernels.gated_update import gated_update_bwd, gated_update_fwd

    rows = []
    for shape in GATED_SHAPES:
        a, s, ga, gs, dout = (torch.randn(shape, device="cuda", dtype=DTYPE) for _ in range(5))
        b = torch.randn(shape[-1], device="cuda", dtype=DTYPE)
        tensor_bytes = a.numel() * a.element_size()
        for direction, n_tensors, fn in (
            # forward (inference): read a, s, ga, gs; write s'
            ("fwd", 5, lambda: gated_update_fwd(a, s, ga, gs, b)),
            # forward (training): also write g = ga + gs, the one tensor backward keeps of ga and gs
            ("fwd+g", 6, lambda: gated_update_fwd(a, s, ga, gs, b, return_gate_sum=True)),
            # backward: read ds', a, s, g; write da, ds, dz (not counted: the fp32 db partials,
            # one row per BLOCK_M rows, i.e. 2 / BLOCK_M of one bf16 tensor)
            ("bwd", 7, lambda: gated_update_bwd(dout, a, s, ga, b)),
        ):
            moved = n_tensors * tensor_bytes
            ms = _bench_ms(fn)
            # A clone reads and writes its size: clone half the bytes to move the same total.
            buf = torch.empty(moved // 2, device="cuda", dtype=torch.uint8)
            copy_ms = _bench_ms(buf.clone)
            rows.append(
                {
                    "op": "gated_update",
                    "direction": direction,
                    "shape": list(shape),
                    "bytes": moved,
                    "ms": ms,
                    "gb_per_s": moved / ms / 1e6,
                    "copy_ms": copy_ms,
                    "copy_gb_per_s": moved / copy_ms / 1e6,
                }
            )
            del buf
    return rows


def _attention_flops(C: int, P: int) -> float:
    visible_pairs = C * P + C * (C + 1) // 2  # bottom-right causal: query i sees P + i + 1 keys
    return 4.0 * ATTN_B * ATTN_H * ATTN_D * visible_pairs


def bench_chunk_attention() -> list[dict]:
    import torch.nn.functional as F
    from torch.nn.attention.bias import causal_lower_right

    from melt_kernels.chunk_attention import chunk_attention

    rows = []
    for P, C in ((P, C) for P in ATTN_PREFIXES for C in ATTN_CHUNKS):
        B, H, D = ATTN_B, ATTN_H, ATTN_D

        def randn(*shape):
            return torch.randn(shape, device="cuda", dtype=DTYPE)

        q, k, v, do = randn(B, H, C, D), randn(B, H, C, D), randn(B, H, C, D), randn(B, H, C, D)
        # The prefix as the model holds it: the first P rows of a preallocated cache buffer.
        k_cache, v_cache = randn(B, H, P + C, D), randn(B, H, P + C, D)
        k_full = torch.cat([k_cache[:, :, :P], k], dim=2)
        v_full = torch.cat([v_cache[:, :, :P], v], dim=2)
        bias = causal_lower_right(C, P + C)

        def leaf(t):
            # detach() keeps the strides, so the prefix leaves stay non-contiguous cache views.
            return t.detach().requires_grad_()

        def run_melt(q, k, v, kp, vp):
            return chunk_attention(q, k, v, kp, vp)

        def run_sdpa(q, k_full, v_full):
            return F.scaled_dot_product_attention(q, k_full, v_full, attn_mask=bias)

        def run_cat_sdpa(q, k, v, kp, vp):
            return run_sdpa(q, torch.cat([kp, k], dim=2), torch.cat([vp, v], dim=2))

        variants = {
            "melt_triton": (run_melt, (q, k, v, k_cache[:, :, :P], v_cache[:, :, :P])),
            "sdpa_flash": (run_sdpa, (q, k_full, v_full)),
            "cat_sdpa_flash": (run_cat_sdpa, (q, k, v, k_cache[:, :, :P], v_cache[:, :, :P])),
        }
        flops = _attention_flops(C, P)
        for name, (fn, inputs) in variants.items():
            fwd_ms = _bench_ms(lambda: fn(*inputs))
            leaves = [leaf(t) for t in inputs]
            out = fn(*leaves)
            bwd_ms = _bench_ms(lambda out=out: out.backward(do, retain_graph=True))
            rows.append(
                {
                    "op": "chunk_attention",
                    "impl": name,
                    "C": C,
                    "P": P,
                    "fwd_ms": fwd_ms,
                    "bwd_ms": bwd_ms,
                    "fwd_tflops": flops / fwd_ms / 1e9,
                    "bwd_tflops": 2.5 * flops / bwd_ms / 1e9,
                }
            )
            del leaves, out
        del k_cache, v_cache, k_full, v_full
    return rows


def print_tables(gated: list[dict], attention: list[dict]) -> None:
    print("\nGated update (bf16): achieved bandwidth vs a device copy of the same bytes")
    print(f"{'shape':>18} {'dir':>4} {'MB':>9} {'ms':>8} {'GB/s':>8} {'copy GB/s':>10} {'% of copy':>10}")
    for r in gated:
        print(
            f"{str(tuple(r['shape'])):>18} {r['direction']:>4} {r['bytes'] / 1e6:9.1f} {r['ms']:8.4f} "
            f"{r['gb_per_s']:8.0f} {r['copy_gb_per_s']:10.0f} {100 * r['gb_per_s'] / r['copy_gb_per_s']:9.0f}%"
        )
    print(f"\nChunk attention (bf16, B={ATTN_B}, H={ATTN_H}, D={ATTN_D}): TFLOP/s on visible pairs")
    print(f"{'C':>4} {'P':>6} {'impl':>15} {'fwd ms':>9} {'fwd TF/s':>9} {'bwd ms':>9} {'bwd TF/s':>9}")
    for r in attention:
        print(
            f"{r['C']:>4} {r['P']:>6} {r['impl']:>15} {r['fwd_ms']:9.4f} {r['fwd_tflops']:9.2f} "
            f"{r['bwd_ms']:9.4f} {r['bwd_tflops']:9.2f}"
        )


def plot(gated: list[dict], attention: list[dict], device_name: str):
    """Figure: gated-update GB/s next to the copy's; attention TFLOP/s over P, forward and backward."""
    fig, axes = common.new_figure(ncols=3)
    bw_ax, fwd_ax, bwd_ax = axes[0]
    labels = [f"{tuple(r['shape'])}\n{r['direction']}" for r in gated]
    x = range(len(gated))
    bw_ax.bar([i - 0.2 for i in x], [r["gb_per_s"] for r in gated], width=0.4, label="gated_update")
    bw_ax.bar([i + 0.2 for i in x], [r["copy_gb_per_s"] for r in gated], width=0.4, label="torch clone")
    bw_ax.set_xticks(list(x), labels, fontsize=7)
    bw_ax.set_ylabel("GB/s")
    bw_ax.set_title("Gated update bandwidth (bf16)")
    bw_ax.legend()
    for ax, key, title in ((fwd_ax, "fwd_tflops", "forward"), (bwd_ax, "bwd_tflops", "backward")):
        for impl, style in (("melt_triton", "-o"), ("sdpa_flash", "--s"), ("cat_sdpa_flash", ":^")):
            for C in ATTN_CHUNKS:
                pts = [r for r in attention if r["impl"] == impl and r["C"] == C]
                ax.plot([r["P"] for r in pts], [r[key] for r in pts], style, label=f"{impl} C={C}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")  # decode (C=1) and prefill chunks differ by orders of magnitude
        ax.set_xlabel("prefix rows P")
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"Chunk attention {title} (bf16, H={ATTN_H}, D={ATTN_D})")
        ax.legend(fontsize=6)
    fig.suptitle(device_name)
    return fig


def aot_report(workers: int | None = None) -> dict:
    """Compile everything ahead of time with ptxas statistics; print the table, write JSON and PNG."""
    from melt_kernels import aot

    jobs = aot.plan(scope="all")
    records = aot.compile_all(jobs, ptxas=True, workers=workers)
    rows = []
    for r in records:
        c = r["config"]
        rows.append({
            "kernel": r["kernel"].removeprefix("_").removesuffix("_kernel"),
            "case": r["case"],
            "dtype": r["dtype"],
            "target": r["target"],
            "config": "/".join(str(c[k]) for k in ("BLOCK_M", "BLOCK_N") if k in c)
            + f" w{c['num_warps']} s{c['num_stages']}",
            "shared_kb": None if r.get("shared") is None else round(r["shared"] / 1024, 1),
            "registers": r.get("registers"),
            "spill_bytes": None if r.get("spill_store_bytes") is None
            else r["spill_store_bytes"] + r["spill_load_bytes"],
            "tensor_cores": r.get("tensor_cores"),
            "error": r["error"],
        })
    print(common.format_table(
        rows, ["kernel", "case", "dtype", "target", "config", "shared_kb", "registers", "spill_bytes",
               "tensor_cores", "error"],
    ))
    spilling = sorted({(r["kernel"], r["config"], r["target"], r["dtype"]) for r in rows if r["spill_bytes"]})
    print(f"\n{len(rows)} compilations, {sum(bool(r['error']) for r in rows)} failed; "
          f"{len(spilling)} (kernel, config, target, dtype) spill registers")
    for kernel, config, target, dtype in spilling:
        print(f"  spills: {kernel} {config} {target} {dtype}")
    payload = {
        "machine": common.machine_info(torch.device("cpu")),
        "targets": {name: {"cc": cc, "shared_limit_bytes": limit} for name, (cc, limit) in aot.TARGETS.items()},
        "rows": rows,
        "records": records,
    }
    stem = common.RESULTS_DIR / "kernels_aot"
    json_path = common.write_json(stem.with_suffix(".json"), payload)
    png_path = common.write_figure(stem.with_suffix(".png"), plot_aot(rows))
    print(f"\nwrote {json_path}\nwrote {png_path}")
    return payload


def plot_aot(rows: list[dict]):
    """Largest shared memory and register count of each (kernel, config) per target, bf16."""
    fig, axes = common.new_figure(ncols=2, width=8.0)
    for ax, key, title in ((axes[0][0], "shared_kb", "shared memory per block (KB)"),
                           (axes[0][1], "registers", "registers per thread")):
        for offset, target in ((-0.2, "sm_80"), (0.2, "sm_90")):
            best: dict[str, float] = {}
            for r in rows:
                if r["target"] == target and r["dtype"] == "bf16" and r[key] is not None:
                    label = f"{r['kernel']} {r['config']}"
                    best[label] = max(best.get(label, 0), r[key])
            labels = sorted(best)
            ax.barh([i + offset for i in range(len(labels))], [best[k] for k in labels], height=0.4, label=target)
            ax.set_yticks(range(len(labels)), labels, fontsize=6)
        ax.set_title(f"{title}, bf16, max over variants")
        ax.legend()
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__.split("\n")[0])
    parser.add_argument("--aot", action="store_true",
                        help="no GPU needed: compile for sm_80/sm_90 and report shared memory, registers, spills")
    parser.add_argument("--workers", type=int, default=None, help="with --aot: compile processes (default: cores)")
    args = parser.parse_args(argv)
    if args.aot:
        aot_report(args.workers)
        return 0
    if not torch.cuda.is_available():
        print("benchmarks.kernels needs a CUDA GPU (it times Triton kernels against SDPA flash); none found.",
              file=sys.stderr)
        return 1
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device = torch.device("cuda")
    gated = bench_gated_update()
    # Lower-right causal SDPA runs flash where it can, else the memory-efficient kernel (never math).
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        attention = bench_chunk_attention()
    print_tables(gated, attention)

    stem = common.DEFAULT_OUT_DIR / f"kernels_{common.device_slug(device)}"
    payload = {"machine": common.machine_info(device), "dtype": str(DTYPE), "gated_update": gated,
               "chunk_attention": attention}
    json_path = common.write_json(stem.with_suffix(".json"), payload)
    png_path = common.write_figure(stem.with_suffix(".png"), plot(gated, attention, common.device_name(device)))
    print(f"\nwrote {json_path}\nwrote {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
