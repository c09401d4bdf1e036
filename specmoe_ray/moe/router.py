"""Router stage: gate scores -> top-k experts and their combine weights.

Softmax routing (Qwen-MoE, Mixtral, OLMoE): softmax over all experts in float32, top-k,
optionally renormalised over the chosen k (`norm_topk_prob`; always for Mixtral).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TopKRouter(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.norm_topk_prob = args.norm_topk_prob
        # Mixtral keeps the combine weights in float32; the others cast to the model dtype.
        self.float_weights = args.model_type == "mixtral"
        self.weight = nn.Parameter(torch.zeros(args.num_experts, args.hidden_size))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [T, D] -> weights [T, A], expert_ids [T, A]
        logits = F.linear(x, self.weight)  # [T, E]
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, expert_ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if not self.float_weights:
            weights = weights.to(x.dtype)
        return weights, expert_ids
