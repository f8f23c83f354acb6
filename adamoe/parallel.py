"""Expert parallelism: each rank holds E/W experts of every MoE layer; tokens travel to
their experts and back by two differentiable all-to-all exchanges."""

import torch
import torch.distributed as dist
from torch import Tensor


class _AllToAll(torch.autograd.Function):
    """Variable-size all-to-all; its gradient is the same exchange with the splits swapped."""

    @staticmethod
    def forward(ctx, x_ND, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x_ND.new_empty(sum(out_splits), *x_ND.shape[1:])
        dist.all_to_all_single(out, x_ND.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty(sum(in_splits), *grad.shape[1:])
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x_ND: Tensor, out_splits: list[int], in_splits: list[int], group=None) -> Tensor:
    return _AllToAll.apply(x_ND, out_splits, in_splits, group)


def parallel_dispatch(experts, x_TD: Tensor, token_N: Tensor, weight_N: Tensor, load_E: Tensor, group) -> tuple[Tensor, int, int]:
    """Run the assignments (sorted by expert) on the ranks that hold their experts.

    Rank r holds experts [r * E/W, (r + 1) * E/W). Counts go first, so every rank knows
    how many rows it receives from each rank; rows arrive grouped by source rank, then
    local expert, and leave in the same layout. Returns the combined [T, D] output, the
    assignments this rank's experts received and the bytes this rank sent to others.
    """
    W, rank = dist.get_world_size(group), dist.get_rank(group)
    send_WE = load_E.view(W, -1)
    recv_WE = torch.empty_like(send_WE)
    dist.all_to_all_single(recv_WE, send_WE, group=group)
    send, recv = send_WE.sum(1).tolist(), recv_WE.sum(1).tolist()
    x_MD = all_to_all(x_TD.index_select(0, token_N), recv, send, group)
    # Rows of each local expert are spread over the source blocks: gather them per expert.
    local_E = recv_WE.shape[1]
    expert_of_row = torch.arange(local_E, device=x_TD.device).repeat(W).repeat_interleave(recv_WE.flatten())
    rows = torch.argsort(expert_of_row, stable=True)
    y_MD = experts(x_MD, rows, torch.ones(rows.numel(), device=x_TD.device), recv_WE.sum(0).tolist())
    y_ND = all_to_all(y_MD, send, recv, group)
    y_TD = torch.zeros_like(x_TD).index_add_(0, token_N, y_ND * weight_N.unsqueeze(1).to(y_ND.dtype))
    element = x_TD.element_size() * x_TD.shape[1]
    sent_bytes = ((sum(send) - send[rank]) + (sum(recv) - recv[rank])) * element  # both exchanges, off-rank only
    return y_TD, sum(recv), sent_bytes
