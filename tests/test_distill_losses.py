"""Each MCAD term on small tensors against hand-computed values, and the properties that matter."""
from __future__ import annotations

import math

import torch

from mcad.distill.losses import (FusionAdapters, candidates, dense, distribution_loss, feature_loss, kl_rows,
                                 mcad_targets, modified_similarity, reassign_by_order, single_teacher_loss,
                                 split_by_fusion)


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def test_reassign_by_order_hand_computed():
    d = torch.tensor([[0.9, 0.5, 0.7]])     # D's scores over 3 candidates
    f = torch.tensor([[-3.0, 2.0, 0.0]])    # F ranks: cand1 > cand2 > cand0
    assert torch.equal(reassign_by_order(d, f), torch.tensor([[0.5, 0.9, 0.7]]))


def test_modified_similarity_hand_computed():
    s = torch.tensor([[0.9, 0.5, 0.7, 0.1],
                      [0.2, 0.8, 0.3, 0.6]])
    cand = torch.tensor([[0, 2, 1], [1, 3, 2]])
    m = torch.tensor([[-3.0, 0.0, 2.0], [5.0, 1.0, 0.0]])  # row 0: F prefers col1 > col2 > col0
    mask, m = dense(cand, m, 4)
    out = modified_similarity(s, mask, m, mu=0.5)
    # row 0: candidates (0, 2, 1) with D scores (0.9, 0.7, 0.5); F order: col1, col2, col0
    #   -> col1 gets 0.9, col2 0.7, col0 0.5; mix half: col0 0.7, col1 0.7, col2 0.7; col3 unchanged
    assert torch.allclose(out[0], torch.tensor([0.7, 0.7, 0.7, 0.1]))
    # row 1: F agrees with D's order (1, 3, 2) -> unchanged
    assert torch.allclose(out[1], s[1])
    assert torch.allclose(modified_similarity(s, mask, m, mu=0.0), s)


def test_split_by_fusion_hand_computed():
    tau = 0.5
    s = torch.tensor([[0.2, 0.2, 0.0, 0.4]])          # D ties the two candidates (cols 0, 1)
    mask = torch.tensor([[True, True, False, False]])
    m = torch.tensor([[math.log(3.0), 0.0, 9.0, 9.0]])  # F: 3:1 for col 0; non-candidates ignored
    out = split_by_fusion(s, mask, m, tau, tau_f=1.0)
    p_d = torch.softmax(s / tau, 1)[0]
    p = torch.softmax(out / tau, 1)[0]
    mass = float(p_d[0] + p_d[1])
    assert torch.allclose(p, torch.tensor([0.75 * mass, 0.25 * mass, float(p_d[2]), float(p_d[3])]), atol=1e-6)
    assert torch.allclose(out[0, 2:], s[0, 2:])
    # the order form cannot say anything here: D's scores are tied
    assert torch.allclose(modified_similarity(s, mask, m, 1.0, within="order"), s)
    assert torch.allclose(modified_similarity(s, mask, m, 1.0, within="split", tau=tau), out)
    assert torch.allclose(modified_similarity(s, mask, m, 0.0, within="split", tau=tau), s)


def test_split_by_fusion_properties():
    g = torch.Generator().manual_seed(0)
    s, m = torch.randn(6, 9, generator=g) * 0.2, torch.randn(6, 9, generator=g) * 3
    mask = torch.rand(6, 9, generator=g) < 0.4
    mask[torch.arange(6), torch.arange(6)] = True
    tau, tau_f = 0.05, 2.0
    p_d, p = torch.softmax(s / tau, 1), torch.softmax(split_by_fusion(s, mask, m, tau, tau_f) / tau, 1)
    torch.testing.assert_close((p * mask).sum(1), (p_d * mask).sum(1))       # D's mass on the candidates
    torch.testing.assert_close(p[~mask], p_d[~mask])                          # D's distribution elsewhere
    f = torch.softmax((m / tau_f).masked_fill(~mask, float("-inf")), 1)
    torch.testing.assert_close(p * mask / (p * mask).sum(1, keepdim=True), f)  # F's split among them
    # one candidate (the positive alone): nothing to split
    one = torch.eye(6, 9, dtype=torch.bool)
    torch.testing.assert_close(split_by_fusion(s, one, m, tau, tau_f), s)


def test_candidates_always_hold_the_positive():
    s = torch.tensor([[0.0, 1.0, 2.0], [3.0, 2.0, 1.0], [0.0, 0.0, 0.1]])
    c = candidates(s, 2)
    for i in range(3):
        assert i in c[i].tolist()


def test_kl_hand_computed_and_zero_when_equal():
    t = torch.tensor([[1.0, 0.0]])
    s = torch.tensor([[0.0, 0.0]])
    p = torch.tensor([math.e / (math.e + 1), 1 / (math.e + 1)])
    expected = float((p * (p.log() - math.log(0.5))).sum())
    assert math.isclose(float(kl_rows(t, s, 1.0)), expected, rel_tol=1e-5)
    assert float(kl_rows(t, t, 0.1)) < 1e-7


def test_distribution_loss_zero_when_student_equals_teacher_and_gradient_only_to_student():
    torch.manual_seed(0)
    v, t = unit(torch.randn(6, 8)), unit(torch.randn(6, 8))
    s_d = v @ t.T
    cand_i = candidates(s_d, 3)
    cand_t = candidates(s_d.T, 3)
    (mask_i, m_i), (mask_t, m_t) = dense(cand_i, torch.randn(6, 3), 6), dense(cand_t, torch.randn(6, 3), 6)
    tgt_i, tgt_t = mcad_targets(v, t, None, None, mask_i, m_i, mask_t, m_t, mu=0.0)
    assert torch.allclose(tgt_i, s_d) and torch.allclose(tgt_t, s_d)
    assert float(distribution_loss(s_d, tgt_i, tgt_t, 0.05)) < 1e-6
    # gradient reaches the student and never the teacher side
    u = torch.randn(6, 8, requires_grad=True)
    v_req = v.clone().requires_grad_(True)
    tgt_i, tgt_t = mcad_targets(v_req.detach(), t, None, None, mask_i, m_i, mask_t, m_t, mu=1.0)
    loss = distribution_loss(unit(u) @ t.T, tgt_i, tgt_t, 0.05)
    loss.backward()
    assert u.grad is not None and u.grad.abs().sum() > 0
    assert v_req.grad is None


def test_t2i_target_uses_column_candidates():
    s = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    cand_i = torch.tensor([[0, 1], [1, 0]])
    cand_t = torch.tensor([[0, 1], [1, 0]])  # for text j: images
    m_i = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # agrees with D
    m_t = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # text 0: F prefers image 1 over image 0
    v = unit(torch.randn(2, 4))
    (mask_i, m_i), (mask_t, m_t) = dense(cand_i, m_i, 2), dense(cand_t, m_t, 2)
    tgt_i, tgt_t = modified_similarity(s, mask_i, m_i, 1.0), modified_similarity(s.T, mask_t, m_t, 1.0).T
    assert torch.allclose(tgt_i, s)
    # column 0 (text 0): image 1 now gets D's top score 0.9, image 0 gets 0.2
    assert torch.allclose(tgt_t[:, 0], torch.tensor([0.2, 0.9]))
    assert torch.allclose(tgt_t[:, 1], s[:, 1])
    del v


def test_single_teacher_loss_zero_when_student_matches_itm_order_scaled():
    s = torch.tensor([[2.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 2.0]])
    cand = torch.tensor([[0, 1, 2]] * 3)
    mask = torch.ones(3, 3, dtype=torch.bool)
    loss = single_teacher_loss(s, mask, s, mask, s.T, tau=1.0, tau_f=1.0)
    assert float(loss) < 1e-6
    assert float(single_teacher_loss(s, mask, -s, mask, -s.T, 1.0, 1.0)) > 0.1
    # only the candidates count: a student wrong outside them costs nothing
    mask = torch.eye(3, dtype=torch.bool) | torch.eye(3, dtype=torch.bool).roll(1, 1)
    s2 = s.clone()
    s2[~mask] = 9.0
    assert abs(float(single_teacher_loss(s2, mask, s, mask.T, s.T, 1.0, 1.0)) -
               float(single_teacher_loss(s, mask, s, mask.T, s.T, 1.0, 1.0))) < 1e-6


def test_feature_term_and_adapters():
    torch.manual_seed(1)
    v, t = unit(torch.randn(4, 8)), unit(torch.randn(4, 8))
    ad = FusionAdapters(16, 8)
    h = torch.randn(4, 16)
    v_m, t_m = ad(v, t, h, lam=1.0)
    assert torch.allclose(v_m, v) and torch.allclose(t_m, t)  # zero-initialised: the plain dual teacher
    assert float(feature_loss(v, t, v_m, t_m)) < 1e-10
    u = torch.zeros(4, 8)
    assert math.isclose(float(feature_loss(u, u, v, t)), 2.0, rel_tol=1e-5)  # ‖v‖² + ‖t‖² = 1 + 1
    # with λ > 0 the feature part of S̃ is ½(ṽ·t + v·t̃) − S^D
    with torch.no_grad():
        ad.img.weight.normal_()
    v_m, t_m = ad(v, t, h, lam=0.5)
    mask, m0 = dense(candidates(v @ t.T, 2), torch.zeros(4, 2), 4)
    tgt_i, _ = mcad_targets(v, t, v_m, t_m, mask, m0, mask, m0, mu=0.0)
    assert torch.allclose(tgt_i, 0.5 * (v_m @ t.T + v @ t_m.T), atol=1e-6)


def test_masked_reassign_keeps_non_candidates_and_permutes_within_rows():
    torch.manual_seed(3)
    s, m = torch.randn(5, 7), torch.randn(5, 7)
    mask = torch.rand(5, 7) < 0.5
    mask[:, 0] = True
    out = reassign_by_order(s, m, mask)
    assert torch.equal(out[~mask], s[~mask])
    for i in range(5):
        got, want = out[i][mask[i]], s[i][mask[i]]
        assert torch.equal(got.sort().values, want.sort().values)  # same scores, new owners
        # F's best candidate gets D's best score
        best = mask[i].nonzero()[m[i][mask[i]].argmax()]
        assert out[i, best] == want.max()
