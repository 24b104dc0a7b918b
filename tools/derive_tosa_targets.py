"""Write the two ExecuTorch Arm (TOSA) targets of ``cohw_utils/data/targets/`` from an ExecuTorch checkout.

Usage: ``python tools/derive_tosa_targets.py EXECUTORCH_DIR`` (a clone of
https://github.com/pytorch/executorch; the shipped files were written from commit
``cff6f4dd32e630945b7188512c1f2b4f102b05ad``). The sources are read as text (ExecuTorch need
not be installed): the profile support lists of
``backends/arm/operator_support/tosa_profile_supported_op_lists.py``, the registered
per-op checks of ``backends/arm/operator_support/*_support.py``, the Ethos-U55 rejections of
``ethos_u55_support.py``, the table ops of ``backends/arm/_passes/insert_table_ops.py`` and
``MAX_RANK`` of ``backends/arm/constants.py``. Which per-op dtype and shape limits each row
carries is written out below, one rule per source check, so that a reader can audit it.
Used by Chapter 3's accelerator-target section (the data it reads).
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd

OUT = Path(__file__).resolve().parents[1] / "cohw_utils" / "data" / "targets"
OPSUP = "backends/arm/operator_support"

#: ExecuTorch's edge dialect replaces each core-ATen view op by a copying form (to_edge).
EDGE_COPY = {"view_copy": "view", "permute_copy": "permute", "expand_copy": "expand", "select_copy": "select",
             "slice_copy": "slice", "squeeze_copy": "squeeze", "unsqueeze_copy": "unsqueeze",
             "alias_copy": "alias", "detach_copy": "detach", "split_with_sizes_copy": "split_with_sizes",
             "split_copy": "split", "unfold_copy": "unfold", "as_strided_copy": "as_strided",
             "_to_dim_order_copy": "_to_copy", "_clone_dim_order": "clone"}
# registered checks (file -> which profiles; default: every profile, as SupportedTOSAOperatorCheck)
FP_ONLY = {"minmax_support.py"}
SKIP = {"sym_size_int_support.py", "control_flow_support.py", "ethos_u55_support.py",
        "tosa_supported_operators.py", "tosa_profile_supported_op_lists.py", "__init__.py"}
# pre-quantization decompositions of the INT flow (ArmPassManager.transform_for_annotation_pipeline):
# a packet they rewrite counts for the INT target when every op they emit is on it (checked below)
INT_DECOMPOSED = {
    "aten.addmm": ("DecomposeAddmmPass", {"aten.mm", "aten.mul", "aten.add"}),
    "aten.native_layer_norm": ("DecomposeLayerNormPass", {"aten.mean", "aten.var", "aten.rsqrt", "aten.sub", "aten.mul", "aten.add", "aten.full"}),
    "aten.native_group_norm": ("DecomposeGroupNormPass", {"aten.mean", "aten.var", "aten.rsqrt", "aten.sub", "aten.mul", "aten.add", "aten.view"}),
    "aten.var": ("DecomposeVarPass", {"aten.mean", "aten.sub", "aten.mul", "aten.sum"}),
    "aten._softmax": ("DecomposeSoftmaxPass", {"aten.amax", "aten.sub", "aten.exp", "aten.sum", "aten.reciprocal", "aten.mul"}),
    "aten._log_softmax": ("DecomposeSoftmaxPass", {"aten.amax", "aten.sub", "aten.exp", "aten.sum", "aten.log"}),
    "aten.div": ("DecomposeDivPass", {"aten.reciprocal", "aten.mul"}),
    "aten.sqrt": ("DecomposeSqrtPass", {"aten.pow"}),
    "aten._native_batch_norm_legit_no_training": ("DecomposeBatchNormNoStatsPass", {"aten.add", "aten.full", "aten.mul", "aten.rsqrt", "aten.sub", "aten.view"}),
    "aten.embedding": ("DecomposeEmbeddingPass", {"aten.index_select", "aten.view"}),
    "aten.avg_pool2d": ("DecomposeAvgPool2dPass", {"aten.constant_pad_nd", "aten.mul"}),
}
BOOL_OK = {"aten.eq", "aten.ne", "aten.lt", "aten.le", "aten.gt", "aten.ge", "aten.logical_and", "aten.logical_or",
           "aten.logical_xor", "aten.logical_not", "aten.where", "aten.any", "aten.masked_fill", "aten.bitwise_and",
           "aten.bitwise_or", "aten.bitwise_xor", "aten.bitwise_not"}
LAYOUT = {"aten.view", "aten.permute", "aten.expand", "aten.select", "aten.slice", "aten.squeeze", "aten.unsqueeze",
          "aten.alias", "aten.detach", "aten.cat", "aten.clone", "aten._to_copy", "aten.repeat", "aten.constant_pad_nd",
          "aten.pad", "aten.full", "aten.full_like", "aten.scalar_tensor", "aten.split", "aten.split_with_sizes",
          "aten.flip", "aten.copy", "aten.slice_scatter", "aten.unfold", "aten.as_strided"}
INDEXED = {"aten.gather", "aten.index_select", "aten.index", "aten.index_put", "aten.embedding"}
INTEGER = {"aten.bitwise_left_shift", "aten.__lshift__", "aten.bitwise_right_shift", "aten.__rshift__"}


def _show(repo: Path, path: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "show", f"HEAD:{path}"], check=True, capture_output=True,
                          text=True).stdout


def _packet(overload: str) -> str:
    name = overload.split(".")[0]
    return "aten." + EDGE_COPY.get(name, name)


def _ops(text: str) -> list[str]:
    """``exir_ops.edge.aten.X.overload`` / ``torch.ops.aten.X.overload`` / ``dim_order_ops`` -> 'X.overload'."""
    return re.findall(r"(?:exir_ops\.edge|torch\.ops)\.(?:aten|dim_order_ops)\.([A-Za-z_0-9]+\.[A-Za-z_0-9]+)", text)


def _set(text: str, name: str) -> list[str]:
    m = re.search(rf"{name}: Final\[Set\] = \{{(.*?)\n\}}", text, re.S)
    return _ops(m.group(1))


def derive(repo: Path) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=True, capture_output=True,
                            text=True).stdout.strip()
    lists = _show(repo, f"{OPSUP}/tosa_profile_supported_op_lists.py")
    u55 = _show(repo, f"{OPSUP}/ethos_u55_support.py")
    tables = _show(repo, "backends/arm/_passes/insert_table_ops.py")
    max_rank = int(re.search(r"MAX_RANK: Final = (\d+)", _show(repo, "backends/arm/constants.py")).group(1))
    files = subprocess.run(["git", "-C", str(repo), "ls-tree", "--name-only", "HEAD", f"{OPSUP}/"], check=True,
                           capture_output=True, text=True).stdout.split()
    registered: dict[str, list[str]] = {}
    for f in files:
        name = f.rsplit("/", 1)[-1]
        if not name.endswith("_support.py") or name in SKIP:
            continue
        body = _show(repo, f)
        for m in re.finditer(r"targets = \[(.*?)\]", body, re.S):
            for ov in _ops(m.group(1)):
                registered.setdefault(ov, []).append(name)
    u55_rejected = {_packet(o) for o in _ops(re.search(r"unsupported_ops = \[(.*?)\n    \]", u55, re.S).group(1))}
    i8_i16_i32 = {_packet(o) for o in _ops(re.search(r"targeted_ops_i8_i16_i32 = \[(.*?)\]", u55, re.S).group(1))}
    table_ops = {_packet(o) for o in _ops(tables.split("def ", 1)[0])}

    def rows(support: list[str], listname: str, fp: bool) -> pd.DataFrame:
        out: dict[str, dict] = {}

        def add(ov: str, via: str, evidence: str):
            p = _packet(ov)
            r = out.setdefault(p, {"op": p, "via": via, "overloads": set(), "evidence": evidence})
            r["overloads"].add(ov.split(".", 1)[1])

        for ov in support:
            add(ov, "edge *_copy form of the core-ATen view op" if ov.split(".")[0] in EDGE_COPY else "support list",
                f"{OPSUP}/tosa_profile_supported_op_lists.py:{listname}")
        for ov, srcs in registered.items():
            if not fp and any(s in FP_ONLY for s in srcs):
                continue
            add(ov, "registered check", ", ".join(f"{OPSUP}/{s}" for s in srcs))
        if not fp:
            for p in [p for p in out if p in u55_rejected]:
                del out[p]
            # the INT flow rewrites these before partitioning: a rewrite into an op U55 rejects
            # (embedding -> index_select) leaves the packet unsupported whatever its own check says
            for p in [p for p in out if p in INT_DECOMPOSED and INT_DECOMPOSED[p][1] & u55_rejected]:
                del out[p]
            grew = True
            while grew:  # a decomposition may emit another decomposed op (layer norm -> var)
                grew = False
                for p, (pass_, emits) in INT_DECOMPOSED.items():
                    if p not in out and emits <= set(out):
                        out[p] = {"op": p, "via": "pre-quantization decomposition", "overloads": {"*"},
                                  "evidence": f"backends/arm/_passes ({pass_}, ArmPassManager.transform_for_annotation_pipeline)"}
                        grew = True
        df = pd.DataFrame(out.values())
        df["overloads"] = df["overloads"].map(lambda s: ";".join(sorted(s)))
        df["dtypes"] = df["op"].map(lambda p: _dtypes(p, fp, i8_i16_i32, table_ops))
        df["index_dtypes"] = df["op"].map(lambda p: "int32" if p in INDEXED else "")
        df["max_rank"] = max_rank
        df["max_dim"] = df["op"].map(lambda p: 65536 if not fp and p in U55_DIM else "")
        df["shape_limits"] = df["op"].map(lambda p: _limits(p, fp, max_rank))
        return df.sort_values("op").reset_index(drop=True)[
            ["op", "via", "overloads", "dtypes", "index_dtypes", "max_rank", "max_dim", "shape_limits", "evidence"]]

    return rows(_set(lists, "TOSA_PRO_FP_SupportList"), "TOSA_PRO_FP_SupportList", True), \
        rows(_set(lists, "TOSA_PRO_INT_SupportList"), "TOSA_PRO_INT_SupportList", False), commit


U55_DIM = {"aten.convolution", "aten.sum", "aten.avg_pool2d", "aten.max_pool2d", "aten.max_pool2d_with_indices"}


def _dtypes(p: str, fp: bool, i8_i16_i32: set, table_ops: set) -> str:
    if fp:  # TOSA-1.0+FP: fp32 and fp16 (bf16 needs EXT-BF16; float64 never); bool where TOSA allows it
        if p in INTEGER:
            return "int8;int16;int32"
        if p in {"aten.bitwise_and", "aten.bitwise_or", "aten.bitwise_xor", "aten.bitwise_not"}:
            return "bool"
        if p == "aten._to_copy":
            return "fp32;fp16;bool;int8;int16;int32"
        return "fp32;fp16" + (";bool" if p in BOOL_OK | LAYOUT else "")
    # TOSA-1.0+INT+u55: no bool at all (_disallowed_dtypes), integer types per EthosU55DtypeSupport
    if p in {"aten.mm", "aten.bmm"}:
        return "int8"
    if p in table_ops or p in {"aten.amax", "aten.amin", "aten.convolution"}:
        return "int8;int16"
    if p in i8_i16_i32 or p in {"aten.add", "aten.sub", "aten.mul", "aten._to_copy", "aten.full", "aten.arange"}:
        return "int8;int16;int32"
    return "int8;int16"


def _limits(p: str, fp: bool, max_rank: int) -> str:
    base = f"rank <= {max_rank} on every input and output (RankCheck, MAX_RANK)"
    if p in INDEXED:
        base += "; indices int32 (TOSA has no int64)"
    if fp:
        return base
    extra = {
        "aten.convolution": "C, H, W in [1, 65536]; kernel_y <= 64, kernel_x*kernel_y <= 4096; stride in [1, 3] "
                            "unless no padding and dilation 1; weights int8, bias int32 (Vela 5.0.0 rules)",
        "aten.sum": "each reduced dim and the products of the dims before and after it in [1, 65536]",
        "aten.avg_pool2d": "non-batch dims <= 65536; kernel_y <= 256, kernel_x*kernel_y <= 65536; stride <= 3",
        "aten.max_pool2d": "non-batch dims <= 65536; kernel_y <= 256, kernel_x*kernel_y <= 65536; stride <= 3",
        "aten.max_pool2d_with_indices": "non-batch dims <= 65536; kernel_y <= 256, kernel_x*kernel_y <= 65536; stride <= 3",
        "aten.flip": "rank-4 input, one dim (channel or height) only",
        "aten.upsample_nearest2d": "batch 1; equal 2x, 4x or 8x scale",
        "aten._to_copy": "no cast from int32 or bool, none to bool",
        "aten.mm": "both inputs int8", "aten.bmm": "both inputs int8",
    }.get(p)
    return base + (f"; {extra}" if extra else "")


def main(repo: str) -> None:  # pragma: no cover - run by hand against an ExecuTorch checkout
    fp, u55, commit = derive(Path(repo))
    fp.to_csv(OUT / "tosa-1.0-fp.csv", index=False)
    u55.to_csv(OUT / "ethos-u55.csv", index=False)
    print(f"executorch {commit}: tosa-1.0-fp {len(fp)} packets, ethos-u55 {len(u55)} packets")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1])
