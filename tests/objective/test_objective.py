"""The CLIP-TD objective (SPEC section 2): selection, schedules, distances, weights, presets,
and the Distiller's loss recomputed independently with plain loops."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from _knobs import knobs

from cliptd.core.config import CHOICES, DistillConfig
from cliptd.objective.distill import Distiller, distance, instance_weights, lambda_at, select_tokens

# --------------------------------------------------------------------------------------
# select_tokens


def _exact_k(n: int, ratio: float) -> int:
    return math.ceil(Fraction(str(ratio)) * n)


def _random_case(seed: int, n: int = 6, t: int = 11):
    g = torch.Generator().manual_seed(seed)
    relevance = torch.randn(n, t, generator=g)
    valid = torch.rand(n, t, generator=g) < 0.7
    valid[0] = True  # a full row
    valid[1] = False
    valid[1, 3] = True  # a row with one valid token
    valid[2] = False  # a row with none
    return relevance, valid


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.75, 1.0])
def test_select_keeps_ceil_ratio_of_valid_tokens(ratio):
    relevance, valid = _random_case(0)
    sel = select_tokens(relevance, valid, ratio, "relevance")
    assert sel.dtype == torch.bool and sel.shape == valid.shape
    for row in range(valid.shape[0]):
        n_valid = int(valid[row].sum())
        assert int(sel[row].sum()) == _exact_k(n_valid, ratio), (row, n_valid)


@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.8])
def test_select_picks_highest_relevance_valid_tokens(ratio):
    relevance, valid = _random_case(1)
    # make an invalid token the most relevant one of each row: it must still be skipped
    relevance = relevance.masked_fill(~valid, 100.0)
    sel = select_tokens(relevance, valid, ratio, "relevance")
    assert not (sel & ~valid).any()
    for row in range(valid.shape[0]):
        idx = valid[row].nonzero().flatten().tolist()
        k = _exact_k(len(idx), ratio)
        expected = set(sorted(idx, key=lambda i: -float(relevance[row, i]))[:k])
        assert set(sel[row].nonzero().flatten().tolist()) == expected


def test_select_never_picks_invalid_tokens_random():
    relevance, valid = _random_case(2)
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        sel = select_tokens(relevance, valid, 0.9, "random", g)
        assert not (sel & ~valid).any()
        assert sel.sum(1).tolist() == [_exact_k(int(v), 0.9) for v in valid.sum(1)]


def test_select_all_returns_valid_mask():
    relevance, valid = _random_case(3)
    sel = select_tokens(relevance, valid, 0.1, "all")
    assert torch.equal(sel, valid)


def test_select_random_reproducible_with_seeded_generator():
    relevance, valid = _random_case(4, n=8, t=20)
    a = select_tokens(relevance, valid, 0.4, "random", torch.Generator().manual_seed(7))
    b = select_tokens(relevance, valid, 0.4, "random", torch.Generator().manual_seed(7))
    c = select_tokens(relevance, valid, 0.4, "random", torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # random ignores relevance: it is not the relevance top-k
    assert not torch.equal(a, select_tokens(relevance, valid, 0.4, "relevance"))


def test_select_ceil_is_exact_for_decimal_ratios():
    bad = []
    for n in range(1, 41):
        for ratio in (0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9, 0.15, 0.35):
            valid = torch.ones(1, n, dtype=torch.bool)
            k = int(select_tokens(torch.arange(n).float()[None], valid, ratio, "relevance").sum())
            if k != _exact_k(n, ratio):
                bad.append((n, ratio, k))
    assert bad == []


# --------------------------------------------------------------------------------------
# lambda_at


@pytest.mark.parametrize("schedule,expected", [
    ("constant", (2.0, 2.0, 2.0)),
    ("linear", (2.0, 1.0, 0.0)),
    ("cosine", (2.0, 1.0, 0.0)),
    ("warmup", (0.0, 2.0, 2.0)),  # warmup_frac 0.25: ramp done by progress 0.25
])
def test_lambda_schedules(schedule, expected):
    cfg = DistillConfig(lam=2.0, schedule=schedule, warmup_frac=0.25)
    got = tuple(lambda_at(cfg, p) for p in (0.0, 0.5, 1.0))
    assert got == pytest.approx(expected, abs=1e-12)


def test_lambda_intermediate_values_and_clamping():
    assert lambda_at(DistillConfig(lam=1.0, schedule="cosine"), 0.25) == pytest.approx(
        0.5 * (1 + math.cos(math.pi / 4)))
    assert lambda_at(DistillConfig(lam=1.0, schedule="linear"), 0.25) == pytest.approx(0.75)
    assert lambda_at(DistillConfig(lam=1.0, schedule="warmup", warmup_frac=0.2), 0.1) == \
        pytest.approx(0.5)
    assert lambda_at(DistillConfig(lam=1.0, schedule="warmup", warmup_frac=0.0), 0.0) == 1.0
    assert lambda_at(DistillConfig(lam=1.0, schedule="linear"), 1.7) == 0.0
    assert lambda_at(DistillConfig(lam=1.0, schedule="linear"), -0.5) == 1.0


# --------------------------------------------------------------------------------------
# distance


def test_distance_known_values():
    x = torch.tensor([[3.0, 0.0]])
    y = torch.tensor([[0.0, 0.5]])
    assert distance(x, x * 7, "cosine").item() == pytest.approx(0.0, abs=1e-7)
    assert distance(x, y, "cosine").item() == pytest.approx(1.0)
    assert distance(x, -x, "cosine").item() == pytest.approx(2.0)
    # normalized: (1, 0) vs (0, 1)
    assert distance(x, y, "l2").item() == pytest.approx(2.0)
    assert distance(x, y, "l1").item() == pytest.approx(2.0)
    # smooth L1 with beta 0.1: |d| = 1 per coordinate → 1 - 0.05, summed over 2 coordinates
    assert distance(x, y, "smooth_l1").item() == pytest.approx(1.9)
    for kind in ("l2", "l1", "smooth_l1"):
        assert distance(x, x * 3, kind).item() == pytest.approx(0.0, abs=1e-7)


def test_distance_small_differences_and_shapes():
    a = torch.tensor([[[1.0, 0.0]]])  # 1×1×2
    b = torch.tensor([[[math.cos(0.1), math.sin(0.1)]]])
    dx, dy = 1 - math.cos(0.1), math.sin(0.1)
    assert distance(a, b, "cosine").shape == (1, 1)
    assert distance(a, b, "cosine").item() == pytest.approx(1 - math.cos(0.1), rel=1e-5)
    assert distance(a, b, "l2").item() == pytest.approx(dx ** 2 + dy ** 2, rel=1e-5)
    assert distance(a, b, "l1").item() == pytest.approx(dx + dy, rel=1e-5)
    # both coordinates below beta = 0.1: 0.5 d² / beta
    assert distance(a, b, "smooth_l1").item() == pytest.approx(
        0.5 * (dx ** 2 + dy ** 2) / 0.1, rel=1e-4)


# --------------------------------------------------------------------------------------
# instance_weights


def test_instance_weights_without_normalization():
    p = torch.tensor([0.2, 0.9, 0.5, 0.0])
    c = torch.tensor([False, True, True, False])
    conf = instance_weights(DistillConfig(weighting="confidence", weight_norm="none"), p, c)
    thr = instance_weights(DistillConfig(weighting="threshold", weight_norm="none"), p, c)
    uni = instance_weights(DistillConfig(weighting="uniform", weight_norm="none"), p, c)
    assert torch.allclose(conf, p)
    assert thr.tolist() == [0.0, 1.0, 1.0, 0.0]
    assert uni.tolist() == [1.0, 1.0, 1.0, 1.0]
    assert conf.dtype == thr.dtype == uni.dtype == torch.float32


@pytest.mark.parametrize("weighting", ["confidence", "threshold", "uniform"])
def test_instance_weights_batch_mean_has_mean_one(weighting):
    p = torch.tensor([0.2, 0.9, 0.5, 0.1])
    c = torch.tensor([False, True, True, False])
    w = instance_weights(DistillConfig(weighting=weighting, weight_norm="batch_mean"), p, c)
    assert w.mean().item() == pytest.approx(1.0, abs=1e-6)
    raw = instance_weights(DistillConfig(weighting=weighting, weight_norm="none"), p, c)
    assert torch.allclose(w, raw / raw.mean())  # proportions kept


def test_instance_weights_batch_mean_all_zero_stays_finite():
    w = instance_weights(DistillConfig(weighting="threshold", weight_norm="batch_mean"),
                         torch.tensor([0.1, 0.2]), torch.tensor([False, False]))
    assert torch.isfinite(w).all() and w.tolist() == [0.0, 0.0]


# --------------------------------------------------------------------------------------
# DistillConfig


def test_naive_preset_forces_selection_weighting_schedule():
    cfg = DistillConfig(method="naive", select_by="random", weighting="threshold",
                        schedule="cosine", weight_norm="batch_mean", lam=0.7,
                        distance="l1").resolved()
    assert (cfg.select_by, cfg.weighting, cfg.schedule) == ("all", "uniform", "constant")
    assert cfg.weight_norm == "none"
    assert (cfg.lam, cfg.distance) == (0.7, "l1")  # the knobs naive keeps


@pytest.mark.parametrize("method", ["none", "clip_features"])
def test_task_loss_only_presets_have_no_teacher_term(method):
    cfg = DistillConfig(method=method, lam=3.0).resolved()
    assert cfg.lam == 0.0
    assert lambda_at(cfg, 0.0) == 0.0


def test_cliptd_preset_keeps_knobs():
    cfg = DistillConfig(method="cliptd", select_by="random", weighting="threshold",
                        schedule="linear", lam=2.0)
    assert cfg.resolved() == cfg


def test_from_dict_resolves_and_rejects_unknown():
    assert DistillConfig.from_dict({"method": "none"}).lam == 0.0
    assert DistillConfig.from_dict({"method": "naive", "select_by": "relevance"}).select_by == "all"
    with pytest.raises(ValueError, match="select_ratio"):
        DistillConfig.from_dict({"select_ratio": 0.5})


@pytest.mark.parametrize("knob,value", [
    ("method", "fancy"), ("select_by", "top"), ("weighting", "soft"), ("weight_norm", "sum"),
    ("schedule", "step"), ("distance", "kl"), ("text_target", "cls"), ("modalities", "all"),
    ("select_ratio_v", 0.0), ("select_ratio_t", 1.5), ("lam", -1.0), ("warmup_frac", 1.0),
])
def test_invalid_values_raise_naming_the_knob(knob, value):
    with pytest.raises(ValueError, match=f"distill.{knob}"):
        DistillConfig(**{knob: value})


def test_every_choice_is_accepted():
    for knob, allowed in CHOICES.items():
        for v in allowed:
            assert getattr(DistillConfig(**{knob: v}), knob) == v


# --------------------------------------------------------------------------------------
# Distiller


N, R, L, H, D = 5, 6, 9, 16, 8


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    region_states = torch.randn(N, R, H, generator=g)
    text_states = torch.randn(N, L, H, generator=g)
    region_mask = torch.ones(N, R, dtype=torch.bool)
    region_mask[1, 4:] = False
    region_mask[3, 2:] = False
    token_mask = torch.rand(N, L, generator=g) < 0.8
    token_mask[:, 0] = True
    token_mask[2, 5:] = False
    targets = {
        "region_emb": torch.randn(N, R, D, generator=g), "region_mask": region_mask,
        "rel_v": torch.randn(N, R, generator=g),
        "token_target": torch.randn(N, L, D, generator=g), "token_mask": token_mask,
        "rel_t": torch.randn(N, L, generator=g),
        "gold_prob": torch.rand(N, generator=g),
        "correct": torch.tensor([True, False, True, True, False]),
    }
    targets["region_conf"] = torch.rand(N, R, generator=g)  # last: the pins keep their draws
    return region_states, text_states, targets


def _reference_loss(distiller: Distiller, region_states, text_states, t, progress) -> float:
    """The SPEC formula with loops, top-k by sorting and hand-written distances."""
    cfg = distiller.cfg
    W_v, b_v = distiller.proj_v.weight.detach().double(), distiller.proj_v.bias.detach().double()
    W_t, b_t = distiller.proj_t.weight.detach().double(), distiller.proj_t.bias.detach().double()

    def d(u, v):
        u, v = u / u.norm(), v / v.norm()
        if cfg.distance == "cosine":
            return 1 - float(u @ v)
        if cfg.distance == "l2":
            return float(((u - v) ** 2).sum())
        if cfg.distance == "l1":
            return float((u - v).abs().sum())
        diff = (u - v).abs()
        return float(torch.where(diff < 0.1, 0.5 * diff ** 2 / 0.1, diff - 0.05).sum())

    def term(states, W, b, target, mask, rel, ratio, conf=None):
        idx = [i for i in range(mask.shape[0]) if mask[i]]
        if cfg.select_by == "relevance":
            k = math.ceil(Fraction(str(ratio)) * len(idx))
            idx = sorted(idx, key=lambda i: -float(rel[i]))[:k]
        if not idx:
            return 0.0
        c = [1.0 if conf is None else float(conf[i]) for i in idx]
        return sum(ci * d(W @ states[i].double() + b, target[i].double())
                   for ci, i in zip(c, idx, strict=True)) / sum(c)

    if cfg.weighting == "confidence":
        w = [float(x) for x in t["gold_prob"]]
    elif cfg.weighting == "threshold":
        w = [float(x) for x in t["correct"]]
    else:
        w = [1.0] * N
    if cfg.weight_norm == "batch_mean":
        m = sum(w) / len(w)
        w = [x / m for x in w]
    total = 0.0
    for n in range(N):
        inst = 0.0
        if cfg.modalities in ("both", "visual"):
            inst += term(region_states[n], W_v, b_v, t["region_emb"][n], t["region_mask"][n],
                         t["rel_v"][n], cfg.select_ratio_v, t["region_conf"][n]
                         if cfg.region_weighting == "confidence" else None)
        if cfg.modalities in ("both", "text"):
            inst += term(text_states[n], W_t, b_t, t["token_target"][n], t["token_mask"][n],
                         t["rel_t"][n], cfg.select_ratio_t)
        total += w[n] * inst
    return lambda_at(cfg, progress) * total / N


@pytest.mark.parametrize("cfg", [
    knobs(),
    knobs(distance="l2", weighting="threshold", select_ratio_v=0.3, select_ratio_t=0.7),
    knobs(distance="l1", weighting="uniform", weight_norm="none", modalities="visual"),
    knobs(distance="smooth_l1", modalities="text", schedule="cosine", lam=2.5),
    knobs(method="naive", lam=0.8).resolved(),
    knobs(region_weighting="confidence", select_ratio_v=0.6),
], ids=["default", "l2-threshold", "l1-visual", "smoothl1-text-cosine", "naive",
        "region-confidence"])
def test_distiller_matches_independent_computation(cfg):
    torch.manual_seed(0)
    distiller = Distiller(H, D, cfg)
    rs, ts, t = _inputs(1)
    loss, logs = distiller(rs, ts, t, progress=0.3)
    expected = _reference_loss(distiller, rs, ts, t, 0.3)
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert logs["distill/lambda"] == pytest.approx(lambda_at(cfg, 0.3))


def test_distiller_pinned_value():
    """A fixed seed pins the exact number (catches a silent change of init or formula)."""
    torch.manual_seed(0)
    distiller = Distiller(H, D, knobs())
    rs, ts, t = _inputs(1)
    loss, _ = distiller(rs, ts, t, progress=0.0)
    expected = _reference_loss(distiller, rs, ts, t, 0.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert loss.item() == pytest.approx(1.82984, abs=2e-4)


def test_region_confidence_weighs_each_region():
    """A region of zero confidence drops out of its instance's visual term; confidence on
    one region only makes the term that region's distance; uniform weighting ignores it."""
    torch.manual_seed(0)
    cfg = knobs(region_weighting="confidence", select_by="all", modalities="visual",
                        weighting="uniform", weight_norm="none")
    distiller = Distiller(H, D, cfg)
    rs, ts, t = _inputs(2)
    t["region_mask"][:] = True
    d = distance(distiller.proj_v(rs), t["region_emb"], "cosine")  # N×R
    t["region_conf"] = torch.zeros(N, R)
    t["region_conf"][:, 2] = 0.7
    loss, logs = distiller(rs, ts, t, progress=0.0)
    assert loss.item() == pytest.approx(d[:, 2].mean().item(), rel=1e-5)
    t["region_conf"][0] = 0.0  # nothing to weigh: contributes 0, not NaN
    loss, _ = distiller(rs, ts, t, progress=0.0)
    assert loss.item() == pytest.approx(d[1:, 2].sum().item() / N, rel=1e-5)
    uniform = Distiller(H, D, knobs(select_by="all", modalities="visual",
                                            weighting="uniform", weight_norm="none"))
    uniform.load_state_dict(distiller.state_dict())
    assert uniform(rs, ts, t, progress=0.0)[0].item() == pytest.approx(d.mean().item(),
                                                                      rel=1e-5)


def test_distiller_zero_when_lambda_zero():
    torch.manual_seed(0)
    rs, ts, t = _inputs(2)
    for cfg in (knobs(lam=0.0), knobs(method="none").resolved(),
                knobs(schedule="linear")):
        distiller = Distiller(H, D, cfg)
        progress = 1.0 if cfg.schedule == "linear" else 0.5
        loss, logs = distiller(rs.requires_grad_(), ts, t, progress=progress)
        assert loss.item() == 0.0 and logs["distill/lambda"] == 0.0
        loss.backward()  # still part of the graph, so the training loop can add it


def test_distiller_gradient_flows_to_heads_and_states():
    torch.manual_seed(0)
    distiller = Distiller(H, D, knobs())
    rs, ts, t = _inputs(3)
    rs.requires_grad_()
    ts.requires_grad_()
    loss, _ = distiller(rs, ts, t, progress=0.0)
    loss.backward()
    for name, p in distiller.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # only selected tokens receive gradient: unselected / invalid regions get none
    sel_v = select_tokens(t["rel_v"], t["region_mask"], 0.5, "relevance")
    assert (rs.grad.abs().sum(-1) > 0).eq(sel_v).all()
    sel_t = select_tokens(t["rel_t"], t["token_mask"], 0.5, "relevance")
    assert (ts.grad.abs().sum(-1) > 0).eq(sel_t).all()


def test_distiller_visual_only_leaves_text_head_untouched():
    torch.manual_seed(0)
    distiller = Distiller(H, D, knobs(modalities="visual"))
    rs, ts, t = _inputs(4)
    distiller(rs, ts, t, progress=0.0)[0].backward()
    assert distiller.proj_v.weight.grad is not None
    assert distiller.proj_t.weight.grad is None


def test_visual_layer_distils_into_the_region_features():
    """``visual_layer``: final-layer states (the default, no extra head), the region
    encoder's features (their own head; the states get no visual gradient), or both (the
    two distances add up)."""
    torch.manual_seed(0)
    rs, ts, t = _inputs(5)
    feats = torch.randn(rs.shape[0], rs.shape[1], 12)
    assert not hasattr(Distiller(H, D, knobs()), "proj_f")
    losses = {}
    for layer in ("final", "features", "both"):
        torch.manual_seed(1)
        d = Distiller(H, D, knobs(visual_layer=layer, modalities="visual"),
                      region_dim=12)
        states, f = rs.clone().requires_grad_(), feats.clone().requires_grad_()
        loss, _ = d(states, ts, t, progress=0.0, region_features=f)
        loss.backward()
        losses[layer] = loss.item()
        assert (states.grad is not None and states.grad.abs().sum() > 0) == (layer != "features")
        assert (f.grad is not None and f.grad.abs().sum() > 0) == (layer != "final")
    assert losses["both"] == pytest.approx(losses["final"] + losses["features"], rel=1e-5)
