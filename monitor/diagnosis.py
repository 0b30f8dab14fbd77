"""Diagnosis rules for the training-health report: metric series in, findings in words out.

Each rule applies one healthy/anomaly rule of the indicator table (seed 002,
"LLM Training Health Monitoring Indicators") or the GSS manual (seed 000) to
the series logged in metrics.jsonl. Rules are pure functions of numpy arrays
(steps, values) with their thresholds named as module constants, so the
report, the tests and a reader can check them against the documents.

A rule returns a list of Finding (empty: healthy). diagnose() maps the run's
series onto the rules and returns, per rule, its findings or None when the
metric it needs was not logged (metric off).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

# ---------------------------------------------------------------- thresholds

UPDATE_RATIO_HIGH = 1e-2  # seed 002: > 1e-2 suggests an excessive learning rate
UPDATE_RATIO_LOW = 1e-4  # seed 002: < 1e-4 suggests optimisation stagnation
GSS_PERSISTENT = 2.0  # seed 002: GSS > 2 indicates momentum contamination
GSS_PERSISTENT_POINTS = 5  # ... when it holds for this many consecutive logged points
GSS_SPIKE = 10.0  # seed 000: a transient GSS >> 10 (the spike threshold tau) is a data outlier
GRAD_NORM_VANISHING = 1e-6  # a global gradient norm below this is "near zero"
GRAD_NORM_VANISHING_DROP = 1e-3  # ... as is one that fell below this fraction of its early level
GRAD_NORM_SPIKE_FACTOR = 10.0  # a sudden spike: this many times the median of the recent points
GRAD_NORM_SPIKE_WINDOW = 10  # recent points the spike baseline is the median of
GRAD_NORM_SPIKE_HISTORY = 3  # points needed before the first one can be called a spike
ATTN_ENTROPY_MIN_DECREASE = 0.05  # healthy heads lose at least 5% of their entropy over a run
ATTN_ENTROPY_COLLAPSE = 0.05  # nats: attention on essentially one token
ATTN_ENTROPY_MIN_POINTS = 3  # points needed to call a trend
SINGULAR_ENTROPY_SHARP_DROP = 0.10  # relative drop between two logged points that counts as sharp
SPECTRAL_RADIUS_GROWTH = 10.0  # sigma_max grown this many times since the first point
ALPHA_UNDERTRAINED = 6.0  # HT-SR: alpha above ~6 marks an under-trained layer
LOSS_DISPERSION_MAX = 0.0  # seed 002: any loss dispersion across workers > 0 is an anomaly
# mean pairwise cosine of the workers' gradients of the SAME probe batch: exactly 1 while the
# replicas agree (identical sketches); anything measurably below means they have diverged
DIRECTION_CONSISTENCY_LOW = 0.999
COLLAPSE_RELATIVE_HIGH = 0.05  # losses 5% above their own power-law trend
CODEC_NEAR_ZERO = 0.01  # nats/token: in-context examples no longer help
ZLIB_MEMORISATION_FRACTION = 0.5  # a probe sequence at half the mean ratio is a memorisation candidate
LOSS_DIVERGENCE_FACTOR = 1.5  # recent loss this many times above the best loss so far

# Element-wise GSS |g| / sqrt(v_hat) per parameter class (monitor/param_classes.py), logged as
# gss_elem/<class>/max and gss_elem/<class>/p999. Healthy ranges, measured on a healthy
# gpt2-tiny-shaped run (2 layers x 32, GPT-2 BPE, AdamWSpam beta2 0.99, steps 15-150):
# - dense classes (attention, mlp, head when untied, other): every element has a gradient on every
#   step, so v tracks g^2 and the ratio behaves like |z| of gradient noise: max 1.5-5.5, p99.9 1.3-4.7.
#   A maximum above ELEM_GSS_DENSE_MAX is an element-wise spike in that class.
# - embedding (GPT-2: the token embedding, which is also the tied output head): rows of tokens not
#   seen for many steps have v ~ 0, so their first gradient gives |g| / eps: max 4e2-1.3e3 on EVERY
#   step (1e3-1e5 on larger vocabularies and runs). That is the rare-token effect, not a spike: judge
#   the embedding by its p99.9 (5-135 in the same run), anomalous above ELEM_GSS_EMBEDDING_P999.
ELEM_GSS_DENSE_MAX = 50.0
ELEM_GSS_EMBEDDING_P999 = 1000.0
DENSE_CLASSES = ("attention", "mlp", "head", "other")

# Parameters of embeddings and output heads (seed 000: layer-specific GSS there = sparse features)
EMBEDDING_OR_HEAD = re.compile(r"(^|\.)(wte|wpe|embed\w*|lm_head|head|fc)\.")


@dataclass(frozen=True)
class Finding:
    rule: str
    severity: str  # "warning" (an anomaly) or "note" (worth knowing, not necessarily wrong)
    message: str


# ------------------------------------------------------------------ helpers


def _finite(steps, values):
    steps, values = np.asarray(steps), np.asarray(values, dtype=float)
    keep = np.isfinite(values)
    return steps[keep], values[keep]


def _late(values):
    """The second half of a series (at least its last point): the regime after warmup."""
    return values[len(values) // 2:]


def _g(x):
    return f"{x:.3g}"


def _names(names, limit=4):
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _valued(named: dict, reverse=False, limit=4):
    """{name: value} -> "a (0.05), b (0.02)", the most extreme first."""
    ordered = sorted(named.items(), key=lambda kv: kv[1], reverse=reverse)
    return _names([f"{name} {_g(value)}" for name, value in ordered], limit)


def _runs_above(values, threshold):
    """(start, end) index ranges [start, end) of consecutive values above threshold."""
    runs, start = [], None
    for i, above in enumerate(np.asarray(values) > threshold):
        if above and start is None:
            start = i
        elif not above and start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(values)))
    return runs


# -------------------------------------------------------------------- rules


def update_ratio_rule(ratios: dict) -> list[Finding]:
    """ratios: {matrix name: values}. Judged on each matrix's median after warmup."""
    high, low = {}, {}
    for name, values in ratios.items():
        _, v = _finite(np.arange(len(values)), values)
        if len(v) == 0:
            continue
        level = float(np.median(_late(v)))
        if level > UPDATE_RATIO_HIGH:
            high[name] = level
        elif level < UPDATE_RATIO_LOW:
            low[name] = level
    out = []
    if high:
        out.append(Finding("update_ratio", "warning",
                           f"update/weight ratio above {_g(UPDATE_RATIO_HIGH)} in {len(high)} weight matrices "
                           f"({_valued(high, reverse=True)}): learning rate too high (unstable); lower LR or "
                           "lengthen the warmup"))
    if low:
        out.append(Finding("update_ratio", "warning",
                           f"update/weight ratio below {_g(UPDATE_RATIO_LOW)} in {len(low)} weight matrices "
                           f"({_valued(low)}): optimisation stagnating; the learning rate may be too low for them"))
    return out


def persistent_gss_rule(steps, gss) -> list[Finding]:
    """GSS above GSS_PERSISTENT for GSS_PERSISTENT_POINTS consecutive logged points."""
    steps, gss = _finite(steps, gss)
    runs = [(a, b) for a, b in _runs_above(gss, GSS_PERSISTENT) if b - a >= GSS_PERSISTENT_POINTS]
    if not runs:
        return []
    a, b = max(runs, key=lambda r: r[1] - r[0])
    return [Finding("gss_persistent", "warning",
                    f"GSS stayed above {_g(GSS_PERSISTENT)} for {b - a} consecutive logged points "
                    f"(steps {steps[a]}-{steps[b - 1]}, peak {_g(gss[a:b].max())}): momentum pollution, "
                    "the optimizer keeps chasing a bad direction; consider a momentum reset "
                    "(SPAM_PERIODIC_RESET) or the spike guard's rollback (MONITOR_SPIKE_GUARD)")]


def transient_gss_rule(steps, gss, spike_events=()) -> list[Finding]:
    """Isolated logged GSS points above GSS_SPIKE (not part of a persistent stretch), and the
    spike guard's events (spikes.jsonl records with event "spike")."""
    steps, gss = _finite(steps, gss)
    persistent = [(a, b) for a, b in _runs_above(gss, GSS_PERSISTENT) if b - a >= GSS_PERSISTENT_POINTS]
    in_persistent = np.zeros(len(gss), dtype=bool)
    for a, b in persistent:
        in_persistent[a:b] = True
    spikes = [(int(s), float(g)) for s, g, p in zip(steps, gss, in_persistent) if g > GSS_SPIKE and not p]
    events = [e for e in spike_events if e.get("event", "spike") == "spike"]
    for e in events:
        g = e.get("max_gss", e.get("gss"))
        spikes.append((int(e["step"]), float(g) if g is not None else float("nan")))
    if not spikes:
        return []
    steps_hit = sorted({s for s, _ in spikes})
    peak_step, peak = max(spikes, key=lambda x: x[1] if np.isfinite(x[1]) else -np.inf)
    where = f"step{'s' if len(steps_hit) > 1 else ''} {_names(map(str, steps_hit), 6)}"
    size = f"; largest GSS {_g(peak)} at step {peak_step}" if np.isfinite(peak) else ""
    return [Finding("gss_transient", "warning",
                    f"{len(steps_hit)} transient gradient spike(s) with GSS > {_g(GSS_SPIKE)} ({where}{size}): "
                    "data outlier (corrupted or unusual batch) or numerical overflow; the batches are in "
                    "spikes.jsonl and `make data-filter RUN=<run>` writes the corpus without their documents")]


def layer_specific_gss_rule(per_param: dict) -> list[Finding]:
    """per_param: {parameter name: GSS values}. Spikes only in embeddings / output head."""
    spiking = [name for name, values in per_param.items()
               if np.any(np.asarray(values, dtype=float) > GSS_SPIKE)]
    if not spiking or not all(EMBEDDING_OR_HEAD.search(name) for name in spiking):
        return []
    return [Finding("gss_layer_specific", "note",
                    f"GSS spikes only in embedding/output-head parameters ({_names(spiking)}): sparse features "
                    "(rare tokens after long gaps); element-wise clipping suits them better than global clipping")]


def vanishing_gradient_rule(steps, grad_norm) -> list[Finding]:
    steps, g = _finite(steps, grad_norm)
    if len(g) == 0:
        return []
    late = float(np.median(_late(g)))
    early = float(np.median(g[:max(1, len(g) // 4)]))
    if late < GRAD_NORM_VANISHING or (len(g) >= 4 and late < GRAD_NORM_VANISHING_DROP * early):
        return [Finding("grad_vanishing", "warning",
                        f"global gradient norm near zero ({_g(late)} after warmup, {_g(early)} early): vanishing "
                        "gradients; check the initialisation, normalisation layers and the loss")]
    return []


def grad_norm_spike_rule(steps, grad_norm) -> list[Finding]:
    """Points above GRAD_NORM_SPIKE_FACTOR times the median of the preceding window."""
    steps, g = _finite(steps, grad_norm)
    hits = []
    for i in range(GRAD_NORM_SPIKE_HISTORY, len(g)):
        base = np.median(g[max(0, i - GRAD_NORM_SPIKE_WINDOW):i])
        if base > 0 and g[i] > GRAD_NORM_SPIKE_FACTOR * base:
            hits.append((int(steps[i]), float(g[i] / base)))
    if not hits:
        return []
    step, factor = max(hits, key=lambda h: h[1])
    return [Finding("grad_norm_spike", "warning",
                    f"{len(hits)} sudden gradient-norm spike(s) above {_g(GRAD_NORM_SPIKE_FACTOR)}x the recent "
                    f"median (worst {_g(factor)}x at step {step}): bad data or numerical overflow")]


def attention_entropy_rule(per_layer: dict, per_head: dict | None = None) -> list[Finding]:
    """per_layer: {"L0": values (mean over heads)}; per_head: {"L0.H1": values}.
    Not decreasing = the late median kept more than (1 - ATTN_ENTROPY_MIN_DECREASE) of the
    first value; collapsed = latest value below ATTN_ENTROPY_COLLAPSE nats."""
    stuck, collapsed = [], []
    for name, values in per_layer.items():
        _, v = _finite(np.arange(len(values)), values)
        if len(v) >= ATTN_ENTROPY_MIN_POINTS and np.median(_late(v)) > (1 - ATTN_ENTROPY_MIN_DECREASE) * v[0]:
            stuck.append(f"{name} ({_g(v[0])} -> {_g(v[-1])})")
    for name, values in {**per_layer, **(per_head or {})}.items():
        _, v = _finite(np.arange(len(values)), values)
        if len(v) and v[-1] < ATTN_ENTROPY_COLLAPSE:
            collapsed.append(name)
    out = []
    if stuck:
        out.append(Finding("attention_entropy", "warning",
                           f"attention entropy not decreasing in {len(stuck)} layer(s) ({_names(stuck)} nats): "
                           "the heads are not learning to focus (failure to capture structure), or the run "
                           "is still too short to tell"))
    if collapsed:
        out.append(Finding("attention_entropy", "warning",
                           f"attention entropy collapsed below {_g(ATTN_ENTROPY_COLLAPSE)} nats in "
                           f"{_names(collapsed)}: heads attend to a single token; possible overfitting"))
    return out


def rank_collapse_rule(per_matrix: dict) -> list[Finding]:
    """per_matrix: {name: singular entropy values}; a sharp relative drop between two points."""
    hit = {}
    for name, values in per_matrix.items():
        _, v = _finite(np.arange(len(values)), values)
        if len(v) < 2:
            continue
        drops = (v[:-1] - v[1:]) / np.maximum(np.abs(v[:-1]), 1e-12)
        if drops.max() > SINGULAR_ENTROPY_SHARP_DROP:
            hit[name] = float(drops.max())
    if not hit:
        return []
    drops = {name: f"-{drop:.0%}" for name, drop in sorted(hit.items(), key=lambda kv: -kv[1])}
    return [Finding("rank_collapse", "warning",
                    f"singular entropy fell sharply (more than {SINGULAR_ENTROPY_SHARP_DROP:.0%} between two "
                    f"logged points) in {_names(f'{k} {v}' for k, v in drops.items())}: spectral saturation / "
                    "rank collapse, limiting the layer's capacity")]


def spectral_radius_rule(per_matrix: dict) -> list[Finding]:
    hit = {}
    for name, values in per_matrix.items():
        _, v = _finite(np.arange(len(values)), values)
        if len(v) >= 2 and v[0] > 0 and v[-1] / v[0] > SPECTRAL_RADIUS_GROWTH:
            hit[name] = float(v[-1] / v[0])
    if not hit:
        return []
    return [Finding("spectral_radius", "warning",
                    f"spectral radius grew more than {_g(SPECTRAL_RADIUS_GROWTH)}x in "
                    f"{_valued(hit, reverse=True)} (growth factor): risk of "
                    "activation explosion; check the initialisation and per-layer learning-rate scaling (muP)")]


def alpha_rule(per_matrix: dict) -> list[Finding]:
    """Heavy-tail exponent alpha of the latest point above ALPHA_UNDERTRAINED."""
    hit = []
    for name, values in per_matrix.items():
        _, v = _finite(np.arange(len(values)), values)
        if len(v) and v[-1] > ALPHA_UNDERTRAINED:
            hit.append(name)
    if not hit:
        return []
    return [Finding("alpha", "note",
                    f"heavy-tail alpha above {_g(ALPHA_UNDERTRAINED)} in {len(hit)} weight matrices "
                    f"({_names(hit)}): weakly correlated, under-trained layers (expected early in training)")]


def loss_dispersion_rule(steps, loss_std) -> list[Finding]:
    steps, v = _finite(steps, loss_std)
    if len(v) == 0 or v.max() <= LOSS_DISPERSION_MAX:
        return []
    return [Finding("loss_dispersion", "warning",
                    f"loss dispersion across workers above {_g(LOSS_DISPERSION_MAX)} (up to {_g(v.max())} at step "
                    f"{steps[int(v.argmax())]}): silent inconsistency: every process evaluated the same probe "
                    "batch, so their model states have diverged")]


def direction_consistency_rule(steps, cosine) -> list[Finding]:
    _, v = _finite(steps, cosine)
    if len(v) == 0:
        return []
    level = float(np.median(_late(v)))
    if level >= DIRECTION_CONSISTENCY_LOW:
        return []
    return [Finding("direction_consistency", "warning",
                    f"gradient direction consistency across workers low (cosine {_g(level)} < "
                    f"{_g(DIRECTION_CONSISTENCY_LOW)} on the same probe batch): the replicas' weights differ: "
                    "unsynchronised seeds, a missed broadcast or a communication fault")]


def elementwise_gss_rule(per_class: dict) -> list[Finding]:
    """per_class: {"<class>/max" or "<class>/p999": values}. Dense classes by their maximum, the
    embedding by its p99.9 (its maximum is the rare-token effect in every healthy run)."""
    out = []
    for cls in DENSE_CLASSES:
        v = np.asarray(per_class.get(f"{cls}/max", []), dtype=float)
        v = v[np.isfinite(v)]
        if len(v) and v.max() > ELEM_GSS_DENSE_MAX:
            out.append(Finding("elementwise_gss", "warning",
                               f"element-wise GSS in {cls} parameters up to {_g(v.max())} (healthy: a few units, "
                               f"alarm above {_g(ELEM_GSS_DENSE_MAX)}): single gradient elements far above their "
                               "running RMS, a localized spike that global-norm clipping barely sees"))
    v = np.asarray(per_class.get("embedding/p999", []), dtype=float)
    v = v[np.isfinite(v)]
    if len(v) and v.max() > ELEM_GSS_EMBEDDING_P999:
        out.append(Finding("elementwise_gss", "warning",
                           f"embedding element-wise GSS p99.9 up to {_g(v.max())} (healthy: tens; alarm above "
                           f"{_g(ELEM_GSS_EMBEDDING_P999)}): more than 1 element in 1000 far above its running RMS, "
                           "beyond the rare-token effect that sets the embedding's maximum"))
    return out


def collapse_residual_rule(steps, relative) -> list[Finding]:
    _, v = _finite(steps, relative)
    if len(v) == 0:
        return []
    level = float(np.median(_late(v)))
    if level <= COLLAPSE_RELATIVE_HIGH:
        return []
    return [Finding("collapse_residual", "warning",
                    f"loss {level:.1%} above its own power-law trend (collapse residual > "
                    f"{COLLAPSE_RELATIVE_HIGH:.0%}): early warning of poor data quality or a sub-optimal "
                    "hyperparameter, even while the loss still falls")]


def codec_rule(steps, score) -> list[Finding]:
    _, v = _finite(steps, score)
    if len(v) == 0:
        return []
    level = float(np.median(_late(v)))
    if level >= CODEC_NEAR_ZERO:
        return []
    return [Finding("codec", "warning",
                    f"CoDeC score {_g(level)} nats/token (< {_g(CODEC_NEAR_ZERO)}): in-context examples no longer "
                    "lower the loss, possible contamination/memorisation of the probe text (or a model still too "
                    "young for in-context learning)")]


def zlib_rule(ratio_mean, ratio_min) -> list[Finding]:
    _, mean = _finite(np.arange(len(ratio_mean)), ratio_mean)
    _, low = _finite(np.arange(len(ratio_min)), ratio_min)
    if len(mean) == 0 or len(low) == 0 or not low[-1] < ZLIB_MEMORISATION_FRACTION * mean[-1]:
        return []
    return [Finding("zlib", "note",
                    f"a probe sequence's perplexity/zlib ratio ({_g(low[-1])}) is below "
                    f"{ZLIB_MEMORISATION_FRACTION:.0%} of the mean ({_g(mean[-1])}): mechanical memorisation "
                    "candidate")]


def loss_divergence_rule(steps, loss) -> list[Finding]:
    steps, v = _finite(steps, loss)
    if len(v) < 4:
        return []
    level = float(np.median(v[-max(1, len(v) // 4):]))
    best = float(v.min())
    if not level > LOSS_DIVERGENCE_FACTOR * best:
        return []
    return [Finding("loss_divergence", "warning",
                    f"training loss diverging: recent {_g(level)} vs best {_g(best)} "
                    f"(> {_g(LOSS_DIVERGENCE_FACTOR)}x): learning rate too high or momentum polluted by spikes")]


def nonfinite_rule(nonfinite_total) -> list[Finding]:
    _, v = _finite(np.arange(len(nonfinite_total)), nonfinite_total)
    if len(v) == 0 or v.max() <= 0:
        return []
    return [Finding("nonfinite", "warning",
                    f"{int(v.max())} step(s) had non-finite loss or gradients and were skipped: numerical "
                    "overflow (fp16 LayerNorm, too high a learning rate) or corrupted data")]


def rollback_rule(spike_events) -> list[Finding]:
    rollbacks = [e for e in spike_events if e.get("event") == "rollback"]
    if not rollbacks:
        return []
    where = _names([f"{e['step']}->{e.get('to_step', '?')}" for e in rollbacks], 6)
    return [Finding("rollback", "note",
                    f"{len(rollbacks)} rollback(s) after spike clusters (steps {where}): weights restored from the "
                    "last checkpoint, momentum reset and the learning rate re-warmed (seed 000, section 4.1)")]


# ------------------------------------------------------------------ mapping


def _family(series: dict, prefix: str, exclude=()) -> dict:
    """{suffix: values} of the series named prefix/<suffix>, minus the excluded suffixes."""
    return {k[len(prefix) + 1:]: v for k, (_, v) in series.items()
            if k.startswith(prefix + "/") and k[len(prefix) + 1:] not in exclude}


def _first(series: dict, *keys):
    for k in keys:
        if k in series:
            return series[k]
    return None


GSS_SUMMARIES = ("global", "max", "elementwise_max")

# rule name -> (what it checks, in words; the metric it needs)
RULES = {
    "loss_divergence": ("training loss diverging", "loss"),
    "nonfinite": ("non-finite steps", "nonfinite_total"),
    "grad_vanishing": ("vanishing gradients", "grad_norm"),
    "grad_norm_spike": ("sudden gradient-norm spikes", "grad_norm"),
    "gss_persistent": ("persistent high GSS (momentum pollution)", "gss/global"),
    "gss_transient": ("transient GSS spikes (data outliers)", "gss/max or spikes.jsonl"),
    "gss_layer_specific": ("GSS spikes only in embeddings/head", "gss/<param>"),
    "elementwise_gss": ("element-wise GSS per class out of its healthy range", "gss_elem/<class>/max|p999"),
    "update_ratio": ("update/weight ratio out of [1e-4, 1e-2]", "update_ratio/<param>"),
    "attention_entropy": ("attention entropy not decreasing / collapsed", "attn_entropy/L<i>"),
    "rank_collapse": ("singular entropy sharp decline (rank collapse)", "singular_entropy/<param>"),
    "spectral_radius": ("spectral radius growth", "spectral_radius/<param>"),
    "alpha": ("under-trained layers (heavy-tail alpha)", "alpha/<param>"),
    "loss_dispersion": ("loss dispersion across workers", "ddp/loss_std"),
    "direction_consistency": ("gradient direction consistency across workers", "ddp/grad_cosine"),
    "collapse_residual": ("loss above its power-law trend", "collapse/relative"),
    "codec": ("CoDeC near zero (contamination)", "codec/score"),
    "zlib": ("zlib/perplexity memorisation candidates", "zlib/ratio_min"),
    "rollback": ("spike-cluster rollbacks", "spikes.jsonl"),
}


def diagnose(series: dict, spike_events: list | None = None) -> dict:
    """series: {metric name: (steps, values)} as in metrics.jsonl; spike_events: the records of
    spikes.jsonl (None: no file). Returns {rule name: list of Finding, or None when the rule's
    metric was not logged}, in RULES order."""
    events = list(spike_events or [])
    out = {}

    def run(rule, arrays, fn):
        out[rule] = fn(*arrays) if arrays is not None else None

    def pair(*keys):  # (steps, values) of the first of these series that was logged
        return _first(series, *keys)

    run("loss_divergence", pair("loss"), loss_divergence_rule)
    nonfinite = pair("nonfinite_total")
    run("nonfinite", (nonfinite[1],) if nonfinite is not None else None, nonfinite_rule)
    grad_norm = pair("grad_norm/global", "grad_norm")
    run("grad_vanishing", grad_norm, vanishing_gradient_rule)
    run("grad_norm_spike", grad_norm, grad_norm_spike_rule)
    run("gss_persistent", pair("gss/global", "gss/max"), persistent_gss_rule)
    gss_max = pair("gss/max", "gss/global")
    if gss_max is not None or spike_events is not None:
        gss_steps, gss_values = gss_max if gss_max is not None else (np.zeros(0), np.zeros(0))
        out["gss_transient"] = transient_gss_rule(gss_steps, gss_values, events)
    else:
        out["gss_transient"] = None
    per_param_gss = _family(series, "gss", GSS_SUMMARIES)
    run("gss_layer_specific", (per_param_gss,) if per_param_gss else None, layer_specific_gss_rule)
    per_class = _family(series, "gss_elem")
    run("elementwise_gss", (per_class,) if per_class else None, elementwise_gss_rule)
    ratios = _family(series, "update_ratio", ("global",))
    run("update_ratio", (ratios,) if ratios else None, update_ratio_rule)
    layers = {k: v for k, v in _family(series, "attn_entropy").items() if ".H" not in k}
    heads = {k: v for k, v in _family(series, "attn_entropy").items() if ".H" in k}
    run("attention_entropy", (layers, heads) if layers or heads else None, attention_entropy_rule)
    for rule, prefix, fn in (("rank_collapse", "singular_entropy", rank_collapse_rule),
                             ("spectral_radius", "spectral_radius", spectral_radius_rule),
                             ("alpha", "alpha", alpha_rule)):
        family = _family(series, prefix)
        run(rule, (family,) if family else None, fn)
    run("loss_dispersion", pair("ddp/loss_std"), loss_dispersion_rule)
    run("direction_consistency", pair("ddp/grad_cosine"), direction_consistency_rule)
    run("collapse_residual", pair("collapse/relative"), collapse_residual_rule)
    run("codec", pair("codec/score"), codec_rule)
    zlib = (series["zlib/ratio_mean"][1], series["zlib/ratio_min"][1]) \
        if "zlib/ratio_mean" in series and "zlib/ratio_min" in series else None
    run("zlib", zlib, zlib_rule)
    out["rollback"] = rollback_rule(events) if spike_events is not None else None
    return {rule: out[rule] for rule in RULES}
