"""FLOP counters compared: ours against torch's FlopCounterMode, fvcore, thop, ptflops and
calflops, with every disagreement explained and shown.

Why compare: a FLOP count is only meaningful with its counting rules, and the popular
counters use different ones. This module runs all six on the same model and inputs and
explains each difference with two pieces of evidence:

1. **Probes** (:func:`probe_matrix`): tiny modules that each isolate one feature (a Linear
   layer, ``x @ w``, ``torch.matmul``, scaled-dot-product attention with and without
   ``is_causal``, GELU, ``x + y``, LayerNorm, BatchNorm, GroupNorm, Llama's RMSNorm, a
   convolution), counted by every counter. The ratio of a counter's number to ours on a probe
   (in FLOPs, after converting MACs x 2) is that counter's *coverage* of the feature: 1 counts
   it as we do, 0.5 (before conversion) means "MACs reported", 0 means "not counted", other
   values mean the counter uses its own per-element constant.
2. **Reconciliation** (:func:`explain`): our op table of the model is split into the same
   features (GEMMs from Linear modules, convolutions, SDPA, explicit matmuls, activation
   functions, other element-wise ops, each normalization kind); predicted count of counter
   ``c`` = sum over features of ``coverage[c, feature] x our FLOPs of that feature``. When the
   prediction matches what the counter reported (the residual is printed), the listed reasons
   account for the whole disagreement.

Units: every counter's headline number is kept as reported (``reported``, in its own
``unit``) and converted to FLOPs (``flops``: MACs x 2). Our semantics are those of
:mod:`cohw_utils.spine.costs` (FLOPs = 2 x MACs, element-wise 1 per output element, attention
counted full even when causal).

A counter that raises on a model is caught: its row carries ``error`` (the exception type and
first line), which is itself a finding. Some counters monkeypatch ``torch`` and
``torch.nn.functional`` while they run and do not undo it when they fail (calflops raising
``StopIteration`` on a module without parameters leaves ``F.gelu`` etc. wrapped, which
then breaks ptflops), so every counter runs inside :func:`_torch_namespace_guard`, which
restores both namespaces and ``torch.Tensor``'s methods afterwards.

Used by Chapter 4.1-4.2 (FLOPs/MACs counted).
"""
from __future__ import annotations

import contextlib
import io
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from cohw_utils.spine import optable
from cohw_utils import workloads
from cohw_utils.core.errors import CohwError
from cohw_utils.spine.trace import trace

COUNTERS = ("ours", "FlopCounterMode", "fvcore", "thop", "ptflops", "calflops")

#: What each counter's headline number counts, from its own documentation (the Linear probe
#: shows it: a MAC counter reports half our FLOPs).
UNITS = {"ours": "FLOPs", "FlopCounterMode": "FLOPs", "fvcore": "MACs", "thop": "MACs",
         "ptflops": "MACs", "calflops": "FLOPs"}

#: Features our op table is split into, and the probe that measures each counter's coverage.
FEATURES = ("linear", "conv", "sdpa", "matmul", "activation", "elementwise", "layer_norm",
            "batch_norm", "group_norm", "other_norm", "other")
_FEATURE_PROBE = {"linear": "Linear", "conv": "Conv2d", "sdpa": "F.sdpa", "matmul": "torch.matmul",
                  "activation": "F.gelu", "elementwise": "x + y", "layer_norm": "LayerNorm",
                  "batch_norm": "BatchNorm2d", "group_norm": "GroupNorm", "other_norm": "LlamaRMSNorm"}
_ACTIVATIONS = ("gelu", "silu", "relu", "sigmoid", "tanh", "hardswish", "mish", "elu", "softplus")


# ---------------------------------------------------------------------------- isolation
@contextlib.contextmanager
def _torch_namespace_guard():
    """Snapshot ``torch``, ``torch.nn.functional`` and ``torch.Tensor`` attributes; restore
    them on exit (some counters monkeypatch them and leave them patched when they fail)."""
    spaces = (torch, F, torch.Tensor)
    saved = [(ns, dict(vars(ns))) for ns in spaces]
    try:
        yield
    finally:
        for ns, attrs in saved:
            for name, value in attrs.items():
                try:
                    if getattr(ns, name, None) is not value:
                        setattr(ns, name, value)
                except (AttributeError, TypeError):
                    pass


@contextlib.contextmanager
def _one_thread():
    """Count with one torch thread: the inputs are small and a counter's cost is Python
    overhead, while on a machine shared with busy processes every multi-threaded small op
    waits at a barrier for a descheduled thread (10x slower, measured)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@contextlib.contextmanager
def _quiet():
    """Counters print tables and warnings; keep them out of the chapter's output."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield


class Wrapped(nn.Module):
    """A model plus how to call it on positional tensors: ``call(model, *tensors)`` returns a
    tensor. Every counter sees the same module and the same inputs. ``forward`` takes the
    tensors as ``x0, x1, ...`` (ptflops passes them by keyword)."""

    def __init__(self, model: nn.Module, call: Callable[..., torch.Tensor]):
        super().__init__()
        self.model = model
        self._call = call

    def forward(self, x0, x1=None, x2=None, x3=None):
        xs = [x for x in (x0, x1, x2, x3) if x is not None]
        return self._call(self.model, *xs)


# ---------------------------------------------------------------------------- one counter
@dataclass
class Count:
    """One counter's result on one model: the headline number as reported and in FLOPs."""

    counter: str
    reported: float | None
    unit: str
    seconds: float
    error: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def flops(self) -> float | None:
        if self.reported is None:
            return None
        return self.reported * (2 if self.unit == "MACs" else 1)


def _ours(model, inputs):
    table = trace(model, *inputs, model=model)
    return optable.totals(table)["flops"], {"table": table}


def _fcm(model, inputs):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fcm:
        model(*inputs)
    by_op: dict[str, int] = {}
    for ops in fcm.get_flop_counts().get("Global", {}).items():
        by_op[str(ops[0])] = int(ops[1])
    return fcm.get_total_flops(), {"by_op": by_op}


def _fvcore(model, inputs):
    from fvcore.nn import FlopCountAnalysis

    fa = FlopCountAnalysis(model, tuple(inputs))
    fa.unsupported_ops_warnings(False)
    fa.uncalled_modules_warnings(False)
    total = fa.total()
    return total, {"by_op": dict(fa.by_operator()), "unsupported": dict(fa.unsupported_ops())}


def _thop(model, inputs):
    import thop

    macs, _params = thop.profile(model, inputs=tuple(inputs), verbose=False)
    return float(macs), {}


def _ptflops(model, inputs):
    from ptflops import get_model_complexity_info

    def construct(_res):
        return {f"x{i}": x for i, x in enumerate(inputs)}

    macs, _params = get_model_complexity_info(model, tuple(inputs[0].shape), input_constructor=construct,
                                              as_strings=False, print_per_layer_stat=False,
                                              backend="pytorch")
    if macs is None:  # ptflops prints the exception and returns None
        raise RuntimeError("ptflops returned None (its forward pass raised; see its log)")
    return macs, {}


def _calflops(model, inputs):
    from calflops import calculate_flops

    flops, macs, _params = calculate_flops(model, args=list(inputs), print_results=False,
                                           print_detailed=False, output_as_string=False)
    return flops, {"macs": macs}


_RUNNERS = {"ours": _ours, "FlopCounterMode": _fcm, "fvcore": _fvcore, "thop": _thop,
            "ptflops": _ptflops, "calflops": _calflops}


def run_counter(name: str, model: nn.Module, inputs: tuple) -> Count:
    """Run one counter on ``model(*inputs)`` (with one torch thread, see :func:`_one_thread`);
    a counter that raises gives a Count with ``error`` set (type and first line of the
    message) instead of a number."""
    if name not in _RUNNERS:
        raise CohwError(f"unknown counter '{name}'; known: {', '.join(COUNTERS)}")
    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad(), _torch_namespace_guard(), _quiet(), _one_thread():
        try:
            value, detail = _RUNNERS[name](model, inputs)
            error = None
        except Exception as e:  # noqa: BLE001 - a crash is a finding, reported as such
            value, detail = None, {}
            first = (str(e).strip().splitlines() or [""])[0][:160]
            error = f"{type(e).__name__}: {first}" if first else type(e).__name__
    return Count(name, None if value is None else float(value), UNITS[name],
                 time.perf_counter() - t0, error, detail)


def count_all(model: nn.Module, inputs: tuple, counters=COUNTERS) -> dict[str, Count]:
    """Every counter on the same model and inputs, in order (ours first)."""
    return {c: run_counter(c, model, inputs) for c in counters}


# ---------------------------------------------------------------------------- probes
class _Fn(nn.Module):
    """A probe: ``fn(self, *x)``, with one unused parameter so that counters which look up
    the model's first parameter (calflops does) work on it."""

    def __init__(self, fn: Callable, **params: torch.Tensor):
        super().__init__()
        self._fn = fn
        self.unused = nn.Parameter(torch.zeros(1))
        for k, v in params.items():
            setattr(self, k, nn.Parameter(v))

    def forward(self, *x):
        return self._fn(self, *x)


def probes(seed: int = 0) -> dict[str, tuple[nn.Module, tuple]]:
    """The feature probes: name -> (module, inputs), each module :class:`Wrapped` like the
    comparison models (so every counter calls it the same way). Small enough to count in
    milliseconds."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 64, generator=g)
    w = torch.randn(64, 64, generator=g)
    q = torch.randn(1, 2, 16, 8, generator=g)
    img = torch.randn(1, 3, 16, 16, generator=g)
    torch.manual_seed(seed)
    raw = {
        "Linear": (nn.Linear(64, 64, bias=False), (x,)),
        "Conv2d": (nn.Conv2d(3, 8, 3, bias=False), (img,)),
        "F.sdpa": (_Fn(lambda s, q: F.scaled_dot_product_attention(q, q, q)), (q,)),
        "F.sdpa causal": (_Fn(lambda s, q: F.scaled_dot_product_attention(q, q, q, is_causal=True)), (q,)),
        "x @ w": (_Fn(lambda s, x: x @ s.w, w=w), (x,)),
        "torch.matmul": (_Fn(lambda s, x: torch.matmul(x, s.w), w=w), (x,)),
        "F.gelu": (_Fn(lambda s, x: F.gelu(x)), (x,)),
        "x + y": (_Fn(lambda s, x: x + x), (x,)),
        "LayerNorm": (nn.LayerNorm(64), (x,)),
        "BatchNorm2d": (nn.BatchNorm2d(3).eval(), (img,)),
        "GroupNorm": (nn.GroupNorm(2, 8), (torch.randn(1, 8, 4, 4, generator=g),)),
        "LlamaRMSNorm": (LlamaRMSNorm(64), (x,)),
    }
    return {k: (Wrapped(m, lambda m, *xs: m(*xs)), xs) for k, (m, xs) in raw.items()}


def probe_matrix(counters=COUNTERS, names=None) -> pd.DataFrame:
    """Every counter on every probe: the number each reports, in its own unit (NaN where it
    raised; the error is in ``attrs['errors']``). Also row ``F.sdpa on meta`` for ours and
    FlopCounterMode: the same attention on the ``meta`` device, where torch runs the math
    path (bmm, softmax) instead of the CPU flash kernel. ``names`` selects probes (default
    all, plus the meta row)."""
    rows, errors = {}, {}
    selected = probes()
    if names is not None:
        unknown = sorted(set(names) - set(selected) - {"F.sdpa on meta"})
        if unknown:
            raise CohwError(f"unknown probe(s) {unknown}; known: {', '.join(selected)}, F.sdpa on meta")
        selected = {k: v for k, v in selected.items() if k in names}
    for name, (module, inputs) in selected.items():
        res = count_all(module, inputs, counters)
        rows[name] = {c: r.reported for c, r in res.items()}
        errors.update({(name, c): r.error for c, r in res.items() if r.error})
    if names is None or "F.sdpa on meta" in names:
        meta_q = torch.empty(1, 2, 16, 8, device="meta")
        attn = Wrapped(_Fn(lambda s, q: F.scaled_dot_product_attention(q, q, q)), lambda m, q: m(q))
        rows["F.sdpa on meta"] = {c: (run_counter(c, attn, (meta_q,)).reported
                                      if c in ("ours", "FlopCounterMode") else np.nan) for c in counters}
    out = pd.DataFrame.from_dict(rows, orient="index")[list(counters)]
    out.index.name = "probe"
    out.attrs["errors"] = errors
    return out


def counter_coverage(matrix: pd.DataFrame) -> pd.DataFrame:
    """Probe matrix in FLOPs (MAC counters x 2) divided by our count: 1 = counted as we do,
    0 = not counted. Rows where our count is 0 are dropped."""
    flops = matrix.copy()
    for c in flops.columns:
        if UNITS.get(c) == "MACs":
            flops[c] = flops[c] * 2
    ours = flops["ours"]
    return flops[ours > 0].div(ours[ours > 0], axis=0)


# ---------------------------------------------------------------------------- our features
def features(table: pd.DataFrame) -> dict[str, float]:
    """Our FLOPs of one model split into :data:`FEATURES` (see the module docstring).

    GEMMs issued by a module whose class name contains ``Linear`` or ``Conv1D`` (GPT-2's
    linear) are ``linear``; convolutions ``conv``; scaled-dot-product kernels ``sdpa``; other
    contractions (``@``, ``torch.matmul``, ``einsum``) ``matmul``; element-wise ops named in
    :data:`_ACTIVATIONS` ``activation``, the rest ``elementwise``; normalization by kind
    (layer, batch, group; ``other_norm`` = RMSNorm pieces and softmax); everything else
    ``other``.
    """
    out = dict.fromkeys(FEATURES, 0.0)
    t = table[table["costed"]]
    for op, cls, mcls, fl in zip(t["op"], t["op_class"], t["module_class"], t["flops"]):
        if not fl:
            continue
        name = op.lower()
        if cls == "contraction":
            if "conv" in name:
                key = "conv"
            elif "attention" in name:
                key = "sdpa"
            elif "linear" in mcls.lower() or mcls == "Conv1D":
                key = "linear"
            else:
                key = "matmul"
        elif cls == "normalization":
            key = ("layer_norm" if "layer_norm" in name else "batch_norm" if "batch_norm" in name
                   else "group_norm" if "group_norm" in name else "other_norm")
        elif cls == "element-wise":
            key = "activation" if any(a in name for a in _ACTIVATIONS) else "elementwise"
        else:
            key = "other"
        out[key] += float(fl)
    return out


# ---------------------------------------------------------------------------- explanations
#: Why a counter treats a feature as it does (the mechanism; the probe shows the effect).
_WHY = {
    ("FlopCounterMode", "sdpa"): "CPU flash attention (aten._scaled_dot_product_flash_attention_for_cpu) "
                                 "is not in FlopCounterMode's registry (counted on meta, where the math path runs)",
    ("fvcore", "sdpa"): "fvcore has no handle for aten::scaled_dot_product_attention (listed as unsupported)",
    ("thop", "sdpa"): "thop only hooks nn.Module classes; F.scaled_dot_product_attention is a function call",
    ("ptflops", "sdpa"): "ptflops' pytorch backend patches no attention function",
    ("calflops", "sdpa"): "calflops patches no attention function",
    ("thop", "matmul"): "thop only hooks nn.Module classes; @ and torch.matmul are invisible to it",
    ("ptflops", "matmul"): "ptflops patches torch.matmul but not Tensor.__matmul__ (x @ w)",
    ("calflops", "matmul"): "calflops patches torch.matmul but not x @ w",
}
_FEATURE_TEXT = {"linear": "Linear GEMMs", "conv": "convolutions", "sdpa": "attention (SDPA)",
                 "matmul": "explicit matmuls", "activation": "activation functions",
                 "elementwise": "element-wise ops", "layer_norm": "LayerNorm", "batch_norm": "BatchNorm",
                 "group_norm": "GroupNorm", "other_norm": "RMSNorm/softmax", "other": "other ops"}


def _fmt(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def explain(counts: dict[str, Count], cov: pd.DataFrame, causal: bool = False,
            tolerance: float = 0.02) -> pd.DataFrame:
    """One row per counter: reported number, unit, ``reported_over_ours`` (the headline
    number divided by our FLOPs: 0.5 for a MAC counter that otherwise agrees), FLOPs, %
    difference from ours in FLOPs (``diff_pct``), the prediction from probe coverage x our per-feature FLOPs, the residual, and a one-line
    ``reason`` listing every feature the counter treats differently, with its FLOPs.

    ``causal`` marks a model whose attention is causal: every counter that counts attention
    counts it full (``4 B H T^2 D``), about twice the work a causal kernel does; the reason
    says so, for ours as well.
    """
    ours = counts["ours"]
    if ours.error:
        raise CohwError(f"our tracer failed on this model ({ours.error}); nothing to compare against")
    feats = features(ours.detail["table"])
    total = sum(feats.values())
    rows = []
    for name, res in counts.items():
        row: dict[str, Any] = {"counter": name, "reported": res.reported, "unit": res.unit,
                               "flops": res.flops, "seconds": res.seconds}
        if res.error:
            row.update(reported_over_ours=np.nan, diff_pct=np.nan, predicted=np.nan, residual_pct=np.nan,
                       reason=f"crashed: {res.error}")
            rows.append(row)
            continue
        row["reported_over_ours"] = res.reported / total if total else np.nan
        row["diff_pct"] = 100.0 * (res.flops - total) / total if total else np.nan
        parts, predicted = [], 0.0
        if res.unit == "MACs":
            parts.append("reports MACs as its 'flops' (x0.5)")
        for feat, fl in feats.items():
            if not fl:
                continue
            probe = _FEATURE_PROBE.get(feat)
            r = float(cov.loc[probe, name]) if probe in cov.index and name in cov.columns else 1.0
            if not np.isfinite(r):
                r = 1.0
            predicted += r * fl
            if abs(r - 1.0) <= tolerance:
                continue
            what = _FEATURE_TEXT[feat]
            if r <= tolerance:
                text = f"{what} not counted (-{_fmt(fl)})"
            else:
                text = f"{what} counted at {r:.2g}x ours ({'+' if r > 1 else '-'}{_fmt(abs(r - 1) * fl)})"
            why = _WHY.get((name, feat))
            parts.append(f"{text}: {why}" if why else text)
        if causal and feats["sdpa"] and cov.loc["F.sdpa causal", name] > tolerance:
            parts.append(f"causal attention counted full ({_fmt(feats['sdpa'] / 2)} of it is masked-out work)")
        row["predicted"] = predicted
        row["residual_pct"] = 100.0 * (res.flops - predicted) / res.flops if res.flops else np.nan
        if name == "ours":
            parts.insert(0, "the reference (cohw_utils.spine.costs semantics)")
        row["reason"] = "; ".join(parts) if parts else "agrees with ours"
        rows.append(row)
    return pd.DataFrame(rows).set_index("counter")


# ---------------------------------------------------------------------------- the models
CONFIG_BERT = workloads.CONFIG_DIR / "bert-base" / "config.json"
COMPARISON_MODELS = ("tiny-llama", "bert-base", "vit-b-16", "resnet-50", "tiny-sd-unet")


@dataclass
class CounterModel:
    """A model for the comparison: the wrapped module, its inputs, and what it is."""

    name: str
    module: Wrapped
    inputs: tuple
    description: str
    causal: bool


def build_model(name: str, small: bool = False, seed: int = 0) -> CounterModel:
    """One of :data:`COMPARISON_MODELS`, on CPU with seeded random weights, fp32.

    ``small=True`` (the chapter's CI configuration) shrinks the inputs, not the models:
    BERT 16 tokens, ViT-B/16 at 32x32 (ViT's position embeddings sized for it), ResNet-50
    at 64x64; the counting rules, and so the reasons, are the same.

    * ``tiny-llama``: Llama-2's class at tiny scale (2 layers, hidden 64), 64 tokens, causal SDPA.
    * ``bert-base``: ``BertModel`` from ``data/configs/bert-base/config.json``, 128 tokens, SDPA.
    * ``vit-b-16``: ViT-B/16 at 224x224, batch 1, SDPA.
    * ``resnet-50``: ResNet-50 at 224x224, batch 1.
    * ``tiny-sd-unet``: Stable Diffusion 1.5's UNet class at tiny scale, CFG batch 2, 8x8 latent.
    """
    gen = torch.Generator().manual_seed(seed)
    if name == "tiny-llama":
        b = workloads.build("llama-2-7b", scale="tiny", device="cpu", seed=seed)
        ids = torch.randint(0, b.config.vocab_size, (1, 64), generator=gen)
        mod = Wrapped(b.model, lambda m, ids: m(input_ids=ids, use_cache=False).logits)
        return CounterModel(name, mod, (ids,), "LlamaForCausalLM, tiny (2 layers, hidden 64), 64 tokens", True)
    if name == "bert-base":
        from transformers import BertModel

        cfg = workloads.load_hf_config(CONFIG_BERT)
        torch.manual_seed(seed)
        model = BertModel(cfg)
        tokens = 16 if small else 128
        ids = torch.randint(0, cfg.vocab_size, (1, tokens), generator=gen)
        mod = Wrapped(model, lambda m, ids: m(input_ids=ids).last_hidden_state)
        return CounterModel(name, mod, (ids,), f"BertModel (bert-base-uncased config), {tokens} tokens", False)
    if name in ("vit-b-16", "resnet-50"):
        size = (32 if name == "vit-b-16" else 64) if small else 224
        b = workloads.build(name, scale="full", device="cpu", seed=seed, image_size=size)
        _, kw = b.phase("forward").make_inputs()
        mod = Wrapped(b.model, lambda m, px: m(pixel_values=px).logits)
        return CounterModel(name, mod, (kw["pixel_values"],),
                            f"{type(b.model).__name__}, {size}x{size}, batch 1", False)
    if name == "tiny-sd-unet":
        b = workloads.build("sd-1.5", scale="tiny", device="cpu", seed=seed)
        (lat, t, emb), _ = b.phase("unet_step").make_inputs()
        mod = Wrapped(b.model["unet"], lambda m, x, t, e: m(x, t, encoder_hidden_states=e).sample)
        return CounterModel(name, mod, (torch.cat([lat] * 2), t, emb),
                            "UNet2DConditionModel, tiny (SD 1.5 class), CFG batch 2, 8x8 latent", False)
    raise CohwError(f"unknown comparison model '{name}'; use one of: {', '.join(COMPARISON_MODELS)}")


def compare_counters(models=COMPARISON_MODELS, counters=COUNTERS, cov: pd.DataFrame | None = None,
            small: bool = False) -> pd.DataFrame:
    """The comparison table: every counter on every model, with reasons (see :func:`explain`).

    Returns one row per (model, counter) with ``reported``, ``unit``, ``flops``, ``diff_pct``
    (vs our total), ``predicted`` and ``residual_pct`` (reported vs the probe-based
    prediction) and ``reason``; ``attrs['models']`` describes each model. ``cov`` defaults to
    :func:`counter_coverage` of :func:`probe_matrix`; ``small`` as in :func:`build_model`.
    """
    if cov is None:
        cov = counter_coverage(probe_matrix(counters))
    frames, described = [], {}
    for name in models:
        m = build_model(name, small=small)
        res = count_all(m.module, m.inputs, counters)
        frames.append(explain(res, cov, causal=m.causal).assign(model=name).reset_index())
        described[name] = m.description
    out = pd.concat(frames, ignore_index=True).set_index(["model", "counter"])
    out.attrs["models"] = described
    return out
