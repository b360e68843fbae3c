"""Instant group routing: a user's stage-2 embedding predicted from their history, with no gradient step.

    properlm train ... group.unseen=instant        # the encoder is fitted after stage 2
    properlm instant fit --run runs/demo           # or added to a finished run

A user who was not in stage 2 needs an embedding ``e_u`` for the user-aware
router. :func:`~properlm.train.group.fit_unseen` fits one by gradient steps on
their history; the *instant encoder* predicts it in one forward pass instead.
A user's features are the frozen stage-2 model's view of their history items
with no user bound (fallback routing, no user LoRA): per item, the final hidden
states averaged over the prompt tokens and over the answer tokens, and the
routing weights of every adapted linear averaged over the item's tokens; then
averaged over the items (:func:`history_features`). The encoder is ridge
regression from these features (each of the three blocks centred and scaled to
unit variance per feature on average, so no block outweighs another by its
units, while a feature that barely varies stays small instead of being blown
up to unit variance) to the stage-2 training users'
learned embeddings (all sites side by side), solved in closed form; its
penalty is chosen by leave-one-out error, and a share of the users is held out
first to report its error against predicting the mean embedding (the
fallback). With a large penalty it predicts the mean embedding, so it degrades
to ``group.unseen=mean``, never below it.

Saved as ``RUN/group/instant.safetensors`` (with ``instant.json``, the fit's
report), checksummed with the other stage-2 files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache

from properlm.errors import ProperError
from properlm.model.device import autocast
from properlm.model.proper import ProperModel
from properlm.train.examples import Encoded, Example, collate, encode

INSTANT_FILE, INSTANT_REPORT = "instant.safetensors", "instant.json"
FORMAT = "properlm-instant-encoder"
#: Ridge penalties tried, as multiples of the largest squared singular value of the features.
PENALTIES = tuple(10.0 ** k for k in np.arange(-4.0, 3.01, 0.5))


@dataclass
class InstantEncoder:
    """Ridge regression from history features to a stage-2 embedding: ``((x - mean) / scale) @ weight + target_mean``.

    Attributes:
        feat_mean, feat_scale: (F,) standardisation of the features.
        weight: (F, D) the regression, D the embedding tensors side by side.
        target_mean: (D,) the training users' mean embedding (what a user with
            average features gets).
        keys: ``[(name in the embedding bank, shape)]`` in the order of D.
        report: how it was fitted (users, penalty, held-out error against the mean).
    """

    feat_mean: torch.Tensor
    feat_scale: torch.Tensor
    weight: torch.Tensor
    target_mean: torch.Tensor
    keys: list[tuple[str, tuple[int, ...]]]
    report: dict = field(default_factory=dict)

    def predict(self, feats: torch.Tensor) -> torch.Tensor:
        """(N, F) features -> (N, D) embeddings."""
        z = (feats.double() - self.feat_mean.double()) / self.feat_scale.double()
        return (z @ self.weight.double() + self.target_mean.double()).float()

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """One user's (D,) prediction as the embedding bank's tensors."""
        out, i = {}, 0
        for name, shape in self.keys:
            n = int(np.prod(shape))
            out[name] = flat[i:i + n].reshape(shape).clone()
            i += n
        return out

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        meta = {"format": FORMAT, "keys": json.dumps([[k, list(s)] for k, s in self.keys]),
                "report": json.dumps(self.report)}
        save_file({"feat_mean": self.feat_mean.float(), "feat_scale": self.feat_scale.float(),
                   "weight": self.weight.float(), "target_mean": self.target_mean.float()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> "InstantEncoder":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ProperError(f"{path}: not an instant encoder")
            t = {k: f.get_tensor(k) for k in f.keys()}
        keys = [(k, tuple(s)) for k, s in json.loads(meta["keys"])]
        return cls(t["feat_mean"], t["feat_scale"], t["weight"], t["target_mean"], keys, json.loads(meta["report"]))


#: Items whose prompts start with at least this many common tokens (the chat template, the task's
#: instruction) run those tokens once and continue every item from their KV cache.
MIN_SHARED_TOKENS = 8


def shared_prefix(enc: list[Encoded]) -> int:
    """How many first tokens every item has in common, within the shortest item's prompt."""
    if len(enc) < 2:
        return 0
    n = min(sum(1 for lab in e.labels if lab == -100) for e in enc)   # prompt lengths (labels -100 on the prompt)
    first = enc[0].ids
    for e in enc[1:]:
        k = 0
        while k < n and e.ids[k] == first[k]:
            k += 1
        n = k
    return n


@torch.no_grad()
def history_features(pm: ProperModel, tok, examples: list[Example], max_len: int, bf16: bool = False,
                     batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Each user's (F,) features: the model's view of their history with no user bound (see the module doc).

    Rows carry no user, so the routers use the fallback embedding and, in a stage-3
    model, stage 2's routing: the same features from the stage-2 and the final model.
    The first tokens all items share (:func:`shared_prefix`: the chat template and the
    task's instruction) run once, and each item continues from their KV cache: a causal
    model's states there do not depend on what follows, so the features are those of
    running every item whole (up to float rounding), at the cost of the items' own tokens.
    """
    was_training = pm.training
    pm.eval()
    enc = sorted((encode(tok, e, max_len) for e in examples), key=lambda x: len(x.ids))
    n_shared = shared_prefix(enc)
    n_shared = n_shared if n_shared >= MIN_SHARED_TOKENS else 0
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    try:
        prefix = _run_prefix(pm, enc[0].ids[:n_shared], bf16) if n_shared else None
        for s in range(0, len(enc), batch_size):
            chunk = enc[s:s + batch_size]
            rows = _item_features(pm, tok, chunk, n_shared, prefix, bf16)
            for e, row in zip(chunk, rows.cpu()):
                sums[e.user_id] = sums[e.user_id] + row if e.user_id in sums else row.clone()
                counts[e.user_id] = counts.get(e.user_id, 0) + 1
    finally:
        pm.state.clear()
        pm.train(was_training)
    return {u: sums[u] / counts[u] for u in sums}


def _run_prefix(pm: ProperModel, ids: list[int], bf16: bool) -> tuple[DynamicCache, torch.Tensor, list[torch.Tensor]]:
    """The shared tokens once: (their KV cache, their hidden states summed (H,), per site their routing
    weights summed over them (K,))."""
    x = torch.tensor([ids], dtype=torch.long, device=pm.device)
    mask = torch.ones_like(x)
    cache = DynamicCache()
    pm.bind(token_mask=mask, record=True)
    with autocast(bf16, pm.device):
        hidden = pm.lm.get_decoder()(input_ids=x, attention_mask=mask, cache=cache, use_cache=True).last_hidden_state
    n = len(ids)
    return cache, hidden.float()[0].sum(0), [r.float()[0] * n for r in pm.state.routes]


def _item_features(pm: ProperModel, tok, chunk: list[Encoded], n_shared: int, prefix, bf16: bool) -> torch.Tensor:
    """(B, F) features of a batch of items: their prompt's and their answer's mean hidden state and every
    site's mean routing weights over the item's tokens, the shared first ``n_shared`` (run once: ``prefix``)
    included."""
    b = collate([Encoded(e.user_id, e.ids[n_shared:], e.labels[n_shared:]) for e in chunk], tok.pad_token_id,
                pm.device)
    ids, mask = b["input_ids"], b["attention_mask"]
    pm.bind(token_mask=mask, record=True)
    if prefix is None:
        with autocast(bf16, pm.device):
            hidden = pm.hidden_states(ids, mask).float()                                  # (B, T, H)
    else:
        n, t = len(chunk), ids.shape[1]
        cache = DynamicCache([(layer.keys.expand(n, -1, -1, -1).contiguous(),
                               layer.values.expand(n, -1, -1, -1).contiguous()) for layer in prefix[0].layers])
        full = torch.cat([torch.ones(n, n_shared, dtype=mask.dtype, device=mask.device), mask], 1)
        pos = (n_shared + torch.arange(t, device=ids.device)).unsqueeze(0).expand(n, -1)
        with autocast(bf16, pm.device):
            hidden = pm.lm.get_decoder()(input_ids=ids, attention_mask=full, position_ids=pos, cache=cache,
                                         use_cache=True).last_hidden_state.float()
    routes = [r.float() for r in pm.state.routes]                                          # sites x (B, K)
    answer = (b["labels"] != -100).float()
    prompt = mask.float() * (1 - answer)
    if prefix is not None:  # the means also cover the shared tokens, whose sums the prefix holds
        _, h_sum, r_sums = prefix
        n_own = mask.float().sum(1, keepdim=True)                                          # (B, 1) own tokens
        prompt_pool = (h_sum + (hidden * prompt.unsqueeze(-1)).sum(1)) / (n_shared + prompt.sum(1, keepdim=True))
        routes = [(rs + r * n_own) / (n_shared + n_own) for rs, r in zip(r_sums, routes)]
    else:
        prompt_pool = _pool(hidden, prompt)
    return torch.cat([prompt_pool, _pool(hidden, answer), *routes], dim=1)


def _pool(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(B, H) mean of ``hidden`` (B, T, H) over the positions where ``weights`` (B, T) is 1."""
    w = weights.to(hidden.dtype).unsqueeze(-1)
    return (hidden * w).sum(1) / w.sum(1).clamp(min=1)


def block_scale(x: np.ndarray, blocks: list[tuple[int, int]] | None = None) -> np.ndarray:
    """(F,) scale of each feature: its block's root mean variance per feature; a block that
    (almost) does not vary, against the size of its values, gets the size of its values instead."""
    blocks = blocks or [(0, x.shape[1])]
    scale = np.ones(x.shape[1])
    for a, b in blocks:
        if b <= a:
            continue
        spread = float(np.sqrt(x[:, a:b].var(0).mean()))
        size = float(np.sqrt((x[:, a:b] ** 2).mean()))
        scale[a:b] = spread if spread > 1e-3 * size else (size or 1.0)
    return scale


def fit_ridge(x: np.ndarray, y: np.ndarray, blocks: list[tuple[int, int]] | None = None) -> dict:
    """Ridge from ``x`` (n, F) to ``y`` (n, D) on centred features scaled by :func:`block_scale`,
    the penalty chosen by leave-one-out error.

    Returns:
        ``{"mean", "scale", "weight", "target_mean", "penalty", "loo_mse", "loo_mse_mean"}``;
        with fewer than 3 users, or features that do not vary, the weight is zero (the mean).
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = len(x)
    mean, scale = x.mean(0), block_scale(x, blocks)
    z, target_mean = (x - mean) / scale, y.mean(0)
    yc = y - target_mean
    zero = {"mean": mean, "scale": scale, "weight": np.zeros((x.shape[1], y.shape[1])), "target_mean": target_mean,
            "penalty": None, "loo_mse": None,
            "loo_mse_mean": float(((yc * n / (n - 1)) ** 2).sum(1).mean()) if n > 1 else None}
    if n < 3:
        return zero
    u, s, vt = np.linalg.svd(z, full_matrices=False)
    if s.max(initial=0.0) <= 1e-9 * np.sqrt(z.size):
        return zero
    uty = u.T @ yc
    best = None
    for rel in PENALTIES:
        lam = rel * s.max() ** 2
        shrink = s ** 2 / (s ** 2 + lam)
        fitted = u @ (shrink[:, None] * uty)
        hat = 1.0 / n + (u ** 2 * shrink).sum(1)
        loo = float((((yc - fitted) / (1 - hat)[:, None]) ** 2).sum(1).mean())
        if best is None or loo < best[1]:
            best = (lam, loo, rel)
    lam, loo, rel = best
    weight = vt.T @ ((s / (s ** 2 + lam))[:, None] * uty)
    return {**zero, "weight": weight, "penalty": rel, "loo_mse": loo}


def fit_encoder(feats: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
                keys: list[tuple[str, tuple[int, ...]]], seed: int = 0, holdout: float = 0.2,
                blocks: list[tuple[int, int]] | None = None) -> InstantEncoder:
    """The encoder from the training users' features to their embeddings (``targets``: (D,) per user);
    ``blocks``: the features' blocks, ``[(start, end)]`` (None: one block).

    With 5 users or more, ``holdout`` of them (seeded) are left out of a first fit to measure its
    error against predicting the mean embedding (``report["validation"]``); the encoder returned is
    then fitted on all of them.
    """
    users = sorted(set(feats) & set(targets))
    if not users:
        raise ProperError("the instant encoder needs stage-2 training users with history and an embedding")
    x = torch.stack([feats[u] for u in users]).double().numpy()
    y = torch.stack([targets[u] for u in users]).double().numpy()
    report = {"users": len(users), "features": int(x.shape[1]), "embedding_size": int(y.shape[1])}
    n_val = int(round(holdout * len(users))) if len(users) >= 5 else 0
    if n_val:
        order = np.random.default_rng([seed, 7]).permutation(len(users))
        val, fit = order[:n_val], order[n_val:]
        r = fit_ridge(x[fit], y[fit], blocks)
        pred = ((x[val] - r["mean"]) / r["scale"]) @ r["weight"] + r["target_mean"]
        mse = float(((pred - y[val]) ** 2).sum(1).mean())
        mse_mean = float(((r["target_mean"] - y[val]) ** 2).sum(1).mean())
        report["validation"] = {"users": n_val, "mse_instant": mse, "mse_mean": mse_mean,
                                "ratio": mse / mse_mean if mse_mean > 0 else None}
    r = fit_ridge(x, y, blocks)
    report.update({"penalty": r["penalty"], "loo_mse": r["loo_mse"], "loo_mse_mean": r["loo_mse_mean"]})
    t = lambda a: torch.from_numpy(np.asarray(a, np.float64))  # noqa: E731
    return InstantEncoder(t(r["mean"]), t(r["scale"]), t(r["weight"]), t(r["target_mean"]), keys, report)


def embedding_keys(pm: ProperModel) -> list[tuple[str, tuple[int, ...]]]:
    """The embedding bank's tensors in the encoder's order."""
    return sorted((k, tuple(s)) for k, s in pm.emb_shapes.items())


def bank_targets(bank, users: list[str], keys: list[tuple[str, tuple[int, ...]]], chunk: int = 1024
                 ) -> dict[str, torch.Tensor]:
    """Each user's embedding tensors from a bank (in memory or the store), flattened side by side."""
    out = {}
    for s in range(0, len(users), chunk):
        part = users[s:s + chunk]
        got = bank.gather_users(part)
        flat = torch.cat([got[k].detach().float().reshape(len(part), -1).cpu() for k, _ in keys], dim=1)
        out.update(zip(part, flat))
    return out


def train_encoder(pm: ProperModel, tok, history: list[Example], max_len: int, bf16: bool, seed: int
                  ) -> InstantEncoder:
    """Fit the encoder on the stage-2 training users of ``pm.user_embs`` that have history in ``history``."""
    if pm.user_embs is None or not pm.emb_shapes:
        raise ProperError("instant routing needs stage 2's user-aware router (user embeddings)")
    keys = embedding_keys(pm)
    users = sorted({e.user_id for e in history if e.user_id in pm.user_embs})
    feats = history_features(pm, tok, [e for e in history if e.user_id in set(users)], max_len, bf16)
    h = pm.lm.config.hidden_size
    blocks = [(0, h), (h, 2 * h), (2 * h, next(iter(feats.values())).numel() if feats else 2 * h)]
    return fit_encoder(feats, bank_targets(pm.user_embs, users, keys), keys, seed=seed, blocks=blocks)


def instant_embeddings(pm: ProperModel, tok, encoder: InstantEncoder, examples: list[Example], max_len: int,
                       bf16: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """The embedding the encoder gives each user of ``examples`` (their history): bank tensors per user."""
    if [k for k, _ in encoder.keys] != [k for k, _ in embedding_keys(pm)]:
        raise ProperError("the instant encoder was fitted for other user embeddings than this model's")
    feats = history_features(pm, tok, examples, max_len, bf16)
    users = sorted(feats)
    if not users:
        return {}
    pred = encoder.predict(torch.stack([feats[u] for u in users]))
    return {u: encoder.unflatten(p) for u, p in zip(users, pred)}
