"""The matmul ladder: Leiserson et al. (Science 2020), Table 1, redone on this machine.

Leiserson et al. multiply two 4096 x 4096 matrices of 64-bit floats in seven successively
engineered versions (Python, Java, C, parallel loops, parallel divide and conquer, plus
vectorization, plus AVX intrinsics) on an 18-core Haswell whose peak is 835 GFLOP/s, and go
from 25,552 s to 0.41 s (62,806x, 40.45% of peak). Their table is a data file
(``data/leiserson2020_table1.csv``) and :func:`leiserson_table` reads it.

Our rungs, each a refinement of the one above (:data:`RUNGS`). Rungs 1-7 compute in fp64, as
the paper's do, so they compare with its table; rungs 8-9 go beyond it in other dtypes:

1. ``python``: the textbook i-j-k triple loop on lists of Python floats (fp64).
2. ``python-ikj``: the same in i-k-j order with the rows of B and C hoisted out of the inner
   loop: the loop-order change, still interpreted.
3. ``numba``: the i-k-j loops on fp64 arrays compiled by numba (LLVM) with LLVM's loop and SLP
   vectorizers switched off (``numba.config.LOOP_VECTORIZE``/``SLP_VECTORIZE`` while
   compiling): a scalar compiled loop, the paper's "C" rung.
4. ``parallel``: + ``numba.prange`` over the rows (as many threads as torch uses).
5. ``tiled``: + cache blocking: 32-row blocks in parallel, each sweeping 128 x 512 tiles of
   B so the working set stays in L2 (the iterative form of the paper's divide and conquer).
6. ``vectorized``: the same tiled source compiled with the vectorizers on and ``fastmath``:
   LLVM emits the widest vector FMAs the CPU has (the paper's "plus vectorization" flags).
7. ``blas-fp64``: ``torch.matmul(a, b, out=c)`` in fp64 (Intel MKL): a vendor BLAS with
   hand-tuned register-blocked kernels, the counterpart of the paper's AVX intrinsics.
8. ``blas-fp32``: the same in fp32 (beyond the paper: its own dtype's peak).
9. ``blas-bf16``: the same in bfloat16 (bf16 dot products where the CPU has them, fp32
   accumulation; beyond the paper).

``numpy`` (its bundled OpenBLAS, fp32) is timed as a second vendor BLAS beside the ladder.

Method
------
* **FLOPs** = ``2 n^3`` per product; rate = FLOPs / seconds (1 GFLOP/s = 1e9 FLOP/s).
* The slow rungs cannot multiply 4096 x 4096 in a notebook, so each rung runs at its own
  size ``n`` (Python small, compiled loops medium, BLAS large; see :func:`default_sizes`).
  **Time at 4096** = measured time x (4096 / n)^3. For the interpreted rungs this is exact
  in practice (their time per inner iteration does not depend on n); for compiled code it is
  an estimate (cache behaviour changes with n), which is why the table also shows the size
  each rung really ran at. Speedups are ratios of rates, i.e. of the scaled times.
* Timing: :func:`cohw_utils.spine.measure.time_callable`, output zeroed untimed before each call
  (``setup``). The **rate is the best call**; the median and the spread are printed beside it.
  numba compilation happens before timing.
* **% of peak** = rate / this CPU's **ISA peak in the rung's own dtype**
  (:func:`cohw_utils.hardware.isa.isa_peaks`: cores x GHz x FMA units x SIMD lanes x 2, every
  factor read from the machine or a labelled assumption), the kind of figure Leiserson et
  al.'s 835 GFLOP/s is (a spec fp64 peak; their top rung reached 40.45% of it). fp64 rungs
  are against the fp64 peak, ``blas-fp32`` and ``numpy`` the fp32 peak, ``blas-bf16`` the
  bf16 one (``peak_basis`` says which; a dtype without an ISA peak gets NaN and the reason).
  The clock is what the machine reports; where that is the nominal rather than the boost
  clock, a rung can pass 100%, and :meth:`~cohw_utils.hardware.isa.IsaPeak.implied_ghz`
  gives the clock its rate implies. (Before issue 20 the denominator was our own probed torch
  GEMM, against which the BLAS rung sat near 100% by construction.)
* Every rung's product is checked against numpy's fp64 product (``max_rel_err``).

Used by Chapter 4.3 (the matmul ladder).
"""
from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from cohw_utils.core.device import cpu_has_native_bf16
from cohw_utils.core.errors import CohwError
from cohw_utils.hardware import isa
from cohw_utils.spine.measure import Timing, time_callable
from cohw_utils.core.data import DATA_DIR

DATA = DATA_DIR
TARGET_N = 4096


@dataclass(frozen=True)
class Rung:
    key: str
    name: str
    paper_version: int | None  # the row of Leiserson et al.'s Table 1 it corresponds to
    dtype: str                 # the arithmetic: fp64 (Python floats), fp32, bf16
    size: str                  # which size class it runs at: python / compiled / blas
    description: str


RUNGS: tuple[Rung, ...] = (
    Rung("python", "Python, i-j-k loops", 1, "fp64", "python",
         "triple loop on lists of Python floats"),
    Rung("python-ikj", "Python, loop order i-k-j", None, "fp64", "python",
         "same loops reordered, row of B and C hoisted"),
    Rung("numba", "compiled loops (numba, scalar)", 3, "fp64", "compiled",
         "i-k-j compiled by LLVM, vectorizers off"),
    Rung("parallel", "+ parallel loops", 4, "fp64", "compiled",
         "prange over rows"),
    Rung("tiled", "+ tiling (cache blocking)", 5, "fp64", "compiled",
         "32-row blocks in parallel x 128x512 tiles"),
    Rung("vectorized", "+ vectorization (SIMD FMAs)", 6, "fp64", "compiled",
         "same source, LLVM vectorizer on, fastmath"),
    Rung("blas-fp64", "vendor BLAS fp64 (torch/MKL)", 7, "fp64", "blas",
         "torch.matmul, register-blocked vector kernels"),
    Rung("blas-fp32", "vendor BLAS fp32 (torch/MKL)", None, "fp32", "blas",
         "torch.matmul in fp32: beyond the paper, against the fp32 peak"),
    Rung("blas-bf16", "vendor BLAS bf16", None, "bf16", "blas",
         "torch.matmul in bfloat16, fp32 accumulate: against the bf16 peak"),
)
EXTRA = Rung("numpy", "numpy (OpenBLAS) fp32", None, "fp32", "blas", "a second vendor BLAS")
_BY_KEY = {r.key: r for r in (*RUNGS, EXTRA)}


# Size of the bf16 BLAS rung on a CPU without bf16 hardware (emulated bf16 runs near 1 GFLOP/s).
EMULATED_BF16_N = 512


def default_sizes(smoke: bool = False) -> dict[str, int]:
    """Matrix size n per size class: small enough that the slow rungs finish."""
    return ({"python": 40, "compiled": 256, "blas": 1024} if smoke
            else {"python": 96, "compiled": 1536, "blas": TARGET_N})


# ------------------------------------------------------------------------------- the rungs
def _python_ijk(a: list, b: list, n: int) -> list:
    c = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            s = 0.0
            for k in range(n):
                s += a[i][k] * b[k][j]
            c[i][j] = s
    return c


def _python_ikj(a: list, b: list, n: int) -> list:
    c = [[0.0] * n for _ in range(n)]
    for i in range(n):
        ci, ai = c[i], a[i]
        for k in range(n):
            aik, bk = ai[k], b[k]
            for j in range(n):
                ci[j] += aik * bk[j]
    return c


@contextlib.contextmanager
def _vectorizers(on: bool):
    """Switch LLVM's loop and SLP vectorizers for the functions numba compiles meanwhile."""
    import numba

    old = numba.config.LOOP_VECTORIZE, numba.config.SLP_VECTORIZE
    numba.config.LOOP_VECTORIZE = numba.config.SLP_VECTORIZE = int(on)
    try:
        yield
    finally:
        numba.config.LOOP_VECTORIZE, numba.config.SLP_VECTORIZE = old


_SIG = "void(float64[:, ::1], float64[:, ::1], float64[:, ::1])"


@functools.lru_cache(maxsize=None)
def _numba_kernel(key: str) -> Callable:
    """The compiled kernel of a numba rung (compiled once per process, eagerly).

    Written by hand on purpose: these loops *are* the experiment. The inner loop runs over a
    1-D row view with a 0-based index so numba emits no negative-index wrap-around check,
    which would otherwise stop LLVM from vectorizing it.
    """
    from numba import njit, prange

    vector = key == "vectorized"
    with _vectorizers(vector):
        @njit(fastmath=vector, cache=False)
        def tile(a, b, c, i0, i1, k0, k1, j0, j1):
            for i in range(i0, i1):
                ci = c[i, j0:j1]
                for k in range(k0, k1):
                    aik = a[i, k]
                    bk = b[k, j0:j1]
                    for j in range(ci.shape[0]):
                        ci[j] += aik * bk[j]

        if key == "numba":
            @njit(_SIG, cache=False)
            def kernel(a, b, c):
                tile(a, b, c, 0, a.shape[0], 0, a.shape[1], 0, b.shape[1])
        elif key == "parallel":
            @njit(_SIG, parallel=True, cache=False)
            def kernel(a, b, c):
                n, m, p = a.shape[0], a.shape[1], b.shape[1]
                for i in prange(n):
                    tile(a, b, c, i, i + 1, 0, m, 0, p)
        elif key in ("tiled", "vectorized"):
            @njit(_SIG, parallel=True, fastmath=vector, cache=False)
            def kernel(a, b, c):
                n, m, p = a.shape[0], a.shape[1], b.shape[1]
                rows, depth, width = 32, 128, 512
                for blk in prange((n + rows - 1) // rows):
                    i0 = blk * rows
                    i1 = min(i0 + rows, n)
                    for k0 in range(0, m, depth):
                        for j0 in range(0, p, width):
                            tile(a, b, c, i0, i1, k0, min(k0 + depth, m), j0, min(j0 + width, p))
        else:
            raise CohwError(f"no numba kernel '{key}'")
    return kernel


def _inputs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, n)).astype(np.float32),
            rng.standard_normal((n, n)).astype(np.float32))


def _prepare(key: str, n: int) -> tuple[Callable[[], object], Callable[[], object], Callable[[], np.ndarray], np.ndarray, np.ndarray]:
    """(call, setup, result, a, b) for one rung at size n; ``call`` is what gets timed."""
    a, b = _inputs(n)
    if key in ("python", "python-ikj"):
        la, lb = a.astype(np.float64).tolist(), b.astype(np.float64).tolist()
        fn = _python_ijk if key == "python" else _python_ikj
        box: dict[str, list] = {}
        return (lambda: box.__setitem__("c", fn(la, lb, n))), (lambda: None), (lambda: np.array(box["c"])), a, b
    if key in ("numba", "parallel", "tiled", "vectorized"):
        import numba
        import torch

        numba.set_num_threads(min(numba.config.NUMBA_NUM_THREADS, torch.get_num_threads()))
        kernel = _numba_kernel(key)
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        c = np.zeros((n, n), dtype=np.float64)
        return (lambda: kernel(a64, b64, c)), (lambda: c.fill(0.0)), (lambda: c), a, b
    if key in ("blas-fp64", "blas-fp32", "blas-bf16"):
        import torch

        dt = {"blas-fp64": torch.float64, "blas-fp32": torch.float32, "blas-bf16": torch.bfloat16}[key]
        ta, tb = torch.from_numpy(a).to(dt), torch.from_numpy(b).to(dt)
        tc = torch.empty(n, n, dtype=dt)
        return (lambda: torch.matmul(ta, tb, out=tc)), (lambda: None), (lambda: tc.double().numpy()), a, b
    if key == "numpy":
        c = np.empty((n, n), dtype=np.float32)
        return (lambda: np.matmul(a, b, out=c)), (lambda: None), (lambda: c), a, b
    raise CohwError(f"unknown rung '{key}'; known: {', '.join(_BY_KEY)}")


def measure_rung(key: str, n: int, repeats: int = 3, warmup: int = 1) -> dict:
    """Time one rung at size ``n``; returns its row of the ladder (see :func:`run_ladder`)."""
    if key not in _BY_KEY:
        raise CohwError(f"unknown rung '{key}'; known: {', '.join(_BY_KEY)}")
    if not isinstance(n, int) or n < 2:
        raise CohwError(f"matrix size must be an integer >= 2, got {n!r}")
    rung = _BY_KEY[key]
    t0 = time.perf_counter()
    call, setup, result, a, b = _prepare(key, n)
    compile_s = time.perf_counter() - t0
    timing: Timing = time_callable(call, repeats=repeats, warmup=warmup, setup=setup)
    ref = a.astype(np.float64) @ b.astype(np.float64)
    err = float(np.abs(result() - ref).max() / np.abs(ref).max())
    flops = 2.0 * n**3
    return {"rung": key, "implementation": rung.name, "paper_version": rung.paper_version,
            "dtype": rung.dtype, "n": n, "best_s": timing.min, "median_s": timing.median,
            "max_s": timing.max, "repeats": repeats, "gflops": flops / timing.min / 1e9,
            "gflops_median": flops / timing.median / 1e9,
            "time_at_4096_s": timing.min * (TARGET_N / n) ** 3, "max_rel_err": err,
            "setup_s": compile_s, "method": timing.method}


def _peak(peaks: dict, dtype: str) -> tuple[float, str]:
    """(FLOP/s or NaN, basis label) of ``dtype`` from ``peaks`` (numbers or :class:`IsaPeak`)."""
    if dtype not in peaks:
        raise CohwError(f"peaks has no {dtype} figure; pass cohw_utils.hardware.isa.isa_peaks() "
                        f"(or a dict of FLOP/s with a '{dtype}' entry)")
    value = peaks[dtype]
    if isinstance(value, isa.IsaPeak):
        if value.flops is None:
            return float("nan"), f"no ISA {dtype} peak: {value.reason}"
        return value.flops, f"ISA {dtype} peak"
    if value is None:
        return float("nan"), f"no {dtype} peak given"
    if not (isinstance(value, (int, float)) and value > 0):
        raise CohwError(f"the {dtype} peak must be a positive FLOP/s, got {value!r}")
    return float(value), f"given {dtype} peak"


def run_ladder(peaks: dict | None = None, sizes: dict[str, int] | None = None, repeats: int = 3,
               rungs: tuple[str, ...] | None = None, extra: bool = True,
               repeats_python: int = 1) -> pd.DataFrame:
    """Run the ladder; one row per rung, in order, plus ``numpy`` when ``extra``.

    ``peaks`` maps dtype (``fp64``, ``fp32``, ``bf16``) to the peak each rung is judged
    against, as :class:`~cohw_utils.hardware.isa.IsaPeak` objects or FLOP/s; None (the
    default) computes this CPU's ISA peaks (:func:`cohw_utils.hardware.isa.isa_peaks`). Every
    rung is against the peak of its own dtype. Columns: rung, implementation, paper_version,
    dtype, n, best_s / median_s / max_s (at n), gflops (best) and gflops_median,
    time_at_4096_s (best x (4096/n)^3), abs_speedup (over rung 1), rel_speedup (over the
    rung above), peak_gflops, peak_basis, pct_of_peak, max_rel_err, setup_s (input
    preparation and compilation), method. ``attrs['peaks']`` holds the FLOP/s used and
    ``attrs['peak_descriptions']`` how each was computed.
    """
    sizes = {**default_sizes(), **(sizes or {})}
    keys = list(rungs or [r.key for r in RUNGS])
    peaks = isa.isa_peaks() if peaks is None else peaks
    unknown = [k for k in keys if k not in _BY_KEY]
    if unknown:
        raise CohwError(f"unknown rung '{unknown[0]}'; known: {', '.join(_BY_KEY)}")
    chosen = [_BY_KEY[k] for k in keys] + ([EXTRA] if extra else [])
    basis = {r.dtype: _peak(peaks, r.dtype) for r in chosen}  # checked before anything is timed
    rows = []
    for rung in chosen:
        reps = repeats_python if rung.size == "python" else repeats
        n = sizes[rung.size]
        emulated = rung.dtype == "bf16" and not cpu_has_native_bf16()
        if emulated:  # ~1 GFLOP/s: a 4096^3 bf16 GEMM would take minutes per repeat
            n = min(n, EMULATED_BF16_N)
        row = measure_rung(rung.key, n, repeats=reps, warmup=0 if rung.size == "python" else 1)
        if emulated:
            row["method"] += (f"; this CPU has no native bf16 (no AVX512-BF16/AMX), so torch emulates it: "
                              f"measured at n={n} and scaled to 4096 by n^3")
        rows.append(row)
    df = pd.DataFrame(rows)
    ladder = df["rung"] != "numpy"
    base = df.loc[ladder, "gflops"].iloc[0]
    df["abs_speedup"] = df["gflops"] / base
    prev = df.loc[ladder, "gflops"].shift(1)
    df["rel_speedup"] = (df.loc[ladder, "gflops"] / prev).reindex(df.index)
    df["peak_gflops"] = df["dtype"].map(lambda d: basis[d][0] / 1e9)
    df["peak_basis"] = df["dtype"].map(lambda d: basis[d][1])
    df["pct_of_peak"] = 100.0 * df["gflops"] / df["peak_gflops"]
    df.attrs["peaks"] = {d: b[0] for d, b in basis.items()}
    df.attrs["peak_descriptions"] = {d: (v.describe() if isinstance(v, isa.IsaPeak) else f"{d}: given {v!r} FLOP/s")
                                     for d, v in peaks.items() if d in basis}
    return df


def top_rung(ladder: pd.DataFrame, dtype: str | None = "fp64") -> pd.Series:
    """The ladder row with the highest % of peak among rungs in ``dtype`` (default fp64, the
    paper's dtype, so that it compares with their 40.45%; None: any dtype)."""
    rows = ladder[ladder["rung"] != "numpy"]
    if dtype is not None:
        rows = rows[rows["dtype"] == dtype]
    rows = rows.dropna(subset=["pct_of_peak"])
    if rows.empty:
        raise CohwError(f"no {dtype or ''} rung with a peak to compare against in this ladder")
    return rows.loc[rows["pct_of_peak"].idxmax()]


def versus_paper(ladder: pd.DataFrame) -> dict:
    """The benchmark figure: the top fp64 rung's rate and % of this CPU's ISA fp64 peak, beside
    Leiserson et al.'s top rung (% of their spec fp64 peak) and both absolute speedups; and, for
    every rung above 100% of its peak, the clock (GHz) its rate implies (see the module docstring)."""
    top = top_rung(ladder, "fp64")
    paper = leiserson_table().iloc[-1]
    out = {"rung": top["rung"], "implementation": top["implementation"], "gflops": float(top["gflops"]),
           "pct_of_isa_peak": float(top["pct_of_peak"]), "peak_gflops": float(top["peak_gflops"]),
           "abs_speedup": float(top["abs_speedup"]), "paper_pct_of_peak": float(paper["fraction_of_peak_pct"]),
           "paper_abs_speedup": float(paper["absolute_speedup"]), "paper_gflops": float(paper["gflops"]),
           "above_peak": {}}
    for _, r in ladder[ladder["pct_of_peak"] > 100].iterrows():
        ghz = isa.isa_peak(r["dtype"]).implied_ghz(r["gflops"] * 1e9) if r["peak_basis"].startswith("ISA") else None
        out["above_peak"][r["rung"]] = ghz
    return out


# ------------------------------------------------------------------------------- the paper
def leiserson_table() -> pd.DataFrame:
    """Leiserson et al.'s Table 1, one row per version (columns: version, implementation,
    running_time_s, gflops, absolute_speedup, relative_speedup, fraction_of_peak_pct)."""
    raw = pd.read_csv(DATA / "leiserson2020_table1.csv")
    wide = raw.pivot_table(index=["version", "implementation"], columns="metric", values="value",
                           aggfunc="first").reset_index()
    wide.columns.name = None
    cols = ["version", "implementation", "running_time_s", "gflops", "absolute_speedup",
            "relative_speedup", "fraction_of_peak_pct"]
    wide = wide.reindex(columns=cols).sort_values("version").reset_index(drop=True)
    wide.attrs["citation"] = raw["citation"].iloc[0]
    wide.attrs["notes"] = raw["notes"].dropna().iloc[0]
    return wide


def side_by_side(ladder: pd.DataFrame) -> pd.DataFrame:
    """Our rungs beside the paper's rows they correspond to (paper columns prefixed ``paper_``)."""
    paper = leiserson_table().add_prefix("paper_")
    ours = ladder[["rung", "implementation", "paper_version", "dtype", "n", "time_at_4096_s",
                   "gflops", "abs_speedup", "rel_speedup", "peak_basis", "pct_of_peak"]]
    out = ours.merge(paper, how="left", left_on="paper_version", right_on="paper_version")
    return out.drop(columns=["paper_version"])


def fig_matmul_ladder(ladder: pd.DataFrame):
    """Bar charts, log scale: our GFLOP/s per rung (left) beside the paper's per version (right),
    each bar labelled with its % of peak."""
    import matplotlib.pyplot as plt

    paper = leiserson_table()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11.5, 4.2))
    panels = ((left, ladder["implementation"], ladder["gflops"], ladder["pct_of_peak"],
               ["tab:gray" if r == "numpy" else "tab:blue" for r in ladder["rung"]],
               "This machine (best call; % of its ISA peak in the rung's dtype)"),
              (right, paper["implementation"], paper["gflops"], paper["fraction_of_peak_pct"],
               "tab:orange", "Leiserson et al. 2020, Table 1 (fp64; % of 835 GFLOP/s)"))
    for ax, names, gflops, pct, color, title in panels:
        y = np.arange(len(names))
        ax.barh(y, gflops, color=color)
        ax.set_yticks(y, list(names), fontsize=8)
        ax.invert_yaxis()
        ax.set(xscale="log", xlabel="GFLOP/s", xlim=(1e-3, 5e3))
        ax.set_title(title, fontsize=9)
        for yi, (g, p) in enumerate(zip(gflops, pct)):
            ax.annotate(f"{g:.3g} ({p:.2g}%)", (g, yi), xytext=(3, -3), textcoords="offset points",
                        fontsize=7)
        ax.grid(True, axis="x", alpha=0.3)
    right.yaxis.tick_right()
    fig.tight_layout()
    return fig
