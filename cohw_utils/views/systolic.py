"""A small model of an R x C systolic array: cycles and utilization of a GEMM.

A GEMM here is ``(M x K) @ (K x N)``: M rows of activations (tokens, pixels), K the reduction
dimension, N output features (for a layer, the weight is K x N). One processing element (PE)
does one multiply-accumulate (MAC) per cycle, so an R x C array peaks at R*C MACs per cycle.

Dataflows (the conventions of SCALE-Sim, Samajdar et al. 2018/2020, whose compute model these
formulas reproduce exactly; see :func:`scalesim_cycles`):

* **Weight-stationary (WS)**, as in the TPU: a K x N weight tile of R x C is loaded into the
  array (R cycles, one row per cycle), then the M activation rows stream through it from the
  left, skewed by one cycle per row, while partial sums flow down the columns and leave at the
  bottom. One *fold* (one weight tile) takes ``R`` (load) ``+ M + R - 1`` (stream, skewed)
  ``+ C - 1`` (the last partial sums cross the array) ``= 2R + C + M - 2`` cycles. There are
  ``ceil(K/R) * ceil(N/C)`` folds.
* **Output-stationary (OS)**: each PE owns one output element of an R x C output tile;
  A enters from the left and B from the top, both skewed, and PE (i, j) does its k-th MAC at
  cycle ``i + j + k``. One fold takes ``K + R + C - 2`` cycles; there are
  ``ceil(M/R) * ceil(N/C)`` folds.

By default (``double_buffer=False``) folds run back to back (no overlap between the drain of
one and the fill of the next, no double-buffered weight loads) and memory never stalls: this is
SCALE-Sim's compute-only cycle count (its "total compute cycles" with enough SRAM bandwidth). A
tile that only partly fills the array still pays the full array's skew, as a physical array does.

**Double-buffered weight-stationary folds** (``double_buffer=True``, WS only), as in the TPU's
matrix unit (Jouppi et al. 2017: one weight tile in use, one being shifted in). Each PE holds two
weight registers; activations carry which of the two they multiply. Assumptions: (a) a fold's
activations enter row 0 only after its R-cycle load has finished; (b) one load at a time per
column (R cycles each); (c) each row's input port takes one activation per cycle, so fold f+1's
stream starts at least M cycles after fold f's; (d) the load of fold f+1 reuses the register of
fold f-1, and it travels down the column as a wavefront (a register takes a value from the one
above only when a valid load value arrives, as the activation and partial-sum wavefronts do), so
row r of column c is first overwritten in load cycle r, at the end of that cycle (a register
written in a cycle is read from the next, which is also why a load of R cycles starting at 0
lets the stream start at R); column c's load starts c cycles after column 0's (the skew of the
stream it feeds). Fold f-1's last activation passes PE (r, c) at ``s_{f-1} + M - 1 + r + c``,
so (d) reads ``L_{f+1} >= s_{f-1} + M - 1``. The earliest schedule (:func:`ws_schedule`): load
of fold f starts at ``L_f``, its stream at ``s_f``, with ``L_0 = 0``, ``s_0 = R``,
``L_{f+1} = max(L_f + R, s_{f-1} + M - 1)`` and ``s_{f+1} = max(L_{f+1} + R, s_f + M)``, whose
solution is ``s_f = R + f * max(R, M)`` (by induction: for M < R, ``L_f = f R`` and (a) binds;
for M >= R, ``L_f <= R + (f - 1) M`` and (c) binds). The last
fold's last partial sum leaves ``M + R + C - 2`` cycles after its stream starts, so over F folds

    cycles = 2R + C + M - 2 + (F - 1) * max(R, M)

one fold's full fill/drain plus ``max(R, M)`` per further fold. With F = 1 it equals the
sequential count. For M < R (decode: M = batch = 1..8) each fold waits ``R - M`` cycles for its
weights: the array is bound by the weight-load rate (C weights per cycle, one row of the tile
per cycle), utilization tends to M / R, a real limit of the design and not a fill/drain
artefact; for M >= R the stream binds and utilization tends to 1.

**Utilization** = MACs done / (R * C * cycles) = ``M*K*N / (R*C*cycles)``: the fraction of the
array's peak the GEMM reaches. **Mapping efficiency** is the part of that loss due to tile
padding alone (ceil effects), ``M*K*N / (R*C*folds*T)`` with T the streamed dimension (M for
WS, K for OS); the rest is fill and drain.

:func:`simulate_array` is a register-level simulation of both dataflows (it computes the product
by moving values PE to PE, cycle by cycle); tests check that it multiplies correctly and that
its cycle count equals :func:`cycles`, for shapes with partial tiles and several folds. With
``double_buffer=True`` it runs every fold of a WS GEMM in one cycle loop with two weight
registers per PE, wavefront loads and the schedule above, and checks on every MAC that the
weight used belongs to the activation's fold (a schedule one cycle tighter than the formula's
fails that check: see the tests).

:func:`gemms_from_table` turns an op table (:mod:`cohw_utils.spine.trace`) into GEMMs: ``mm``,
``addmm``, ``bmm``/``baddbmm`` (one GEMM per batch entry), fused attention rows (QK^T and PV
per batch x head), and convolutions as **im2col** GEMMs (M = batch x output pixels, K = input
channels per group x kernel height x width, N = output channels per group, one GEMM per group).

Used by Chapter 4.3 (systolic arrays) and Chapter 5.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cohw_utils.core.errors import CohwError

DATAFLOWS = ("ws", "os")


def _check(M: int, K: int, N: int, rows: int, cols: int, dataflow: str,
           double_buffer: bool = False) -> None:
    for name, v in (("M", M), ("K", K), ("N", N), ("rows", rows), ("cols", cols)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise CohwError(f"{name} must be a positive integer, got {v!r}")
    if dataflow not in DATAFLOWS:
        raise CohwError(f"unknown dataflow '{dataflow}'; use one of: {', '.join(DATAFLOWS)} "
                        "(weight- or output-stationary)")
    if double_buffer and dataflow != "ws":
        raise CohwError("double_buffer=True models double-buffered weight loads, which only a "
                        "weight-stationary array has; use dataflow='ws' or double_buffer=False")


def folds(M: int, K: int, N: int, rows: int, cols: int, dataflow: str = "ws") -> int:
    """Number of array-sized tiles the GEMM is cut into (see the module docstring)."""
    _check(M, K, N, rows, cols, dataflow)
    if dataflow == "ws":
        return math.ceil(K / rows) * math.ceil(N / cols)
    return math.ceil(M / rows) * math.ceil(N / cols)


def cycles(M: int, K: int, N: int, rows: int, cols: int, dataflow: str = "ws",
           double_buffer: bool = False) -> int:
    """Cycles of one ``(M x K) @ (K x N)`` GEMM on a rows x cols array (module docstring):
    ``folds x (2R + C + M - 2)`` for WS, ``folds x (K + R + C - 2)`` for OS; with
    ``double_buffer=True`` (WS only) ``2R + C + M - 2 + (folds - 1) x max(R, M)``."""
    _check(M, K, N, rows, cols, dataflow, double_buffer)
    f = folds(M, K, N, rows, cols, dataflow)
    if double_buffer:
        return 2 * rows + cols + M - 2 + (f - 1) * max(rows, M)
    per_fold = 2 * rows + cols + M - 2 if dataflow == "ws" else K + rows + cols - 2
    return f * per_fold


def utilization(M: int, K: int, N: int, rows: int, cols: int, dataflow: str = "ws",
                double_buffer: bool = False) -> float:
    """MACs / (rows * cols * cycles)."""
    return M * K * N / (rows * cols * cycles(M, K, N, rows, cols, dataflow, double_buffer))


def ws_schedule(M: int, rows: int, n_folds: int) -> tuple[list[int], list[int]]:
    """The earliest double-buffered WS schedule (module docstring): per fold, the cycle its
    weight load starts in column 0 (``L_f``) and the cycle its first activation enters row 0
    (``s_f``). Constraints (a)-(d) of the docstring, applied greedily."""
    for name, v in (("M", M), ("rows", rows), ("n_folds", n_folds)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise CohwError(f"{name} must be a positive integer, got {v!r}")
    load, start = [0], [rows]
    for f in range(1, n_folds):
        load.append(max(load[-1] + rows, start[f - 2] + M - 1 if f >= 2 else 0))
        start.append(max(load[f] + rows, start[f - 1] + M))
    return load, start


def mapping_efficiency(M: int, K: int, N: int, rows: int, cols: int, dataflow: str = "ws") -> float:
    """Utilization lost to tile padding only: MACs / (rows * cols * folds * streamed length)."""
    streamed = M if dataflow == "ws" else K
    return M * K * N / (rows * cols * folds(M, K, N, rows, cols, dataflow) * streamed)


# --------------------------------------------------------------------------- the simulation
def _simulate_ws_fold(a: np.ndarray, w: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, int]:
    """One WS fold: ``a`` (M x rows), weights ``w`` (rows x cols), zero-padded to the array.

    Cycle 0..rows-1: weights shift in from the top, one row per cycle (after ``rows`` cycles
    row r holds w[r]). Then activation a[m, r] enters PE (r, 0) at cycle rows + m + r and moves
    one PE right per cycle; the partial sum of output (m, c) enters PE (0, c) with a[m, 0] and
    moves one PE down per cycle, leaving the bottom row one cycle after its last MAC.
    Returns (the M x cols product, cycles until the last partial sum has left the array).
    """
    M = a.shape[0]
    wreg = np.zeros((rows, cols))
    for t in range(rows):  # weights shift down one row per cycle; row rows-1-t enters first
        wreg[1:] = wreg[:-1].copy()
        wreg[0] = w[rows - 1 - t]
    act = np.full((rows, cols), np.nan)   # activation register of each PE (nan = bubble)
    psum = np.zeros((rows, cols))         # partial-sum register of each PE
    tag = np.full((rows, cols), -1)       # which output row m the partial sum belongs to
    out = np.zeros((M, cols))
    t = rows
    last_exit = rows - 1
    done = 0
    while done < M * cols:
        # values move: activations one PE right, partial sums one PE down
        act[:, 1:] = act[:, :-1].copy()
        exiting_sum, exiting_tag = psum[-1].copy(), tag[-1].copy()
        psum[1:], tag[1:] = psum[:-1].copy(), tag[:-1].copy()
        psum[0], tag[0] = 0.0, -1
        for c in range(cols):  # the bottom row's results leave the array this cycle
            if exiting_tag[c] >= 0:
                out[exiting_tag[c], c] = exiting_sum[c]
                done += 1
                last_exit = t - 1
        # new activations enter at the left edge, skewed: a[m, r] at cycle rows + m + r
        for r in range(rows):
            m = t - rows - r
            act[r, 0] = a[m, r] if 0 <= m < M else np.nan
        # a new partial sum starts at the top of column c when a[m, 0] reaches it
        for c in range(cols):
            m = t - rows - c
            tag[0, c] = m if 0 <= m < M else -1
        valid = ~np.isnan(act)
        psum += np.where(valid & (tag >= 0), np.nan_to_num(act) * wreg, 0.0)
        t += 1
    return out, last_exit + 1


def _simulate_os_fold(a: np.ndarray, b: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, int]:
    """One OS fold: ``a`` (rows x K) from the left, ``b`` (K x cols) from the top, both skewed
    (a[i, k] enters row i at cycle i + k, b[k, j] enters column j at cycle k + j). Returns the
    rows x cols tile and the cycles until the last MAC."""
    K = a.shape[1]
    areg = np.full((rows, cols), np.nan)
    breg = np.full((rows, cols), np.nan)
    acc = np.zeros((rows, cols))
    last_mac, t, macs = -1, 0, 0
    while macs < rows * cols * K:
        areg[:, 1:] = areg[:, :-1].copy()
        breg[1:] = breg[:-1].copy()
        for i in range(rows):
            k = t - i
            areg[i, 0] = a[i, k] if 0 <= k < K else np.nan
        for j in range(cols):
            k = t - j
            breg[0, j] = b[k, j] if 0 <= k < K else np.nan
        fire = ~np.isnan(areg) & ~np.isnan(breg)
        if fire.any():
            acc += np.where(fire, np.nan_to_num(areg) * np.nan_to_num(breg), 0.0)
            macs += int(fire.sum())
            last_mac = t
        t += 1
    return acc, last_mac + 1


def _simulate_ws_double_buffered(xs: list[np.ndarray], ws: list[np.ndarray], rows: int, cols: int,
                                 load: list[int], start: list[int]) -> tuple[list[np.ndarray], int, int]:
    """Every WS fold of a GEMM in one cycle loop, double-buffered (module docstring).

    ``xs[f]`` (M x rows) and ``ws[f]`` (rows x cols) are fold f's activations and weight tile;
    ``load[f]`` / ``start[f]`` its schedule (the load of column c runs ``c`` cycles after
    column 0's). Fold f's weights go to register ``f % 2``; each weight register carries the
    (fold, row) it was loaded for and each activation its fold, so a MAC that finds another
    fold's (or another row's, in transit) weight, or two folds' activations due at one input
    port in the same cycle, counts as a hazard. Returns (each fold's M x cols product, cycles
    until the last partial sum has left the array, hazards).
    """
    F, M = len(xs), xs[0].shape[0]
    wval = np.zeros((2, rows, cols))
    wfold = np.full((2, rows, cols), -1)
    wrow = np.full((2, rows, cols), -1)
    act, afold = np.zeros((rows, cols)), np.full((rows, cols), -1)
    psum, pfold, pm = np.zeros((rows, cols)), np.full((rows, cols), -1), np.full((rows, cols), -1)
    outs = [np.zeros((M, cols)) for _ in range(F)]
    starts = np.asarray(start)
    hazards, done, t, last_exit = 0, 0, 0, 0

    def due(u: int) -> tuple[int, int]:  # (fold, row m) whose stream puts element m at offset u
        fs = [f for f in range(F) if starts[f] <= u < starts[f] + M]
        return (fs[0], u - starts[fs[0]]) if len(fs) == 1 else (-1, len(fs))

    horizon = max(starts) + M + rows + cols  # every partial sum has left by then, if none was lost
    while done < F * M * cols and t <= horizon:
        # activations one PE right, partial sums one PE down (the bottom row's leave)
        act[:, 1:], afold[:, 1:] = act[:, :-1].copy(), afold[:, :-1].copy()
        for c in range(cols):
            if pfold[-1, c] >= 0:
                outs[pfold[-1, c]][pm[-1, c], c] = psum[-1, c]
                done += 1
                last_exit = t - 1
        psum[1:], pfold[1:], pm[1:] = psum[:-1].copy(), pfold[:-1].copy(), pm[:-1].copy()
        # new activations at the left edge (row r skewed by r), new partial sums at the top
        for r in range(rows):
            f, m = due(t - r)
            if f < 0 and m > 1:
                hazards += 1                          # two folds' activations at one port
            act[r, 0], afold[r, 0] = (xs[f][m, r], f) if f >= 0 else (0.0, -1)
        for c in range(cols):
            f, m = due(t - c)
            pfold[0, c], pm[0, c], psum[0, c] = (f, m, 0.0) if f >= 0 else (-1, -1, 0.0)
        for r in range(rows):
            for c in range(cols):
                f = afold[r, c]
                if f < 0:
                    continue
                buf = f % 2
                if wfold[buf, r, c] != f or wrow[buf, r, c] != r or pfold[r, c] != f:
                    hazards += 1
                psum[r, c] += act[r, c] * wval[buf, r, c]
        # weight loads, written at the end of the cycle (usable from the next): a wavefront
        # down each column, c cycles after column 0; one load per column at a time
        busy = np.zeros(cols, dtype=int)
        for f in range(F):
            buf = f % 2
            for c in range(cols):
                j = t - load[f] - c                   # load cycle of this column
                if 0 <= j < rows:
                    busy[c] += 1
                    for r in range(min(j, rows - 1), 0, -1):
                        wval[buf, r, c], wfold[buf, r, c], wrow[buf, r, c] = \
                            wval[buf, r - 1, c], wfold[buf, r - 1, c], wrow[buf, r - 1, c]
                    wval[buf, 0, c], wfold[buf, 0, c], wrow[buf, 0, c] = ws[f][rows - 1 - j, c], f, rows - 1 - j
        hazards += int((busy > 1).sum())              # two loads share a column's weight port
        t += 1
    if done < F * M * cols:
        hazards += F * M * cols - done                # outputs lost in a collision
    return outs, last_exit + 1, hazards


def _ws_tiles(a: np.ndarray, b: np.ndarray, rows: int, cols: int):
    """The WS folds of ``a @ b`` in order: (k0, n0, kk, nn, activations M x rows, weights rows x cols)."""
    M, K = a.shape
    N = b.shape[1]
    for k0 in range(0, K, rows):
        for n0 in range(0, N, cols):
            kk, nn = min(rows, K - k0), min(cols, N - n0)
            w = np.zeros((rows, cols))
            w[:kk, :nn] = b[k0:k0 + kk, n0:n0 + nn]
            x = np.zeros((M, rows))
            x[:, :kk] = a[:, k0:k0 + kk]
            yield k0, n0, kk, nn, x, w


def simulate_array(a: np.ndarray, b: np.ndarray, rows: int, cols: int,
                   dataflow: str = "ws", double_buffer: bool = False) -> tuple[np.ndarray, int]:
    """Multiply ``a @ b`` on a simulated rows x cols array, fold by fold (or, with
    ``double_buffer=True``, all WS folds overlapped on the schedule of :func:`ws_schedule`);
    returns (product, total cycles). Slow (Python, cycle by cycle): for checking the model on
    small shapes."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise CohwError(f"simulate needs a (M x K) and b (K x N), got {a.shape} and {b.shape}")
    M, K = a.shape
    N = b.shape[1]
    _check(M, K, N, rows, cols, dataflow, double_buffer)
    out = np.zeros((M, N))
    total = 0
    if dataflow == "ws" and double_buffer:
        tiles = list(_ws_tiles(a, b, rows, cols))
        load, start = ws_schedule(M, rows, len(tiles))
        outs, total, hazards = _simulate_ws_double_buffered([t[4] for t in tiles], [t[5] for t in tiles],
                                                            rows, cols, load, start)
        if hazards:  # the schedule's constraints are the model's: a hazard here is a bug
            raise RuntimeError(f"double-buffered schedule hit {hazards} hazard(s)")
        for (_, n0, _, nn, _, _), tile in zip(tiles, outs):
            out[:, n0:n0 + nn] += tile[:, :nn]
    elif dataflow == "ws":
        for _, n0, _, nn, x, w in _ws_tiles(a, b, rows, cols):
            tile, cyc = _simulate_ws_fold(x, w, rows, cols)
            out[:, n0:n0 + nn] += tile[:, :nn]
            total += cyc
    else:
        for m0 in range(0, M, rows):
            for n0 in range(0, N, cols):
                mm, nn = min(rows, M - m0), min(cols, N - n0)
                x = np.zeros((rows, K))
                x[:mm] = a[m0:m0 + mm]
                y = np.zeros((K, cols))
                y[:, :nn] = b[:, n0:n0 + nn]
                tile, cyc = _simulate_os_fold(x, y, rows, cols)
                out[m0:m0 + mm, n0:n0 + nn] = tile[:mm, :nn]
                total += cyc
    return out, total


# --------------------------------------------------------------------------- SCALE-Sim
def scalesim_cycles(M: int, K: int, N: int, rows: int, cols: int, dataflow: str = "ws") -> int:
    """Compute cycles of the same GEMM from SCALE-Sim's own compute model (pip ``scalesim``):
    its operand matrices for an M x N x K GEMM layer, its WS/OS demand matrices, whose length
    is the cycle count without memory stalls. Raises ImportError when scalesim is absent.
    Builds the full demand matrices: keep shapes small (cycles x rows well under 1e7)."""
    _check(M, K, N, rows, cols, dataflow)
    import contextlib
    import io

    from scalesim.compute.operand_matrix import operand_matrix
    from scalesim.compute.systolic_compute_os import systolic_compute_os
    from scalesim.compute.systolic_compute_ws import systolic_compute_ws
    from scalesim.layout_utils import layouts
    from scalesim.scale_config import scale_config
    from scalesim.topology_utils import topologies

    with contextlib.redirect_stdout(io.StringIO()):
        cfg = scale_config()
        cfg.set_arr_dims(rows, cols)
        cfg.set_dataflow(dataflow)
        cfg.force_valid()
        topo = topologies()
        # SCALE-Sim's GEMM layer entry: ifmap M x K, filter 1 x K, 1 channel, N filters
        topo.append_topo_arrays("gemm", ["gemm", M, K, 1, K, 1, N, 1, 1, 1, 1])
        topo.num_layers, topo.topo_load_flag = 1, True
        topo.topo_calc_hyperparams()
        opm = operand_matrix()
        opm.set_params(layer_id=0, config_obj=cfg, topoutil_obj=topo, layoututil_obj=layouts())
        _, ifmap = opm.get_ifmap_matrix()
        _, filt = opm.get_filter_matrix()
        _, ofmap = opm.get_ofmap_matrix()
        comp = systolic_compute_ws() if dataflow == "ws" else systolic_compute_os()
        comp.set_params(config_obj=cfg, ifmap_op_mat=ifmap, filter_op_mat=filt, ofmap_op_mat=ofmap)
        comp.create_demand_matrices()
    return int(comp.ifmap_demand_matrix.shape[0])


# --------------------------------------------------------------------------- GEMMs of a model
@dataclass(frozen=True)
class Gemm:
    M: int
    K: int
    N: int
    count: int = 1


def _conv_gemm(in_shape, w_shape, out_shape, groups: int) -> Gemm:
    n_batch = in_shape[0]
    out_pixels = int(np.prod(out_shape[2:]))
    k = int(np.prod(w_shape[1:]))          # in_channels/groups x kernel
    n = w_shape[0] // groups               # out_channels per group
    return Gemm(n_batch * out_pixels, k, n, groups)


def _row_gemms(op: str, ins: tuple, outs: tuple) -> list[tuple[str, Gemm]]:
    name = op.split(".")[1] if "." in op else op
    if name == "mm" and len(ins) >= 2:
        (m, k), (_, n) = ins[0], ins[1]
        return [("mm", Gemm(m, k, n))]
    if name == "addmm" and len(ins) >= 3:
        (m, k), (_, n) = ins[1], ins[2]
        return [("mm", Gemm(m, k, n))]
    if name in ("bmm", "baddbmm"):
        a, b = (ins[0], ins[1]) if name == "bmm" else (ins[1], ins[2])
        return [("bmm", Gemm(a[1], a[2], b[2], a[0]))]
    if name == "convolution" and len(ins) >= 2 and outs:
        return [("conv (im2col)", _conv_gemm(ins[0], ins[1], outs[0], max(1, ins[0][1] // ins[1][1])))]
    if name == "scaled_dot_product_attention" or "scaled_dot_product" in name:
        q, k = ins[0], ins[1]
        v = ins[2] if len(ins) > 2 else k
        heads = int(np.prod(q[:-2]))
        return [("attention QK^T", Gemm(q[-2], q[-1], k[-2], heads)),
                ("attention PV", Gemm(q[-2], k[-2], v[-1], heads))]
    return []


def gemms_from_table(table: pd.DataFrame) -> pd.DataFrame:
    """One row per GEMM shape in an op table's forward contractions (see module docstring):
    columns kind, module, M, K, N, count (GEMMs of that shape in the row), macs."""
    rows = []
    fwd = table[(table["op_class"] == "contraction") & (table["pass"] == "forward")]
    for _, r in fwd.iterrows():
        for kind, g in _row_gemms(r["op"], r["input_shapes"], r["output_shapes"]):
            rows.append({"kind": kind, "module": r["module"], "M": int(g.M), "K": int(g.K),
                         "N": int(g.N), "count": int(g.count)})
    df = pd.DataFrame(rows, columns=["kind", "module", "M", "K", "N", "count"])
    df["macs"] = df["M"] * df["K"] * df["N"] * df["count"]
    return df


def evaluate_gemms(gemms: pd.DataFrame, rows: int, cols: int, dataflow: str,
                   double_buffer: bool = False) -> pd.DataFrame:
    """Per GEMM row: cycles (all ``count`` GEMMs, one after another) and utilization;
    ``double_buffer`` as in :func:`cycles` (WS only)."""
    out = gemms.copy()
    cyc = [cycles(int(m), int(k), int(n), rows, cols, dataflow, double_buffer) * int(c)
           for m, k, n, c in zip(gemms["M"], gemms["K"], gemms["N"], gemms["count"])]
    out["cycles"] = cyc
    out["utilization"] = out["macs"] / (rows * cols * out["cycles"])
    return out


def utilization_table(gemm_sets: dict[str, pd.DataFrame], sizes=(32, 128, 256),
                      dataflows=DATAFLOWS, double_buffer: bool = False) -> pd.DataFrame:
    """MAC-weighted utilization (total MACs / (R*C*total cycles)) of each named GEMM set on
    square arrays of each size and dataflow. One row per set; columns ``ws 128x128`` etc.,
    plus ``gemms`` (count) and ``macs``. ``double_buffer=True`` double-buffers the WS columns'
    weight loads (OS columns, which load no weights, are unchanged)."""
    rows = []
    for name, g in gemm_sets.items():
        row = {"workload": name, "gemms": int(g["count"].sum()), "macs": int(g["macs"].sum())}
        for df in dataflows:
            for s in sizes:
                e = evaluate_gemms(g, s, s, df, double_buffer and df == "ws")
                row[f"{df} {s}x{s}"] = e["macs"].sum() / (s * s * e["cycles"].sum())
        rows.append(row)
    return pd.DataFrame(rows).set_index("workload")


def fig_systolic(gemm_sets: dict[str, pd.DataFrame], size: int = 128, double_buffer: bool = False):
    """Utilization of every GEMM (dots sized by its MACs) against M, the dimension a
    weight-stationary array streams, on a ``size`` x ``size`` array, one colour per GEMM set
    (e.g. workload phase), one panel per dataflow (``double_buffer`` applies to the WS panel)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DATAFLOWS), figsize=(11, 4), sharey=True)
    total = max(float(g["macs"].max()) for g in gemm_sets.values())
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, df in zip(axes, DATAFLOWS):
        for (name, g), color in zip(gemm_sets.items(), colors):
            e = evaluate_gemms(g, size, size, df, double_buffer and df == "ws")
            ax.scatter(e["M"], e["utilization"], s=6 + 120 * np.sqrt(e["macs"] / total), alpha=0.5,
                       color=color, label=name)
        ax.set(xscale="log", xlabel="M (rows streamed: tokens x batch, or pixels, or samples)",
               ylim=(0, 1.02))
        db = ", double-buffered" if double_buffer and df == "ws" else ""
        ax.set_title(f"{'weight' if df == 'ws' else 'output'}-stationary{db}, {size}x{size} array", fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("utilization (MACs / (R x C x cycles))")
    axes[0].legend(fontsize=7, loc="upper left", markerscale=0.6)
    fig.tight_layout()
    return fig
