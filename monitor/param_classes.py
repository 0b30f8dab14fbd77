"""Parameter classes for per-class statistics: embedding, attention, MLP, head, other.

Why classes: the element-wise Gradient Spike Score |g| / sqrt(v) has a
different healthy range per class. Dense matrices (attention, MLP, an untied
head) get a gradient on every element at every step, so v tracks g^2 and the
ratio behaves like |z| of a noise variable (p99.9 a few units, max tens).
Embedding rows get a gradient only when their token is in the batch; the v of
a token not seen for many steps has decayed to about 0, and its first
gradient gives |g| / eps: 1e3 to 1e5 in a healthy run (the rare-token
effect).

GPT-2 ties the output head to the token embedding: one tensor
(transformer.wte.weight = lm_head.weight) with one gradient, the sum of its
input-embedding and output-head contributions, and one v. It is listed once
by named_parameters() and classed as "embedding"; "head" then holds nothing
for GPT-2 and is the classifier (ResNet's fc) for image models.
"""

import torch.nn as nn

CLASSES = ("embedding", "attention", "mlp", "head", "other")
HEAD_MODULES = ("lm_head", "head", "fc", "classifier")  # names of output-layer modules


def parameter_classes(model: nn.Module) -> dict:
    """{parameter name (as named_parameters() lists it): class}."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    out = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        if id(p) in embeddings:
            out[name] = "embedding"
        elif any("attn" in part or "attention" in part for part in parts[:-1]):
            out[name] = "attention"
        elif any("mlp" in part for part in parts[:-1]):
            out[name] = "mlp"
        elif len(parts) >= 2 and parts[-2] in HEAD_MODULES:
            out[name] = "head"
        else:
            out[name] = "other"
    return out
