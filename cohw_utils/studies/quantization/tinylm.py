"""A small Llama the book trains itself, on text this machine already has.

No model can be downloaded, so the quantization chapter needs a language model whose
accuracy it can measure: this module builds one from nothing but the Python interpreter.

* **Corpus** (:func:`load_corpus`): the top-level modules of the running interpreter's
  standard library, ``<stdlib>/*.py`` (``sysconfig.get_paths()['stdlib']``; no sub-packages,
  so no test suites or vendored code), source and docstrings, read as UTF-8 in sorted file-name
  order. File ``i`` (0-based, in that order) is **held out** when ``i % heldout_every ==
  heldout_every - 1`` (every 10th file by default); the others are the training split. The split
  is by file, so no held-out text is ever seen in training. The text depends on the Python
  version (3.11.7: 168 files, 4.7 MB); :meth:`Corpus.describe` prints the version, counts and a
  SHA-256 of each split.
* **Tokenizer** (:func:`train_tokenizer`): byte-level BPE trained with Hugging Face
  ``tokenizers`` on the training split only (GPT-2-style byte pre-tokenizer, so any text
  encodes), with one special token ``<|endoftext|>`` (id 0) between files.
* **Model** (:class:`TinyLMConfig`, :func:`make_model`): ``transformers.LlamaForCausalLM`` (the
  Llama-2 architecture: RMSNorm, rotary embeddings, SwiGLU MLP, untied embedding and head),
  a few million parameters, seeded initialisation.
* **Training** (:func:`train`): AdamW (fused CPU kernel), linear warm-up then cosine decay, random windows of the
  training tokens drawn by a seeded generator, under CPU bf16 autocast (fp32 master weights)
  where the CPU computes bf16 natively (:func:`cohw_utils.core.device.cpu_has_native_bf16`), in
  fp32 where it would emulate it (100x slower there): ``TrainLog``/the chapter say which. A fixed number of steps, not a time budget, so the result does not depend on the
  machine's speed. With the same seed, torch version and thread count the run is bitwise
  repeatable on a CPU; a different thread count changes reduction order and the last digits.
* **Perplexity** (:func:`perplexity`): ``exp`` of the mean next-token cross-entropy (natural
  log) over non-overlapping windows of the held-out tokens, every token after the first of a
  window being predicted from the ones before it in that window; fp32, no dropout. Two models
  are compared on the same windows (:func:`paired_change`, in percent, with a 95% interval from
  the per-window differences, and :func:`paired_verdict`).

Used by Chapter 4.2b (quantization): the model every method quantizes.
"""
from __future__ import annotations

import hashlib
import math
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from cohw_utils.core.device import cpu_has_native_bf16
from cohw_utils.core.errors import CohwError
from cohw_utils.spine.analyze import count_parameters

EOT = "<|endoftext|>"


# ------------------------------------------------------------------------------------ corpus
@dataclass(frozen=True)
class Corpus:
    """The two splits of the corpus, as lists of file texts, with their file names."""

    root: Path
    python: str
    train_files: tuple[str, ...]
    heldout_files: tuple[str, ...]
    train_texts: tuple[str, ...] = field(repr=False)
    heldout_texts: tuple[str, ...] = field(repr=False)

    def sha256(self, split: str) -> str:
        texts = self.train_texts if split == "train" else self.heldout_texts
        h = hashlib.sha256()
        for t in texts:
            h.update(t.encode("utf-8"))
            h.update(b"\0")
        return h.hexdigest()

    def describe(self) -> str:
        tr = sum(len(t) for t in self.train_texts)
        he = sum(len(t) for t in self.heldout_texts)
        return (f"Python {self.python} standard library, top-level modules {self.root}/*.py: "
                f"{len(self.train_files)} training files ({tr:,} characters, sha256 {self.sha256('train')[:12]}), "
                f"{len(self.heldout_files)} held-out files ({he:,} characters, sha256 {self.sha256('heldout')[:12]}); "
                f"held out: {', '.join(self.heldout_files[:6])}, ...")


def load_corpus(heldout_every: int = 10, root: str | Path | None = None, max_files: int | None = None) -> Corpus:
    """Read the corpus (see the module docstring). ``root`` defaults to this interpreter's
    stdlib; ``max_files`` keeps only the first files in sorted order (for quick tests)."""
    if heldout_every < 2:
        raise CohwError(f"heldout_every must be >= 2 (every n-th file held out), got {heldout_every}")
    base = Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in base.glob("*.py") if p.is_file())
    if max_files is not None:
        files = files[:max_files]
    if len(files) < heldout_every:
        raise CohwError(f"{base} has {len(files)} top-level .py files; need at least {heldout_every}")
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    held = [i % heldout_every == heldout_every - 1 for i in range(len(files))]
    pick = lambda keep, xs: tuple(x for x, h in zip(xs, held) if h == keep)  # noqa: E731
    names = [p.name for p in files]
    return Corpus(base, sys.version.split()[0], pick(False, names), pick(True, names),
                  pick(False, texts), pick(True, texts))


# ------------------------------------------------------------------------------------ tokenizer
def train_tokenizer(texts: tuple[str, ...] | list[str], vocab_size: int = 4096):
    """Byte-level BPE (``tokenizers``) trained on ``texts``; ``<|endoftext|>`` is id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 300:
        raise CohwError(f"vocab_size must be at least 300 (256 bytes + merges), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer)
    return tok


def encode_text(tok, texts) -> torch.Tensor:
    """All texts as one 1-D LongTensor of ids, each file followed by ``<|endoftext|>``."""
    eot = tok.token_to_id(EOT)
    ids: list[int] = []
    for enc in tok.encode_batch(list(texts)):
        ids.extend(enc.ids)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.long)


# ------------------------------------------------------------------------------------ model
@dataclass(frozen=True)
class TinyLMConfig:
    """Architecture and training knobs. Widths are multiples of 128 so that int4 groups of
    32/64/128 divide every row of every linear layer."""

    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    seq_len: int = 256
    batch: int = 8
    steps: int = 800
    lr: float = 3e-3
    warmup: int = 20
    weight_decay: float = 0.1
    bf16: bool = field(default_factory=cpu_has_native_bf16)  # autocast only where bf16 is native
    seed: int = 0

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "seq_len", "batch", "steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise CohwError(f"TinyLMConfig.{name} must be a positive integer, got {v!r}")
        if self.hidden_size % self.num_attention_heads:
            raise CohwError("hidden_size must be a multiple of num_attention_heads")
        if not 0 < self.lr < 1:
            raise CohwError(f"lr must be in (0, 1), got {self.lr}")

    def hf_config(self):
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                           intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
                           num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_attention_heads,
                           max_position_embeddings=max(1024, 2 * self.seq_len), tie_word_embeddings=False,
                           rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=0, pad_token_id=None)


def make_model(cfg: TinyLMConfig) -> nn.Module:
    """A freshly initialised ``LlamaForCausalLM`` (seeded by ``cfg.seed``), fp32, eager-free."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(cfg.hf_config()).float()


# ------------------------------------------------------------------------------------ training
@dataclass
class TrainLog:
    steps: int
    tokens: int
    seconds: float
    losses: list[float]
    threads: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def random_windows(ids: torch.Tensor, n: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(ids) - seq_len, (n,), generator=gen)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def train(model: nn.Module, ids: torch.Tensor, cfg: TinyLMConfig,
          log_every: int = 50, callback: Callable[[int, float], Any] | None = None) -> TrainLog:
    """Train ``model`` in place for ``cfg.steps`` steps of ``cfg.batch`` random windows of
    ``cfg.seq_len`` tokens from ``ids`` (see the module docstring)."""
    if len(ids) <= cfg.seq_len:
        raise CohwError(f"training split has {len(ids)} tokens, fewer than one window of {cfg.seq_len}")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95),
                            fused=True)  # one fused CPU kernel: ~4x cheaper than the per-tensor loop

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    model.train()
    losses = []
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x = random_windows(ids, cfg.batch, cfg.seq_len, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.detach().item())
        if callback is not None and (step % log_every == 0 or step == cfg.steps - 1):
            callback(step, losses[-1])
    model.eval()
    return TrainLog(cfg.steps, cfg.steps * cfg.batch * cfg.seq_len, time.perf_counter() - t0, losses,
                    torch.get_num_threads())


# ------------------------------------------------------------------------------------ evaluation
def eval_windows(ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows (n, seq_len) from the start of ``ids``."""
    n = len(ids) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise CohwError(f"{len(ids)} tokens make no window of {seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def window_nll(model: nn.Module, windows: torch.Tensor, batch: int = 8,
               cache_factory: Callable[[], Any] | None = None) -> torch.Tensor:
    """Mean next-token negative log-likelihood (nats) of each window: shape (n_windows,).
    ``cache_factory``, if given, makes a fresh KV cache per batch that the forward writes and
    reads back (e.g. an int8 cache), so attention sees keys and values as that cache stores them."""
    model.eval()
    out = []
    for i in range(0, len(windows), batch):
        x = windows[i:i + batch]
        kw = {"cache": cache_factory(), "use_cache": True} if cache_factory else {"use_cache": False}
        logits = model(input_ids=x, **kw).logits.float()
        lp = torch.log_softmax(logits[:, :-1], dim=-1)
        out.append(-lp.gather(-1, x[:, 1:, None])[..., 0].double().mean(dim=1))
    return torch.cat(out)


def perplexity(model: nn.Module, windows: torch.Tensor, batch: int = 8,
               cache_factory: Callable[[], Any] | None = None) -> float:
    """Perplexity of ``model`` on ``windows`` (see the module docstring): ``exp`` of the mean of
    :func:`window_nll` (every window predicts the same number of tokens)."""
    return math.exp(float(window_nll(model, windows, batch, cache_factory).mean()))


def paired_change(nll_ref: torch.Tensor, nll: torch.Tensor) -> tuple[float, float, float]:
    """Perplexity change of ``nll`` over ``nll_ref`` (per-window NLLs of two models on the same
    windows), in percent, with a 95% interval from the windows' paired differences:
    ``100 (exp(d) - 1)`` for ``d`` = mean difference and ``d -/+ 1.96 s.e.``. An interval that
    straddles 0 means the held-out set cannot tell the two models apart."""
    d = (nll - nll_ref).double()
    m = float(d.mean())
    se = float(d.std(unbiased=True)) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    pct = lambda v: 100 * (math.exp(v) - 1)  # noqa: E731
    return pct(m), pct(m - 1.96 * se), pct(m + 1.96 * se)


def paired_verdict(lo: float, hi: float) -> str:
    """The paired-verdict rule for a change's 95% interval ``[lo, hi]`` (from :func:`paired_change`;
    negative = lower perplexity): ``"better"`` when the whole interval is below 0, ``"worse"``
    when it is above 0, else ``"not resolved"`` (the held-out set cannot tell the two apart;
    also when the interval is NaN)."""
    return "better" if hi < 0 else "worse" if lo > 0 else "not resolved"


# ------------------------------------------------------------------------------------ decode timing
@torch.no_grad()
def decode_tokens_per_s(model: nn.Module, prompt: torch.Tensor, new_tokens: int = 32, repeats: int = 5,
                        warmup: int = 1, cache_factory: Callable[[], Any] | None = None):
    """Greedy decode speed: ``setup`` (untimed) runs the prompt (1, T) to fill a KV cache; the
    timed call generates ``new_tokens`` tokens one at a time, each step one forward of a single
    token against the cache. Returns (tokens/s from the median, the :class:`Timing`)."""
    from transformers import DynamicCache

    from cohw_utils.spine.measure import time_callable

    state: dict[str, Any] = {}

    def setup():
        cache = cache_factory() if cache_factory else DynamicCache()
        out = model(input_ids=prompt, cache=cache, use_cache=True, logits_to_keep=1)
        state["cache"], state["tok"] = cache, out.logits[:, -1:].argmax(-1)

    def step():
        tok, cache = state["tok"], state["cache"]
        for _ in range(new_tokens):
            out = model(input_ids=tok, cache=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
        state["tok"] = tok

    t = time_callable(step, repeats=repeats, warmup=warmup, setup=setup)
    return new_tokens / t.median, t


# ------------------------------------------------------------------------------------ the whole recipe
@dataclass
class TinyLM:
    """Everything the chapter needs: the trained model, tokenizer, corpus, token splits, log."""

    cfg: TinyLMConfig
    corpus: Corpus
    tokenizer: Any
    model: nn.Module
    train_ids: torch.Tensor
    heldout_ids: torch.Tensor
    log: TrainLog

    def n_params(self) -> int:
        return count_parameters(self.model)


def build_tiny_lm(cfg: TinyLMConfig | None = None, heldout_every: int = 10,
                  callback: Callable[[int, float], Any] | None = None, log_every: int = 50) -> TinyLM:
    """Corpus -> tokenizer (training split) -> token ids -> model -> training."""
    cfg = cfg or TinyLMConfig()
    corpus = load_corpus(heldout_every)
    tok = train_tokenizer(corpus.train_texts, cfg.vocab_size)
    if tok.get_vocab_size() != cfg.vocab_size:
        raise CohwError(f"the corpus gave a BPE vocabulary of {tok.get_vocab_size()}, not {cfg.vocab_size}; "
                        "lower vocab_size")
    train_ids = encode_text(tok, corpus.train_texts)
    heldout_ids = encode_text(tok, corpus.heldout_texts)
    model = make_model(cfg)
    log = train(model, train_ids, cfg, log_every=log_every, callback=callback)
    return TinyLM(cfg, corpus, tok, model, train_ids, heldout_ids, log)


def config_dict(cfg: TinyLMConfig) -> dict[str, Any]:
    return asdict(cfg)


def fig_loss(log: TrainLog, heldout_ppl: float | None = None):
    """Training loss per step (and its running mean), with the final held-out loss as a line."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 3.2))
    ax = fig.add_subplot()
    ax.plot(log.losses, lw=0.8, alpha=0.5, label="training batch loss")
    k = max(1, len(log.losses) // 20)
    run = [sum(log.losses[max(0, i - k + 1):i + 1]) / len(log.losses[max(0, i - k + 1):i + 1]) for i in range(len(log.losses))]
    ax.plot(run, lw=1.5, label=f"running mean ({k} steps)")
    if heldout_ppl is not None:
        ax.axhline(math.log(heldout_ppl), color="k", ls="--", lw=1, label=f"held-out loss (ppl {heldout_ppl:.1f})")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
