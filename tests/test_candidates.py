import math

import torch

from candidates import candidate_stats


def test_tied_dual_scores_order_moves_nothing_split_follows_fusion():
    # D ties every candidate; F puts the positive (column 0) first by a logit gap of log 3
    s = torch.full((5, 4), 0.3)
    m = torch.tensor([[math.log(3.0), 0.0, 0.0, 0.0]]).repeat(5, 1)
    st = candidate_stats(s, m, tau_kd=0.05, tau_f=1.0)
    assert st["fusion_positive_first"] == 1.0
    assert st["dual_spread_median"] == 0.0
    assert abs(st["mass_on_positive"]["dual"] - 0.25) < 1e-6
    assert abs(st["mass_on_positive"]["order"] - 0.25) < 1e-6      # tied scores, reordered: same row
    assert abs(st["kl_to_dual"]["order"]) < 1e-6
    assert abs(st["mass_on_positive"]["split"] - 0.5) < 1e-5       # softmax(log 3, 0, 0, 0)[0] = 3/6


def test_order_form_hands_the_top_score_to_fusions_choice():
    s = torch.tensor([[0.0, 0.1, 0.0, 0.0]])                       # D prefers a confuser
    m = torch.tensor([[5.0, 0.0, 0.0, 0.0]])                       # F the positive
    st = candidate_stats(s, m, tau_kd=0.05, tau_f=1.0)
    assert st["dual_positive_first"] == 0.0 and st["fusion_positive_first"] == 1.0
    top = math.exp(2.0) / (math.exp(2.0) + 3)                      # 0.1 / τ_kd = 2
    assert abs(st["mass_on_positive"]["order"] - top) < 1e-5
    assert abs(st["mass_on_positive"]["dual"] - 1 / (math.exp(2.0) + 3)) < 1e-5
