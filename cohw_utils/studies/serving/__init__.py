"""Chapter 4.2's serving section: the continuous-batching simulator of
:mod:`cohw_utils.views.serving` checked against a real engine on this machine
(:mod:`.engine`: transformers' continuous batching serving a small Llama under a Poisson load)."""
