"""Every Triton kernel compiles for the GPUs it runs on, at its production configs, without a GPU.

`python -m melt_kernels.aot` (kernels/aot.py) compiles each `@triton.jit` kernel of the package x
every config of its production autotune space x fp16/bf16/fp32 x sm_80/sm_90 ahead of time with
the ptxas that ships in the triton wheel, from launches recorded by the launchers themselves on
`meta` tensors (so the signatures cannot drift from what runs). A compile error, or a block using
more shared memory than the card allows (163 KB on sm_80, 227 KB on sm_90), fails here on CPU
instead of on a lent GPU.

It runs in a subprocess: this test session runs the kernels in Triton's interpreter, which replaces
them with Python functions that cannot be compiled. Compiled kernels go to Triton's cache
(~/.triton/cache), so only the first run on a machine pays the full compile (minutes on 2 cores).
"""

import json
import os
import subprocess
import sys

import pytest

AOT = [sys.executable, "-m", "melt_kernels.aot"]
SHARED_LIMITS = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}
DTYPES = ("fp16", "bf16", "fp32")


def _run_aot(*args: str, tmp_path) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's current default, stated (silences a warning)
    proc = subprocess.run([*AOT, "--json", str(out), *args], env=env, capture_output=True, text=True, timeout=3000)
    payload = json.loads(out.read_text()) if out.exists() else {}
    return proc, payload


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    proc, payload = _run_aot("--scope", "ci", tmp_path=tmp_path_factory.mktemp("aot"))
    assert payload, f"melt_kernels.aot wrote no results (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc, payload


def test_every_kernel_config_compiles_within_shared_memory(compiled):
    proc, payload = compiled
    records = payload["records"]
    failures = [
        f"{r['kernel']} [{r['case']}] {r['dtype']} {r['target']} {r['config']}: {r['error']}"
        for r in records
        if r["error"]
    ]
    assert not failures, f"{len(failures)} of {len(records)} compilations failed:\n" + "\n".join(failures)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    for r in records:
        assert r["shared_limit"] == SHARED_LIMITS[r["target"]]
        assert 0 <= r["shared"] <= SHARED_LIMITS[r["target"]]


def test_compile_covers_every_kernel_config_dtype_and_target(compiled):
    _, payload = compiled
    defined = set(payload["defined_kernels"])
    spaces = payload["production_configs"]
    assert defined, "no @triton.jit kernels found"
    assert defined == set(spaces), f"kernels never launched by the representative calls: {defined - set(spaces)}"
    done = {
        (r["kernel"], json.dumps(r["config"], sort_keys=True), r["dtype"], r["target"]) for r in payload["records"]
    }
    assert all(set(per_dtype) == set(DTYPES) for per_dtype in spaces.values()), spaces
    missing = [
        (kernel, config, dtype, target)
        for kernel, per_dtype in spaces.items()
        for dtype, configs in per_dtype.items()
        for config in configs
        for target in SHARED_LIMITS
        if (kernel, json.dumps(config, sort_keys=True), dtype, target) not in done
    ]
    assert not missing, f"{len(missing)} (kernel, config, dtype, target) never compiled, e.g. {missing[:5]}"


def test_tensor_cores_used_on_both_targets(compiled):
    # The attention matmuls of prefill tiles (64+ query rows) in fp16/bf16 must lower to the target's
    # tensor-core instructions: wgmma on Hopper, mma on Ampere.
    _, payload = compiled
    expected = {"sm_80": "mma", "sm_90": "wgmma"}
    for r in payload["records"]:
        if r["kernel"] == "_attn_fwd_kernel" and r["dtype"] != "fp32" and r["config"]["BLOCK_M"] >= 64:
            assert r["tensor_cores"] == expected[r["target"]], r


def test_config_over_shared_memory_limit_fails(tmp_path):
    # A forward tile no card can hold: 128 queries x 256 keys x head_dim 128 over 4 pipeline stages.
    proc, payload = _run_aot(
        "--kernel", "_attn_fwd_kernel", "--config", "128,256,8,4", "--dtypes", "bf16",
        "--case", "fwd C128-P1024-D128-mask", tmp_path=tmp_path,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr[-4000:]
    records = payload["records"]
    assert {r["target"] for r in records} == {"sm_80", "sm_90"}
    for r in records:
        assert r["error"] and "exceeds" in r["error"], r
    assert "FAILED _attn_fwd_kernel" in proc.stdout
