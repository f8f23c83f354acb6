"""Expert parallelism, applied to a model from outside it: each rank holds E/W experts
of every MoE layer, tokens travel to their experts and back by two differentiable
all-to-all exchanges, and checkpoints always hold all E experts."""

import time

import torch
import torch.distributed as dist
from torch import Tensor, nn

from adamoe import compat
from adamoe.errors import CheckpointError, ConfigError
from adamoe.moe import Experts, MoELayer


class CollectiveClock:
    """Seconds this process spends inside the expert all-to-all exchanges, while `on`. On a
    CPU (gloo) an exchange returns once every rank has sent its part, so the time is the
    wait for the slowest rank plus the transfer; on a GPU the device is synchronized around
    each exchange to see the same, which costs time: it is off unless asked for."""

    on = False
    seconds = 0.0


def _exchange(out: Tensor, x: Tensor, out_splits=None, in_splits=None, group=None):
    if not CollectiveClock.on:
        return dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
    if out.is_cuda:
        torch.cuda.synchronize(out.device)
    start = time.perf_counter()
    dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
    if out.is_cuda:
        torch.cuda.synchronize(out.device)
    CollectiveClock.seconds += time.perf_counter() - start


class _AllToAll(torch.autograd.Function):
    """Variable-size all-to-all; its gradient is the same exchange with the splits swapped."""

    @staticmethod
    def forward(ctx, x_ND, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x_ND.new_empty(sum(out_splits), *x_ND.shape[1:])
        _exchange(out, x_ND.contiguous(), out_splits, in_splits, group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty(sum(in_splits), *grad.shape[1:])
        _exchange(back, grad.contiguous(), in_splits, out_splits, ctx.group)
        return back, None, None, None


def all_to_all(x_ND: Tensor, out_splits: list[int], in_splits: list[int], group=None) -> Tensor:
    return _AllToAll.apply(x_ND, out_splits, in_splits, group)


class AllToAllDispatch:
    """Expert parallelism's dispatch: the assignments (sorted by expert) run on the ranks of
    `group` that hold their experts, rank r holding experts [r * E/W, (r + 1) * E/W).

    Counts go first, so every rank knows how many rows it receives from each rank; rows
    arrive grouped by source rank, then local expert, and leave in the same layout. After
    each call, `received` is the number of assignments this rank's experts processed and
    `sent_bytes` the bytes this rank sent to the others, both exchanges."""

    def __init__(self, group=None):
        self.group = group if group is not None else dist.group.WORLD
        self.received, self.sent_bytes = 0, 0

    def __call__(self, experts: Experts, x_TD: Tensor, token_N: Tensor, weight_N: Tensor, load_E: Tensor) -> Tensor:
        W, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        send_WE = load_E.view(W, -1)
        recv_WE = torch.empty_like(send_WE)
        _exchange(recv_WE, send_WE, group=self.group)
        send, recv = send_WE.sum(1).tolist(), recv_WE.sum(1).tolist()
        x_MD = all_to_all(x_TD.index_select(0, token_N), recv, send, self.group)
        # Rows of each local expert are spread over the source blocks: gather them per expert.
        local_E = recv_WE.shape[1]
        expert_of_row = torch.arange(local_E, device=x_TD.device).repeat(W).repeat_interleave(recv_WE.flatten())
        rows = torch.argsort(expert_of_row, stable=True)
        y_MD = experts(x_MD, rows, torch.ones(rows.numel(), device=x_TD.device), recv_WE.sum(0).tolist())
        y_ND = all_to_all(y_MD, send, recv, self.group)
        element = x_TD.element_size() * x_TD.shape[1]
        self.received = sum(recv)
        self.sent_bytes = ((sum(send) - send[rank]) + (sum(recv) - recv[rank])) * element  # off-rank only
        return torch.zeros_like(x_TD).index_add_(0, token_N, y_ND * weight_N.unsqueeze(1).to(y_ND.dtype))


class AgreedSteps:
    """Decoding steps every rank of `group` agrees on: the longest limit, and done only when
    every rank is, since each step's all-to-all needs every rank."""

    def __init__(self, group=None):
        self.group = group

    def _reduce(self, value: int, op) -> int:
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=op, group=self.group)
        return int(t)

    def limit(self, steps: int) -> int:
        return self._reduce(steps, dist.ReduceOp.MAX)

    def all_done(self, done: Tensor) -> bool:
        return bool(self._reduce(int(done.all()), dist.ReduceOp.MIN))


def moe_layers(root: nn.Module) -> list[MoELayer]:
    return [m for m in root.modules() if isinstance(m, MoELayer)]


def expert_group(root: nn.Module):
    """The process group the experts under `root` are spread over; None when they are not."""
    return next(
        (layer.dispatcher.group for layer in moe_layers(root) if isinstance(layer.dispatcher, AllToAllDispatch)), None
    )


def expert_parameter_names(root: nn.Module) -> list[str]:
    experts = {id(p) for layer in moe_layers(root) for p in layer.experts.parameters()}
    return [n for n, p in root.named_parameters() if id(p) in experts]


def shard_experts(root: nn.Module, group=None):
    """Keep this rank's E/W experts of every MoE layer under `root` (itself one, or a model),
    send tokens to them by all-to-all, and make every decoding loop under `root` take the
    steps all ranks agree on."""
    W, rank = dist.get_world_size(group), dist.get_rank(group)
    for layer in moe_layers(root):
        if layer.num_experts % W:
            raise ConfigError(f"expert parallelism needs num_experts ({layer.num_experts}) divisible by the {W} ranks")
        local = layer.num_experts // W
        layer.experts.shard(rank * local, local)
        layer.dispatcher = AllToAllDispatch(group)
    for module in root.modules():
        if hasattr(module, "decode_steps"):
            module.decode_steps = AgreedSteps(group)


def parallelize_experts(root: nn.Module, group=None):
    """Spread the experts of every MoE layer under `root` over the ranks of `group`, for
    training under DDP (`shard_experts`, and the gradients to match).

    Dense weights stay data-parallel. Expert weights are left out of DDP's all-reduce:
    their gradients already sum every rank's tokens, so they are divided by W to match
    DDP's mean. Call it once, before DDP wraps `root`.
    """
    W = dist.get_world_size(group)
    shard_experts(root, group)
    for layer in moe_layers(root):
        for p in layer.experts.parameters():
            p.register_hook(lambda g: g / W)
    compat.ddp_ignore(root, expert_parameter_names(root))


def record_parameter_names(checkpoint: dict, root: nn.Module, optimizers) -> None:
    """Torch keys optimizer state by position over the param groups, which a fork changes
    as soon as it splits parameters into groups: store the name behind each position, so
    that expert state is found by name when a checkpoint is gathered or sliced."""
    names = {id(p): n for n, p in root.named_parameters()}
    checkpoint["optimizer_parameter_names"] = [
        [names[id(p)] for g in opt.param_groups for p in g["params"]] for opt in optimizers
    ]


def _map_expert_state(checkpoint: dict, root: nn.Module, fn) -> None:
    """Apply fn(tensor, local parameter) to every expert tensor of a checkpoint: the
    weights and their optimizer state."""
    params = dict(root.named_parameters())
    experts = expert_parameter_names(root)  # a list: every rank must gather in the same order
    for name in experts:
        checkpoint["state_dict"][name] = fn(checkpoint["state_dict"][name], params[name])
    states = checkpoint.get("optimizer_states", [])
    names = checkpoint.get("optimizer_parameter_names")
    if states and names is None:
        raise CheckpointError(
            "the checkpoint's optimizer state has no parameter names, so its expert state cannot be split over ranks"
        )
    for state, order in zip(states, names or []):
        for i, name in enumerate(order):
            if name in experts and i in state["state"]:
                state["state"][i] = {
                    k: fn(v, params[name]) if torch.is_tensor(v) and v.dim() else v
                    for k, v in state["state"][i].items()
                }


def gather_experts(checkpoint: dict, root: nn.Module) -> None:
    """Every rank calls this while a checkpoint is made, each giving its E/W experts."""
    group = expert_group(root)
    if group is None:
        return

    def gather(t, p):
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, t.contiguous(), group=group)
        return torch.cat(parts, 0)

    _map_expert_state(checkpoint, root, gather)


def slice_experts(checkpoint: dict, root: nn.Module) -> None:
    """Keep this rank's experts of a checkpoint that holds all E, saved with any W."""
    group = expert_group(root)
    if group is None:
        return
    rank = dist.get_rank(group)
    _map_expert_state(checkpoint, root, lambda t, p: t[rank * p.shape[0] : (rank + 1) * p.shape[0]])
