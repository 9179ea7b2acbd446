"""Ahead-of-time compile of every kernel config for sm_80/sm_90 and what its cubin says.

No GPU needed: `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` runs the
whole pipeline through ptxas (shipped in the triton wheel); `cuobjdump -res-usage` then gives
registers, stack, local memory (spills) and static shared memory, and `cuobjdump -sass` shows
whether the matmuls became tensor-core instructions (HMMA on sm_80, HGMMA or HMMA on sm_90).
Needs triton imported WITHOUT TRITON_INTERPRET (the interpreter has nothing to compile).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import ema as _ema
from . import infonce as _infonce

ARCHS = (80, 90)
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # max dynamic shared memory per block
REGS_PER_SM = 65536
TORCH_DTYPE_SIG = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}
ELEM_SIZE = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class KernelConfig:
    """One launchable specialisation of a kernel: constexprs, dtypes and launch options."""

    kernel: str
    label: str
    signature: tuple  # ((arg name, triton type), …); constexprs carry "constexpr"
    constexprs: tuple  # ((name, value), …)
    num_warps: int
    num_stages: int = 3
    min_ctas_per_sm: int = 1  # the occupancy this config is meant to reach
    tensor_cores: bool = False  # whether its tl.dot must map to tensor cores
    aligned: tuple = ()  # args launched 16-divisible (torch pointers; strides of C % 16 == 0)


@dataclass
class CompileResult:
    """What one (config, arch) compile produced, and what the checks found."""

    config: KernelConfig
    arch: int
    regs: int = 0
    stack: int = 0
    local: int = 0
    shared: int = 0  # dynamic (Triton metadata) + static (cubin) bytes
    hmma: int = 0
    hgmma: int = 0
    seconds: float = 0.0
    error: Optional[str] = None
    problems: list = field(default_factory=list)

    @property
    def spills(self) -> bool:
        return self.stack > 0 or self.local > 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        c = self.config
        return f"{c.kernel}[{c.label}, warps={c.num_warps}, stages={c.num_stages}] sm_{self.arch}"


def _kernel_fn(name: str):
    fn = {"infonce_partial": _infonce.infonce_partial_kernel,
          "infonce_combine": _infonce.infonce_combine_kernel,
          "ema": _ema.ema_kernel}[name]
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise RuntimeError("compile checks need triton imported without TRITON_INTERPRET=1")
    return fn


def partial_config(
    dtype: str, block_c: int, pos_in_cand: bool = False, compute_grad: bool = True,
    precision: Optional[str] = None, override: Optional[_infonce.PartialConfig] = None,
) -> KernelConfig:
    """The partial InfoNCE kernel as the launcher would launch it (or with `override`)."""
    cfg = override or _infonce.partial_config(block_c, ELEM_SIZE[dtype])
    precision = precision or ("ieee" if dtype == "fp32" else "tf32")
    ptr = TORCH_DTYPE_SIG[dtype]
    sig = (("Q", ptr), ("CAND", ptr)) + tuple((a, "*fp32") for a in (
        "M_OUT", "D_OUT", "ACC_OUT", "MAXB_OUT", "MAXA_OUT")) + tuple((a, "i32") for a in (
        "N", "K", "C", "stride_q", "stride_cand", "pos_offset")) + (("scale", "fp32"),
        ("tiles_per_split", "i32"))
    const = (("BLOCK_N", cfg.block_n), ("BLOCK_K", cfg.block_k), ("BLOCK_C", block_c),
             ("POS_IN_CAND", pos_in_cand), ("COMPUTE_GRAD", compute_grad),
             ("INPUT_PRECISION", precision), ("DOT_UPCAST", False))
    sig += tuple((k, "constexpr") for k, _ in const)
    label = (f"{dtype},C={block_c},BN={cfg.block_n},BK={cfg.block_k}"
             f"{',inbatch' if pos_in_cand else ''}{'' if compute_grad else ',nograd'}"
             f"{',tf32' if dtype == 'fp32' and precision == 'tf32' else ''}")
    aligned = ("Q", "CAND", "M_OUT", "D_OUT", "ACC_OUT", "MAXB_OUT", "MAXA_OUT", "C",
               "stride_q", "stride_cand")
    return KernelConfig("infonce_partial", label, sig, const, cfg.num_warps, cfg.num_stages,
                        min_ctas_per_sm=2 if cfg.num_warps == 4 else 1,
                        tensor_cores=dtype != "fp32" or precision == "tf32", aligned=aligned)


def combine_config(dtype: str, block_c: int, pos_in_cand: bool = False) -> KernelConfig:
    """The combine kernel as launched for this feature width."""
    ptr = TORCH_DTYPE_SIG[dtype]
    sig = (("Q", ptr), ("POS", ptr)) + tuple((a, "*fp32") for a in (
        "M_P", "D_P", "ACC_P", "MAXB_P", "MAXA_P", "LOSS", "LSE")) + (("CORRECT", "*i8"),
        ("G", "*fp32")) + tuple((a, "i32") for a in ("N", "C", "n_split", "stride_q",
        "stride_pos")) + (("scale", "fp32"), ("inv_t", "fp32"))
    const = (("BLOCK_N", _infonce.combine_block_n(block_c)), ("BLOCK_C", block_c),
             ("POS_IN_CAND", pos_in_cand), ("COMPUTE_GRAD", True))
    sig += tuple((k, "constexpr") for k, _ in const)
    aligned = ("Q", "POS", "ACC_P", "G", "C", "stride_q", "stride_pos")
    return KernelConfig("infonce_combine", f"{dtype},C={block_c}", sig, const,
                        _infonce.COMBINE_WARPS, 3, min_ctas_per_sm=2, aligned=aligned)


def ema_config(dtype: str) -> KernelConfig:
    """The flat EMA kernel for one parameter dtype."""
    ptr = TORCH_DTYPE_SIG[dtype]
    sig = (("TARGET", ptr), ("SOURCE", ptr), ("n", "i32"), ("weight", "fp32"),
           ("BLOCK", "constexpr"))
    return KernelConfig("ema", f"{dtype},BLOCK={_ema.EMA_BLOCK}", sig,
                        (("BLOCK", _ema.EMA_BLOCK),), _ema.EMA_WARPS, 3, min_ctas_per_sm=2,
                        aligned=("TARGET", "SOURCE"))


def all_configs(full: bool = True) -> list[KernelConfig]:
    """Every config the launchers can pick (full), or the CI subset (not full): the heaviest
    partial variant (in-batch, with gradient) at every width in bf16 (fp16 compiles to the same
    code shape), fp32 IEEE/TF32 at the common and widest widths, combine and EMA at two."""
    if not full:
        out = [partial_config("bf16", c, pos_in_cand=True) for c in _infonce.SUPPORTED_BLOCK_C]
        out += [partial_config("fp32", 128, pos_in_cand=True),
                partial_config("fp32", 1024, pos_in_cand=True),
                partial_config("fp32", 128, pos_in_cand=True, precision="tf32"),
                combine_config("bf16", 128), combine_config("fp32", 1024),
                ema_config("bf16"), ema_config("fp32")]
        return out
    out = []
    for dtype in ("fp32", "bf16", "fp16"):
        for block_c in _infonce.SUPPORTED_BLOCK_C:
            for pos_in_cand in (False, True):
                out.append(partial_config(dtype, block_c, pos_in_cand=pos_in_cand))
                out.append(combine_config(dtype, block_c, pos_in_cand=pos_in_cand))
            out.append(partial_config(dtype, block_c, compute_grad=False))
        out.append(ema_config(dtype))
    for block_c in (c for c in _infonce.SUPPORTED_BLOCK_C if c <= 512):
        out.append(partial_config("fp32", block_c, pos_in_cand=True, precision="tf32"))
    return out


@lru_cache(maxsize=1)
def _bin_dir() -> str:
    import triton.backends.nvidia as nv

    return os.path.join(os.path.dirname(nv.__file__), "bin")


def _cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        r = subprocess.run([os.path.join(_bin_dir(), "cuobjdump"), flag, f.name],
                           capture_output=True, text=True, check=True)
    return r.stdout


def compile_one(config: KernelConfig, arch: int) -> CompileResult:
    """Compile one config for one arch, read its cubin, and run the checks."""
    import time

    res = CompileResult(config, arch)
    fn = _kernel_fn(config.kernel)
    sig = dict(config.signature)
    names = list(sig)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in config.aligned}
    t0 = time.perf_counter()
    try:
        compiled = triton.compile(
            ASTSource(fn, sig, dict(config.constexprs), attrs),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": config.num_warps, "num_stages": config.num_stages},
        )
    except Exception as e:  # a config that does not compile is a finding, not a crash
        res.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        res.problems.append(f"{res.describe()}: does not compile ({res.error})")
        return res
    res.seconds = time.perf_counter() - t0
    cubin = compiled.asm["cubin"]
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)",
                      _cuobjdump(cubin, "-res-usage"))
    res.regs, res.stack, static_smem, res.local = (int(x) for x in usage.groups())
    res.shared = static_smem + compiled.metadata.shared
    sass = _cuobjdump(cubin, "-sass")
    res.hgmma = len(re.findall(r"\bHGMMA\.", sass))
    res.hmma = len(re.findall(r"\bHMMA\.", sass))
    check(res)
    return res


def check(res: CompileResult) -> None:
    """Append a message naming kernel, config and figure for every failed check."""
    c, name = res.config, res.describe()
    if res.spills:
        res.problems.append(f"{name}: spills (STACK={res.stack} B, LOCAL={res.local} B, "
                            f"REG={res.regs})")
    if res.shared * c.min_ctas_per_sm > SMEM_LIMIT[res.arch]:
        res.problems.append(f"{name}: shared memory {res.shared} B × {c.min_ctas_per_sm} CTA "
                            f"> sm_{res.arch} limit {SMEM_LIMIT[res.arch]} B")
    threads = 32 * c.num_warps
    if res.regs * threads * c.min_ctas_per_sm > REGS_PER_SM:
        res.problems.append(f"{name}: {res.regs} registers × {threads} threads × "
                            f"{c.min_ctas_per_sm} CTA > {REGS_PER_SM} per SM")
    if c.tensor_cores and res.hmma + res.hgmma == 0:
        res.problems.append(f"{name}: tl.dot did not use tensor cores (no HMMA/HGMMA in SASS)")


def _compile_pair(pair: tuple[KernelConfig, int]) -> CompileResult:
    return compile_one(*pair)


def compile_all(
    configs: Optional[list[KernelConfig]] = None, archs: tuple = ARCHS, workers: int = 2
) -> list[CompileResult]:
    """Compile every (config, arch) pair, `workers` at a time (ptxas is single-threaded)."""
    pairs = [(c, a) for c in (configs if configs is not None else all_configs()) for a in archs]
    if workers <= 1:
        return [compile_one(c, a) for c, a in pairs]
    import multiprocessing as mp

    with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
        return list(pool.map(_compile_pair, pairs))
