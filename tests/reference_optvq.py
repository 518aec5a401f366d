"""Independent reference implementations used by the tests (written from the paper and the release notes).

Nothing here imports optvq_hf: these are the golden computations our code is checked against.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def reference_cost(features, codebook, normalization="all"):
    """The published normalized distance matrix `(N, K)`, float64."""
    z = features.detach().double()
    c = codebook.detach().double()
    distances = torch.sqrt(((z[:, None, :] - c[None, :, :]) ** 2).sum(-1))
    if normalization == "all":
        spread = distances.std() if distances.numel() > 1 else torch.zeros((), dtype=torch.float64)  # 1 entry: none
        cost = (distances - distances.mean()) / (spread + 1e-6)
        return cost - cost.min()
    if normalization == "dim":
        return distances / math.sqrt(c.shape[1])
    return distances


def reference_sinkhorn_assign(features, codebook, epsilon=10.0, num_iters=5, normalization="all"):
    """The published algorithm, in float64 and in the exponential domain, with the reference's +1e-8 guards."""
    a = reference_cost(features, codebook, normalization)
    q = torch.exp(-epsilon * a).t()  # (K, N)
    num_codes, num_rows = q.shape
    q = q / (q.sum() + 1e-8)
    for _ in range(num_iters):
        q = q / (q.sum(dim=1, keepdim=True) + 1e-8) / num_codes
        q = q / (q.sum(dim=0, keepdim=True) + 1e-8) / num_rows
    return q.t().argmax(dim=1)


def reference_sinkhorn_log_plan(features, codebook, epsilon=10.0, num_iters=5, normalization="all"):
    """The published algorithm's plan, float64, in the log domain (no underflow), with its +1e-8 guards: `(N, K)`.

    Its row-wise argmax is the published assignment wherever that is finite; entries within float32 resolution of
    their row's largest are ties for any float32 implementation.
    """
    log_plan = -epsilon * reference_cost(features, codebook, normalization)
    num_rows, num_codes = log_plan.shape
    guard = torch.tensor(math.log(1e-8), dtype=torch.float64)
    log_plan = log_plan - torch.logaddexp(torch.logsumexp(log_plan.flatten(), 0), guard)
    for _ in range(num_iters):
        log_plan = log_plan - torch.logaddexp(torch.logsumexp(log_plan, 0, keepdim=True), guard) - math.log(num_codes)
        log_plan = log_plan - torch.logaddexp(torch.logsumexp(log_plan, 1, keepdim=True), guard) - math.log(num_rows)
    return log_plan


def assert_near_optimal(ids, log_plan, tolerance):
    """Every row's chosen code is within `tolerance` nats of its row's best under the float64 plan `log_plan`."""
    ids = ids.reshape(-1)
    best = log_plan.max(dim=1).values
    chosen = log_plan.gather(1, ids[:, None].long()).squeeze(1)
    gaps = best - chosen
    assert bool((gaps <= tolerance).all()), (
        f"{int((gaps > tolerance).sum())} of {ids.numel()} rows chose a code up to {float(gaps.max()):.3g} nats "
        f"below the best (tolerance {tolerance})"
    )


def reference_equipartition_plan(features, codebook, epsilon=10.0, num_iters=5, normalization="all"):
    """OT-VAE's targets: Sinkhorn without guards in the float64 log domain (code then row normalization, exact
    marginals), every row of the plan normalized to sum to 1."""
    log_plan = -epsilon * reference_cost(features, codebook, normalization)
    num_rows, num_codes = log_plan.shape
    for _ in range(num_iters):
        log_plan = log_plan - torch.logsumexp(log_plan, dim=0, keepdim=True) - math.log(num_codes)
        log_plan = log_plan - torch.logsumexp(log_plan, dim=1, keepdim=True) - math.log(num_rows)
    return torch.softmax(log_plan, dim=1)


def reference_quantize(features_bchw, codebook, num_heads, assignment, epsilon=10.0, num_iters=5):
    """Split channels into heads, assign (Sinkhorn over all rows, or nearest), put codes back. float64."""
    batch, channels, height, width = features_bchw.shape
    code_dim = channels // num_heads
    rows = features_bchw.double().permute(0, 2, 3, 1).reshape(-1, code_dim)
    if assignment == "sinkhorn":
        ids = reference_sinkhorn_assign(rows, codebook, epsilon, num_iters)
    else:
        ids = torch.cdist(rows, codebook.double()).argmin(dim=1)
    quantized = codebook.double()[ids].reshape(batch, height, width, channels).permute(0, 3, 1, 2)
    token_ids = ids.reshape(batch, height, width, num_heads).permute(0, 3, 1, 2)
    return quantized, token_ids


# --------------------------------------------------------------------------------------------------------------
# Functional taming VQGAN over an original-layout state dict ("model."-prefixed keys)
# --------------------------------------------------------------------------------------------------------------
def _conv(sd, name, x, stride=1, padding=None):
    weight = sd[name + ".weight"].double()
    pad = weight.shape[-1] // 2 if padding is None else padding
    return F.conv2d(x, weight, sd[name + ".bias"].double(), stride=stride, padding=pad)


def _norm(sd, name, x):
    return F.group_norm(x, 32, sd[name + ".weight"].double(), sd[name + ".bias"].double(), eps=1e-6)


def _swish(x):
    return x * torch.sigmoid(x)


def _resblock(sd, name, x):
    h = _conv(sd, name + ".conv1", _swish(_norm(sd, name + ".norm1", x)))
    h = _conv(sd, name + ".conv2", _swish(_norm(sd, name + ".norm2", h)))
    if name + ".nin_shortcut.weight" in sd:
        x = _conv(sd, name + ".nin_shortcut", x, padding=0)
    return x + h


def _attn(sd, name, x):
    h = _norm(sd, name + ".norm", x)
    q, k, v = (_conv(sd, f"{name}.{p}", h, padding=0) for p in ("q", "k", "v"))
    b, c, hh, ww = q.shape
    q = q.reshape(b, c, hh * ww).permute(0, 2, 1)
    k = k.reshape(b, c, hh * ww)
    w = torch.softmax(torch.bmm(q, k) * (c ** -0.5), dim=2)
    v = v.reshape(b, c, hh * ww)
    out = torch.bmm(v, w.permute(0, 2, 1)).reshape(b, c, hh, ww)
    return x + _conv(sd, name + ".proj_out", out, padding=0)


def _blocks(sd, prefix, x):
    i = 0
    while f"{prefix}.block.{i}.conv1.weight" in sd:
        x = _resblock(sd, f"{prefix}.block.{i}", x)
        if f"{prefix}.attn.{i}.q.weight" in sd:
            x = _attn(sd, f"{prefix}.attn.{i}", x)
        i += 1
    return x


def _mid(sd, prefix, x):
    x = _resblock(sd, prefix + ".block_1", x)
    x = _attn(sd, prefix + ".attn_1", x)
    return _resblock(sd, prefix + ".block_2", x)


def reference_encode_features(sd, pixels, num_levels):
    """taming Encoder + quant_conv, float64."""
    x = _conv(sd, "model.encoder.conv_in", pixels.double())
    for level in range(num_levels):
        x = _blocks(sd, f"model.encoder.down.{level}", x)
        if f"model.encoder.down.{level}.downsample.conv.weight" in sd:
            x = _conv(sd, f"model.encoder.down.{level}.downsample.conv", F.pad(x, (0, 1, 0, 1)), stride=2, padding=0)
    x = _mid(sd, "model.encoder.mid", x)
    x = _conv(sd, "model.encoder.conv_out", _swish(_norm(sd, "model.encoder.norm_out", x)))
    return _conv(sd, "model.quant_conv", x, padding=0)


def reference_codebook(sd):
    table = sd["model.quantize.embedding.weight"].double()
    if "model.quantize.proj.weight" in sd:
        return F.linear(table, sd["model.quantize.proj.weight"].double(), sd["model.quantize.proj.bias"].double())
    return table


def reference_decode(sd, quantized, num_levels):
    """post_quant_conv + taming Decoder, float64."""
    x = _conv(sd, "model.post_quant_conv", quantized.double(), padding=0)
    x = _conv(sd, "model.decoder.conv_in", x)
    x = _mid(sd, "model.decoder.mid", x)
    for level in reversed(range(num_levels)):
        x = _blocks(sd, f"model.decoder.up.{level}", x)
        if f"model.decoder.up.{level}.upsample.conv.weight" in sd:
            x = _conv(sd, f"model.decoder.up.{level}.upsample.conv", F.interpolate(x, scale_factor=2.0, mode="nearest"))
    return _conv(sd, "model.decoder.conv_out", _swish(_norm(sd, "model.decoder.norm_out", x)))


def reference_quantization_loss(rows, codebook, ids, loss_q_type, beta):
    """The original code's quantization loss of rows `(N, d)` assigned to `ids` (float64, differentiable in both):
    "l2" / "l1": `mean(f(z - sg(c))) + beta * mean(f(c - sg(z)))`; "ce": `cross_entropy(-cdist(z, codebook), ids)`."""
    chosen = codebook[ids]
    if loss_q_type == "ce":
        return F.cross_entropy(-torch.cdist(rows, codebook), ids)
    form = (lambda x: x.pow(2)) if loss_q_type == "l2" else (lambda x: x.abs())
    return form(rows - chosen.detach()).mean() + beta * form(chosen - rows.detach()).mean()
