"""Tests of the heads, parametrised over the registry: a new head is tested the moment it registers."""
from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from heads.models import (
    FeatureDims,
    MissingFieldsError,
    build_head,
    check_fields,
    get_head,
    head_loss,
    list_heads,
    register_head,
)
from heads.models.layers import (
    ActionAttendedRelation,
    CrossStreamGate,
    MaskedMeanPool,
    ObjectAlignment,
    masked_softmax,
)

pytestmark = pytest.mark.usefixtures("one_thread")

DIMS = FeatureDims(verb_dim=12, noun_dim=10, det_dim=8)
NUM_VERBS, NUM_NOUNS = 7, 9
SLOT_KEYS = {  # batch key of per-slot features -> the validity mask that governs it
    "det_global_feat": "det_global_valid",
    "det_local_feat": "det_local_valid",
    "verb_local": "det_local_valid",
}

# Recorded with torch 2.14 on CPU: `_golden_loss(name)`. A change means the numerics of a head
# changed; if intended, re-record (and say so in the change). Re-recorded for issue 23: the relation
# attends L2-normalised rows rescaled by their mean norm (`relation_norm="rows"`) and SAP's verb
# branch aligns with the 60 global detections; `GOLDEN_LOSS_BEFORE_ISSUE_23` pins that the old
# switches still give the old numbers, `GOLDEN_LOSS_UNIT_ROWS` the unit rows without the rescale.
GOLDEN_LOSS = {
    "global": 4.842519283294678,
    "saoa": 4.256478309631348,
    "sap": 4.25132942199707,
    "vectors": 4.842519283294678,  # its defaults are `global`'s fields, in the same order
}
GOLDEN_LOSS_UNIT_ROWS = {"saoa": 4.257413387298584, "sap": 4.260775566101074}
GOLDEN_LOSS_BEFORE_ISSUE_23 = {
    ("saoa", (("relation_norm", "none"),)): 4.242239952087402,
    ("sap", (("relation_norm", "none"), ("verb_objects", "local"))): 4.241043567657471,
}

# Non-default values to try for switches that are not booleans. A new non-bool switch must be
# added here, so that it gets the "changes the computation" test.
OTHER_SWITCH_VALUES: dict[str, Any] = {"verb_objects": "local", "relation_norm": "none",
                                       "verb_fields": "det.global.feat", "noun_fields": "noun.global,det.local.feat"}


def make_batch(dims: FeatureDims = DIMS, batch_size: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random batch with every key any head reads; each row has at least one valid slot."""
    g = torch.Generator().manual_seed(seed)
    B = batch_size
    global_valid = torch.rand(B, dims.n_global, generator=g) < 0.6
    local_valid = torch.rand(B, dims.n_local, generator=g) < 0.6
    global_valid[:, 0] = True
    local_valid[:, 0] = True
    return {
        "verb_global": torch.randn(B, dims.verb_dim, generator=g),
        "noun_global": torch.randn(B, dims.noun_dim, generator=g),
        "det_global_feat": torch.randn(B, dims.n_global, dims.det_dim, generator=g),
        "det_global_valid": global_valid,
        "det_local_feat": torch.randn(B, dims.n_local, dims.det_dim, generator=g),
        "det_local_valid": local_valid,
        "verb_local": torch.randn(B, dims.n_local, dims.verb_dim, generator=g),
    }


def make_labels(batch_size: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(NUM_VERBS, (batch_size,), generator=g), torch.randint(NUM_NOUNS, (batch_size,), generator=g)


def build(name: str, seed: int = 0, **switches: Any) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_head(name, dims=DIMS, num_verbs=NUM_VERBS, num_nouns=NUM_NOUNS, **switches)


def switch_cases() -> list[tuple[str, str, Any]]:
    """(head, switch, non-default value) for every switch of every registered head."""
    cases = []
    for name in list_heads():
        for switch, default in get_head(name).switches().items():
            if isinstance(default, bool):
                cases.append((name, switch, not default))
            elif switch in OTHER_SWITCH_VALUES:
                cases.append((name, switch, OTHER_SWITCH_VALUES[switch]))
            else:
                cases.append((name, switch, None))  # fails below: add it to OTHER_SWITCH_VALUES
    return cases


# ---------------------------------------------------------------- registry


def test_registry_lists_the_design_heads() -> None:
    assert {"saoa", "sap", "global"} <= set(list_heads())


def test_register_refuses_duplicates() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_head("saoa", description="again", fields=lambda **_: ())(lambda **_: torch.nn.Identity())


def test_unknown_head_and_unknown_switch() -> None:
    with pytest.raises(KeyError, match="saoa"):
        get_head("nope")
    with pytest.raises(TypeError, match="no_such_switch"):
        build_head("saoa", dims=DIMS, num_verbs=3, num_nouns=3, no_such_switch=True)
    with pytest.raises(TypeError, match="gating"):
        build_head("global", dims=DIMS, num_verbs=3, num_nouns=3, gating=False)
    with pytest.raises(TypeError, match="bogus"):
        get_head("sap").required_fields(bogus=1)


def test_required_fields() -> None:
    saoa = get_head("saoa")
    assert set(saoa.required_fields()) == {
        "verb.global", "noun.global", "det.global.feat", "det.global.score",
        "det.local.feat", "det.local.score", "verb.local",
    }
    no_local = set(saoa.required_fields(local_alignment=False))
    assert "verb.local" not in no_local and "det.local.box" not in no_local
    assert "det.local.feat" in no_local
    assert set(get_head("global").required_fields()) == {"verb.global", "noun.global"}
    sap_global = set(get_head("sap").required_fields(verb_objects="global"))
    assert not any(f.startswith("det.local") for f in sap_global)
    assert set(get_head("sap").required_fields(verb_objects="local")) == no_local


def test_sap_aligns_both_branches_with_the_global_detections_by_default() -> None:
    """Issue 23: the report ties the 6 s window (60 slots) to global alignment, SAP's in both branches."""
    assert get_head("sap").switches()["verb_objects"] == "global"
    assert set(get_head("sap").required_fields()) == {"verb.global", "noun.global", "det.global.feat",
                                                      "det.global.score"}
    batch = make_batch()
    sap = build("sap")
    out = sap(batch)
    assert out["verb_attention"].shape == (4, DIMS.n_global)
    changed = dict(batch, det_local_feat=torch.randn_like(batch["det_local_feat"]))
    assert torch.equal(sap(changed)["verb_logits"], out["verb_logits"])


def test_check_fields_names_every_missing_field_and_the_head() -> None:
    available = ["verb.global", "noun.global", "det.global.feat", "det.global.score"]
    with pytest.raises(MissingFieldsError) as info:
        check_fields("saoa", available)
    message = str(info.value)
    assert "saoa" in message
    for field in ("det.local.feat", "det.local.score", "verb.local"):
        assert field in message
    assert info.value.missing == ("det.local.feat", "det.local.score", "verb.local")
    # verb.local can also be pooled at load time: the message says from what.
    assert "verb.map + det.local.box" in message and "verb.map_tmean + det.local.box" in message
    local = ["det.local.feat", "det.local.score"]
    check_fields("saoa", available + local + ["verb.local"])  # stored
    check_fields("saoa", available + local + ["verb.map", "det.local.box"])  # pooled at load time
    check_fields("saoa", available + local + ["verb.map_tmean", "det.local.box"])
    with pytest.raises(MissingFieldsError, match="verb.local"):
        check_fields("saoa", available + local + ["verb.map"])  # a map without its boxes
    check_fields("global", available)  # no error
    check_fields("sap", available, verb_objects="global")
    check_fields(get_head("sap"), available, verb_objects="global")


# ---------------------------------------------------------------- every head


@pytest.mark.parametrize("name", list_heads())
def test_output_shapes(name: str) -> None:
    model = build(name)
    out = model(make_batch(batch_size=3))
    assert out["verb_logits"].shape == (3, NUM_VERBS)
    assert out["noun_logits"].shape == (3, NUM_NOUNS)
    if "verb_attention" in out:
        verb_slots = DIMS.n_global if get_head(name).switches().get("verb_objects") == "global" else DIMS.n_local
        assert out["verb_attention"].shape == (3, verb_slots)
        assert out["noun_attention"].shape == (3, DIMS.n_global)


@pytest.mark.parametrize("name", list_heads())
def test_backward_gives_finite_grads_on_every_parameter(name: str) -> None:
    model = build(name)
    verb_labels, noun_labels = make_labels()
    losses = head_loss(model(make_batch()), verb_labels, noun_labels)
    assert torch.allclose(losses["total"], losses["verb"] + losses["noun"])
    losses["total"].backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None, f"{pname} is not used"
        assert torch.isfinite(param.grad).all(), pname
        assert param.grad.abs().sum() > 0, f"{pname} got an all-zero gradient"


@pytest.mark.parametrize("name", list_heads())
def test_masked_slots_have_no_influence(name: str) -> None:
    """Masked slots get exactly zero attention, and their contents (even NaN) change nothing."""
    model = build(name)
    batch = make_batch()
    out = model(batch)
    verb_set = "global" if get_head(name).switches().get("verb_objects") == "global" else "local"
    for key, weights in (("verb_attention", f"det_{verb_set}_valid"), ("noun_attention", "det_global_valid")):
        if key in out:
            assert (out[key][~batch[weights]] == 0).all()
            torch.testing.assert_close(out[key].sum(-1), torch.ones(len(out[key])))
    g = torch.Generator().manual_seed(7)
    for junk in ("random", "nan"):
        changed = dict(batch)
        for key, valid_key in SLOT_KEYS.items():
            invalid = ~batch[valid_key]
            shape = batch[key].shape
            noise = 1e3 * torch.randn(shape, generator=g) if junk == "random" else torch.full(shape, float("nan"))
            changed[key] = torch.where(invalid.unsqueeze(-1), noise, batch[key])
        out2 = model(changed)
        for key in out:
            assert torch.equal(out[key], out2[key]), (junk, key)
        if junk == "nan":  # the gradients must not see the NaN padding either
            verb_labels, noun_labels = make_labels()
            head_loss(out2, verb_labels, noun_labels)["total"].backward()
            assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", list_heads())
def test_all_invalid_rows_are_finite(name: str) -> None:
    model = build(name)
    batch = make_batch()
    batch["det_global_valid"][0] = False
    batch["det_local_valid"][0] = False
    out = model(batch)
    for key, value in out.items():
        assert torch.isfinite(value).all(), key
    for key in ("verb_attention", "noun_attention"):
        if key in out:
            assert (out[key][0] == 0).all()
    verb_labels, noun_labels = make_labels()
    head_loss(out, verb_labels, noun_labels)["total"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize(("name", "switch", "value"), switch_cases())
def test_each_switch_changes_the_computation(name: str, switch: str, value: Any) -> None:
    if value is None:
        pytest.fail(f"switch {switch!r} of {name!r} is not a bool: add a value to OTHER_SWITCH_VALUES")
    default = build(name)
    flipped = build(name, **{switch: value})
    # Share every weight the two models have in common, so only the switch can make a difference.
    own = flipped.state_dict()
    shared = {k: v for k, v in default.state_dict().items() if k in own and own[k].shape == v.shape}
    flipped.load_state_dict(shared, strict=False)
    batch = make_batch()
    a, b = default(batch), flipped(batch)
    same_verbs = torch.allclose(a["verb_logits"], b["verb_logits"])
    same_nouns = torch.allclose(a["noun_logits"], b["noun_logits"])
    assert not (same_verbs and same_nouns)


@pytest.mark.parametrize("name", list_heads())
def test_golden_loss(name: str) -> None:
    recorded = GOLDEN_LOSS.get(name)
    assert recorded is not None, f"record a golden loss for {name!r}: {_golden_loss(name)!r}"
    assert _golden_loss(name) == pytest.approx(recorded, abs=1e-5)


@pytest.mark.parametrize(("name", "switches"), sorted(GOLDEN_LOSS_BEFORE_ISSUE_23))
def test_golden_loss_of_the_switches_before_issue_23(name: str, switches: tuple) -> None:
    assert _golden_loss(name, **dict(switches)) == pytest.approx(GOLDEN_LOSS_BEFORE_ISSUE_23[name, switches], abs=1e-5)


@pytest.mark.parametrize("name", sorted(GOLDEN_LOSS_UNIT_ROWS))
def test_golden_loss_of_unit_rows(name: str) -> None:
    assert _golden_loss(name, relation_norm="unit") == pytest.approx(GOLDEN_LOSS_UNIT_ROWS[name], abs=1e-5)


def _golden_loss(name: str, **switches: Any) -> float:
    model = build(name, seed=0, **switches)
    verb_labels, noun_labels = make_labels(batch_size=8, seed=123)
    with torch.no_grad():
        return head_loss(model(make_batch(batch_size=8, seed=123)), verb_labels, noun_labels)["total"].item()


# ---------------------------------------------------------------- specific heads


def test_saoa_without_local_alignment_is_sap_on_the_local_detections() -> None:
    batch = make_batch()
    saoa = build("saoa", local_alignment=False)
    sap = build("sap", verb_objects="local")
    # Same seed, same creation order: identical weights, and identical outputs.
    for (k1, v1), (k2, v2) in zip(saoa.state_dict().items(), sap.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    for key, value in saoa(batch).items():
        assert torch.equal(value, sap(batch)[key])
    # And with weights copied from a differently seeded model.
    other = build("sap", seed=5, verb_objects="local")
    saoa.load_state_dict(other.state_dict())
    for key, value in saoa(batch).items():
        assert torch.equal(value, other(batch)[key])
    # The verb branch then reads verb_global, not verb_local.
    changed = dict(batch, verb_local=torch.randn_like(batch["verb_local"]))
    assert torch.equal(saoa(changed)["verb_logits"], saoa(batch)["verb_logits"])


def test_saoa_reads_verb_local_and_sap_verb_objects() -> None:
    batch = make_batch()
    changed = dict(batch, verb_local=torch.randn_like(batch["verb_local"]))
    saoa = build("saoa")
    assert not torch.allclose(saoa(changed)["verb_logits"], saoa(batch)["verb_logits"])
    sap_global = build("sap", verb_objects="global")
    out = sap_global(batch)
    assert out["verb_attention"].shape == (4, DIMS.n_global)
    changed = dict(batch, det_local_feat=torch.randn_like(batch["det_local_feat"]))
    assert torch.equal(sap_global(changed)["verb_logits"], out["verb_logits"])
    with pytest.raises(ValueError, match="verb_objects"):
        build("sap", verb_objects="middle")


def test_global_baseline_ignores_detections() -> None:
    model = build("global")
    batch = make_batch()
    out = model(batch)
    torch.testing.assert_close(out["verb_logits"], model.verb_classifier(batch["verb_global"]))
    torch.testing.assert_close(out["noun_logits"], model.noun_classifier(batch["noun_global"]))
    assert set(out) == {"verb_logits", "noun_logits"}


# ---------------------------------------------------------------- layers against the equations


def test_object_alignment_equals_the_equation() -> None:
    torch.manual_seed(0)
    align = ObjectAlignment(6, 5, 4)
    torch.nn.init.normal_(align.bias)
    f, objects = torch.randn(2, 6), torch.randn(2, 3, 5)
    valid = torch.ones(2, 3, dtype=torch.bool)
    W, Wo, b = align.backbone_proj.weight, align.object_proj.weight, align.bias
    # The report's form: concatenate [f, fo_i] and apply one linear layer + ReLU.
    concat = torch.cat([f[:, None].expand(-1, 3, -1), objects], dim=-1)
    expected = F.relu(concat @ torch.cat([W, Wo], dim=1).T + b)
    torch.testing.assert_close(align(f, objects, valid), expected)
    # Local alignment: one backbone vector per slot.
    f_local = torch.randn(2, 3, 6)
    torch.testing.assert_close(align(f_local, objects, valid), F.relu(f_local @ W.T + objects @ Wo.T + b))


def test_object_alignment_l2_scheme() -> None:
    """I3D scheme: L2-normalise both, combine, multiply by ||f||; bias outside the scaling."""
    torch.manual_seed(0)
    align = ObjectAlignment(6, 5, 4, normalize=True)
    torch.nn.init.normal_(align.bias)
    f, objects = 10 * torch.randn(2, 6), 0.1 * torch.randn(2, 3, 5)
    valid = torch.ones(2, 3, dtype=torch.bool)
    W, Wo, b = align.backbone_proj.weight, align.object_proj.weight, align.bias
    norm = f.norm(dim=-1)[:, None, None]
    f_hat = f / f.norm(dim=-1, keepdim=True)
    o_hat = objects / objects.norm(dim=-1, keepdim=True)
    expected = F.relu(norm * (f_hat[:, None] @ W.T + o_hat @ Wo.T) + b)
    torch.testing.assert_close(align(f, objects, valid), expected)
    # Scaling the detection features does not matter any more; scaling the backbone feature does.
    torch.testing.assert_close(align(f, 7 * objects, valid), expected)


def test_gate_and_relation_equal_the_equations() -> None:
    torch.manual_seed(0)
    rows, query = torch.randn(2, 5, 4), torch.randn(2, 3)
    valid = torch.tensor([[1, 1, 0, 1, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    gate = CrossStreamGate(3, 4)
    expected_gated = torch.sigmoid(query @ gate.gate.weight.T + gate.gate.bias)[:, None] * rows
    torch.testing.assert_close(gate(rows, query), expected_gated)

    unit = rows / rows.norm(dim=-1, keepdim=True)  # h'_i / ||h'_i||
    # s: the mean norm of each segment's valid rows; h''_i = s h'_i / ||h'_i||
    mean_norm = torch.stack([rows[b][valid[b]].norm(dim=-1).mean() for b in range(2)])
    scaled = unit * mean_norm[:, None, None]
    # (row_norm, rows the keys see, rows that are summed)
    for row_norm, attended, summed in (("rows", scaled, scaled), ("unit", unit, unit), ("keys", unit, rows),
                                       ("none", rows, rows)):
        relation = ActionAttendedRelation(3, 4, row_norm=row_norm)
        z, weights = relation(rows, valid, query)
        for b in range(2):
            q = relation.query_proj.weight @ query[b]
            logits = torch.stack([q @ (relation.key_proj.weight @ attended[b, i]) for i in range(5)])
            idx = valid[b].nonzero().flatten()
            a = torch.softmax(logits[idx], dim=0)
            torch.testing.assert_close(weights[b, idx], a)
            torch.testing.assert_close(z[b], (a[:, None] * summed[b, idx]).sum(0))
        assert (weights[~valid] == 0).all()
    # The default is our reading of the report: the normalised rows, at their mean length, are
    # attended and summed; a convex combination of rows of that one length.
    default = ActionAttendedRelation(3, 4)
    z_default, _ = default(rows, valid, query)
    assert (z_default.norm(dim=-1) <= mean_norm + 1e-6).all()
    unit_rows = ActionAttendedRelation(3, 4, row_norm="unit")
    unit_rows.load_state_dict(default.state_dict())  # the same weights: only the rows' length differs
    assert not torch.allclose(z_default, unit_rows(rows, valid, query)[0])
    with pytest.raises(ValueError, match="row_norm"):
        ActionAttendedRelation(3, 4, row_norm="l1")

    z_mean, w_mean = MaskedMeanPool()(rows, valid)
    torch.testing.assert_close(z_mean[0], rows[0, [0, 1, 3]].mean(0))
    torch.testing.assert_close(z_mean[1], rows[1, 0])
    assert (w_mean[~valid] == 0).all()


def test_masked_softmax_edge_cases() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [5.0, -1e30, 0.0]], requires_grad=True)
    valid = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    weights = masked_softmax(logits, valid)
    assert weights[0, 1] == 0 and weights[0].sum().item() == pytest.approx(1.0)
    assert (weights[1] == 0).all()
    assert torch.isfinite(weights).all()
    weights.sum().backward()
    assert torch.isfinite(logits.grad).all()
    z, w = MaskedMeanPool()(torch.randn(3, 3, 2), valid)
    assert (z[1] == 0).all() and (w[1] == 0).all()


# ---------------------------------------------------------------- learning a planted signal

PLANT_DIM, PLANT_KEY, PLANT_CLASSES = 32, 16, 8


def _unit(g: torch.Generator, *shape: int) -> torch.Tensor:
    x = torch.randn(*shape, generator=g)
    return x / x.norm(dim=-1, keepdim=True)


def _planted_data(n: int, g: torch.Generator, verb_protos: torch.Tensor, noun_protos: torch.Tensor,
                  amp: float = 3.0, noise: float = 0.1) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """See `test_planted_signal_is_learned_only_by_the_right_head` for the construction."""
    n_global, n_local, half = 60, 40, PLANT_KEY
    rows = torch.arange(n)
    verb_labels = torch.randint(PLANT_CLASSES, (n,), generator=g)
    noun_labels = torch.randint(PLANT_CLASSES, (n,), generator=g)
    # Noun side: every global slot = [key, prototype of some noun]; the target slot carries the
    # segment's noun and the key that is also written in verb_global.
    global_keys = _unit(g, n, n_global, half) * amp
    global_classes = torch.randint(PLANT_CLASSES, (n, n_global), generator=g)
    noun_slot = torch.randint(n_global, (n,), generator=g)
    global_classes[rows, noun_slot] = noun_labels
    det_global = torch.cat([global_keys, noun_protos[global_classes]], -1)
    det_global = det_global + noise * torch.randn(n, n_global, PLANT_DIM, generator=g)
    # Verb side: every local slot's detection = [key, noise] and its RoI-pooled verb feature =
    # [prototype of some verb, noise]; the target slot carries the segment's verb and the key that
    # is also written in noun_global.
    local_keys = _unit(g, n, n_local, half) * amp
    local_classes = torch.randint(PLANT_CLASSES, (n, n_local), generator=g)
    verb_slot = torch.randint(n_local, (n,), generator=g)
    local_classes[rows, verb_slot] = verb_labels
    det_local = torch.cat([local_keys, noise * torch.randn(n, n_local, half, generator=g)], -1)
    verb_local = torch.cat([verb_protos[local_classes], noise * torch.randn(n, n_local, half, generator=g)], -1)
    verb_global = torch.cat([global_keys[rows, noun_slot], noise * torch.randn(n, half, generator=g)], -1)
    noun_global = torch.cat([local_keys[rows, verb_slot], noise * torch.randn(n, half, generator=g)], -1)
    global_valid = torch.rand(n, n_global, generator=g) < 0.7
    local_valid = torch.rand(n, n_local, generator=g) < 0.7
    global_valid[rows, noun_slot] = True
    local_valid[rows, verb_slot] = True
    batch = {
        "verb_global": verb_global, "noun_global": noun_global,
        "det_global_feat": det_global, "det_global_valid": global_valid,
        "det_local_feat": det_local, "det_local_valid": local_valid, "verb_local": verb_local,
    }
    return batch, verb_labels, noun_labels


def _train_and_score(name: str, train: tuple, test: tuple, steps: int = 300) -> tuple[float, float]:
    torch.manual_seed(0)
    dims = FeatureDims(PLANT_DIM, PLANT_DIM, PLANT_DIM)
    model = build_head(name, dims=dims, num_verbs=PLANT_CLASSES, num_nouns=PLANT_CLASSES)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch, verb_labels, noun_labels = train
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(len(verb_labels), (128,), generator=g)
        loss = head_loss(model({k: v[idx] for k, v in batch.items()}), verb_labels[idx], noun_labels[idx])
        optimizer.zero_grad()
        loss["total"].backward()
        optimizer.step()
    with torch.no_grad():
        out = model(test[0])
    verb_acc = (out["verb_logits"].argmax(1) == test[1]).float().mean().item()
    noun_acc = (out["noun_logits"].argmax(1) == test[2]).float().mean().item()
    return verb_acc, noun_acc


@pytest.mark.slow  # trains every head to convergence on a planted signal
def test_planted_signal_is_learned_only_by_the_right_head() -> None:
    """SAOA learns a signal that, by construction, `global` and SAP cannot see.

    Construction (C = Cd = 32, 8 verbs, 8 nouns, 60 global / 40 local slots, ~30% of slots masked;
    keys and class prototypes are random 16-d vectors of norm 3, plus noise of std 0.1):
    - noun: each global detection = [key_i, prototype of a random noun]; one target slot holds the
      segment's noun, and its key is copied into `verb_global` (the noun branch's cross-stream
      query, per the equations). The other slots are distractors of random nouns.
    - verb: each local detection = [key_j, noise] and each `verb_local` row (the verb map RoI-pooled
      at that box) = [prototype of a random verb, noise]; one target slot holds the segment's verb,
      and its key is copied into `noun_global` (the verb branch's query).
    - Otherwise `verb_global` and `noun_global` are noise.
    So the global features are independent of both labels: `global` is at chance (1/8) on both.
    SAP's verb branch sees `verb_global` and the local detections, neither of which depends on the
    verb label: SAP is at chance on verbs. SAOA (and SAP, for nouns) can find the target slot by
    matching the query's key against each slot's key and read the prototype there.
    """
    g = torch.Generator().manual_seed(0)
    verb_protos = _unit(g, PLANT_CLASSES, PLANT_KEY) * 3
    noun_protos = _unit(g, PLANT_CLASSES, PLANT_KEY) * 3
    train = _planted_data(2048, g, verb_protos, noun_protos)
    test = _planted_data(1024, g, verb_protos, noun_protos)
    global_verb, global_noun = _train_and_score("global", train, test)
    sap_verb, sap_noun = _train_and_score("sap", train, test)
    saoa_verb, saoa_noun = _train_and_score("saoa", train, test)
    chance = 1 / PLANT_CLASSES
    assert global_verb < chance + 0.08 and global_noun < chance + 0.08
    assert sap_verb < chance + 0.08
    assert saoa_noun > global_noun + 0.4
    assert saoa_verb > sap_verb + 0.4
    assert math.isclose(sap_noun, saoa_noun, abs_tol=0.15)  # same noun branch
