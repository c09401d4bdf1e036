"""Router stage: gate scores -> top-k experts and their combine weights.

Softmax routing (Qwen-MoE, Mixtral, OLMoE): softmax over all experts in float32, top-k,
optionally renormalised over the chosen k (`norm_topk_prob`; always for Mixtral).

Grouped routing (DeepSeek-V2, DeepSeek-AI 2024; DeepSeek-V3, DeepSeek-AI 2024): the E experts
form `n_group` groups; each token keeps its best `topk_group` groups and picks its top-k
experts among theirs only (device-limited routing). V2 scores experts with a softmax and a
group by its best expert; V3 with a sigmoid plus `e_score_correction_bias` (auxiliary-loss-free
load balancing: the bias steers *selection* only, the weights come from the unbiased scores)
and a group by the sum of its two best experts. The weights are optionally renormalised,
then multiplied by `routed_scaling_factor`.

`make_router(args)` picks the stage from the model args.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from specmoe_ray.models import fused, triton_kernels
from specmoe_ray.models.fused import linear, softmax_topk

# T = tokens, E = experts, G = groups, A = experts per token, D = hidden


class TopKRouter(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.norm_topk_prob = args.norm_topk_prob
        # Mixtral keeps the combine weights in float32; the others cast to the model dtype.
        self.float_weights = args.model_type == "mixtral"
        self.weight = nn.Parameter(torch.zeros(args.num_experts, args.hidden_size))
        self._done: dict[torch.device, torch.Tensor] = {}  # `route_tokens`' counters, per device

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [T, D] -> weights [T, A], expert_ids [T, A]
        return self.route(linear(x, self.weight), x)[:2]

    def route(self, logits: torch.Tensor, x: torch.Tensor, counter=None):
        """The router's logits [T, E] (of the normed tokens x) -> weights [T, A], expert ids
        [T, A], and whether the expert load was counted here: `counter()` -> (counts [E], token
        mask or None), called where the routing kernel runs (it counts as it routes)."""
        if fused.is_active() and triton_kernels.routing_supported(logits):  # static steps: one kernel
            dtype = torch.float32 if self.float_weights else x.dtype
            counts, mask = counter() if counter is not None else (None, None)
            weights, ids = triton_kernels.softmax_topk(
                logits, self.top_k, self.norm_topk_prob, dtype, counts, mask
            )
            return weights, ids, counts is not None
        weights, ids = softmax_topk(logits, self.top_k, self.norm_topk_prob, x, not self.float_weights)
        return weights, ids, False

    def route_tokens(self, x: torch.Tensor, counter=None, norm=None):
        """`route(x @ weight^T, x, counter)` in one kernel (`triton_kernels.router_topk`; static
        steps of a few tokens, `router_topk_supported`) -> (weights, ids, counted). norm =
        (residual, the norm's weight, eps): x is routed as `add_rms_norm(x, residual, ...)` ->
        (weights, ids, counted, the normed tokens, x + residual)."""
        dtype = torch.float32 if self.float_weights else x.dtype
        done = self._done.get(x.device)
        if done is None:  # the kernel's counter of finished programs: this router's own
            done = self._done[x.device] = torch.zeros(1, dtype=torch.int32, device=x.device)
        counts, mask = counter() if counter is not None else (None, None)
        out = triton_kernels.router_topk(
            x, self.weight, done, self.top_k, self.norm_topk_prob, dtype, counts, mask, norm
        )
        return (*out[:2], counts is not None, *out[2:])


class GroupedTopKRouter(nn.Module):
    """DeepSeek-V2/V3 routing, computed in float32 (float32 combine weights, as transformers)."""

    def __init__(self, args):
        super().__init__()
        r = args.routing
        self.top_k = args.num_experts_per_tok
        self.num_experts = args.num_experts
        self.norm_topk_prob = args.norm_topk_prob
        self.scoring = r.scoring
        self.n_group, self.topk_group = r.n_group, r.topk_group
        self.group_score = r.group_score
        self.routed_scaling_factor = r.routed_scaling_factor
        self.weight = nn.Parameter(torch.zeros(args.num_experts, args.hidden_size))
        if r.correction_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(args.num_experts))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [T, D] -> weights [T, A] (float32), expert_ids [T, A]
        logits = F.linear(x.float(), self.weight.float())  # [T, E]
        scores = logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(dim=-1)
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        if self.topk_group < self.n_group:
            T, G = x.shape[0], self.n_group
            grouped = choice.view(T, G, self.num_experts // G)  # [T, G, E/G]
            if self.group_score == "top2_sum":
                group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [T, G]
            else:
                group_scores = grouped.amax(dim=-1)
            keep_groups = group_scores.topk(self.topk_group, dim=-1).indices  # [T, topk_group]
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep_groups, True)
            # As transformers: softmax scores are > 0, so V2 masks with 0; biased sigmoid scores need -inf.
            fill = 0.0 if self.scoring == "softmax" else float("-inf")
            choice = choice.masked_fill(~keep[:, :, None].expand_as(grouped).reshape(T, -1), fill)
        expert_ids = choice.topk(self.top_k, dim=-1).indices  # [T, A]
        weights = scores.gather(1, expert_ids)  # unbiased scores
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, expert_ids


def make_router(args) -> nn.Module:
    """The router stage the model args call for."""
    if args.model_type in ("deepseek_v2", "deepseek_v3"):
        return GroupedTopKRouter(args)
    return TopKRouter(args)
