"""Ahead-of-time compile of every kernel config for sm_80 and sm_90, checked from the cubin.

No GPU needed (ptxas and cuobjdump ship in the triton wheel). Needs triton imported without
TRITON_INTERPRET; in an interpreter process these tests skip.
"""
from __future__ import annotations

import pytest
from fastmoco.kernels import infonce as tri
from fastmoco.kernels.launch import interpreter_active

pytestmark = pytest.mark.skipif(interpreter_active(), reason="compile checks need real triton")

if not interpreter_active():
    from fastmoco.kernels import compile_check as cc


@pytest.fixture(scope="module")
def results():
    """The CI subset of configs (see all_configs), compiled once for both archs, 2 at a time."""
    return cc.compile_all(cc.all_configs(full=False), workers=2)


def _by(results, kernel):
    rows = [r for r in results if r.config.kernel == kernel]
    assert rows, f"no {kernel} configs compiled"
    return rows


def test_every_config_compiles(results):
    errors = [p for r in results if r.error for p in r.problems]
    assert not errors, "\n".join(errors)
    assert {r.arch for r in results} == {80, 90}


@pytest.mark.parametrize("kernel", ["infonce_partial", "infonce_combine", "ema"])
def test_no_spills_smem_and_registers_within_limits(results, kernel):
    problems = [p for r in _by(results, kernel) for p in r.problems]
    assert not problems, "\n".join(problems)


def test_half_precision_infonce_uses_tensor_cores(results):
    rows = [r for r in _by(results, "infonce_partial") if r.config.tensor_cores]
    assert any(r.config.label.startswith("bf16") for r in rows)
    missing = [r.describe() for r in rows if r.hmma + r.hgmma == 0]
    assert not missing, "no HMMA/HGMMA in: " + ", ".join(missing)
    # the common MoCo widths get Hopper's warpgroup MMA, not the Ampere fallback
    hopper = [r for r in rows if r.arch == 90 and "C=128," in r.config.label
              and not r.config.label.startswith("fp32")]
    assert hopper and all(r.hgmma > 0 for r in hopper), [r.describe() for r in hopper]


def test_launcher_table_covers_every_supported_width(results):
    widths = {dict(r.config.constexprs)["BLOCK_C"] for r in _by(results, "infonce_partial")}
    assert widths == set(tri.SUPPORTED_BLOCK_C)
    assert len(cc.all_configs(full=True)) > len(cc.all_configs(full=False))  # report: all
    with pytest.raises(ValueError, match="C ≤ 1024"):
        tri.partial_config(2048, 2)


def test_check_catches_a_bad_config():
    """A tile far too big for one CTA: shared memory over both limits, registers over budget."""
    bad = cc.partial_config("bf16", 512, override=tri.PartialConfig(64, 128, 4, 4))
    found = {90: cc.compile_one(bad, 90)}  # one arch keeps the test short; sm_90 has more smem
    for arch, res in found.items():
        assert not res.ok
        text = "\n".join(res.problems)
        assert "infonce_partial[bf16,C=512,BN=64,BK=128" in text and f"sm_{arch}" in text
        assert "shared memory" in text and str(cc.SMEM_LIMIT[arch]) in text
        assert "spills" in text or "registers" in text, text


def test_cubins_target_ampere_and_hopper():
    """The checks read real sm_80/sm_90 binaries: GPUTarget reaches ptxas, the PTX says so."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    assert cc.ARCHS == (80, 90)
    config = next(c for c in cc.all_configs(full=False) if c.kernel == "ema")
    for arch in cc.ARCHS:
        compiled = triton.compile(
            ASTSource(cc._kernel_fn("ema"), dict(config.signature), dict(config.constexprs)),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": config.num_warps, "num_stages": config.num_stages},
        )
        assert compiled.metadata.target.arch == arch
        assert f".target sm_{arch}" in compiled.asm["ptx"]
        assert compiled.asm["cubin"][:4] == b"\x7fELF"
