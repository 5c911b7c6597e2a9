"""InfoNCE by hand, GradCache == full-batch gradients, cross-device loss == combined batch."""

import math

import pytest
import torch
import torch.nn.functional as F

from ray_ft.train.contrastive import cross_device_loss, grad_cache_backward, info_nce


def test_info_nce_equals_hand_computation():
    # 2 queries, group 2: passages [pos0, neg0, pos1, neg1]; 2-d unit vectors.
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6]])
    t = 0.5
    # query 0 scores / t: [2, 0, 1.2, 1.6], target 0; query 1: [0, 2, 1.6, 1.2], target 2.
    l0 = -2 + math.log(math.exp(2) + 1 + math.exp(1.2) + math.exp(1.6))
    l1 = -1.6 + math.log(1 + math.exp(2) + math.exp(1.6) + math.exp(1.2))
    assert info_nce(q, p, t).item() == pytest.approx((l0 + l1) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="not a multiple"):
        info_nce(q, p[:3], t)


class TinyEncoder(torch.nn.Module):
    """Embedding bag + MLP with dropout: enough to check GradCache's replay of randomness."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(50, 16)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Dropout(0.3), torch.nn.Linear(16, 8))

    def forward(self, inputs):
        x = (self.emb(inputs["input_ids"]) * inputs["attention_mask"][..., None]).sum(1)
        return F.normalize(self.mlp(x), dim=-1)


def _batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (n, 6), generator=g)
    lengths = torch.randint(1, 7, (n,), generator=g)  # right padding, as a tokenizer makes it
    mask = (torch.arange(6)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids, "attention_mask": mask}


def test_grad_cache_gradients_match_the_full_batch():
    q_in, p_in = _batch(6, 1), _batch(18, 2)  # 6 queries x group 3
    loss_fn = lambda q, p: info_nce(q, p, 0.05)  # noqa: E731

    torch.manual_seed(123)
    rng = torch.get_rng_state()
    cached = TinyEncoder().train()
    torch.set_rng_state(rng)
    # With dropout, the replayed chunk forwards must draw the same masks as the cached ones: the
    # reference consumes the random stream chunk by chunk in the same order.
    loss_gc = grad_cache_backward(cached, q_in, p_in, chunk_size=4, loss_fn=loss_fn, sort_by_length=False)

    ref = TinyEncoder().train()
    torch.set_rng_state(rng)
    q = torch.cat([ref({k: v[i:i + 4] for k, v in q_in.items()}) for i in range(0, 6, 4)])
    p = torch.cat([ref({k: v[i:i + 4] for k, v in p_in.items()}) for i in range(0, 18, 4)])
    loss_ref = loss_fn(q, p)
    loss_ref.backward()

    torch.testing.assert_close(loss_gc, loss_ref.detach())
    for a, b in zip(cached.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad)
    # Without dropout the chunking (length-sorted, padding trimmed per chunk) does not matter at
    # all: GradCache == one plain full batch.
    plain, gc = TinyEncoder().eval(), TinyEncoder().eval()
    loss_fn(plain(q_in), plain(p_in)).backward()
    grad_cache_backward(gc, q_in, p_in, chunk_size=5, loss_fn=loss_fn)
    for a, b in zip(gc.parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, q, p, out_dir, port):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    b, g = q.shape[0] // world, p.shape[0] // q.shape[0]
    lq = q[rank * b:(rank + 1) * b].clone().requires_grad_()
    lp = p[rank * b * g:(rank + 1) * b * g].clone().requires_grad_()
    loss = cross_device_loss(lq, lp, 0.05)
    loss.backward()
    torch.save((loss.item(), lq.grad.clone(), lp.grad.clone()), f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_cross_device_loss_with_two_processes_equals_one_combined_batch(tmp_path):
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    q = F.normalize(torch.randn(4, 8), dim=-1)
    p = F.normalize(torch.randn(12, 8), dim=-1)
    # Results come back through files: a multiprocessing Manager would fork this process, which
    # holds the test session's Ray driver (a forked gRPC client stalled later Ray Train runs).
    mp.spawn(_worker, args=(2, q, p, str(tmp_path), _free_port()), nprocs=2, join=True)
    out = {rank: torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)}

    q1, p1 = q.clone().requires_grad_(), p.clone().requires_grad_()
    single = info_nce(q1, p1, 0.05)
    single.backward()
    for rank in range(2):
        loss, gq, gp = out[rank]
        # Value: the combined-batch loss on every worker.
        assert loss == pytest.approx(single.item(), rel=1e-5)
        # Each worker's rows get W x their share of the single-batch gradient; DDP divides by W.
        torch.testing.assert_close(gq / 2, q1.grad[rank * 2:(rank + 1) * 2])
        torch.testing.assert_close(gp / 2, p1.grad[rank * 6:(rank + 1) * 6])


def test_listwise_loss_is_the_groups_softmax_cross_entropy_by_hand():
    from ray_ft.train.contrastive import listwise_loss

    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5, 3.0], requires_grad=True)  # 2 groups of 3
    loss = listwise_loss(logits, 3)
    g1 = -(2.0 - math.log(math.exp(2.0) + math.exp(1.0) + math.exp(0.0)))
    g2 = -(-1.0 - math.log(math.exp(-1.0) + math.exp(0.5) + math.exp(3.0)))
    assert loss.item() == pytest.approx((g1 + g2) / 2, rel=1e-6)
    loss.backward()
    # d loss / d positive logit = (softmax - 1) / B: it pushes every positive up
    assert (logits.grad[[0, 3]] < 0).all() and (logits.grad[[1, 2, 4, 5]] > 0).all()
    with pytest.raises(ValueError, match="multiple of the group size"):
        listwise_loss(torch.zeros(5), 3)
