"""Caches measured, not assumed: run a workload phase and read the cache object the model itself
returns, layer by layer (:func:`measure_cache` -> :class:`CacheReport`).

Chapter 2 (KV cache and "Architectures of now": MHA/GQA/MLA, sliding windows, SSM state) shows
these reports; Chapter 4's memory and capacity studies and ``cohw_utils.spine.analyze`` (the CLI's
``analyze``) carry their numbers.

What is measured. The phase runs untraced on its device (``meta`` at full scale: shapes and
dtypes, no memory), and the cache it returns (``out.cache`` / ``out.past_key_values``:
``DynamicCache`` for a prefill, the decode phase's ``StaticCache``, an ``EncoderDecoderCache``...)
is walked layer by layer. Each layer gets a *type*, read from its transformers cache-layer class
and the config's layer types (:func:`~cohw_utils.workloads.hf_config.cache_layer_types`):

* ``"full attention"``: keys and values, one position per token of context;
* ``"sliding window (W)"``: the same per token until the window of W tokens fills, then constant
  (transformers' ``DynamicSlidingWindowLayer`` keeps W - 1 tokens between steps, its
  ``StaticSlidingWindowLayer`` W; :meth:`CacheLayer.bytes_at` caps at W, as a serving engine does);
* ``"recurrent state"``: conv and SSM states (Mamba, Jamba's Mamba layers), constant in length:
  0 bytes per token;
* ``"cross attention"``: an encoder-decoder's cross-attention K/V, sized by the encoder's source
  length and constant in the decoded context (0 bytes per decoded token).

Bytes are ``numel x element_size`` of the layer's tensors (``keys``/``values``, or the
``conv_states``/``recurrent_states``), so a state kept in fp32 inside a bf16 model counts 4 bytes
an element. Per-token bytes are per sequence: the K/V bytes of one position (the tensors' bytes
divided by batch and by the positions held on their sequence axis, ``dim=-2``).

Framework vs serving. ``framework_bytes_per_token`` is what transformers' cache holds.
``serving_bytes_per_token`` is what a serving engine stores: the same, except for multi-head
latent attention (DeepSeek-V2/V3, ``kv_lora_rank``), where vLLM, SGLang and FlashMLA store the
compressed latent, ``(kv_lora_rank + qk_rope_head_dim) x layers x bytes``. (transformers 5 caches
that latent too, so the two agree there -- measured, not assumed; ``decompressed_bytes_per_token``
gives the per-head K and V, ``heads x (qk_nope + qk_rope + v_head_dim)``, that a plain per-head
cache of the same model would hold.) The analyses use the **serving** number (``used``): memory
and capacity questions (how many sequences fit, when the cache outgrows the weights) are about
what a deployed engine allocates, not about one library's layout. A traced decode's op table, by
contrast, counts the bytes of the cache transformers actually reads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cohw_utils.core.dtypes import dtype_name
from cohw_utils.core.errors import CohwError, ConfigError
from cohw_utils.workloads.base import Built
from cohw_utils.workloads.hf_config import _out_cache, cache_layer_types, kv_cache_bytes_per_token, mla_geometry

FULL = "full attention"
RECURRENT = "recurrent state"
CROSS = "cross attention"
KINDS = ("serving", "framework")


def _sliding(window: int) -> str:
    return f"sliding window ({window})"


@dataclass(frozen=True)
class CacheLayer:
    """One layer's cache as measured (``bytes_held``: the whole batch; the rest per sequence)."""

    index: int
    layer_type: str
    cache_class: str
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    positions: int | None  # positions held on the sequence axis (attention layers), None for a state
    window: int | None  # W of a sliding-window layer
    bytes_held: int  # bytes of its tensors at the measured context, whole batch
    bytes_per_token: int  # framework: bytes one more token of context adds, one sequence
    serving_bytes_per_token: int  # the same as a serving engine stores it (MLA: the latent)
    constant_bytes: int  # bytes independent of the context, one sequence (state, cross-attention K/V)

    def per_token(self, kind: str = "serving") -> int:
        return self.serving_bytes_per_token if kind == "serving" else self.bytes_per_token

    def bytes_at(self, context: int, batch: int = 1, kind: str = "serving") -> int:
        """Bytes this layer holds for ``batch`` sequences of ``context`` tokens (sliding: capped at W)."""
        tokens = context if self.window is None else min(context, self.window)
        return (self.per_token(kind) * tokens + self.constant_bytes) * batch

    def bytes_per_token_at(self, context: int, kind: str = "serving") -> int:
        """Bytes the (context + 1)-th token adds: per token, 0 once a sliding window is full."""
        return self.per_token(kind) if self.window is None or context < self.window else 0


@dataclass(frozen=True)
class CacheReport:
    """The cache a workload phase returned, per layer, with totals by layer type.

    ``context``: the tokens the measured cache covers (the prompt for a prefill, prompt + 1 after
    a decode step; for a cache with no attention layer, the tokens of the measured call).
    ``closed_form_bytes_per_token``: :func:`~cohw_utils.workloads.kv_cache_bytes_per_token` of the
    config (None where it does not apply: no attention, encoder-decoder);
    ``closed_form_difference`` = measured framework bytes per token minus it.
    """

    workload: str
    phase: str
    scale: str
    device: str
    dtype: str
    batch: int
    context: int | None
    cache_class: str
    per_layer: tuple[CacheLayer, ...]
    used: str = "serving"
    closed_form_bytes_per_token: int | None = None
    closed_form_state_bytes: int | None = None
    decompressed_bytes_per_token: int | None = None
    notes: tuple[str, ...] = ()

    # ------------------------------------------------------------------ per-token and at a context
    @property
    def framework_bytes_per_token(self) -> int:
        return sum(la.bytes_per_token for la in self.per_layer)

    @property
    def serving_bytes_per_token(self) -> int:
        return sum(la.serving_bytes_per_token for la in self.per_layer)

    @property
    def kv_bytes_per_token(self) -> int:
        """The per-token number the analyses use (``used``; sliding layers before their window fills)."""
        return self.serving_bytes_per_token if self.used == "serving" else self.framework_bytes_per_token

    @property
    def state_bytes(self) -> int:
        """Bytes per sequence that do not grow with the context (recurrent state, cross-attention K/V)."""
        return sum(la.constant_bytes for la in self.per_layer)

    @property
    def bytes_held(self) -> int:
        """Bytes of every tensor of the measured cache (whole batch)."""
        return sum(la.bytes_held for la in self.per_layer)

    @property
    def closed_form_difference(self) -> int | None:
        if self.closed_form_bytes_per_token is None:
            return None
        return self.framework_bytes_per_token - self.closed_form_bytes_per_token

    def _kind(self, kind: str | None) -> str:
        kind = kind or self.used
        if kind not in KINDS:
            raise CohwError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        return kind

    def bytes_per_token(self, context: int = 0, kind: str | None = None) -> int:
        """Bytes per sequence the (context + 1)-th token adds: full-attention layers always, sliding
        layers while ``context`` < W, recurrent state never. ``kind``: "serving" / "framework"
        (default ``used``)."""
        k = self._kind(kind)
        return sum(la.bytes_per_token_at(int(context), k) for la in self.per_layer)

    def bytes_at(self, context: int, batch: int = 1, kind: str | None = None) -> int:
        """Bytes the cache holds for ``batch`` sequences of ``context`` tokens: per-token bytes x
        context (sliding layers x min(context, W)) + the constant state, summed over layers."""
        if context < 0 or batch < 1:
            raise CohwError(f"context must be >= 0 and batch >= 1, got context={context}, batch={batch}")
        k = self._kind(kind)
        return sum(la.bytes_at(int(context), batch, k) for la in self.per_layer)

    def by_type(self, context: int | None = None) -> dict[str, dict[str, Any]]:
        """Totals per layer type: layers, bytes per token (framework and serving, one sequence),
        constant bytes, and bytes at ``context`` (default: the measured one) for the measured batch."""
        ctx = self._totals_context if context is None else context
        out: dict[str, dict[str, Any]] = {}
        for la in self.per_layer:
            t = out.setdefault(la.layer_type, {"layers": 0, "window": la.window, "framework_bytes_per_token": 0,
                                               "serving_bytes_per_token": 0, "constant_bytes": 0,
                                               "framework_bytes_at_context": 0, "serving_bytes_at_context": 0})
            t["layers"] += 1
            t["framework_bytes_per_token"] += la.bytes_per_token
            t["serving_bytes_per_token"] += la.serving_bytes_per_token
            t["constant_bytes"] += la.constant_bytes
            if ctx is None:
                t["framework_bytes_at_context"] = t["serving_bytes_at_context"] = None
            else:
                t["framework_bytes_at_context"] += la.bytes_at(ctx, self.batch, "framework")
                t["serving_bytes_at_context"] += la.bytes_at(ctx, self.batch, "serving")
        return out

    def table(self):
        """One row per layer (pandas DataFrame)."""
        import pandas as pd

        return pd.DataFrame([{
            "layer": la.index, "type": la.layer_type, "class": la.cache_class, "shapes": la.shapes,
            "dtypes": la.dtypes, "positions": la.positions, "bytes_held": la.bytes_held,
            "bytes_per_token": la.bytes_per_token, "serving_bytes_per_token": la.serving_bytes_per_token,
            "constant_bytes": la.constant_bytes} for la in self.per_layer])

    @property
    def _totals_context(self) -> int | None:
        # a cache with no attention layer holds the same bytes at every context: total it at 0
        if self.context is None and not any(la.positions is not None for la in self.per_layer):
            return 0
        return self.context

    def summary(self) -> dict[str, Any]:
        """JSON-friendly totals (what ``Analysis.totals()`` and the CLI carry); ``*_at_context``
        are for the measured batch."""
        ctx = self._totals_context
        return {
            "class": self.cache_class, "used": self.used, "context": ctx, "batch": self.batch,
            "layers": self.layers,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "framework_bytes_per_token": self.framework_bytes_per_token,
            "serving_bytes_per_token": self.serving_bytes_per_token,
            "bytes_per_token_at_context": None if ctx is None else self.bytes_per_token(ctx),
            "state_bytes": self.state_bytes,
            "framework_bytes_at_context": None if ctx is None else self.bytes_at(ctx, self.batch, "framework"),
            "serving_bytes_at_context": None if ctx is None else self.bytes_at(ctx, self.batch, "serving"),
            "bytes_held": self.bytes_held,
            "closed_form_bytes_per_token": self.closed_form_bytes_per_token,
            "closed_form_difference": self.closed_form_difference,
            "decompressed_bytes_per_token": self.decompressed_bytes_per_token,
            "by_type": self.by_type(),
            "notes": list(self.notes),
        }

    # ----------------------------------------- the fields of the earlier views.kvcache.CacheCheck
    @property
    def model(self) -> str:
        return self.workload

    @property
    def layers(self) -> int:
        """Number of model layers the cache holds something for."""
        return len({la.index for la in self.per_layer if la.layer_type != CROSS})

    @property
    def key_shape(self) -> tuple[int, ...] | None:
        """Shape of the first attention layer's K tensor, (batch, kv_heads, positions, head_dim)."""
        kv = [la for la in self.per_layer if la.positions is not None and la.layer_type != CROSS]
        return kv[0].shapes[0] if kv else None

    @property
    def measured_bytes(self) -> int:
        return self.bytes_held

    @property
    def formula_bytes(self) -> int | None:
        """The closed form at the measured context, whole batch: per-layer closed-form bytes per
        token x min(context, W) + the closed-form state; None where no closed form applies."""
        if self._totals_context is None:
            return None
        kv_layers = [la for la in self.per_layer if la.positions is not None and la.layer_type != CROSS]
        if any(la.layer_type == CROSS for la in self.per_layer):
            return None
        total = 0
        if kv_layers:
            if self.closed_form_bytes_per_token is None:
                return None
            per = self.closed_form_bytes_per_token / len(kv_layers)
            total += sum(per * (self.context if la.window is None else min(self.context, la.window)) for la in kv_layers)
        if any(la.layer_type == RECURRENT for la in self.per_layer):
            if self.closed_form_state_bytes is None:
                return None
            total += self.closed_form_state_bytes
        return int(total * self.batch)

    @property
    def agrees(self) -> bool | None:
        """measured == formula (None where there is no closed form)."""
        f = self.formula_bytes
        return None if f is None else self.measured_bytes == f


# ------------------------------------------------------------------------------------ measuring
def _nbytes(t: torch.Tensor) -> int:
    return int(t.numel() * t.element_size())


def _int_len(layer) -> int | None:
    """The layer's true sequence length (sliding layers count past their window), where known."""
    try:
        v = layer.get_seq_length()
    except Exception:
        return None
    if isinstance(v, torch.Tensor):
        return None if v.device.type == "meta" else int(v)
    return int(v) if v is not None else None


def _state_tensors(layer) -> list[torch.Tensor]:
    out = []
    for name in ("conv_states", "recurrent_states"):
        d = getattr(layer, name, None) or {}
        out += [t for t in d.values() if isinstance(t, torch.Tensor)]
    return out


def _kv_layer(index, layer, layer_type, window, mla):
    """One attention layer's K/V: (batch, heads, positions, head_dim) each."""
    k, v = layer.keys, layer.values
    batch = int(k.shape[0])
    positions = int(k.shape[-2])
    if positions == 0:
        raise CohwError(f"cache layer {index} ({type(layer).__name__}) holds no position; run a phase that fills the cache")
    held = _nbytes(k) + _nbytes(v)
    per = held // (batch * positions)
    serving = per
    if mla is not None and layer_type != CROSS:
        serving = (mla["kv_lora_rank"] + mla["qk_rope_head_dim"]) * k.element_size()
    constant = held // batch if layer_type == CROSS else 0
    if layer_type == CROSS:
        per = serving = 0
    return CacheLayer(index, layer_type, type(layer).__name__, (tuple(k.shape), tuple(v.shape)),
                      (str(k.dtype).removeprefix("torch."), str(v.dtype).removeprefix("torch.")),
                      positions, window, held, per, serving, constant)


def _layers_of(cache, config) -> tuple[list[CacheLayer], list[str]]:
    from transformers.cache_utils import CacheLayerMixin, DummyLayer, LinearAttentionCacheLayerMixin

    notes: list[str] = []
    self_cache, cross = cache, None
    if hasattr(cache, "self_attention_cache") and hasattr(cache, "cross_attention_cache"):
        self_cache, cross = cache.self_attention_cache, cache.cross_attention_cache
    if not hasattr(self_cache, "layers"):
        raise CohwError(f"the cache ({type(cache).__name__}) has no per-layer structure; measure_cache reads "
                        "transformers Cache objects (DynamicCache, StaticCache, EncoderDecoderCache)")
    kinds = cache_layer_types(config) if config is not None and cross is None else []
    mla = mla_geometry(config) if config is not None else None
    rows: list[CacheLayer] = []
    for i, layer in enumerate(self_cache.layers):
        if isinstance(layer, DummyLayer):
            notes.append(f"layer {i}: no cache of its own (DummyLayer: it reuses another layer's KV or has no attention)")
            continue
        if isinstance(layer, LinearAttentionCacheLayerMixin):
            ts = _state_tensors(layer)
            if ts:
                batch = int(ts[0].shape[0])
                held = sum(_nbytes(t) for t in ts)
                rows.append(CacheLayer(i, RECURRENT, type(layer).__name__, tuple(tuple(t.shape) for t in ts),
                                       tuple(str(t.dtype).removeprefix("torch.") for t in ts), None, None,
                                       held, 0, 0, held // batch))
        if isinstance(layer, CacheLayerMixin) and getattr(layer, "keys", None) is not None and layer.keys.dim() > 1:
            window = None
            if getattr(layer, "is_sliding", False):
                window = kinds[i][1] if i < len(kinds) and kinds[i][1] else (
                    getattr(layer, "sliding_window", None) or getattr(layer, "max_cache_len", None))
            rows.append(_kv_layer(i, layer, _sliding(window) if window else FULL, window, mla))
        elif isinstance(layer, CacheLayerMixin) and not isinstance(layer, LinearAttentionCacheLayerMixin):
            notes.append(f"layer {i}: {type(layer).__name__} holds no tensors yet (not run)")
    for i, layer in enumerate(getattr(cross, "layers", []) or []):
        if getattr(layer, "keys", None) is not None and layer.keys.dim() > 1:
            rows.append(_kv_layer(i, layer, CROSS, None, None))
    return rows, notes


def _closed_state_bytes(config, n_state: int, elem: int) -> int | None:
    """Closed form of a Mamba-style recurrent state, one sequence: per SSM layer a conv state of
    ``intermediate x conv_kernel`` at the model's dtype and an SSM state of ``intermediate x
    state_size`` in float32 (transformers' scan builds it from ``A = -exp(A_log.float())``, so the
    state it caches is float32 even in a half-precision model; the uniform-dtype formula
    ``intermediate x (conv_kernel + state_size) x bytes`` undercounts it). Mamba: ``intermediate_size``,
    ``conv_kernel``, ``state_size``; Jamba: ``mamba_expand x hidden_size``, ``mamba_d_conv``,
    ``mamba_d_state``. None for other state layouts (Mamba2's heads, RWKV...)."""
    def g(*names):
        return next((getattr(config, n) for n in names if getattr(config, n, None) is not None), None)

    model_type = getattr(config, "model_type", None)
    if model_type in ("mamba", "falcon_mamba"):
        inner, conv, state = g("intermediate_size"), g("conv_kernel"), g("state_size")
    elif model_type == "jamba":
        expand, hidden = g("mamba_expand"), g("hidden_size")
        inner = None if None in (expand, hidden) else expand * hidden
        conv, state = g("mamba_d_conv"), g("mamba_d_state")
    else:
        return None
    if None in (inner, conv, state):
        return None
    return int(inner * (conv * elem + state * 4) * n_state)


def _report(built: Built, phase: str, cache, context_hint: int | None) -> CacheReport:
    config = built.config
    rows, notes = _layers_of(cache, config)
    if not rows:
        raise CohwError(f"the cache of '{built.workload.name}' / {phase} holds no tensors; nothing to measure")
    kv = [la for la in rows if la.positions is not None and la.layer_type != CROSS]
    lens = [n for n in (_int_len(la_obj) for la_obj in _cache_layer_objects(cache)) if n]
    context = max(lens) if lens and kv else (max(la.positions for la in kv) if kv else context_hint)
    elem = built.dtype.itemsize
    closed = state_closed = decompressed = None
    is_encdec = any(la.layer_type == CROSS for la in rows)
    if kv and not is_encdec:
        kv_elem = _dtype_of(kv[0]).itemsize
        try:
            closed = int(kv_cache_bytes_per_token(config, kv_elem))
        except (ConfigError, CohwError, AttributeError, TypeError):
            closed = None
        mla = mla_geometry(config)
        if mla is not None:
            decompressed = (mla["heads"] * (mla["qk_nope_head_dim"] + mla["qk_rope_head_dim"] + mla["v_head_dim"])
                            * len(kv) * kv_elem)
    n_state = sum(la.layer_type == RECURRENT for la in rows)
    if n_state:
        state_closed = _closed_state_bytes(config, n_state, elem)
        dts = sorted({d for la in rows if la.layer_type == RECURRENT for d in la.dtypes})
        if len(dts) > 1:
            notes.append(f"recurrent state tensors in {', '.join(dts)}: transformers keeps the SSM state in the "
                         "scan's float32 even in a half-precision model (its torch path: A = -exp(A_log.float()))")
    if any(la.window for la in kv) and context is not None:
        held_short = [la for la in kv if la.window and context >= la.window and la.positions < la.window]
        if held_short:
            notes.append(f"sliding layers hold {held_short[0].positions} positions once the context reaches the "
                         f"window (DynamicSlidingWindowLayer keeps W - 1 = {held_short[0].window - 1} between "
                         "steps); bytes_at caps at W")
    return CacheReport(
        workload=built.workload.name, phase=phase, scale=built.scale, device=str(built.device),
        dtype=dtype_name(built.dtype), batch=_batch_of(rows), context=context, cache_class=type(cache).__name__,
        per_layer=tuple(rows), closed_form_bytes_per_token=closed, closed_form_state_bytes=state_closed,
        decompressed_bytes_per_token=decompressed, notes=tuple(notes))


def _dtype_of(layer: CacheLayer) -> torch.dtype:
    return getattr(torch, layer.dtypes[0])


def _batch_of(rows: list[CacheLayer]) -> int:
    return int(rows[0].shapes[0][0])  # every cache tensor is (batch, ...)


def _cache_layer_objects(cache) -> list:
    inner = getattr(cache, "self_attention_cache", cache)
    from transformers.cache_utils import CacheLayerMixin

    return [la for la in getattr(inner, "layers", []) if isinstance(la, CacheLayerMixin)
            and getattr(la, "keys", None) is not None and la.keys.dim() > 1]


def cache_report(built: Built, phase: str, output: Any, context: int | None = None) -> CacheReport:
    """A :class:`CacheReport` of the cache in ``output`` (what ``built.phase(phase).run`` returned),
    without running anything: how ``cohw_utils.spine.analyze`` reads the cache of the phase it
    traced. ``context`` is used only when the cache has no attention layer to read it from."""
    return _report(built, phase, _out_cache(output), context)


def measure_cache(built, phase: str | None = None, *, seq_len: int | None = None, batch: int | None = None,
                  scale: str | None = None, device: str | torch.device | None = None,
                  dtype: str | torch.dtype | None = None) -> CacheReport:
    """Run ``phase`` of ``built`` (untraced, on its device) and measure the cache the model returns.

    ``built``: a :class:`~cohw_utils.workloads.Built` (e.g. ``build("llama-2-7b")``, full scale on
    ``meta``), or a workload name / config path, which is built first with ``seq_len`` (16),
    ``batch`` (2), ``scale`` ("tiny"), ``device`` ("cpu") and ``dtype`` -- the defaults of the
    earlier ``views.kvcache.measure_cache``; these build options are refused with a ``Built``.
    ``phase``: default "prefill" where the workload has one, else "decode".
    """
    from cohw_utils.workloads.registry import build  # the registry imports the families, not this module

    opts = {"seq_len": seq_len, "batch": batch, "scale": scale, "device": device, "dtype": dtype}
    if isinstance(built, Built):
        given = [k for k, v in opts.items() if v is not None]
        if given:
            raise CohwError(f"measure_cache got a Built and build options ({', '.join(given)}); "
                            "pass them to build(...) instead, or pass a workload name")
    else:
        kw = {"dtype": dtype} if dtype is not None else {}
        built = build(built, scale=scale or "tiny", device=device or "cpu", batch=batch or 2,
                      seq_len=seq_len or 16, **kw)
    if phase is None:
        phase = next((p for p in ("prefill", "decode") if p in built.phases), None)
        if phase is None:
            raise CohwError(f"workload '{built.workload.name}' has no prefill or decode phase (its phases: "
                            f"{', '.join(built.phases)}); measure_cache needs a phase that returns a cache")
    ph = built.phase(phase)
    args, kwargs = ph.make_inputs()
    with torch.no_grad():
        out = ph.run(*args, **kwargs)
    try:
        cache = _out_cache(out)
    except CohwError:
        raise CohwError(f"phase '{phase}' of '{built.workload.name}' returned no cache; measure_cache needs a "
                        "phase run with use_cache=True (prefill or decode)") from None
    ids = kwargs.get("input_ids")
    hint = int(ids.shape[-1]) if isinstance(ids, torch.Tensor) and phase == "prefill" else None
    return _report(built, phase, cache, hint)
