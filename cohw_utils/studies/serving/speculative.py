"""Speculative decoding: the expected speedup from an acceptance rate (Leviathan et al. 2023),
checked against transformers' assisted generation with a draft/target pair measured on this machine.

* :func:`expected_tokens`: tokens produced per target step when each of ``gamma`` drafted tokens
  is accepted independently with probability ``alpha``: ``(1 - alpha^(gamma + 1)) / (1 - alpha)``
  (``gamma + 1`` at ``alpha = 1``).
* :func:`expected_speedup`: that, over the cost of one round, ``gamma x c + 1`` target steps,
  where ``c`` is one draft step's time over one target step's. Stated assumption of the formula:
  verifying ``gamma + 1`` tokens in one target call costs one target step (true while decode is
  bound by reading the weights, not by the extra tokens).
* :func:`layer_skip_draft`: a draft made of the target's embedding, first ``layers`` blocks, final
  norm and LM head (self-speculation: same vocabulary, no second training run).
* :func:`damp_later_blocks`: scales the output projections (attention ``o_proj``, MLP
  ``down_proj``) of every block after the first ``layers`` by ``scale``, in place. A model with
  random weights has no structure a shallow draft can predict (its one-block draft agrees with it
  almost never); damping the later blocks makes them small refinements of the first ones, the
  regime trained layer-skip pairs are in, with an acceptance rate that falls as ``scale`` grows.
* :func:`acceptance_rate`: the greedy acceptance rate, the share of positions of the target's own
  greedy continuation at which the draft's next-token argmax equals the target's (teacher-forced,
  so every position counts once: the i.i.d. ``alpha`` of the formula).
* :func:`measure_pair`: times plain greedy decoding of the target and of the draft (``c`` is their
  ratio per token) and assisted generation (``generate(assistant_model=draft)``, a constant
  ``gamma`` drafted tokens per round), and returns ``alpha``, ``c``, the predicted and the
  measured speedup; medians of ``repeats`` runs after a warm-up. Also the formula with the
  measured cost of one drafting call (transformers drafts each round with a ``generate`` call of
  ``gamma`` tokens, whose fixed setup ``gamma x c`` leaves out) in place of ``gamma x c``.

Used by Chapter 4.6 (serving under load).
"""
from __future__ import annotations

import copy
import time

import torch

from cohw_utils.core.errors import CohwError
from cohw_utils.spine.measure import time_callable

__all__ = ["expected_tokens", "expected_speedup", "layer_skip_draft", "damp_later_blocks", "acceptance_rate",
           "measure_pair"]


def expected_tokens(alpha: float, gamma: int) -> float:
    """Expected tokens per target step (module docstring)."""
    if not 0 <= alpha <= 1 or gamma < 1:
        raise CohwError(f"need 0 <= alpha <= 1 and gamma >= 1 drafted tokens, got alpha={alpha}, gamma={gamma}")
    return float(gamma + 1) if alpha == 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)


def expected_speedup(alpha: float, gamma: int, c: float) -> float:
    """Leviathan et al.'s walltime improvement: ``expected_tokens / (gamma x c + 1)``."""
    if c < 0:
        raise CohwError(f"the draft/target cost ratio c must be >= 0, got {c}")
    return expected_tokens(alpha, gamma) / (gamma * c + 1)


def layer_skip_draft(target, layers: int):
    """A copy of a Llama-style ``target`` keeping its first ``layers`` decoder blocks."""
    n = len(target.model.layers)
    if not 1 <= layers < n:
        raise CohwError(f"a layer-skip draft keeps 1..{n - 1} of the target's {n} blocks, got {layers}")
    draft = copy.deepcopy(target)
    draft.model.layers = draft.model.layers[:layers]
    draft.config.num_hidden_layers = layers
    if getattr(draft.config, "layer_types", None):
        draft.config.layer_types = draft.config.layer_types[:layers]
    return draft.eval()


@torch.no_grad()
def damp_later_blocks(model, layers: int, scale: float):
    """Scale the residual-branch outputs of blocks ``layers..`` of a Llama-style ``model`` (module docstring)."""
    if not 0 <= scale:
        raise CohwError(f"scale must be >= 0, got {scale}")
    for block in model.model.layers[layers:]:
        block.self_attn.o_proj.weight.mul_(scale)
        block.mlp.down_proj.weight.mul_(scale)
    return model


@torch.no_grad()
def acceptance_rate(target, draft, ids: torch.Tensor) -> float:
    """Share of next-token positions of ``ids`` (1, T) where both models' argmax agree (module docstring)."""
    a = target(ids).logits.argmax(-1)
    b = draft(ids).logits.argmax(-1)
    return float((a == b).float().mean())


def _time(fn, repeats: int) -> tuple[float, object]:
    """Median seconds of ``fn`` (the project's harness, one warm-up call) and its last output."""
    last: dict[str, object] = {}
    timing = time_callable(lambda: last.__setitem__("out", fn()), repeats, 1, "cpu")
    return timing.median, last["out"]


@torch.no_grad()
def measure_pair(target, draft, prompt_len: int = 32, new_tokens: int = 64, gamma: int = 4, repeats: int = 3,
            seed: int = 0) -> dict[str, float]:
    """Predicted against measured speedup of assisted generation (module docstring)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, target.config.vocab_size, (1, prompt_len), generator=g)
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    greedy = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                              pad_token_id=0, num_assistant_tokens=gamma, num_assistant_tokens_schedule="constant")
    t_target, out = _time(lambda: target.generate(ids, generation_config=greedy), repeats)
    t_draft, _ = _time(lambda: draft.generate(ids, generation_config=greedy), repeats)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the assistant's own generate() calls warn about their arguments each round
    try:
        t_assist, out_assist = _time(lambda: target.generate(ids, generation_config=greedy, assistant_model=draft),
                                     repeats)
    finally:
        hf_logging.set_verbosity(level)
    one_round = GenerationConfig(max_new_tokens=gamma, min_new_tokens=gamma, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
    t_round, _ = _time(lambda: draft.generate(ids, generation_config=one_round), repeats)  # one drafting call
    if not torch.equal(out, out_assist):  # greedy speculative decoding must not change a single token
        raise CohwError("assisted generation produced other tokens than greedy decoding of the target")
    alpha = acceptance_rate(target, draft, out[:, :-1])
    c = t_draft / t_target
    step = t_target / new_tokens
    return {"gamma": gamma, "alpha": alpha, "c": c, "predicted_speedup": expected_speedup(alpha, gamma, c),
            "draft_call_in_target_steps": t_round / step,
            "predicted_with_draft_call": expected_tokens(alpha, gamma) / (t_round / step + 1),
            "measured_speedup": t_target / t_assist, "target_s": t_target, "assisted_s": t_assist,
            "draft_layers": len(draft.model.layers), "target_layers": len(target.model.layers),
            "method": f"median of {repeats} greedy generate() calls of {new_tokens} tokens after a {prompt_len}-token "
                      "prompt, after one warm-up (time.perf_counter)"}
