"""A plain, materialising float64 MoCHi: the oracle the fast implementation is checked against.

It builds every synthetic negative as a vector and takes dot products, exactly as the paper
describes it. The random draws are the library's (`draw_mixing`), so both sides mix the same
pairs with the same coefficients; everything else is computed independently here.
"""

import torch

from hnmix.mixing import draw_mixing


def oracle_logits(q, k, queue, *, temperature, n_hard=0, s1=0, s2=0, ids=None, queue_ids=None, generator=None):
    """Returns (logits [B, 1+K+s1+s2] float64, hard queue indices [B, n_hard])."""
    q, k, queue = q.double(), k.double().detach(), queue.double().detach()
    B, K = q.shape[0], queue.shape[0]
    pos = torch.stack([q[b] @ k[b] for b in range(B)]).unsqueeze(1)
    neg = q @ queue.T
    masked = torch.zeros(B, K, dtype=torch.bool)
    if ids is not None:
        masked = ids.unsqueeze(1) == queue_ids.unsqueeze(0)
    neg = neg.masked_fill(masked, float("-inf"))

    hard_lists, n_valid = [], []
    for b in range(B):
        allowed = [j for j in range(K) if not masked[b, j]]
        allowed.sort(key=lambda j: float(neg[b, j].detach()), reverse=True)
        hard_lists.append(allowed[:n_hard])
        n_valid.append(min(n_hard, len(allowed)))
    draws = draw_mixing(torch.tensor(n_valid), s1, s2, generator)

    def normalise(v):
        return v / v.norm()

    rows = []
    for b in range(B):
        hard = hard_lists[b]
        synthetic = []
        for t in range(s1):
            if n_valid[b] < 2:
                synthetic.append(None)
                continue
            a = draws.alpha[b, t].double()
            n_i = queue[hard[draws.pair_i[b, t]]]
            n_j = queue[hard[draws.pair_j[b, t]]]
            synthetic.append(normalise(a * n_i + (1 - a) * n_j))
        for t in range(s2):
            if n_valid[b] < 1:
                synthetic.append(None)
                continue
            beta = draws.beta[b, t].double()
            n_i = queue[hard[draws.single[b, t]]]
            synthetic.append(normalise(beta * q[b].detach() + (1 - beta) * n_i))
        values = [q[b] @ h if h is not None else q.new_tensor(float("-inf")) for h in synthetic]
        rows.append(torch.stack(values) if values else q.new_zeros(0))
    logits = torch.cat([pos, neg, torch.stack(rows)], dim=1) / temperature
    hard = torch.tensor([h + [-1] * (n_hard - len(h)) for h in hard_lists], dtype=torch.long).reshape(B, n_hard)
    return logits, hard
