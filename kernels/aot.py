r"""Ahead-of-time compilation of every Triton kernel for a named GPU, with no GPU present.

Triton compiles for a target it is told, ``triton.compile(ASTSource(...), target=GPUTarget("cuda",
cc, 32))``, and its wheel ships ``ptxas`` and ``cuobjdump``. That gives, per kernel launch ×
autotune config × dtype × target, what a compiler can prove before a device is lent:

* it compiles;
* the tensor-core instruction it emits: ``wgmma`` (Hopper, sm_90) or ``mma.sync`` (Ampere, sm_80);
* registers per thread and local memory (``cuobjdump -res-usage``: spills show as STACK or LOCAL);
* shared memory per block (static + dynamic), which must fit the target.

**Discovery.** Every module of :mod:`peftlab.kernels` that defines ``AOT_LAUNCHES`` (a list of
:class:`Launch`) is included; a ``@triton.jit`` function whose name ends in ``_kernel`` with no
launch makes :func:`discover` fail, so a new kernel cannot be left out unnoticed.

Run in a process where ``TRITON_INTERPRET`` is unset (the interpreter replaces ``@triton.jit``
functions by Python ones, which cannot be compiled); :func:`run_subprocess` does that.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DTYPES = ("fp32", "bf16", "fp16")
TARGETS = (80, 90)
#: Opt-in shared memory per block (bytes): A100 (sm_80) and H100 (sm_90).
MAX_SHARED = {80: 166912, 90: 232448}
#: A constexpr value in :attr:`Launch.constants` that is True for the fp32 build only (e.g. ``IEEE``:
#: fp32 products as tf32x3 rather than plain TF32, which the host picks for fp32 activations).
IS_FP32 = "<dtype is fp32>"


@dataclass(frozen=True)
class Launch:
    """One way the host code launches a kernel.

    Args:
        name: label, e.g. ``"lora.fused/forward"``.
        kernel: the ``@triton.jit`` function, or the ``Autotuner`` around it.
        types: runtime argument -> Triton type (``"*{dtype}"`` takes the activation dtype,
            ``"*fp32"``, ``"fp32"``, ``"i64"``); an argument not listed is ``i32``.
        constants: the constexpr meta-parameters of this launch, and the runtime arguments it
            specialises (Triton specialises an integer equal to 1, e.g. a unit stride).
        configs: ``[(meta, num_warps, num_stages)]`` for a kernel launched with fixed tiles;
            None for an autotuned kernel (its configs, after ``prune``).
        prune: ``prune(configs, dtype_name, max_shared, **constants) -> configs`` for an autotuned
            kernel: the configs its ``early_config_prune`` would keep on that target.
        tensor_cores: ``"gemm"`` (wgmma on sm_90, mma.sync on sm_80), ``"mma"`` (mma.sync or wgmma:
            tiles too small for wgmma) or ``"none"`` (no tl.dot).
        unhinted: integer arguments not assumed divisible by 16 (the others are: the shapes and
            strides of the benchmarked models are).
    """

    name: str
    kernel: Any
    types: dict[str, str]
    constants: dict[str, Any]
    configs: list[tuple[dict, int, int]] | None = None
    prune: Callable | None = None
    tensor_cores: str = "none"
    unhinted: tuple[str, ...] = ("seed",)
    dtypes: tuple[str, ...] = DTYPES

    def constants_for(self, dtype: str) -> dict[str, Any]:
        """The constants with :data:`IS_FP32` resolved for ``dtype``."""
        return {k: (dtype == "fp32") if v == IS_FP32 else v for k, v in self.constants.items()}

    @property
    def jit(self):
        """The JITFunction (unwrapping an Autotuner)."""
        from triton.runtime.autotuner import Autotuner

        return self.kernel.fn if isinstance(self.kernel, Autotuner) else self.kernel


@dataclass
class Result:
    launch: str
    dtype: str
    cc: int
    config: str
    ok: bool
    error: str = ""
    registers: int = -1
    stack: int = -1
    local: int = -1
    shared: int = -1
    tensor_core: str = ""
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)


def _package():
    return importlib.import_module(__name__.rsplit(".", 1)[0])


def discover() -> list[Launch]:
    """All launches declared by the kernel modules (``AOT_LAUNCHES``); fails on an undeclared kernel."""
    import triton

    pkg = _package()
    launches, missing = [], []
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        declared = list(getattr(module, "AOT_LAUNCHES", []))
        launches += declared
        covered = {launch.jit.__name__ for launch in declared}
        for name, obj in vars(module).items():
            fn = obj.fn if isinstance(obj, triton.runtime.autotuner.Autotuner) else obj
            if (
                isinstance(fn, triton.runtime.jit.JITFunction)
                and name.endswith("_kernel")
                and name not in covered
            ):
                missing.append(f"{module.__name__}.{name}")
    if missing:
        raise RuntimeError(f"kernels without an AOT launch (add them to AOT_LAUNCHES): {', '.join(missing)}")
    return launches


def configs_for(launch: Launch, dtype: str, cc: int) -> list[tuple[dict, int, int]]:
    """The (meta, num_warps, num_stages) the launch uses on target ``cc`` for ``dtype``."""
    if launch.configs is not None:
        return list(launch.configs)
    configs = launch.kernel.configs
    if launch.prune is not None:
        configs = launch.prune(configs, dtype, MAX_SHARED[cc], **launch.constants_for(dtype))
    return [(dict(c.kwargs), c.num_warps, c.num_stages) for c in configs]


def _signature(launch: Launch, dtype: str, meta: dict):
    jit = launch.jit
    constants = {**launch.constants_for(dtype), **meta}
    signature, attrs = {}, {}
    for index, (name, param) in enumerate(zip(jit.arg_names, jit.params)):
        if param.is_constexpr or name in constants:
            signature[name] = "constexpr"
            continue
        kind = launch.types.get(name, "i32").replace("{dtype}", dtype)
        signature[name] = kind
        if kind.startswith("*") or (kind in ("i32", "i64") and name not in launch.unhinted):
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, constants, attrs


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED, LOCAL of the (single) function in ``cubin`` from ``cuobjdump -res-usage``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run(
            [_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True
        ).stdout
    finally:
        os.unlink(f.name)
    line = next(line for line in out.splitlines() if "REG:" in line)
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}


def compile_one(launch: Launch, dtype: str, cc: int, meta: dict, num_warps: int, num_stages: int) -> Result:
    """Compile one launch for one target; fill in resources and what violates the rules."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    label = ",".join(f"{k}={v}" for k, v in meta.items()) + f",w={num_warps},s={num_stages}"
    res = Result(launch.name, dtype, cc, label, ok=False)
    t0 = time.perf_counter()
    try:
        signature, constants, attrs = _signature(launch, dtype, meta)
        src = ASTSource(fn=launch.jit, signature=signature, constexprs=constants, attrs=attrs)
        compiled = triton.compile(
            src, target=GPUTarget("cuda", cc, 32), options={"num_warps": num_warps, "num_stages": num_stages}
        )
    except Exception as exc:  # noqa: BLE001 - a compile failure is a result to report
        res.error = (
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else ''}"
        )
        res.problems.append("does not compile")
        res.seconds = time.perf_counter() - t0
        return res
    res.seconds = time.perf_counter() - t0
    usage = resource_usage(compiled.asm["cubin"])
    res.registers, res.stack, res.local = usage["REG"], usage["STACK"], usage["LOCAL"]
    res.shared = usage["SHARED"] + compiled.metadata.shared
    ptx = compiled.asm["ptx"]
    res.tensor_core = (
        "wgmma" if "wgmma.mma_async" in ptx else "mma" if re.search(r"\bmma\.sync", ptx) else "-"
    )
    if res.stack or res.local:
        res.problems.append(f"spills (STACK {res.stack}, LOCAL {res.local} bytes)")
    if res.shared > MAX_SHARED[cc]:
        res.problems.append(f"shared memory {res.shared} > {MAX_SHARED[cc]}")
    want = {"gemm": "wgmma" if cc >= 90 else "mma", "mma": ("mma", "wgmma")}.get(launch.tensor_cores)
    if want is not None and res.tensor_core not in ((want,) if isinstance(want, str) else want):
        res.problems.append(f"emits {res.tensor_core!r}, expected {want}")
    res.ok = not res.problems
    return res


def matrix(launches=None, dtypes=DTYPES, targets=TARGETS, select: Callable | None = None):
    """(launch, dtype, cc, meta, num_warps, num_stages) for every combination (``select`` filters)."""
    for launch in launches if launches is not None else discover():
        for dtype in dtypes:
            if dtype not in launch.dtypes:
                continue
            for cc in targets:
                configs = configs_for(launch, dtype, cc)
                for index, (meta, warps, stages) in enumerate(configs):
                    item = (launch, dtype, cc, meta, warps, stages)
                    if select is None or select(item, index, configs):
                        yield item


def ci_subset(item, index, configs) -> bool:
    """Representative and cheap: bf16 on both targets with the config of the largest tile, plus the
    largest tile of every dtype on sm_90 for the GEMM-shaped launches."""
    launch, dtype, cc, meta, warps, stages = item
    largest = max(range(len(configs)), key=lambda i: (_tile(configs[i][0]), -i))
    if index != largest:
        return False
    return dtype == "bf16" or (cc == 90 and launch.tensor_cores == "gemm" and "/forward" in launch.name)


def _tile(meta: dict) -> int:
    size = 1
    for key, value in meta.items():
        if key.startswith("BLOCK_"):
            size *= value
    return size


def source_hashes(launches=None) -> dict[str, str]:
    """Per kernel module, a hash of the source of its ``@triton.jit`` functions (independent of the
    Triton version, so a committed table is compared against the kernels' code only)."""
    import hashlib
    import inspect

    import triton

    modules = {inspect.getmodule(launch.jit.fn).__name__ for launch in (launches or discover())}
    hashes = {}
    for name in sorted(modules):
        module = importlib.import_module(name)
        sources = []
        for attr, obj in sorted(vars(module).items()):
            fn = obj.fn if isinstance(obj, triton.runtime.autotuner.Autotuner) else obj
            if isinstance(fn, triton.runtime.jit.JITFunction):
                sources.append(f"{attr}\n{fn.src}")
        hashes[name] = hashlib.sha256("\n".join(sources).encode()).hexdigest()
    return hashes


def run(subset: str = "full", progress: bool = True) -> dict:
    """Compile the matrix (``"full"`` or ``"ci"``); returns {"results": [...], "hashes": {...}, ...}."""
    import triton

    launches = discover()
    items = list(matrix(launches, select=ci_subset if subset == "ci" else None))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc=f"AOT compile ({subset})", file=sys.stderr)
    results = []
    for item in items:
        results.append(compile_one(*item).__dict__)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return {"triton": triton.__version__, "results": results, "hashes": source_hashes(launches)}


def run_subprocess(subset: str, json_out: str | os.PathLike, timeout: float = 1800) -> dict:
    """:func:`run` in a fresh interpreter with ``TRITON_INTERPRET`` unset; returns its JSON."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    code = (
        "import json, sys; from peftlab.kernels import aot; "
        f"json.dump(aot.run({subset!r}), open(sys.argv[1], 'w'))"
    )
    with tempfile.TemporaryDirectory() as cwd:  # the repo's top-level kernels/ never shadows anything
        proc = subprocess.run(
            [sys.executable, "-c", code, str(Path(json_out).resolve())],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"AOT compile run failed:\n{proc.stderr[-4000:]}")
    return json.loads(Path(json_out).read_text())
