"""Model FLOPs utilization of a training step: counted two ways, measured on this machine (Chapter 4.7).

**Model FLOPs** (PaLM, Chowdhery et al. 2022, Sec. 4.1 and App. B): a decoder-only transformer
needs, per trained token, ``6 N + 12 L H Q T`` FLOPs -- ``2N`` in the forward pass and ``4N`` in
the backward pass for the matrix multiplies against the weights (input gradient and weight
gradient), plus ``6 L H (2 Q T)`` for dense self-attention (the ``Q K^T`` and ``P V`` products,
``2 x 2 T Q`` FLOPs per head and token forward, times three for forward + backward). ``L``
layers, ``H`` heads, ``Q`` head dimension, ``T`` sequence length; one multiply-add = 2 FLOPs.
The attention term counts the full ``T x T`` score matrix, not the causal half a flash kernel
computes. **MFU** = observed tokens/s x model FLOPs per token / peak FLOP/s. It counts only what
the model needs, never rematerialization, so two systems compare on the same numerator.

``N`` here (:func:`model_parameters`) is every parameter except the input-embedding table: the
embedding is a lookup, not a matrix multiply. A tied LM head shares that table and *is* a matrix
multiply, so a tied table is kept (counted once). ``N`` still includes the norm gains and biases,
which do no matrix multiply: ``6`` FLOPs per token for each of them is the formula's only
over-count of the contraction work, and :func:`flops_check` names it.

**Hardware FLOPs** (:func:`hardware_flops_per_token`, the HFU numerator, Korthikanti et al. 2022
Sec. 5): what the chip executes when activations are recomputed. Full recomputation reruns the
forward pass before the backward pass, ``8 N + 16 L H Q T``; selective recomputation (only the
attention core, ``Q K^T``, softmax, ``P V``) adds the forward attention term, ``6 N + 16 L H Q T``.

**Counted by the tracer** (:func:`traced_train_step`): one forward + backward of the real model on
``meta`` traced op by op (:mod:`cohw_utils.spine.trace`; with autograd on, attention runs as
explicit ``bmm`` products over the full score matrix). Its contraction FLOPs equal the formula
less the norm/bias term above; its total adds the element-wise, normalization and softmax FLOPs
(:func:`flops_check`).

**Measured on this machine** (:func:`measure_train_step`): the small Llama of the two-process run
(:data:`cohw_utils.studies.parallel.gloo_run.SMALL_LLAMA`, random weights,
:func:`~cohw_utils.studies.performance.mbu.build_random_llm`) trained with ``torch.optim.AdamW``
on a fixed batch of random token ids; one step = ``zero_grad``, forward with the loss, backward,
optimizer step, timed with :func:`cohw_utils.core.timing.time_callable` after warm-up steps. The
denominator is this host's **probed fp32 GEMM peak** (:mod:`cohw_utils.hardware.probe`: the best
rate of ``torch.matmul`` on square matrices on all of torch's threads), so the MFU says how close
the step comes to torch's own best GEMM, not to a data-sheet figure.

Published training runs predicted per rank are :mod:`cohw_utils.studies.parallel.megatron`.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from cohw_utils.core.errors import CohwError, ConfigError
from cohw_utils.core.timing import Timing, time_callable

__all__ = ["RECOMPUTE", "model_flops_per_token", "hardware_flops_per_token", "model_parameters",
           "transformer_shape", "mfu", "traced_train_step", "flops_check", "TrainRun", "measure_train_step"]

#: Activation recomputation modes of :func:`hardware_flops_per_token`.
RECOMPUTE = ("none", "selective", "full")


def _check_positive(**values: float) -> None:
    bad = {k: v for k, v in values.items() if not (isinstance(v, (int, float)) and v > 0)}
    if bad:
        raise CohwError(f"{', '.join(f'{k}={v!r}' for k, v in bad.items())}: every size must be a number > 0")


def model_flops_per_token(n_params: float, layers: int, heads: int, head_dim: int, seq_len: int) -> float:
    """PaLM's model FLOPs per trained token, ``6 N + 12 L H Q T`` (module docstring)."""
    _check_positive(n_params=n_params, layers=layers, heads=heads, head_dim=head_dim, seq_len=seq_len)
    return 6.0 * n_params + 12.0 * layers * heads * head_dim * seq_len


def hardware_flops_per_token(n_params: float, layers: int, heads: int, head_dim: int, seq_len: int,
                             recompute: str = "none") -> float:
    """FLOPs per token the chip executes under activation ``recompute`` (``"none"``: the model
    FLOPs; ``"selective"``: ``6N + 16LHQT``; ``"full"``: ``8N + 16LHQT``)."""
    if recompute not in RECOMPUTE:
        raise CohwError(f"recompute={recompute!r}: choose one of {', '.join(RECOMPUTE)}")
    base = model_flops_per_token(n_params, layers, heads, head_dim, seq_len)
    attn_fwd = 4.0 * layers * heads * head_dim * seq_len
    return base + {"none": 0.0, "selective": attn_fwd, "full": 2.0 * n_params + attn_fwd}[recompute]


def model_parameters(model: torch.nn.Module) -> int:
    """``N`` of the formula: unique parameters less input-embedding tables that no output head
    shares (module docstring). Works on ``meta`` models."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    shared = {id(out_emb.weight)} if out_emb is not None and hasattr(out_emb, "weight") else set()
    seen, n = set(), 0
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)} - shared
    for p in model.parameters():
        if id(p) in seen or id(p) in lookups:
            continue
        seen.add(id(p))
        n += p.numel()
    return n


def transformer_shape(config: Any) -> dict[str, int]:
    """``layers``, ``heads``, ``head_dim`` of a Hugging Face decoder config (``head_dim`` from the
    config where it states one, else hidden / heads)."""
    try:
        layers, heads, hidden = config.num_hidden_layers, config.num_attention_heads, config.hidden_size
    except AttributeError as err:
        raise ConfigError(f"{type(config).__name__} is not a decoder config ({err}); give one with "
                          "num_hidden_layers, num_attention_heads and hidden_size") from None
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return {"layers": int(layers), "heads": int(heads), "head_dim": int(head_dim)}


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilization: ``tokens/s x FLOPs per token / peak FLOP/s`` (pass hardware
    FLOPs per token for the hardware FLOPs utilization)."""
    _check_positive(tokens_per_s=tokens_per_s, flops_per_token=flops_per_token, peak_flops=peak_flops)
    return tokens_per_s * flops_per_token / peak_flops


def _hf_config(config: Any):
    """A transformers config from a dict (``model_type`` set), a config object, or a path."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        return config
    if isinstance(config, dict):
        d = {k: v for k, v in config.items() if k not in ("architectures",)}
        if "model_type" not in d:
            raise ConfigError("a config dict needs a model_type (e.g. 'llama')")
        return AutoConfig.for_model(d.pop("model_type"), **d)
    from cohw_utils import workloads

    return workloads.load_hf_config(config)


def traced_train_step(config: Any, batch: int, seq_len: int) -> tuple[pd.DataFrame, torch.nn.Module]:
    """The op table of one training step's forward + backward (loss = next-token cross entropy
    on random ids) of the causal LM ``config`` built on ``meta``, and the model."""
    from transformers import AutoModelForCausalLM

    from cohw_utils.spine.trace import trace

    _check_positive(batch=batch, seq_len=seq_len)
    cfg = _hf_config(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    ids = torch.zeros(batch, seq_len, dtype=torch.long, device="meta")

    def step(ids: torch.Tensor) -> None:
        model(input_ids=ids, labels=ids).loss.backward()

    return trace(step, ids, model=model, phase="train_step"), model


def flops_check(config: Any, batch: int, seq_len: int) -> dict[str, float]:
    """The formula beside the tracer for one step of ``batch x seq_len`` tokens: formula FLOPs,
    traced contraction and total FLOPs, their ratios, and the parts that explain the gap
    (``norm_bias_term``: 6 x the parameters that do no matrix multiply x tokens;
    ``non_contraction``: the traced FLOPs outside contractions, by class)."""
    table, model = traced_train_step(config, batch, seq_len)
    shape = transformer_shape(model.config)
    n = model_parameters(model)
    tokens = batch * seq_len
    formula = model_flops_per_token(n, seq_len=seq_len, **shape) * tokens
    contraction = float(table.loc[table["op_class"] == "contraction", "flops"].sum())
    total = float(table["flops"].sum())
    no_matmul = sum(p.numel() for name, p in model.named_parameters() if p.dim() < 2)
    by_class = table[table["op_class"] != "contraction"].groupby("op_class")["flops"].sum()
    return {"tokens": tokens, "n_params": n, "formula": formula, "traced_contraction": contraction,
            "traced_total": total, "contraction_ratio": contraction / formula, "total_ratio": total / formula,
            "norm_bias_params": no_matmul, "norm_bias_term": 6.0 * no_matmul * tokens,
            "non_contraction": {str(k): float(v) for k, v in by_class.items() if v}, **shape}


@dataclass(frozen=True)
class TrainRun:
    """A measured training step: its :class:`~cohw_utils.core.timing.Timing`, tokens per step,
    FLOPs per token (the model's, and all the tracer counts), the peak it is divided by and
    where that peak comes from."""

    timing: Timing
    batch: int
    seq_len: int
    dtype: str
    n_params: int
    model_flops_per_token: float
    traced_flops_per_token: float
    peak_flops: float
    peak_source: str

    @property
    def tokens_per_s(self) -> float:
        return self.batch * self.seq_len / self.timing.median

    @property
    def mfu(self) -> float:
        return mfu(self.tokens_per_s, self.model_flops_per_token, self.peak_flops)

    @property
    def mfu_range(self) -> tuple[float, float]:
        """MFU at the slowest and the fastest timed step."""
        per_s = [self.batch * self.seq_len / t for t in (self.timing.max, self.timing.min)]
        return tuple(mfu(r, self.model_flops_per_token, self.peak_flops) for r in per_s)

    @property
    def achieved_flops(self) -> float:
        """Model FLOP/s of the median step."""
        return self.tokens_per_s * self.model_flops_per_token

    def describe(self) -> str:
        lo, hi = self.mfu_range
        return (f"{self.tokens_per_s:,.0f} tokens/s ({self.batch} x {self.seq_len} tokens per step, {self.dtype}); "
                f"step {self.timing.describe()}; model FLOPs {self.model_flops_per_token / 1e6:.1f} M/token "
                f"-> {self.achieved_flops / 1e9:.1f} GFLOP/s = MFU {self.mfu:.1%} (range {lo:.1%}-{hi:.1%} "
                f"over the timed steps) of {self.peak_flops / 1e9:.1f} GFLOP/s ({self.peak_source})")


def measure_train_step(overrides: dict[str, Any] | None = None, *, batch: int = 4, seq_len: int = 128,
                       dtype: str = "fp32", repeats: int = 5, warmup: int = 2, lr: float = 1e-4,
                       peak_flops: float | None = None, quick_probe: bool = True, seed: int = 0) -> TrainRun:
    """Train the small Llama (:data:`~cohw_utils.studies.parallel.gloo_run.SMALL_LLAMA` with
    ``overrides``, e.g. ``{"num_hidden_layers": 2}``) on the CPU for ``warmup + repeats`` AdamW steps and return the :class:`TrainRun` (module
    docstring). ``peak_flops``: the denominator; default this host's probed GEMM peak in ``dtype``."""
    from cohw_utils.core.dtypes import dtype_name
    from cohw_utils.hardware.probe import host_hardware
    from cohw_utils.studies.parallel import gloo_run
    from cohw_utils.studies.performance.mbu import build_random_llm

    _check_positive(batch=batch, seq_len=seq_len, repeats=repeats)
    name = dtype_name(dtype)
    if name not in ("fp32", "bf16"):
        raise CohwError(f"dtype {dtype!r}: the CPU training step runs in fp32 or bf16")
    folder = gloo_run.write_config(Path(tempfile.mkdtemp(prefix="cohw-mfu-")) / "model", overrides)
    model = build_random_llm(folder, name, seed=seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=gen)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()

    timing = time_callable(step, repeats=repeats, warmup=warmup)
    table, meta_model = traced_train_step(folder, batch, seq_len)
    shape = transformer_shape(meta_model.config)
    n = model_parameters(meta_model)
    if peak_flops is None:
        hw = host_hardware(quick=quick_probe)
        peak_flops = hw.peak(name)
        source = (f"this host's probed {name} GEMM peak: best torch.matmul rate on square matrices, "
                  f"{torch.get_num_threads()} threads")
    else:
        source = "peak given by the caller"
    return TrainRun(timing, batch, seq_len, name, n, model_flops_per_token(n, seq_len=seq_len, **shape),
                    float(table["flops"].sum()) / (batch * seq_len), float(peak_flops), source)
