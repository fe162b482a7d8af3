"""Ahead-of-time compilation of every MELT Triton kernel for the GPUs it runs on, without a GPU.

`python -m melt_kernels.aot [--json PATH] [--ptxas] [--kernel NAME --config M,N,WARPS,STAGES]`

The triton wheel ships ptxas, so `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`
builds PTX and a cubin for Ampere (sm_80) and Hopper (sm_90) on a CPU machine. This module compiles

    every `@triton.jit` kernel of the package (the functions named `*_kernel`)
    x every config of its production autotune space (the launcher's fixed config where it has none)
    x fp16, bf16, fp32 (every kernel here takes all three)
    x sm_80 and sm_90

and checks each result against the card: a compile error, or shared memory over the card's limit
(163 KB per block on A100, 227 KB on H100/H200), is a failure (exit status 1).

The signatures are never written here. Each op's launcher starts its kernels through
`utils.launch`; under `utils.capture_launches()` the launchers run on `meta` tensors of
representative shapes (prefill, decode with a flash-decoding split, backward) and every launch is
recorded with its arguments, which are specialised exactly as Triton's runtime does (int == 1 becomes
a constant, pointers and multiples of 16 get the divisibility hint). A launcher change therefore
changes what is compiled here, and the compile test (tests/kernels/test_compile.py) cannot drift.

Must run without TRITON_INTERPRET=1 (the interpreter replaces the kernels with Python functions);
the test runs it in a subprocess. Compiled kernels land in Triton's cache (TRITON_CACHE_DIR,
~/.triton/cache by default), so a second run takes seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch
import triton

from . import utils

# Largest shared memory one block may use (opt-in maximum), bytes: A100 163 KB, H100/H200 227 KB.
TARGETS = {"sm_80": (80, 163 * 1024), "sm_90": (90, 227 * 1024)}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class Job:
    """One compilation: a recorded launch with one config, for one target."""

    kernel: str  # the @triton.jit function's name
    case: str  # the representative call it was recorded from
    dtype: str
    target: str
    config: dict  # BLOCK_* constexprs and num_warps / num_stages
    launch_index: int  # into `representative_launches(dtype)`


def representative_launches(dtype: torch.dtype) -> list[tuple[str, bool, utils.Launch]]:
    """(case, heaviest, launch) for every launch the launchers make on representative `meta` inputs.

    `heaviest` marks the variant that holds every other's code and the most shared memory (head_dim
    128 with a key mask and prefix lengths) and the kernels that have no variants; the CI scope
    compiles the other variants in bf16 only (see `plan`).
    """
    from .chunk_attention.triton_impl import chunk_attention_bwd, chunk_attention_fwd
    from .gated_update.triton_impl import gated_update_bwd, gated_update_fwd

    meta = torch.device("meta")
    recorded: list[tuple[str, bool, utils.Launch]] = []

    def record(case: str, call, heaviest: bool = True) -> None:
        with utils.capture_launches() as launches:
            call()
        recorded.extend((case, heaviest, launch) for launch in launches)

    # Variants: head_dim x (key mask, per-sequence prefix lengths); the last is the heaviest.
    variants = [(D, mask, lengths) for D in (64, 128)
                for mask, lengths in ((False, False), (True, False), (True, True))]
    for D, has_mask, has_lengths in variants:
        heaviest = (D, has_mask, has_lengths) == variants[-1]
        # Prefill: C = 128 queries over 1,024 prefix rows; decode: C = 1 over 4,096 rows, few
        # enough programs that the keys are split (flash-decoding) and the combine kernel runs.
        for C, P, B, H, Hkv in ((128, 1024, 1, 4, 2), (1, 4096, 1, 2, 1)):
            q = torch.empty(B, C, H, D, device=meta, dtype=dtype).transpose(1, 2)
            k = torch.empty(B, Hkv, C, D, device=meta, dtype=dtype)
            cache = torch.empty(B, Hkv, P + 512, D, device=meta, dtype=dtype)
            prefix = cache[:, :, :P]
            key_mask = torch.empty(B, P + C, device=meta, dtype=torch.bool) if has_mask else None
            lengths = torch.empty(B, device=meta, dtype=torch.int32) if has_lengths else None
            case = f"C{C}-P{P}-D{D}" + ("-mask" if has_mask else "") + ("-lengths" if has_lengths else "")
            record(
                f"fwd {case}",
                lambda: chunk_attention_fwd(q, k, k, prefix, prefix, key_mask, D**-0.5, prefix_lengths=lengths),
                heaviest,
            )
            if C == 1:
                continue
            o = torch.empty_like(q)
            lse = torch.empty(B, H, C, device=meta, dtype=torch.float32)
            for dlse in (None, lse):
                record(
                    f"bwd {case}" + ("-dlse" if dlse is not None else ""),
                    lambda: chunk_attention_bwd(
                        o, dlse, q, k, k, prefix, prefix, key_mask, o, lse, D**-0.5, prefix_lengths=lengths
                    ),
                    heaviest,
                )
    for hidden in (64, 2048):  # the tiny models' hidden size and Ouro's
        x = torch.empty(4, 500, hidden, device=meta, dtype=dtype)
        b = torch.empty(hidden, device=meta, dtype=dtype)
        record(f"fwd D{hidden}", lambda: gated_update_fwd(x, x, x, x, b))
        record(f"fwd-sum D{hidden}", lambda: gated_update_fwd(x, x, x, x, b, return_gate_sum=True))
        record(f"bwd D{hidden}", lambda: gated_update_bwd(x, x, x, x, b))
    return recorded


def _jit_function(kernel):
    return kernel.fn if hasattr(kernel, "production_configs") else kernel


def _configs(launch: utils.Launch) -> list[dict]:
    """The production configs of a launch: its autotune space, or the launcher's own choice."""
    if hasattr(launch.kernel, "production_configs"):
        return [
            {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
            for c in launch.kernel.production_configs
        ]
    fixed = {k: v for k, v in launch.constexprs.items() if k in ("num_warps", "num_stages")}
    return [{"num_warps": fixed.get("num_warps", 4), "num_stages": fixed.get("num_stages", 3)}]


def defined_kernels() -> set[str]:
    """Names of every `@triton.jit` entry kernel (`*_kernel`) defined in the package's op modules."""
    from .chunk_attention import triton_impl as attention
    from .gated_update import triton_impl as gated

    return {
        name
        for module in (attention, gated)
        for name, obj in vars(module).items()
        if isinstance(obj, triton.runtime.JITFunction) and name.endswith("_kernel")
    }


def production_configs() -> dict[str, dict[str, list[dict]]]:
    """Kernel name -> dtype -> the production configs its launches in that dtype tune over."""
    spaces: dict[str, dict[str, list[dict]]] = {}
    for dtype in DTYPES:
        for _, _, launch in _launches(dtype):
            space = spaces.setdefault(_jit_function(launch.kernel).__name__, {}).setdefault(dtype, [])
            space.extend(c for c in _configs(launch) if c not in space)
    return spaces


def _specialise(jit, launch: utils.Launch, config: dict):
    """(signature, constexprs, attrs, options) for `triton.compile`, as Triton's runtime builds them."""
    kwargs = {**launch.constexprs, **config}
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    runtime_args = iter(launch.args)
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(jit.params):
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[(i,)] = kwargs[param.name]
            continue
        arg = next(runtime_args)
        kind, spec = _specialise_arg(arg)
        signature[param.name] = kind
        if kind == "constexpr":  # an int equal to 1
            constexprs[(i,)] = arg
        elif spec == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs, options


_TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.uint8: "u8",
                  torch.int32: "i32", torch.int64: "i64", torch.bool: "i1"}


def _specialise_arg(arg) -> tuple[str, str | None]:
    """(type, "D" when divisible by 16) of one runtime argument, as Triton's launcher specialises it."""
    try:  # Triton's own rule where it exposes it (3.4+)
        from triton.backends.compiler import BaseBackend
        from triton.runtime.jit import native_specialize_impl

        return native_specialize_impl(BaseBackend, arg, False, True, True)
    except ImportError:
        pass
    if isinstance(arg, torch.Tensor):
        return "*" + _TRITON_DTYPES[arg.dtype], "D" if arg.data_ptr() % 16 == 0 else None
    if isinstance(arg, bool):
        return "u1", None
    if isinstance(arg, int):
        if arg == 1:
            return "constexpr", None
        kind = "i32" if -(2**31) <= arg < 2**31 else "i64"
        return kind, "D" if arg % 16 == 0 else None
    if isinstance(arg, float):
        return "fp32", None
    raise TypeError(f"cannot specialise a kernel argument of type {type(arg).__name__}")


def _ptxas_usage(ptx: str, arch: str) -> dict:
    """Registers and spill bytes from `ptxas -v` on the kernel's PTX."""
    from triton.backends.nvidia import compiler as nvidia

    try:
        ptxas = nvidia.get_ptxas(int(arch[3:5])).path
    except TypeError:  # older Triton: get_ptxas() takes no architecture
        ptxas = nvidia.get_ptxas().path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run(
            [ptxas, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True, text=True, check=True,
        ).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {
        "registers": int(regs.group(1)) if regs else None,
        "spill_store_bytes": int(spills.group(1)) if spills else None,
        "spill_load_bytes": int(spills.group(2)) if spills else None,
    }


def _tensor_core_family(ptx: str) -> str:
    if "wgmma" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma"
    return "none"


_LAUNCHES: dict[str, list[tuple[str, bool, utils.Launch]]] = {}


def _launches(dtype_name: str) -> list[tuple[str, bool, utils.Launch]]:
    if dtype_name not in _LAUNCHES:
        _LAUNCHES[dtype_name] = representative_launches(DTYPES[dtype_name])
    return _LAUNCHES[dtype_name]


def compile_job(job: Job, ptxas: bool = False) -> dict:
    """Compile one job; a record with shared memory, the tensor-core family, and an error if any."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    _, _, launch = _launches(job.dtype)[job.launch_index]
    jit = _jit_function(launch.kernel)
    cc, limit = TARGETS[job.target]
    record = {
        "kernel": job.kernel, "case": job.case, "dtype": job.dtype, "target": job.target,
        "config": job.config, "shared_limit": limit, "error": None,
    }
    start = time.perf_counter()
    try:
        signature, constexprs, attrs, options = _specialise(jit, launch, job.config)
        compiled = triton.compile(
            ASTSource(fn=jit, signature=signature, constexprs=constexprs, attrs=attrs),
            target=GPUTarget("cuda", cc, 32),
            options=options,
        )
    except Exception as exc:  # noqa: BLE001 - every compile failure is reported, none hidden
        record["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        return record
    ptx = compiled.asm["ptx"]
    record["shared"] = compiled.metadata.shared
    record["tensor_cores"] = _tensor_core_family(ptx)
    if record["shared"] > limit:
        record["error"] = f"shared memory {record['shared']} B exceeds the {job.target} limit of {limit} B"
    if ptxas:
        arch = re.search(r"\.target\s+(sm_\w+)", ptx).group(1)
        record.update(_ptxas_usage(ptx, arch))
    record["compile_s"] = round(time.perf_counter() - start, 3)
    return record


def plan(
    dtypes=tuple(DTYPES),
    targets=tuple(TARGETS),
    scope: str = "all",
    kernel: str | None = None,
    case: str | None = None,
    config: dict | None = None,
) -> list[Job]:
    """Every distinct (kernel, specialisation, config, dtype, target) to compile.

    scope "all": every representative variant (head_dim 64/128; no key mask, a key mask, a key mask
    and prefix lengths) in every dtype. scope "ci": every kernel x production config x dtype x
    target in the heaviest variant, the other variants in bf16 only (under half the compilations
    of "all"; fp16 lowers like bf16, and fp32 differs in its dots, which the heaviest variant has).
    Launches that specialise identically (same kernel, argument types and constants) are compiled
    once. `kernel` / `case` keep only that kernel / the cases containing that text; `config`
    replaces the production configs (to try one).
    """
    if scope not in ("all", "ci"):
        raise ValueError(f"scope must be 'all' or 'ci', got {scope!r}")
    jobs, seen = [], set()
    for dtype in dtypes:
        for index, (name, heaviest, launch) in enumerate(_launches(dtype)):
            jit = _jit_function(launch.kernel)
            if kernel is not None and jit.__name__ != kernel:
                continue
            if case is not None and case not in name:
                continue
            if scope == "ci" and not heaviest and dtype != "bf16":
                continue
            for cfg in [config] if config is not None else _configs(launch):
                signature, constexprs, attrs, options = _specialise(jit, launch, cfg)
                key = (jit.__name__, repr(sorted(signature.items())), repr(sorted(constexprs.items())),
                       repr(sorted(attrs.items())), repr(sorted(options.items())))
                for target in targets:
                    if (key, target) in seen:
                        continue
                    seen.add((key, target))
                    jobs.append(Job(jit.__name__, name, dtype, target, cfg, index))
    return jobs


def _compile_star(args):
    return compile_job(*args)


def compile_all(jobs: list[Job], ptxas: bool = False, workers: int | None = None) -> list[dict]:
    """Compile `jobs` over `workers` processes (default: one per CPU core); records in job order."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1" or utils.INTERPRET:
        raise RuntimeError("ahead-of-time compilation needs TRITON_INTERPRET unset (run it in a fresh process)")
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        return [compile_job(job, ptxas) for job in jobs]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_compile_star, [(job, ptxas) for job in jobs], chunksize=4))


def _parse_config(text: str) -> dict:
    m, n, warps, stages = (int(x) for x in text.split(","))
    return {"BLOCK_M": m, "BLOCK_N": n, "num_warps": warps, "num_stages": stages}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m melt_kernels.aot", description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write every record to this JSON file")
    parser.add_argument("--ptxas", action="store_true", help="also report registers and spills (ptxas -v)")
    parser.add_argument("--scope", choices=("all", "ci"), default="all", help="variants to compile (see plan)")
    parser.add_argument("--kernel", help="only this kernel (with --config: try one config)")
    parser.add_argument("--case", help="only the representative cases whose name contains this text")
    parser.add_argument("--config", type=_parse_config, help="BLOCK_M,BLOCK_N,num_warps,num_stages for --kernel")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated subset of fp16,bf16,fp32")
    parser.add_argument("--workers", type=int, default=None, help="compile processes (default: CPU cores)")
    args = parser.parse_args(argv)
    if args.config is not None and args.kernel is None:
        parser.error("--config needs --kernel")

    start = time.perf_counter()
    jobs = plan(tuple(args.dtypes.split(",")), scope=args.scope, kernel=args.kernel, case=args.case, config=args.config)
    records = compile_all(jobs, ptxas=args.ptxas, workers=args.workers)
    elapsed = time.perf_counter() - start
    failures = [r for r in records if r["error"]]
    payload = {
        "triton": triton.__version__,
        "targets": {name: {"cc": cc, "shared_limit": limit} for name, (cc, limit) in TARGETS.items()},
        "defined_kernels": sorted(defined_kernels()),
        "production_configs": production_configs(),
        "seconds": round(elapsed, 1),
        "records": records,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
    print(f"{len(records)} compilations ({len(failures)} failed) in {elapsed:.1f} s")
    for r in failures:
        print(f"FAILED {r['kernel']} [{r['case']}] {r['dtype']} {r['target']} {r['config']}: {r['error']}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
