#!/usr/bin/env python3
"""Reference for pali's optimizer chain: big_vision's `optax.make` built from optax itself.

    python3 -m venv /tmp/pyref && /tmp/pyref/bin/pip install optax==0.2.8 jax==0.10.2 numpy
    /tmp/pyref/bin/python scripts/optim_reference.py > tests/fixtures/optim/reference.json

`chain` below is big_vision/optax.py `make` with its config spelled out (read 2026-12 from
google-research/big_vision): global-norm clip and Adam masked to the trainable parameters,
`scale(lr)`, `add_decayed_weights(wd, mask)`, one `scale_by_schedule` per group whose schedule
is big_vision's `create_learning_rate_schedule(base=mult, ...)` (so a group's `mult` scales its
weight decay too), `set_to_zero` on frozen parameters, `scale(-1)`. Computed in float64.

Two scenarios, both over the same parameters and gradients:
- "optax": the chain itself, several steps, three groups (one frozen), weight decay on the
  kernels only, clipping active on some steps;
- "restart": the same, but after step 3 one parameter's Adam moments are dropped (pali does this
  when a position embedding is resampled or a part is reset). optax keeps one step count for the
  whole tree, so this scenario uses `adam_numpy`, a transcription of the chain checked here
  against optax on the first scenario to 1e-12: the dropped parameter restarts as a fresh optax
  Adam would, with its own count (bias correction) starting again at 1.
"""
import json
import re

import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

rng = np.random.default_rng(20261202)

SHAPES = {
    "img.kernel": (4, 3),
    "img.scale": (3,),
    "head.kernel": (3, 2),
    "llm.kernel": (2, 5),
    "llm.scale": (5,),
    "frozen.kernel": (2, 2),
}
LR, B1, B2, EPS, WD, CLIP = 0.01, 0.9, 0.95, 1e-6, 0.1, 0.5
WD_PARAMS = r".*\.kernel"
STEPS = 6
TOTAL = 6
# (regex, schedule) in big_vision's form; None freezes.
GROUPS = [
    (r"img\..*", dict(decay_type="cosine", warmup_steps=2, mult=0.5)),
    (r"(head|llm)\..*", dict(decay_type="rsqrt", warmup_steps=1, timescale=3)),
    (r"frozen\..*", None),
]
RESTART_AFTER, RESTART_PARAM = 3, "img.kernel"


def create_learning_rate_schedule(total_steps, base=1.0, decay_type="stair", **kw):
    """big_vision/utils.py `create_learning_rate_schedule`, the decay types pali has."""
    warmup_steps = kw.get("warmup_steps", 0)
    cooldown_steps = kw.get("cooldown_steps", 0)

    def step_fn(step):
        # optax's count is int32, and JAX divides it in float32 even with x64: in float64 here,
        # so the reference is exact (big_vision itself runs in float32 throughout).
        step = jnp.asarray(step, jnp.float64)
        lr = base
        progress = jnp.clip((step - warmup_steps) / float(total_steps - warmup_steps), 0.0, 1.0)
        if decay_type == "linear":
            lr = lr * (1.0 - progress)
        elif decay_type == "cosine":
            lr = lr * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        elif decay_type == "rsqrt":
            t = kw.get("timescale", 10_000)
            lr = jnp.where(warmup_steps <= step, lr / jnp.sqrt(1 + (step - warmup_steps) / t), lr)
        if warmup_steps:
            lr = lr * jnp.minimum(1.0, step / warmup_steps)
        if cooldown_steps:
            lr = lr * jnp.minimum(1.0, (total_steps - step) / cooldown_steps)
        return jnp.asarray(lr, dtype=jnp.float64)

    return step_fn


def group_of(name):
    """big_vision's `make_mask_trees`: the first pattern that fully matches."""
    return next(i for i, (p, _) in enumerate(GROUPS) if re.fullmatch(p, name))


def schedule_fns():
    return [
        None if s is None else create_learning_rate_schedule(TOTAL, base=s.get("mult", 1.0),
                                                             **{k: v for k, v in s.items() if k != "mult"})
        for _, s in GROUPS
    ]


def chain(params):
    names = list(params)
    mask = lambda pred: {n: pred(n) for n in names}
    frozen = mask(lambda n: GROUPS[group_of(n)][1] is None)
    trainable = {n: not f for n, f in frozen.items()}
    fns = schedule_fns()
    schedule_txs = [
        optax.masked(optax.scale_by_schedule(fn), mask(lambda n, g=g: group_of(n) == g))
        for g, fn in enumerate(fns) if fn is not None
    ] + [optax.masked(optax.set_to_zero(), frozen)]
    return optax.chain(
        optax.masked(optax.clip_by_global_norm(CLIP), trainable),
        optax.masked(optax.scale_by_adam(b1=B1, b2=B2, eps=EPS), trainable),
        optax.scale(LR),
        optax.add_decayed_weights(WD, mask(lambda n: bool(re.fullmatch(WD_PARAMS, n)))),
        *schedule_txs,
        optax.scale(-1.0),
    )


def adam_numpy(params, grads, restart=None):
    """The same chain in numpy with a step count per parameter; `restart = (k, name)` drops
    that parameter's moments and count after step k."""
    fns = schedule_fns()
    p = {n: v.copy() for n, v in params.items()}
    m = {n: np.zeros_like(v) for n, v in p.items()}
    v2 = {n: np.zeros_like(v) for n, v in p.items()}
    count = {n: 0 for n in p}
    out = []
    for k, g in enumerate(grads):
        if restart and k == restart[0]:
            n = restart[1]
            m[n], v2[n], count[n] = np.zeros_like(m[n]), np.zeros_like(v2[n]), 0
        trainable = [n for n in p if fns[group_of(n)] is not None]
        norm = np.sqrt(sum((g[n] ** 2).sum() for n in trainable))
        coef = CLIP / norm if norm > CLIP else 1.0
        for n in trainable:
            gn = g[n] * coef
            m[n] = B1 * m[n] + (1 - B1) * gn
            v2[n] = B2 * v2[n] + (1 - B2) * gn * gn
            count[n] += 1
            mhat = m[n] / (1 - B1 ** count[n])
            vhat = v2[n] / (1 - B2 ** count[n])
            u = LR * mhat / (np.sqrt(vhat) + EPS)
            if re.fullmatch(WD_PARAMS, n):
                u = u + WD * p[n]
            p[n] = p[n] - float(fns[group_of(n)](k)) * u
        out.append({n: x.copy() for n, x in p.items()})
    return out


params = {n: rng.normal(0, 0.5, s) for n, s in SHAPES.items()}
# Gradients: large on the first steps (the clip is active), small later (it is not).
grads = [
    {n: rng.normal(0, 1.0 if k < 2 else 0.05, s) for n, s in SHAPES.items()} for k in range(STEPS)
]

tx = chain(params)
state = tx.init({n: jnp.asarray(v) for n, v in params.items()})
p = {n: jnp.asarray(v) for n, v in params.items()}
optax_steps = []
for g in grads:
    updates, state = tx.update({n: jnp.asarray(v) for n, v in g.items()}, state, p)
    p = optax.apply_updates(p, updates)
    optax_steps.append({n: np.asarray(v) for n, v in p.items()})

numpy_steps = adam_numpy(params, grads)
for a, b in zip(optax_steps, numpy_steps):
    for n in a:
        assert np.abs(a[n] - b[n]).max() < 1e-12, (n, np.abs(a[n] - b[n]).max())
restart_steps = adam_numpy(params, grads, restart=(RESTART_AFTER, RESTART_PARAM))
# The restart must matter, or the scenario tests nothing.
assert np.abs(restart_steps[-1][RESTART_PARAM] - numpy_steps[-1][RESTART_PARAM]).max() > 1e-4

fns = schedule_fns()
flat = lambda d: {n: v.reshape(-1).tolist() for n, v in d.items()}
json.dump(
    {
        "about": "scripts/optim_reference.py: big_vision's optax chain (optax "
        + optax.__version__ + ", float64)",
        "lr": LR, "b1": B1, "b2": B2, "eps": EPS, "weight_decay": WD, "grad_clip": CLIP,
        "weight_decay_params": WD_PARAMS, "total_steps": TOTAL,
        "groups": [{"params": p, "schedule": s} for p, s in GROUPS],
        "shapes": {n: list(s) for n, s in SHAPES.items()},
        "params": flat(params),
        "grads": [flat(g) for g in grads],
        # Each group's schedule value (mult included) at each step, as big_vision computes it.
        "schedule": [[None if f is None else float(f(k)) for f in fns] for k in range(STEPS)],
        "optax": [flat(s) for s in optax_steps],
        "restart": {"after": RESTART_AFTER, "param": RESTART_PARAM,
                    "steps": [flat(s) for s in restart_steps]},
    },
    __import__("sys").stdout,
    indent=1,
)
