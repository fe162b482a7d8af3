"""Benchmark the MELT Triton kernels on a CUDA GPU: `python -m benchmarks.kernels`.

`python -m benchmarks.kernels --aot` needs no GPU: it compiles every kernel x production config x
variant x dtype for sm_80 and sm_90 ahead of time (`melt_kernels.aot`) and tabulates, per kernel,
config and target, the shared memory per block, the registers per thread and the spill bytes (from
`ptxas -v`), and the tensor-core instruction family in the PTX (`wgmma` on sm_90, `mma` on sm_80,
`none` where the dots run on FMA units: fp32 with exact dots, element-wise kernels). Writes
benchmarks/results/kernels_aot.json and .png. Nothing is asserted.

- Gated update (memory-bound): achieved GB/s of the forward and backward launchers, next to the
  bandwidth of a device copy (`torch.clone`) moving the same number of bytes in the same run.
- Decode attention (one query per sequence, C = 1) over a preallocated cache buffer, B in {1, 8}, H=16, D=128,
  bf16, the buffer filled to P in {1K, 8K, 32K} with 256 columns still unwritten after the fill: the three ways
  MELT's decode step can attend (see `bench_decode_attention`), each as achieved GB/s over the K/V bytes of the
  written columns, next to a device copy of the same bytes: the fraction of the bandwidth limit the attention
  alone reaches.
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
DECODE_BATCHES = [1, 8]
DECODE_FILLS = [1024, 8192, 32768]
DECODE_HEADROOM = 256  # unwritten columns after the fill: a static cache part way through its generate


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


def bench_decode_attention(batches=DECODE_BATCHES, fills=DECODE_FILLS, heads: int = ATTN_H, head_dim: int = ATTN_D,
                           dtype: torch.dtype = DTYPE, device: str = "cuda", time_ms=_bench_ms) -> list[dict]:
    """One decode step's attention (C = 1) over a preallocated buffer filled to P, the ways MELT's step runs it:

    - `triton_lengths`: `chunk_attention` with the prefix read in place and `prefix_lengths` = P; it skips the
      unwritten columns and splits the keys over programs (flash-decoding). The eager step on CUDA, and compiled
      with the backend forced to "triton" (`graphs+triton` in `benchmarks.gpu_suite`).
    - `sdpa_written`: `melt.attention.cache_attention` over the P + 1 written columns (the token's own row
      written first), no mask: the eager in-place step.
    - `sdpa_buffer_mask`: the same over the whole buffer under an additive mask: the compiled in-place step (the
      automatic backend, compiled); SDPA picks its kernel among those that take a mask.

    Bytes are the K/V rows of the P + 1 written columns, what any of them must read; `copy_gb_per_s` is a device
    copy (`clone`) of the same bytes timed the same way. Each row also records its output's largest difference
    from the first way's, so a fast wrong path shows.
    """
    from melt.attention import cache_attention
    from melt_kernels.chunk_attention import chunk_attention

    rows = []
    for B, P in ((B, P) for P in fills for B in batches):
        def randn(*shape):
            return torch.randn(shape, device=device, dtype=dtype)

        S = P + 1 + DECODE_HEADROOM
        q, k, v = randn(B, heads, 1, head_dim), randn(B, heads, 1, head_dim), randn(B, heads, 1, head_dim)
        k_buf, v_buf = randn(B, heads, S, head_dim), randn(B, heads, S, head_dim)
        k_buf[:, :, P:P + 1], v_buf[:, :, P:P + 1] = k, v  # the in-place step writes the token's row first
        fill = torch.full((B,), P, device=device, dtype=torch.int32)
        bias = torch.zeros(B, 1, 1, S, device=device, dtype=dtype)
        bias[..., P + 1:] = float("-inf")
        nbytes = 2 * B * heads * (P + 1) * head_dim * k_buf.element_size()
        variants = {
            "triton_lengths": lambda: chunk_attention(q, k, v, k_buf, v_buf, prefix_lengths=fill),
            "sdpa_written": lambda: cache_attention(q, k_buf[:, :, :P + 1], v_buf[:, :, :P + 1], None, None),
            "sdpa_buffer_mask": lambda: cache_attention(q, k_buf, v_buf, bias, None),
        }
        scratch = torch.empty(nbytes, dtype=torch.uint8, device=device)
        copy_ms = time_ms(scratch.clone)
        first = None
        for impl, fn in variants.items():
            out = fn().float()
            first = out if first is None else first  # every way computes the same attention: recorded, not asserted
            ms = time_ms(fn)
            rows.append({"op": "decode_attention", "impl": impl, "B": B, "P": P, "buffer_columns": S,
                         "bytes": nbytes, "ms": ms, "gb_per_s": nbytes / ms / 1e6,
                         "copy_ms": copy_ms, "copy_gb_per_s": nbytes / copy_ms / 1e6,
                         "max_abs_diff_vs_triton_lengths": (out - first).abs().max().item()})
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


def print_decode_table(decode: list[dict]) -> None:
    print(f"\nDecode attention (bf16, C=1, H={ATTN_H}, D={ATTN_D}, buffer = P + 1 + {DECODE_HEADROOM} columns): "
          "GB/s over the K/V rows written")
    print(f"{'B':>3} {'P':>6} {'impl':>17} {'ms':>8} {'GB/s':>8} {'% of copy':>10} {'max |diff|':>11}")
    for r in decode:
        print(f"{r['B']:>3} {r['P']:>6} {r['impl']:>17} {r['ms']:8.4f} {r['gb_per_s']:8.0f} "
              f"{100 * r['gb_per_s'] / r['copy_gb_per_s']:9.0f}% {r['max_abs_diff_vs_triton_lengths']:11.2e}")


def plot_decode(ax, decode: list[dict]) -> None:
    """Decode attention: % of a device copy of the same bytes over the fill, per way and batch."""
    if not decode:  # a report from before these rows existed
        ax.set_axis_off()
        return
    colors = dict(zip(sorted({r["impl"] for r in decode}), ("C0", "C1", "C2")))  # one colour per way
    styles = dict(zip(sorted({r["B"] for r in decode}), ("-o", "--s")))  # one line style per batch
    for impl, B in sorted({(r["impl"], r["B"]) for r in decode}):
        color, style = colors[impl], styles[B]
        pts = sorted((r for r in decode if (r["impl"], r["B"]) == (impl, B)), key=lambda r: r["P"])
        ax.plot([r["P"] for r in pts], [100 * r["gb_per_s"] / r["copy_gb_per_s"] for r in pts], style, color=color,
                label=f"{impl}, batch {B}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("fill P (written columns)")
    ax.set_ylabel("% of a device copy of the same bytes")
    ax.legend(fontsize=7)
    ax.set_title("decode attention (C = 1)")


def plot(gated: list[dict], attention: list[dict], decode: list[dict], device_name: str):
    """Figure: gated-update GB/s next to the copy's; attention TFLOP/s over P, forward and backward; decode
    attention as a fraction of a copy."""
    fig, axes = common.new_figure(ncols=4)
    bw_ax, fwd_ax, bwd_ax, decode_ax = axes[0]
    plot_decode(decode_ax, decode)
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
    decode = bench_decode_attention()  # SDPA's own kernel choice, as the model gets it
    # Lower-right causal SDPA runs flash where it can, else the memory-efficient kernel (never math).
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        attention = bench_chunk_attention()
    print_tables(gated, attention)
    print_decode_table(decode)

    stem = common.DEFAULT_OUT_DIR / f"kernels_{common.device_slug(device)}"
    payload = {"machine": common.machine_info(device), "dtype": str(DTYPE), "gated_update": gated,
               "chunk_attention": attention, "decode_attention": decode}
    json_path = common.write_json(stem.with_suffix(".json"), payload)
    png_path = common.write_figure(stem.with_suffix(".png"),
                                   plot(gated, attention, decode, common.device_name(device)))
    print(f"\nwrote {json_path}\nwrote {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
