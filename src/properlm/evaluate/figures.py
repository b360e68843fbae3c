"""The paper's analysis figures (section 4.5) and the routing-vs-groups check, as PNG files.

* ``tsne.png``: t-SNE of the stage-2 user embeddings (each user's embedding
  averaged over the adapted sites), coloured by KMeans clusters of the users'
  mean expert weights: users the router treats alike should sit together.
* ``expert_density.png``: the density of per-user mean expert weights with the
  user-aware router and the constraint loss, against a plain LoRAMoE run
  (``group.router=text``, ``group.constraint_weight=0``) when one is given:
  PROPER's users should spread away from the uniform ``1/K``.
* ``score_vs_history.png``: each method's per-user score against the user's
  history length (points and the mean per log-spaced bin).
* ``gains_by_history.png`` (:func:`plot_gains`, drawn by the report from
  :mod:`properlm.evaluate.gains`): each method's gain over stage 1 per tercile of
  the targets' history length (and the low-resource run's targets), with 95%
  intervals over users.

A user's mean expert weights are the stage-2 routing weights averaged over the
tokens of their history examples and over all adapted sites (``pm.bind(...,
record=True)`` then ``pm.routing_vectors()``), with their own learned embedding.
:func:`routing_ari` compares KMeans clusters of these vectors with the planted
groups of a synthetic dataset (adjusted Rand index: 1 = the same partition,
about 0 = chance).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402,F401
import numpy as np  # noqa: E402

from properlm.data.tasks import get_task  # noqa: E402
from properlm.errors import ProperError  # noqa: E402


_ROUTING_CACHE: dict[tuple, tuple[list[str], np.ndarray]] = {}


def _routed_users(run_dir: Path):
    """(cfg, task, users): the users with a stage-2 embedding, else (text router) the training users.

    The embedded users are the training users, or the targets in the end-to-end ablation.
    """
    from properlm.store.run import EMB, open_bank, read_config, read_split
    from properlm.train.run import load_data

    cfg = read_config(run_dir)
    ds = load_data(cfg)
    by_id = {u.id: u for u in ds.users}
    split = read_split(run_dir)
    # The stage-2 users: the training users (the targets in the end-to-end ablation),
    # not the unseen users whose embeddings were fitted afterwards.
    ids = split["target"] if cfg.user.end_to_end else split["train"]
    if open_bank(run_dir, EMB) is None and cfg.user.end_to_end:
        ids = split["train"]
    return cfg, ds.task, [by_id[i] for i in ids if i in by_id]


def user_routing(run_dir: str | Path, max_examples: int = 8, batch_size: int = 32) -> tuple[list[str], np.ndarray]:
    """Mean stage-2 expert weights of the users, averaged over the adapted sites: ``(ids, (U, K))``.

    See :func:`user_routing_sites` for the users and arguments.
    """
    ids, w = user_routing_sites(run_dir, max_examples, batch_size)
    return ids, w.mean(1)


def user_routing_sites(run_dir: str | Path, max_examples: int = 8, batch_size: int = 32
                       ) -> tuple[list[str], np.ndarray]:
    """Mean stage-2 expert weights per adapted site of the users with a learned embedding (the
    training users; all training users with a text router): ``(ids, (U, sites, K))``.

    Args:
        run_dir: a run with stage 2 trained.
        max_examples: history examples per user fed through the model.
        batch_size: rows per forward pass (rows of many users together).

    Returns:
        ``(user ids, weights (U, sites, K))``; each site's K weights sum to 1.
    """
    import torch

    from properlm.model.device import autocast
    from properlm.store.run import load_model
    from properlm.train.examples import collate, encode, user_examples

    run_dir = Path(run_dir)
    experts = run_dir / "group" / "experts.safetensors"
    if not experts.exists():
        raise ProperError(f"{run_dir}: routing analysis needs stage group; train it first")
    key = (str(run_dir.resolve()), experts.stat().st_mtime_ns, max_examples)
    if key in _ROUTING_CACHE:  # t-SNE, density and ARI all need it: one pass through the model
        return _ROUTING_CACHE[key]
    cfg, task, users = _routed_users(run_dir)
    pm, tok = load_model(cfg, run_dir, "user")
    embs = pm.user_embs
    enc = [encode(tok, e, cfg.data.max_len) for u in users
           for e in user_examples(task, u, history=True, queries=False)[:max_examples]]
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    with torch.no_grad(), autocast(cfg.bf16, pm.device):  # as evaluation runs it (a bf16 base needs it)
        for s in range(0, len(enc), batch_size):
            chunk = enc[s:s + batch_size]
            b = collate(chunk, tok.pad_token_id, pm.device)
            ids = [e.user_id for e in chunk]
            pm.bind(emb_users=[u if embs is not None and u in embs else None for u in ids],
                    token_mask=b["attention_mask"], record=True)
            pm.hidden_states(b["input_ids"], b["attention_mask"])
            routes = torch.stack(pm.state.routes, 1)                      # (B, sites, K)
            for uid, r in zip(ids, routes):
                sums[uid] = sums.get(uid, 0) + r.float().cpu()
                counts[uid] = counts.get(uid, 0) + 1
    pm.state.clear()
    order = [u.id for u in users if u.id in sums]
    _ROUTING_CACHE[key] = (order, torch.stack([sums[u] / counts[u] for u in order]).numpy())
    return _ROUTING_CACHE[key]


def user_embeddings(run_dir: str | Path) -> tuple[list[str], np.ndarray]:
    """Stage-2 embeddings of the stage-2 users, averaged over sites: ``(user ids, (U, d_e))``."""
    from properlm.store.run import EMB, open_bank

    bank = open_bank(run_dir, EMB)
    if bank is None:
        raise ProperError(f"{Path(run_dir) / 'store' / EMB}: no stage-2 user embeddings (a text-router run has none)")
    _, _, users = _routed_users(Path(run_dir))
    ids = [u.id for u in users if u.id in bank]
    embs = [np.stack([t.numpy() for _, t in sorted(bank.get(i)["params"].items())]).mean(0) for i in ids]
    return ids, np.stack(embs)                                            # (U, d_e)


def _kmeans(x: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    from sklearn.cluster import KMeans

    k = max(1, min(k, len(x)))
    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)


def routing_ari(run_dir: str | Path, seed: int = 0, per_site: bool = False) -> float:
    """Adjusted Rand index between users clustered by mean expert weights and their planted groups.

    The users with stage-2 embeddings (the training users; with a text router,
    the training users all the same) are clustered with KMeans into as many
    clusters as there are true groups among them. ``per_site=False`` clusters
    the weights averaged over all adapted sites (K numbers per user);
    ``per_site=True`` the concatenated per-site weights (sites x K numbers):
    expert k of one layer has nothing to do with expert k of another, so the
    average over sites can blur a partition that every site shows.

    Raises:
        ProperError: stage 2 missing, or the data has no planted groups (only synthetic data does).
    """
    from sklearn.metrics import adjusted_rand_score

    _, _, users = _routed_users(Path(run_dir))
    truth = {u.id: u.group for u in users if u.group is not None}
    if not truth:
        raise ProperError(f"{run_dir}: the run's users have no planted groups (generate synthetic data to check routing)")
    if per_site:
        ids, w = user_routing_sites(run_dir)
        w = w.reshape(len(ids), -1)
    else:
        ids, w = user_routing(run_dir)
    keep = [i for i, u in enumerate(ids) if u in truth]
    labels = [truth[ids[i]] for i in keep]
    pred = _kmeans(w[keep], len(set(labels)), seed)
    return float(adjusted_rand_score(labels, pred))


# --- plots ---------------------------------------------------------------------------------------


def plot_tsne(run_dir: str | Path, out_path: str | Path, n_clusters: int | None = None, seed: int = 0) -> Path:
    """t-SNE of the stage-2 user embeddings, coloured by KMeans clusters of mean expert weights."""
    from sklearn.manifold import TSNE

    ids, emb = user_embeddings(run_dir)
    rids, w = user_routing(run_dir)
    pos = {u: i for i, u in enumerate(rids)}
    keep = [i for i, u in enumerate(ids) if u in pos]
    emb, w = emb[keep], w[[pos[ids[i]] for i in keep]]
    clusters = _kmeans(w, n_clusters or w.shape[1], seed)
    if len(emb) >= 4:
        xy = TSNE(n_components=2, perplexity=min(30.0, max(1.0, (len(emb) - 1) / 3)), init="pca",
                  random_state=seed).fit_transform(emb)
    else:  # t-SNE needs a few points; show the first two coordinates
        xy = np.pad(emb[:, :2], ((0, 0), (0, max(0, 2 - emb.shape[1]))))
    fig, ax = plt.subplots(figsize=(5, 4.5))
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=clusters, cmap="tab10", s=28, edgecolors="k", linewidths=0.3)
    ax.legend(*sc.legend_elements(), title="cluster", fontsize=7, loc="best")
    ax.set(title="Stage-2 user embeddings (t-SNE)", xticks=[], yticks=[])
    return _save(fig, out_path)


def plot_expert_density(runs: dict[str, str | Path], out_path: str | Path) -> Path:
    """Density of per-user mean expert weights, one curve per labelled run (e.g. PROPER vs LoRAMoE)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    k = None
    for label, run_dir in runs.items():
        _, w = user_routing(run_dir)
        k = w.shape[1]
        ax.hist(w.ravel(), bins=np.linspace(0, 1, 41), density=True, histtype="step", linewidth=1.6, label=label)
    if k:
        ax.axvline(1.0 / k, color="grey", linestyle=":", label=f"uniform 1/K = {1.0 / k:.2f}")
    ax.set(xlabel="mean expert weight of a user", ylabel="density", title="Per-user expert weights")
    ax.legend(fontsize=8)
    return _save(fig, out_path)


def plot_score_vs_history(result: dict, out_path: str | Path) -> Path:
    """Each method's per-user primary metric against history length (an evaluate_run result)."""
    metric = get_task(result["task"]).metric_names[0]
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, e in result["methods"].items():
        rows = [r for r in e.get("per_user", []) if metric in r]
        if not rows:
            continue
        x = np.array([max(r["history_len"], 1) for r in rows], dtype=float)
        y = np.array([r[metric] for r in rows], dtype=float)
        pts = ax.scatter(x, y, s=10, alpha=0.35)
        edges = np.unique(np.geomspace(x.min(), x.max() + 1, num=min(6, len(x)) + 1))
        idx = np.clip(np.digitize(x, edges) - 1, 0, len(edges) - 2)
        centers = [np.sqrt(edges[i] * edges[i + 1]) for i in range(len(edges) - 1) if (idx == i).any()]
        means = [y[idx == i].mean() for i in range(len(edges) - 1) if (idx == i).any()]
        ax.plot(centers, means, marker="o", color=pts.get_facecolor()[0][:3], label=method)
    ax.set_xscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.set(xlabel="history length (items)", ylabel=metric, title=f"{result['task']}: {metric} by user activity")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, out_path)


def plot_gains(rows: list[dict], out_path: str | Path, title: str = "") -> Path:
    """Gains over stage 1 with their 95% intervals: one point and whisker per user group (x) and method,
    one panel per decoding (rows of :func:`properlm.evaluate.gains.figure_rows`)."""
    from properlm.evaluate.gains import GAIN_METHODS

    rank = {m: i for i, m in enumerate(GAIN_METHODS)}
    decodings = list(dict.fromkeys(r["method"].partition("@")[2] for r in rows))
    fig, axes = plt.subplots(1, len(decodings), figsize=(1.6 + 3.6 * len(decodings), 4), sharey=True, squeeze=False)
    colors: dict[str, str] = {}
    for ax, dec in zip(axes[0], decodings):
        mine = [r for r in rows if r["method"].partition("@")[2] == dec]
        cats = list(dict.fromkeys(r["category"] for r in mine))
        methods = sorted(dict.fromkeys(r["method"] for r in mine), key=lambda m: rank.get(m.partition("@")[0], 99))
        width = 0.8 / len(methods)
        for j, m in enumerate(methods):
            pts = [r for r in mine if r["method"] == m]
            x = np.array([cats.index(r["category"]) for r in pts]) + (j - (len(methods) - 1) / 2) * width
            y = np.array([r["gain"] for r in pts])
            err = np.array([[max(0.0, r["gain"] - r["ci_low"]) for r in pts], [max(0.0, r["ci_high"] - r["gain"])
                                                                             for r in pts]])
            base = m.partition("@")[0]
            line = ax.errorbar(x, y, yerr=err, fmt="o", capsize=3, label=m, color=colors.get(base))
            colors.setdefault(base, line[0].get_color())
        ax.axhline(0.0, color="grey", linestyle=":", linewidth=1)
        ax.set_xticks(range(len(cats)), cats, fontsize=7)
        ax.set(title=f"decoding @{dec}" if dec else "free generation", xlim=(-0.5, len(cats) - 0.5))
        # below the panel: inside it, the legend hides points wherever they sit
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    metric = rows[0]["metric"] if rows else ""
    what = {"correct": "accuracy", "abs_error": "absolute error, stage 1's minus the method's"}.get(metric, metric)
    axes[0][0].set_ylabel(f"gain over stage 1 ({what})")
    fig.suptitle(title or "Gain over stage 1 by history length (95% intervals over users)", fontsize=10)
    return _save(fig, out_path)


def _save(fig, out_path: str | Path) -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out_path, dpi=150)
    plt.close(fig)
    return out_path


def make_figures(main: dict, plain: dict | None, out_dir: str | Path, prefix: str = ""
                 ) -> tuple[dict[str, Path], dict[str, float] | None]:
    """All figures for one task's main run (and a plain LoRAMoE run), plus the routing ARI.

    Args:
        main: the main run's evaluation result (``evaluate_run``'s dict).
        plain: a run with ``group.router=text`` and no constraint loss, or None.
        out_dir: where the PNG files go.
        prefix: file name prefix (the task, when a report covers several).

    Returns:
        ``({figure name: path}, {"site_mean": ARI, "per_site": ARI} or None)`` (see
        :func:`routing_ari`); figures needing a missing stage are skipped.
    """
    out, figs, ari = Path(out_dir), {}, None
    figs["score_vs_history"] = plot_score_vs_history(main, out / f"{prefix}score_vs_history.png")
    run = Path(main["run_dir"])
    if not (run / "group").exists():
        return figs, ari
    if (run / "store" / "emb" / "bank.json").exists():
        figs["tsne"] = plot_tsne(run, out / f"{prefix}tsne.png")
    runs = {"PROPER (user-aware router + constraint)": run}
    if plain is not None and (Path(plain["run_dir"]) / "group").exists():
        runs["LoRAMoE (text router, no constraint)"] = Path(plain["run_dir"])
    figs["expert_density"] = plot_expert_density(runs, out / f"{prefix}expert_density.png")
    try:
        ari = {"site_mean": routing_ari(run), "per_site": routing_ari(run, per_site=True)}
    except ProperError:
        ari = None  # real data: no planted groups to compare with
    return figs, ari
