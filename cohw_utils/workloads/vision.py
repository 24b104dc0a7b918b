"""Vision classifiers: ViT-B/16 (google/vit-base-patch16-224) and ResNet-50 (microsoft/resnet-50),
transformers' ``AutoModelForImageClassification`` from their published configs, one ``forward``
phase.

``vit-b-16`` and ``resnet-50`` are the vision proxies of Chapters 1-4 (proxy set, architecture,
enabling, roofline, energy).
"""
from __future__ import annotations

from cohw_utils.core.errors import CohwError
from cohw_utils.workloads.base import Built, Phase
from cohw_utils.workloads.helpers import CONFIG_DIR, _construct, _generator, _no_grad, _randn
from cohw_utils.workloads.hf_config import load_hf_config


_TINY_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 image_size=32, patch_size=8, num_labels=10)
_TINY_RESNET = dict(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_labels=10)


def _build_vision(wl, scale, device, dtype, batch, seq_len, *, config_name, tiny, image_size=None, seed=0):
    """Image classifier from its published config: ``ViTForImageClassification``
    (google/vit-base-patch16-224) or ``ResNetForImageClassification`` (microsoft/resnet-50);
    root module = the classifier. Tiny: 2 narrow layers (ViT, 32x32 input) or one bottleneck per
    stage with 16..128 channels (ResNet, 64x64 input), 10 classes.

    Phase ``forward``: ``pixel_values`` (batch, 3, H, W), H = W = the config's image_size (224 at
    full scale) or the ``image_size`` option (for ViT this resizes the position embeddings, as a
    ViT fine-tuned at that resolution has); under no_grad; units: batch images.
    """
    from transformers import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING, AutoModelForImageClassification

    config = load_hf_config(CONFIG_DIR / config_name / "config.json")
    MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING[type(config)]  # import outside the device context
    if scale == "tiny":
        for k, v in tiny.items():
            setattr(config, k, v)  # num_labels' setter also rebuilds id2label
    default_size = getattr(config, "image_size", None) or (64 if scale == "tiny" else 224)
    image_size = image_size or default_size
    patch = getattr(config, "patch_size", 1)
    if not isinstance(image_size, int) or image_size < 32 or image_size % patch:
        raise CohwError(f"image_size must be an integer >= 32 and a multiple of the patch size {patch}, got {image_size!r}")
    if getattr(config, "image_size", None) is not None:
        config.image_size = image_size  # ViT: position embeddings for this resolution (as ViT-B/16@384 has)
    model = _construct(device, seed, lambda: AutoModelForImageClassification.from_config(config))
    model = model.to(dtype).eval()
    channels = config.num_channels

    def inputs():
        gen = _generator(device, seed + 1)
        return (), {"pixel_values": _randn((batch, channels, image_size, image_size), device, dtype, gen)}

    def run(pixel_values):
        return model(pixel_values=pixel_values).logits

    phases = {"forward": Phase("forward", inputs, _no_grad(run), batch, "image",
                               description=f"classify {batch} image(s) of {image_size}x{image_size}")}
    return Built(wl, scale, device, dtype, model, config, phases)
