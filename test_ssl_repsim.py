"""Tests for ssl_repsim: checkpoint layouts, positional interpolation, safety, downloads, CLI.

Every official self-supervised ViT checkpoint layout described in shared/reference/checkpoints.md is
rebuilt here in miniature (random weights, fixed seed, the official container, prefixes, key names and
extra keys), loaded with ``sr.load_model(path)`` without a family hint, and compared against a naive
float64 forward pass written from the formulas in this file (never calling ssl_repsim's modules).
"""
import argparse
import collections
import dataclasses
import hashlib
import http.server
import json
import math
import os
import pickle
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import ssl_repsim as sr

HERE = Path(__file__).resolve().parent
ATOL = 1e-5
RTOL = 1e-5


# ----------------------------------------------------------------------------------------------------
# Architecture description and random canonical parameters (our own naming, not ssl_repsim's)
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Arch:
    D: int = 32
    depth: int = 2
    heads: int = 2
    patch: int = 8
    grid: int = 4               # stored patch grid (img = patch * grid)
    mlp: int = 64
    cls: bool = True
    pos: str = "cls_row"        # "cls_row" | "no_cls_row" | "none"
    regs: int = 0
    rel: str = None             # None | "shared" | "per_block"
    ls: bool = False
    swiglu: bool = False
    final_norm: bool = True
    fc_norm: bool = False
    qv_bias: bool = False       # q/v-only bias (k bias is zero)
    eps: float = 1e-6

    @property
    def img(self):
        return self.patch * self.grid

    @property
    def n_rel(self):
        return (2 * self.grid - 1) ** 2 + 3

    @property
    def swiglu_hidden(self):
        return ((int(4 * self.D * 2 / 3) + 7) // 8) * 8


def seed_of(name):
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def make_params(a: Arch, seed: int):
    g = torch.Generator().manual_seed(seed)

    def rn(*shape, s=1.0):
        return torch.randn(*shape, generator=g) * s

    def ru(*shape):
        return torch.rand(*shape, generator=g)

    D, p, N = a.D, a.patch, a.grid ** 2
    P = {"patch_w": rn(D, 3, p, p, s=0.5 / math.sqrt(3 * p * p)), "patch_b": rn(D, s=0.1)}
    if a.cls:
        P["cls"] = rn(1, 1, D, s=0.3)
    if a.pos == "cls_row":
        P["pos"] = rn(1, N + 1, D, s=0.3)
    elif a.pos == "no_cls_row":
        P["pos"] = rn(1, N, D, s=0.3)
    if a.regs:
        P["reg"] = rn(1, a.regs, D, s=0.3)
    shared = rn(a.n_rel, a.heads) if a.rel == "shared" else None
    blocks = []
    for _ in range(a.depth):
        b = {
            "n1w": 1 + rn(D, s=0.2), "n1b": rn(D, s=0.1),
            "qkv_w": rn(3 * D, D, s=1.5 / math.sqrt(D)), "qkv_b": rn(3 * D, s=0.2),
            "proj_w": rn(D, D, s=0.6 / math.sqrt(D)), "proj_b": rn(D, s=0.1),
            "n2w": 1 + rn(D, s=0.2), "n2b": rn(D, s=0.1),
        }
        if a.qv_bias:
            b["qkv_b"][D:2 * D] = 0
        if a.swiglu:
            h = a.swiglu_hidden
            b.update(w12_w=rn(2 * h, D, s=1 / math.sqrt(D)), w12_b=rn(2 * h, s=0.1),
                     w3_w=rn(D, h, s=0.6 / math.sqrt(h)), w3_b=rn(D, s=0.1))
        else:
            b.update(fc1_w=rn(a.mlp, D, s=1 / math.sqrt(D)), fc1_b=rn(a.mlp, s=0.1),
                     fc2_w=rn(D, a.mlp, s=0.6 / math.sqrt(a.mlp)), fc2_b=rn(D, s=0.1))
        if a.ls:
            b["g1"] = 0.3 + 0.6 * ru(D)
            b["g2"] = 0.3 + 0.6 * ru(D)
        if a.rel == "shared":
            b["rel"] = shared
        elif a.rel == "per_block":
            b["rel"] = rn(a.n_rel, a.heads)
        blocks.append(b)
    P["blocks"] = blocks
    if a.final_norm:
        P["norm_w"], P["norm_b"] = 1 + rn(D, s=0.2), rn(D, s=0.1)
    if a.fc_norm:
        P["fcn_w"], P["fcn_b"] = 1 + rn(D, s=0.2), rn(D, s=0.1)
    return P


def sincos_table(D, grid, order="mae", cls_row=True):
    """2-D sin-cos table; order 'mae' = [sin c, cos c, sin r, cos r], 'moco' = [sin r, cos r, sin c, cos c]."""
    k = torch.arange(D // 4, dtype=torch.float64)
    omega = 1.0 / 10000 ** (k / (D / 4))
    r, c = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    rw = r.flatten()[:, None].double() * omega
    cw = c.flatten()[:, None].double() * omega
    if order == "mae":
        parts = [cw.sin(), cw.cos(), rw.sin(), rw.cos()]
    else:
        parts = [rw.sin(), rw.cos(), cw.sin(), cw.cos()]
    t = torch.cat(parts, 1)
    if cls_row:
        t = torch.cat([torch.zeros(1, D, dtype=t.dtype), t])
    return t[None].float()


# ----------------------------------------------------------------------------------------------------
# Naive reference forward (float64), from the formulas
# ----------------------------------------------------------------------------------------------------

def beit_index(wh, ww):
    """(N+1)x(N+1) relative position index of BEiT: patch pairs, then cls->patch, patch->cls, cls->cls."""
    n = wh * ww
    hs = torch.arange(n) // ww
    ws = torch.arange(n) % ww
    rel = (hs[:, None] - hs[None, :] + wh - 1) * (2 * ww - 1) + (ws[:, None] - ws[None, :] + ww - 1)
    num = (2 * wh - 1) * (2 * ww - 1) + 3
    idx = torch.zeros(n + 1, n + 1, dtype=torch.long)
    idx[1:, 1:] = rel
    idx[0, 1:] = num - 3
    idx[1:, 0] = num - 2
    idx[0, 0] = num - 1
    return idx


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w.double() + b.double()


def gelu_erf(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2.0)))


def softmax(x):
    e = torch.exp(x - x.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def lin(x, w, b):
    return x @ w.double().T + b.double()


def ref_block(t, b, a: Arch, index):
    B, T, D = t.shape
    H = a.heads
    hd = D // H
    h = layer_norm(t, b["n1w"], b["n1b"], a.eps)
    qkv = lin(h, b["qkv_w"], b["qkv_b"])
    q, k, v = qkv.reshape(B, T, 3, H, hd).permute(2, 0, 3, 1, 4)
    logits = (q * hd ** -0.5) @ k.transpose(-1, -2)
    if a.rel:
        logits = logits + b["rel"].double()[index].permute(2, 0, 1)
    att = softmax(logits)
    o = (att @ v).transpose(1, 2).reshape(B, T, D)
    o = lin(o, b["proj_w"], b["proj_b"])
    t1 = t + (b["g1"].double() * o if a.ls else o)
    h2 = layer_norm(t1, b["n2w"], b["n2b"], a.eps)
    if a.swiglu:
        fc1 = lin(h2, b["w12_w"], b["w12_b"])
        x1, x2 = fc1.chunk(2, dim=-1)
        act = x1 * torch.sigmoid(x1) * x2
        m = lin(act, b["w3_w"], b["w3_b"])
    else:
        fc1 = lin(h2, b["fc1_w"], b["fc1_b"])
        act = gelu_erf(fc1)
        m = lin(act, b["fc2_w"], b["fc2_b"])
    t2 = t1 + (b["g2"].double() * m if a.ls else m)
    inter = {"norm1": h, "attn.qkv": qkv, "attn": o, "attn.proj": o, "attn_residual": t1, "norm2": h2,
             "mlp.fc1": fc1, "mlp.act": act, "mlp.fc2": m, "mlp": m}
    return t2, inter


def ref_forward(P, a: Arch, x, pos=None):
    """Returns dict: 'embed', 'blocks.i', 'blocks.i.<sub>', 'norm' (final tokens), 'pooled'."""
    x = x.double()
    B, _, Hh, Ww = x.shape
    p, D = a.patch, a.D
    gh, gw = Hh // p, Ww // p
    patches = x.reshape(B, 3, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, 3 * p * p)
    t = lin(patches, P["patch_w"].reshape(D, -1), P["patch_b"])
    pos = (P.get("pos") if pos is None else pos)
    if a.pos == "no_cls_row":
        t = t + pos.double()
    if a.cls:
        t = torch.cat([P["cls"].double().expand(B, -1, -1), t], 1)
    if a.pos == "cls_row":
        t = t + pos.double()
    if a.regs:
        t = torch.cat([t[:, :1], P["reg"].double().expand(B, -1, -1), t[:, 1:]], 1)
    out = {"embed": t}
    index = beit_index(gh, gw) if a.rel else None
    for i, b in enumerate(P["blocks"]):
        t, inter = ref_block(t, b, a, index)
        out[f"blocks.{i}"] = t
        for k, v in inter.items():
            out[f"blocks.{i}.{k}"] = v
    final = layer_norm(t, P["norm_w"], P["norm_b"], a.eps) if a.final_norm else t
    out["norm"] = final
    npre = int(a.cls) + a.regs
    if a.fc_norm:
        out["pooled"] = layer_norm(final[:, npre:].mean(1), P["fcn_w"], P["fcn_b"], a.eps)
    elif not a.cls:
        out["pooled"] = final.mean(1)
    else:
        out["pooled"] = final[:, 0]
    return out


def interp_grid(pos_patch, m, new, recipe):
    """pos_patch: (1, m*m, D) float32 -> (1, gh*gw, D), bicubic align_corners=False, per recipe.
    new: g or (gh, gw) (rows = image height / patch)."""
    gh, gw = (new, new) if isinstance(new, int) else new
    D = pos_patch.shape[-1]
    grid = pos_patch.float().reshape(1, m, m, D).permute(0, 3, 1, 2)
    if recipe == "plain":
        r = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
    elif recipe == "dinov2":   # DINO / DINOv2 without registers: scale_factor with the +0.1 offset
        r = F.interpolate(grid, scale_factor=((gh + 0.1) / m, (gw + 0.1) / m), mode="bicubic",
                          align_corners=False)
    elif recipe == "dinov2_reg":  # DINOv2 with registers: size, antialias
        r = F.interpolate(grid, size=(gh, gw), mode="bicubic", antialias=True, align_corners=False)
    else:
        raise ValueError(recipe)
    assert r.shape[-2:] == (gh, gw)
    return r.permute(0, 2, 3, 1).reshape(1, gh * gw, D)


# ----------------------------------------------------------------------------------------------------
# Official layouts: canonical params -> official key names / containers
# ----------------------------------------------------------------------------------------------------

def T(t):
    return t.detach().clone().contiguous()


def plain_sd(P, a: Arch, ls_style="gamma", with_index=True):
    """timm/BEiT/DINOv2-style key names without prefix."""
    D = a.D
    sd = {}
    if "cls" in P:
        sd["cls_token"] = P["cls"]
    if "pos" in P:
        sd["pos_embed"] = P["pos"]
    if "reg" in P:
        sd["register_tokens"] = P["reg"]
    sd["patch_embed.proj.weight"] = P["patch_w"]
    sd["patch_embed.proj.bias"] = P["patch_b"]
    idx = beit_index(a.grid, a.grid)
    if a.rel == "shared":
        sd["rel_pos_bias.relative_position_bias_table"] = P["blocks"][0]["rel"]
        if with_index:
            sd["rel_pos_bias.relative_position_index"] = idx
    for i, b in enumerate(P["blocks"]):
        pre = f"blocks.{i}."
        if a.ls and ls_style == "gamma":
            sd[pre + "gamma_1"], sd[pre + "gamma_2"] = b["g1"], b["g2"]
        sd[pre + "norm1.weight"], sd[pre + "norm1.bias"] = b["n1w"], b["n1b"]
        if a.qv_bias:
            sd[pre + "attn.q_bias"] = b["qkv_b"][:D]
            sd[pre + "attn.v_bias"] = b["qkv_b"][2 * D:]
            sd[pre + "attn.qkv.weight"] = b["qkv_w"]
        else:
            sd[pre + "attn.qkv.weight"], sd[pre + "attn.qkv.bias"] = b["qkv_w"], b["qkv_b"]
        if a.rel == "per_block":
            sd[pre + "attn.relative_position_bias_table"] = b["rel"]
            if with_index:
                sd[pre + "attn.relative_position_index"] = idx
        sd[pre + "attn.proj.weight"], sd[pre + "attn.proj.bias"] = b["proj_w"], b["proj_b"]
        if a.ls and ls_style == "ls":
            sd[pre + "ls1.gamma"] = b["g1"]
        sd[pre + "norm2.weight"], sd[pre + "norm2.bias"] = b["n2w"], b["n2b"]
        if a.swiglu:
            sd[pre + "mlp.w12.weight"], sd[pre + "mlp.w12.bias"] = b["w12_w"], b["w12_b"]
            sd[pre + "mlp.w3.weight"], sd[pre + "mlp.w3.bias"] = b["w3_w"], b["w3_b"]
        else:
            sd[pre + "mlp.fc1.weight"], sd[pre + "mlp.fc1.bias"] = b["fc1_w"], b["fc1_b"]
            sd[pre + "mlp.fc2.weight"], sd[pre + "mlp.fc2.bias"] = b["fc2_w"], b["fc2_b"]
        if a.ls and ls_style == "ls":
            sd[pre + "ls2.gamma"] = b["g2"]
    if a.final_norm:
        sd["norm.weight"], sd["norm.bias"] = P["norm_w"], P["norm_b"]
    if a.fc_norm:
        sd["fc_norm.weight"], sd["fc_norm.bias"] = P["fcn_w"], P["fcn_b"]
    return {k: T(v) for k, v in sd.items()}


def rnd(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda *s: torch.randn(*s, generator=g) * 0.1


def prefixed(sd, pre):
    return {pre + k: v for k, v in sd.items()}


def drop_key(sd, key):
    if key is not None:
        assert key in sd, key
        del sd[key]
    return sd


def linear(r, name, out, inp, bias=True):
    d = {name + ".weight": r(out, inp)}
    if bias:
        d[name + ".bias"] = r(out)
    return d


def batchnorm(r, name, n, affine=True):
    d = {name + ".running_mean": r(n), name + ".running_var": 1 + r(n).abs(),
         name + ".num_batches_tracked": torch.tensor(1000)}
    if affine:
        d[name + ".weight"] = 1 + r(n)
        d[name + ".bias"] = r(n)
    return d


def vit_block_extras(r, name, D, hidden, qv=False, ls=False):
    d = {name + ".norm1.weight": 1 + r(D), name + ".norm1.bias": r(D)}
    d[name + ".attn.qkv.weight"] = r(3 * D, D)
    if qv:
        d[name + ".attn.q_bias"], d[name + ".attn.v_bias"] = r(D), r(D)
    else:
        d[name + ".attn.qkv.bias"] = r(3 * D)
    d.update(linear(r, name + ".attn.proj", D, D))
    d[name + ".norm2.weight"], d[name + ".norm2.bias"] = 1 + r(D), r(D)
    d.update(linear(r, name + ".mlp.fc1", hidden, D))
    d.update(linear(r, name + ".mlp.fc2", D, hidden))
    if ls:
        d[name + ".gamma_1"], d[name + ".gamma_2"] = r(D), r(D)
    return d


def optimizer_state(r, n=3):
    return {"state": {i: {"step": torch.tensor(10.0), "exp_avg": r(4), "exp_avg_sq": r(4).abs()} for i in range(n)},
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.05,
                              "amsgrad": False, "params": list(range(n))}]}


def scaler_state():
    return {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
            "_growth_tracker": 0}


def dino_head(r, pre, D, second=False):
    hid, bott, out = 48, 16, 64
    d = {}
    d.update(linear(r, pre + "head.mlp.0", hid, D))
    d.update(linear(r, pre + "head.mlp.2", hid, hid))
    d.update(linear(r, pre + "head.mlp.4", bott, hid))
    d[pre + "head.last_layer.weight_g"] = torch.ones(out, 1)
    d[pre + "head.last_layer.weight_v"] = r(out, bott)
    if second:
        d[pre + "head.last_layer2.weight_g"] = torch.ones(out, 1)
        d[pre + "head.last_layer2.weight_v"] = r(out, bott)
    return d


def ns_args(**kw):
    base = dict(arch="vit_small", patch_size=8, out_dim=64, norm_last_layer=True, momentum_teacher=0.996,
                use_bn_in_head=False, warmup_teacher_temp=0.04, teacher_temp=0.04, use_fp16=False,
                weight_decay=0.04, lr=0.0005, epochs=100, batch_size_per_gpu=64, optimizer="adamw",
                global_crops_scale=(0.4, 1.0), local_crops_number=8, data_path="/path/to/imagenet/train",
                output_dir=".", seed=0, dist_url="env://")
    base.update(kw)
    return argparse.Namespace(**base)


@dataclasses.dataclass
class Case:
    path: Path
    P: dict
    a: Arch
    family: str
    kwargs: dict


def _save(obj, path):
    torch.save(obj, path)
    return path


# Each builder: (dir, arch, drop) -> (path, P, family). `drop` removes one backbone key (plain name).

def b_mae(d, a, drop, full=False):
    P = make_params(a, seed_of("mae"))
    P["pos"] = sincos_table(a.D, a.grid, "mae", cls_row=True)
    sd = drop_key(plain_sd(P, a), drop)
    if full:
        r = rnd(1)
        Dd = 16
        sd["mask_token"] = r(1, 1, Dd)
        sd.update(linear(r, "decoder_embed", Dd, a.D))
        sd["decoder_pos_embed"] = sincos_table(Dd, a.grid, "mae")
        for k, v in vit_block_extras(r, "decoder_blocks.0", Dd, 2 * Dd).items():
            sd[k] = v
        sd["decoder_norm.weight"], sd["decoder_norm.bias"] = 1 + r(Dd), r(Dd)
        sd.update(linear(r, "decoder_pred", a.patch ** 2 * 3, Dd))
    return _save({"model": sd}, d / ("mae_pretrain_vit_tiny_full.pth" if full else "mae_pretrain_vit_tiny.pth")), P


def b_mae_full(d, a, drop):
    return b_mae(d, a, drop, full=True)


def b_mae_ft(d, a, drop):
    P = make_params(a, seed_of("mae_ft"))
    sd = drop_key(plain_sd(P, a), drop)
    sd.update(linear(rnd(2), "head", 10, a.D))
    return _save({"model": sd}, d / "mae_finetuned_vit_tiny.pth"), P


def b_dino(d, a, drop):
    P = make_params(a, seed_of("dino"))
    sd = drop_key(plain_sd(P, a), drop)
    return _save(sd, d / "dino_deitsmall8_pretrain.pth"), P


def b_dino_safetensors(d, a, drop):
    from safetensors.torch import save_file
    P = make_params(a, seed_of("dino_st"))
    sd = drop_key(plain_sd(P, a), drop)
    path = d / "dino_vits8.safetensors"
    save_file(sd, str(path), metadata={"format": "pt"})
    return path, P


def b_dino_full(d, a, drop):
    P = make_params(a, seed_of("dino_full"))
    S = make_params(a, seed_of("dino_full_student"))
    r = rnd(3)
    teacher = prefixed(drop_key(plain_sd(P, a), drop), "backbone.")
    teacher.update(dino_head(r, "", a.D))
    student = prefixed(plain_sd(S, a), "module.backbone.")
    student.update(dino_head(r, "module.", a.D))
    obj = {"student": student, "teacher": teacher, "optimizer": optimizer_state(r), "epoch": 100,
           "args": ns_args()}
    return _save(obj, d / "dino_deitsmall8_pretrain_full_checkpoint.pth"), P


def b_ibot(d, a, drop):
    P = make_params(a, seed_of("ibot"))
    return _save({"state_dict": drop_key(plain_sd(P, a), drop)}, d / "checkpoint_teacher.pth"), P


def b_ibot_full(d, a, drop):
    P = make_params(a, seed_of("ibot_full"))
    S = make_params(a, seed_of("ibot_full_student"))
    r = rnd(4)
    teacher = prefixed(drop_key(plain_sd(P, a), drop), "backbone.")
    teacher.update(dino_head(r, "", a.D, second=True))
    student = prefixed(plain_sd(S, a), "module.backbone.")
    student["module.backbone.masked_embed"] = r(1, a.D)
    student.update(dino_head(r, "module.", a.D, second=True))
    obj = {"student": student, "teacher": teacher, "optimizer": optimizer_state(r), "epoch": 800,
           "args": ns_args(arch="vit_small", pred_ratio=0.3, lambda1=1.0, lambda2=1.0, shared_head=True),
           "ibot_loss": {"center": r(1, 64), "center2": r(1, 1, 64)}, "fp16_scaler": scaler_state()}
    return _save(obj, d / "checkpoint.pth"), P


def moco_encoder(r, pre, bb, D):
    sd = prefixed(bb, pre)
    hid, out = 48, 24
    sd.update(linear(r, pre + "head.0", hid, D, bias=False))
    sd.update(batchnorm(r, pre + "head.1", hid))
    sd.update(linear(r, pre + "head.3", hid, hid, bias=False))
    sd.update(batchnorm(r, pre + "head.4", hid))
    sd.update(linear(r, pre + "head.6", out, hid, bias=False))
    sd.update(batchnorm(r, pre + "head.7", out, affine=False))
    return sd


def b_mocov3(d, a, drop):
    P = make_params(a, seed_of("mocov3"))
    P["pos"] = sincos_table(a.D, a.grid, "moco", cls_row=True)
    M = make_params(a, seed_of("mocov3_momentum"))
    M["pos"] = P["pos"]
    r = rnd(5)
    st = moco_encoder(r, "module.base_encoder.", drop_key(plain_sd(P, a), drop), a.D)
    st.update(moco_encoder(r, "module.momentum_encoder.", plain_sd(M, a), a.D))
    st.update(linear(r, "module.predictor.0", 48, 24, bias=False))
    st.update(batchnorm(r, "module.predictor.1", 48))
    st.update(linear(r, "module.predictor.3", 24, 48, bias=False))
    st.update(batchnorm(r, "module.predictor.4", 24, affine=False))
    obj = {"epoch": 300, "arch": "vit_small", "state_dict": st, "optimizer": optimizer_state(r)}
    return _save(obj, d / "vit-s-300ep.pth.tar"), P


def b_msn(d, a, drop):
    P = make_params(a, seed_of("msn"))
    r = rnd(6)
    sd = prefixed(drop_key(plain_sd(P, a), drop), "module.")
    hid, out = 48, 24
    sd.update(linear(r, "module.fc.fc1", hid, a.D))
    sd.update(batchnorm(r, "module.fc.bn1", hid))
    sd.update(linear(r, "module.fc.fc2", hid, hid))
    sd.update(batchnorm(r, "module.fc.bn2", hid))
    sd.update(linear(r, "module.fc.fc3", out, hid))
    return _save({"target_encoder": sd, "prototypes": r(100, out)}, d / "vits16_800ep.pth.tar"), P


def b_deit(d, a, drop):
    P = make_params(a, seed_of("deit"))
    sd = drop_key(plain_sd(P, a), drop)
    sd.update(linear(rnd(7), "head", 10, a.D))
    return _save({"model": sd}, d / "deit_small_patch16_224-cd65a155.pth"), P


def b_deit3(d, a, drop):
    P = make_params(a, seed_of("deit3"))
    sd = drop_key(plain_sd(P, a), drop)
    sd.update(linear(rnd(8), "head", 10, a.D))
    return _save({"model": sd}, d / "deit_3_small_224_21k.pth"), P


def b_ijepa(d, a, drop):
    P = make_params(a, seed_of("ijepa"))
    P["pos"] = sincos_table(a.D, a.grid, "mae", cls_row=False)
    E = make_params(a, seed_of("ijepa_context"))
    E["pos"] = P["pos"]
    r = rnd(9)
    Dp = 16
    pred = {"module.mask_token": r(1, 1, Dp)}
    pred.update(linear(r, "module.predictor_embed", Dp, a.D))
    pred["module.predictor_pos_embed"] = sincos_table(Dp, a.grid, "mae", cls_row=False)
    pred.update(vit_block_extras(r, "module.predictor_blocks.0", Dp, 2 * Dp))
    pred["module.predictor_norm.weight"], pred["module.predictor_norm.bias"] = 1 + r(Dp), r(Dp)
    pred.update(linear(r, "module.predictor_proj", a.D, Dp))
    obj = {"encoder": prefixed(plain_sd(E, a), "module."), "predictor": pred,
           "target_encoder": prefixed(drop_key(plain_sd(P, a), drop), "module."),
           "opt": optimizer_state(r), "scaler": None, "epoch": 300, "loss": 0.123, "batch_size": 128,
           "world_size": 16, "lr": 0.001}
    return _save(obj, d / "IN1K-vit.h.14-300e.pth.tar"), P


def b_beit(d, a, drop):
    P = make_params(a, seed_of("beit"))
    r = rnd(10)
    sd = drop_key(plain_sd(P, a), drop)
    sd["mask_token"] = r(1, 1, a.D)
    sd.update(linear(r, "lm_head", 8192, a.D))
    return _save({"model": sd}, d / "beit_base_patch16_224_pt22k.pth"), P


def b_beit_pt1k(d, a, drop):
    P = make_params(a, seed_of("beit_pt1k"))
    r = rnd(11)
    sd = drop_key(plain_sd(P, a), drop)
    sd["mask_token"] = r(1, 1, a.D)
    sd.update(linear(r, "lm_head", 8192, a.D))
    return _save({"model": sd}, d / "beit_base_patch16_224_pt1k_800ep.pth"), P


def b_beit_ft(d, a, drop):
    P = make_params(a, seed_of("beit_ft"))
    sd = drop_key(plain_sd(P, a), drop)
    sd.update(linear(rnd(12), "head", 21841 // 100, a.D))
    return _save({"model": sd}, d / "beit_base_patch16_224_pt22k_ft22k.pth"), P


def b_simmim(d, a, drop):
    P = make_params(a, seed_of("simmim"))
    r = rnd(13)
    sd = prefixed(drop_key(plain_sd(P, a), drop), "encoder.")
    sd["encoder.mask_token"] = r(1, 1, a.D)
    sd["decoder.0.weight"] = r(a.patch ** 2 * 3, a.D, 1, 1)
    sd["decoder.0.bias"] = r(a.patch ** 2 * 3)
    obj = {"model": sd, "optimizer": optimizer_state(r), "max_accuracy": 0.0, "epoch": 799,
           "scaler": scaler_state()}
    return _save(obj, d / "simmim_pretrain__vit_base__img224__800ep.pth"), P


def b_data2vec(d, a, drop):
    P = make_params(a, seed_of("data2vec"))
    E = make_params(a, seed_of("data2vec_ema"))
    r = rnd(14)

    def full(sd):
        sd["mask_token"] = r(1, 1, a.D)
        sd.update(linear(r, "lm_head", a.D, a.D))
        return sd

    obj = {"model": full(drop_key(plain_sd(P, a), drop)), "optimizer": optimizer_state(r), "epoch": 799,
           "scaler": scaler_state(), "args": ns_args(model="beit_base_patch16_224"),
           "model_ema": full(plain_sd(E, a))}
    return _save(obj, d / "checkpoint-799.pth"), P


def b_data2vec_ft(d, a, drop):
    P = make_params(a, seed_of("data2vec_ft" + str(a.rel)))
    r = rnd(15)
    sd = drop_key(plain_sd(P, a), drop)
    sd.update(linear(r, "head", 10, a.D))
    buffers = [k for k in sd if k.endswith("relative_position_index")]
    obj = {"module": sd, "buffer_names": buffers, "optimizer": None, "lr_scheduler": None,
           "param_shapes": [collections.OrderedDict((k, v.shape) for k, v in sd.items() if k not in buffers)],
           "sparse_tensor_module_names": set(), "skipped_steps": 0, "global_steps": 1000, "global_samples": 1024000,
           "dp_world_size": 16, "mp_world_size": 1, "ds_version": "0.5.8", "epoch": 99}
    return _save(obj, d / "mp_rank_00_model_states.pt"), P


def b_dinov2(d, a, drop):
    P = make_params(a, seed_of(f"dinov2{a.regs}{a.swiglu}"))
    sd = drop_key(plain_sd(P, a, ls_style="ls"), drop)
    sd["mask_token"] = T(rnd(16)(1, a.D))
    name = "dinov2_vit{}14{}_pretrain.pth".format("g" if a.swiglu else "s", "_reg4" if a.regs else "")
    return _save(sd, d / name), P


def b_dinov2_chunked(d, a, drop):
    """DINOv2 training layout with block_chunks == depth: chunk c holds c Identity slots, then block c."""
    P = make_params(a, seed_of("dinov2_chunked"))
    sd = drop_key(plain_sd(P, a, ls_style="ls"), drop)
    out = {}
    for k, v in sd.items():
        if k.startswith("blocks."):
            i = k.split(".")[1]
            k = f"blocks.{i}.{i}." + k.split(".", 2)[2]
        out[k] = v
    out["mask_token"] = T(rnd(16)(1, a.D))
    return _save(out, d / "dinov2_chunked_teacher.pth"), P


def b_cae(d, a, drop):
    P = make_params(a, seed_of("cae"))
    P["pos"] = sincos_table(a.D, a.grid, "moco", cls_row=True)
    A = make_params(a, seed_of("cae_alignment"))
    A["pos"] = P["pos"]
    r = rnd(17)
    D = a.D
    sd = prefixed(drop_key(plain_sd(P, a), drop), "encoder.")
    sd.update(prefixed(plain_sd(A, a), "alignment_encoder."))
    sd["rd_pos_embed"] = sincos_table(D, a.grid, "moco", cls_row=True)
    sd["mask_token"] = r(1, 1, D)
    pre = "regresser.regressor_blocks.0."
    for n in ("norm1_q", "norm1_k", "norm1_v", "norm2_cross"):
        sd[pre + n + ".weight"], sd[pre + n + ".bias"] = 1 + r(D), r(D)
    for n in ("q", "k", "v"):
        sd[pre + f"cross_attn.{n}.weight"] = r(D, D)
    sd[pre + "cross_attn.q_bias"], sd[pre + "cross_attn.v_bias"] = r(D), r(D)
    sd.update(linear(r, pre + "cross_attn.proj", D, D))
    sd.update(linear(r, pre + "mlp_cross.fc1", 2 * D, D))
    sd.update(linear(r, pre + "mlp_cross.fc2", D, 2 * D))
    sd[pre + "gamma_1_cross"], sd[pre + "gamma_2_cross"] = r(D), r(D)
    sd["regresser.norm.weight"], sd["regresser.norm.bias"] = 1 + r(D), r(D)
    sd.update(vit_block_extras(r, "decoder.decoder_blocks.0", D, 2 * D, qv=True, ls=True))
    sd["decoder.norm.weight"], sd["decoder.norm.bias"] = 1 + r(D), r(D)
    sd.update(linear(r, "decoder.head", 8192, D))
    obj = {"model": sd, "optimizer": optimizer_state(r), "epoch": 799, "scaler": scaler_state(),
           "args": ns_args(model="cae_base_patch16_224_8k_vocab")}
    return _save(obj, d / "cae_base_800ep.pth"), P


def tv_sd(P, a, legacy=False):
    sd = {"class_token": P["cls"], "conv_proj.weight": P["patch_w"], "conv_proj.bias": P["patch_b"],
          "encoder.pos_embedding": P["pos"]}
    m0, m3 = ("linear_1", "linear_2") if legacy else ("0", "3")
    for i, b in enumerate(P["blocks"]):
        pre = f"encoder.layers.encoder_layer_{i}."
        sd[pre + "ln_1.weight"], sd[pre + "ln_1.bias"] = b["n1w"], b["n1b"]
        sd[pre + "self_attention.in_proj_weight"] = b["qkv_w"]
        sd[pre + "self_attention.in_proj_bias"] = b["qkv_b"]
        sd[pre + "self_attention.out_proj.weight"] = b["proj_w"]
        sd[pre + "self_attention.out_proj.bias"] = b["proj_b"]
        sd[pre + "ln_2.weight"], sd[pre + "ln_2.bias"] = b["n2w"], b["n2b"]
        sd[pre + f"mlp.{m0}.weight"], sd[pre + f"mlp.{m0}.bias"] = b["fc1_w"], b["fc1_b"]
        sd[pre + f"mlp.{m3}.weight"], sd[pre + f"mlp.{m3}.bias"] = b["fc2_w"], b["fc2_b"]
    sd["encoder.ln.weight"], sd["encoder.ln.bias"] = P["norm_w"], P["norm_b"]
    sd = {k: T(v) for k, v in sd.items()}
    sd.update(linear(rnd(18), "heads.head", 10, a.D))
    return sd


def b_torchvision(d, a, drop):
    P = make_params(a, seed_of("torchvision"))
    return _save(tv_sd(P, a), d / "vit_b_16-c867db91.pth"), P


def b_torchvision_legacy(d, a, drop):
    P = make_params(a, seed_of("torchvision_legacy"))
    return _save(tv_sd(P, a, legacy=True), d / "vit_b_16_legacy.pth"), P


def hf_sd(P, a, ft):
    D = a.D
    pre = "data2vec_vision." if ft else ""
    sd = {"embeddings.cls_token": P["cls"],
          "embeddings.patch_embeddings.projection.weight": P["patch_w"],
          "embeddings.patch_embeddings.projection.bias": P["patch_b"]}
    idx = beit_index(a.grid, a.grid)
    if a.rel == "shared":
        sd["encoder.relative_position_bias.relative_position_bias_table"] = P["blocks"][0]["rel"]
        sd["encoder.relative_position_bias.relative_position_index"] = idx
    for i, b in enumerate(P["blocks"]):
        L = f"encoder.layer.{i}."
        A = L + "attention.attention."
        sd[L + "lambda_1"], sd[L + "lambda_2"] = b["g1"], b["g2"]
        sd[A + "query.weight"], sd[A + "query.bias"] = b["qkv_w"][:D], b["qkv_b"][:D]
        sd[A + "key.weight"] = b["qkv_w"][D:2 * D]
        sd[A + "value.weight"], sd[A + "value.bias"] = b["qkv_w"][2 * D:], b["qkv_b"][2 * D:]
        if a.rel == "per_block":
            sd[A + "relative_position_bias.relative_position_bias_table"] = b["rel"]
            sd[A + "relative_position_bias.relative_position_index"] = idx
        sd[L + "attention.output.dense.weight"], sd[L + "attention.output.dense.bias"] = b["proj_w"], b["proj_b"]
        sd[L + "layernorm_before.weight"], sd[L + "layernorm_before.bias"] = b["n1w"], b["n1b"]
        sd[L + "intermediate.dense.weight"], sd[L + "intermediate.dense.bias"] = b["fc1_w"], b["fc1_b"]
        sd[L + "output.dense.weight"], sd[L + "output.dense.bias"] = b["fc2_w"], b["fc2_b"]
        sd[L + "layernorm_after.weight"], sd[L + "layernorm_after.bias"] = b["n2w"], b["n2b"]
    if a.final_norm:
        sd["layernorm.weight"], sd["layernorm.bias"] = P["norm_w"], P["norm_b"]
    if a.fc_norm:
        sd["pooler.layernorm.weight"], sd["pooler.layernorm.bias"] = P["fcn_w"], P["fcn_b"]
    sd = {pre + k: T(v) for k, v in sd.items()}
    if ft:
        sd.update(linear(rnd(19), "classifier", 5, D))
    return sd


def hf_config(a, ft):
    cfg = {
        "architectures": ["Data2VecVisionForImageClassification" if ft else "Data2VecVisionModel"],
        "model_type": "data2vec-vision", "hidden_size": a.D, "num_hidden_layers": a.depth,
        "num_attention_heads": a.heads, "intermediate_size": a.mlp, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
        "layer_norm_eps": 1e-12, "image_size": a.img, "patch_size": a.patch, "num_channels": 3,
        "use_mask_token": False, "use_absolute_position_embeddings": False,
        "use_relative_position_bias": ft, "use_shared_relative_position_bias": not ft,
        "layer_scale_init_value": 0.1, "drop_path_rate": 0.1, "use_mean_pooling": ft,
        "out_indices": [3, 5, 7, 11], "pool_scales": [1, 2, 3, 6], "use_auxiliary_head": True,
        "auxiliary_loss_weight": 0.4, "auxiliary_channels": 256, "auxiliary_num_convs": 1,
        "auxiliary_concat_input": False, "semantic_loss_ignore_index": 255, "torch_dtype": "float32",
        "transformers_version": "4.17.0.dev0",
    }
    if ft:
        cfg["id2label"] = {str(i): f"class_{i}" for i in range(5)}
        cfg["label2id"] = {f"class_{i}": i for i in range(5)}
    return cfg


def b_hf(d, a, drop, ft=False, fmt="bin"):
    P = make_params(a, seed_of(f"hf{ft}{fmt}"))
    out = d / ("data2vec-vision-base" + ("-ft1k" if ft else ""))
    out.mkdir()
    (out / "config.json").write_text(json.dumps(hf_config(a, ft), indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps(
        {"do_resize": True, "size": a.img, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    sd = hf_sd(P, a, ft)
    if fmt == "bin":
        torch.save(sd, out / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file
        save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out, P


# name -> (builder, arch overrides, expected family, pass num_heads?)
BEIT_PT = dict(cls=True, pos="none", rel="shared", ls=True, qv_bias=True)
BEIT_FT = dict(cls=True, pos="none", rel="per_block", ls=True, qv_bias=True, final_norm=False, fc_norm=True)
LAYOUTS = {
    "mae": (b_mae, {}, "mae"),
    "mae_full": (b_mae_full, {}, "mae"),
    "mae_ft": (b_mae_ft, dict(final_norm=False, fc_norm=True), "mae_ft"),
    "dino": (b_dino, {}, "dino"),
    "dino_safetensors": (b_dino_safetensors, {}, "dino"),
    "dino_full": (b_dino_full, {}, "dino"),
    "ibot": (b_ibot, {}, "ibot"),
    "ibot_full": (b_ibot_full, {}, "ibot"),
    "mocov3": (b_mocov3, {}, "mocov3"),
    "msn": (b_msn, {}, "msn"),
    "deit": (b_deit, {}, "deit"),
    "deit3": (b_deit3, dict(pos="no_cls_row", ls=True), "deit3"),
    "ijepa": (b_ijepa, dict(cls=False, pos="no_cls_row"), "ijepa"),
    "beit": (b_beit, BEIT_PT, "beit"),
    "beit_pt1k_800ep": (b_beit_pt1k, dict(qv_bias=True), "beit"),
    "beit_ft": (b_beit_ft, BEIT_FT, "beit_ft"),
    "simmim": (b_simmim, BEIT_PT, "simmim"),
    "data2vec": (b_data2vec, BEIT_PT, "data2vec"),
    "data2vec_ft_shared": (b_data2vec_ft, dict(BEIT_FT, rel="shared"), "data2vec_ft"),
    "data2vec_ft_per_block": (b_data2vec_ft, BEIT_FT, "data2vec_ft"),
    "data2vec_hf": (lambda d, a, drop: b_hf(d, a, drop), dict(BEIT_PT, eps=1e-12), "data2vec_hf"),
    "data2vec_hf_safetensors": (lambda d, a, drop: b_hf(d, a, drop, fmt="st"), dict(BEIT_PT, eps=1e-12),
                                "data2vec_hf"),
    "data2vec_hf_ft1k": (lambda d, a, drop: b_hf(d, a, drop, ft=True), dict(BEIT_FT, eps=1e-12), "data2vec_hf"),
    "dinov2": (b_dinov2, dict(patch=14, ls=True), "dinov2"),
    "dinov2_reg4": (b_dinov2, dict(patch=14, ls=True, regs=4), "dinov2"),
    "dinov2_g_swiglu": (b_dinov2, dict(patch=14, ls=True, swiglu=True), "dinov2"),
    "dinov2_g_swiglu_reg4": (b_dinov2, dict(patch=14, ls=True, swiglu=True, regs=4), "dinov2"),
    "dinov2_block_chunks": (b_dinov2_chunked, dict(patch=14, ls=True), "dinov2"),
    "cae": (b_cae, dict(qv_bias=True, ls=True), "cae"),
    "torchvision": (b_torchvision, {}, "torchvision"),
    "torchvision_legacy": (b_torchvision_legacy, {}, "torchvision"),
}
HF_LAYOUTS = {"data2vec_hf", "data2vec_hf_safetensors", "data2vec_hf_ft1k"}


def build(name, d: Path, drop=None, **arch_over):
    builder, over, family = LAYOUTS[name]
    a = Arch(**{**over, **arch_over})
    path, P = builder(d, a, drop)
    kwargs = {} if name in HF_LAYOUTS else {"num_heads": a.heads}
    return Case(Path(path), P, a, family, kwargs)


def images(a: Arch, n=2, img=None, seed=0):
    """img: None (native), an int (square) or (height, width)."""
    img = img or a.img
    h, w = (img, img) if isinstance(img, int) else img
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, h, w, generator=g)


def grid_img(a: Arch, g):
    return a.patch * g if isinstance(g, int) else (a.patch * g[0], a.patch * g[1])


def close(got, exp, what):
    got = torch.as_tensor(got).detach().double().cpu()
    exp = exp.detach().double()
    assert got.shape == exp.shape, f"{what}: shape {tuple(got.shape)} != expected {tuple(exp.shape)}"
    err = (got - exp).abs().max().item()
    ok = bool(torch.allclose(got, exp, atol=ATOL, rtol=RTOL))
    assert ok, f"{what}: max abs err {err:.3g} (max |expected| {exp.abs().max().item():.3g})"


def check_model(model, case: Case, x, pos=None, sub=False):
    a = case.a
    ref = ref_forward(case.P, a, x, pos=pos)
    points = ["embed"] + [f"blocks.{i}" for i in range(a.depth)]
    if sub:
        points += [f"blocks.{i}.{s}" for i in range(a.depth)
                   for s in ("norm1", "attn.qkv", "attn", "attn_residual", "norm2", "mlp.fc1", "mlp.act", "mlp")]
    if a.final_norm:
        points.append("norm")
    feats = sr.extract(model, x, points=points, tokens="all")
    for pnt in points:
        assert pnt in feats, f"extract did not return {pnt!r}"
        assert feats[pnt].dtype == torch.float32
        close(feats[pnt], ref[pnt], pnt)
    with torch.no_grad():
        close(model.forward_features(x), ref["norm"], "forward_features")
        close(model(x), ref["pooled"], "model(x)")
    return ref


# ----------------------------------------------------------------------------------------------------
# Layout tests
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layout_loads_and_matches_naive_forward(name, tmp_path):
    case = build(name, tmp_path)
    model = sr.load_model(str(case.path), **case.kwargs)
    assert model.family == case.family
    assert not model.training
    x = images(case.a)
    check_model(model, case, x)


@pytest.mark.parametrize("name", ["beit", "dinov2_g_swiglu_reg4", "deit3", "mae_ft", "cae"])
def test_sublayer_points_match(name, tmp_path):
    case = build(name, tmp_path)
    model = sr.load_model(str(case.path), **case.kwargs)
    check_model(model, case, images(case.a), sub=True)


def test_load_model_accepts_path_object(tmp_path):
    case = build("deit", tmp_path)
    model = sr.load_model(case.path, num_heads=2)
    assert model.family == "deit"


def test_token_reductions_exclude_cls_and_registers(tmp_path):
    case = build("dinov2_reg4", tmp_path)
    model = sr.load_model(str(case.path), **case.kwargs)
    x = images(case.a, n=3)
    ref = ref_forward(case.P, case.a, x)["blocks.1"]
    npre = 1 + case.a.regs
    expect = {"all": ref, "cls": ref[:, 0], "patch": ref[:, npre:], "mean": ref[:, npre:].mean(1),
              "flat": ref.reshape(3, -1)}
    for tokens, exp in expect.items():
        got = sr.extract(model, x, points=["blocks.1"], tokens=tokens, batch_size=2)["blocks.1"]
        close(got, exp, f"tokens={tokens}")


def test_extract_accepts_iterable_of_batches(tmp_path):
    case = build("dino", tmp_path)
    model = sr.load_model(str(case.path), **case.kwargs)
    x = images(case.a, n=4)
    ref = ref_forward(case.P, case.a, x)["blocks.1"]
    batches = [(x[:2], torch.tensor([0, 1])), (x[2:], torch.tensor([1, 0]))]
    got = sr.extract(model, iter(batches), points=["blocks.1"], tokens="all")["blocks.1"]
    close(got, ref, "iterable batches")


@pytest.mark.parametrize("name,D,depth,expected_heads", [
    ("dino", 128, 1, 2),            # D/64
    ("dino", 384, 1, 6),            # ViT-S
    ("mocov3", 384, 1, 12),         # MoCo v3 ViT-S: 12 heads
    ("mae", 1280, 1, 16),           # ViT-H: 16 heads
    ("ijepa", 1408, 1, 16),         # I-JEPA ViT-g: 16 heads
    ("dinov2_g_swiglu", 1536, 1, 24),  # DINOv2 ViT-g: 24 heads
])
def test_default_num_heads(name, D, depth, expected_heads, tmp_path):
    over = dict(D=D, depth=depth, heads=expected_heads, grid=2, mlp=64)
    if name.startswith("dinov2"):
        over.update(patch=14)
    case = build(name, tmp_path, **over)
    model = sr.load_model(str(case.path))  # no num_heads
    assert model.family == case.family
    x = images(case.a)
    ref = ref_forward(case.P, case.a, x)
    with torch.no_grad():
        close(model.forward_features(x), ref["norm"], f"{name} D={D} heads={expected_heads}")


def test_hf_dir_reads_num_heads_from_config(tmp_path):
    # D=32 with 4 heads: neither D/64 nor the explicit default; only config.json can tell.
    case = build("data2vec_hf", tmp_path, heads=4)
    model = sr.load_model(str(case.path))
    check_model(model, case, images(case.a))


# ----------------------------------------------------------------------------------------------------
# Position-embedding interpolation
# ----------------------------------------------------------------------------------------------------

# Learned tables: bicubic align_corners=False to size=(g, g) (timm/MAE/DeiT/BEiT fine-tuning). The DINO
# code base and its descendants (iBOT, MSN) resample with scale_factor=(g + 0.1)/M instead
# (dino:vision_transformer.py interpolate_pos_encoding), like DINOv2 without registers.
@pytest.mark.parametrize("name,new_grid,recipe", [
    ("deit", 6, "plain"), ("deit", 3, "plain"), ("deit3", 5, "plain"), ("mae_ft", 6, "plain"),
    ("deit", (3, 6), "plain"),
    ("dino", 6, "dinov2"), ("dino", 3, "dinov2"), ("ibot", 5, "dinov2"), ("msn", 6, "dinov2"),
    ("dino", (2, 8), "dinov2"),   # same token count as the stored 4x4 grid, but not square: must resample
])
def test_learned_pos_embed_bicubic_interpolation(name, new_grid, recipe, tmp_path):
    case = build(name, tmp_path)
    a = case.a
    model = sr.load_model(str(case.path), **case.kwargs)
    pos = case.P["pos"]
    if a.pos == "cls_row":
        new_pos = torch.cat([pos[:, :1], interp_grid(pos[:, 1:], a.grid, new_grid, recipe)], 1)
    else:
        new_pos = interp_grid(pos, a.grid, new_grid, recipe)
    x = images(a, img=grid_img(a, new_grid), seed=5)
    check_model(model, case, x, pos=new_pos)


@pytest.mark.parametrize("name,new_grid", [("dinov2", 3), ("dinov2", 6), ("dinov2_reg4", 3), ("dinov2_reg4", 6),
                                           ("dinov2_g_swiglu_reg4", 5), ("dinov2", (2, 8)),
                                           ("dinov2_reg4", (8, 2)), ("dinov2_reg4", (3, 5))])
def test_dinov2_pos_embed_interpolation_recipe(name, new_grid, tmp_path):
    case = build(name, tmp_path)
    a = case.a
    model = sr.load_model(str(case.path), **case.kwargs)
    recipe = "dinov2_reg" if a.regs else "dinov2"
    pos = case.P["pos"]
    new_pos = torch.cat([pos[:, :1], interp_grid(pos[:, 1:], a.grid, new_grid, recipe)], 1)
    # sanity: the two recipes really differ here, so the test can tell them apart
    other = interp_grid(pos[:, 1:], a.grid, new_grid, "dinov2" if a.regs else "dinov2_reg")
    assert (other - new_pos[:, 1:]).abs().max() > 1e-3
    x = images(a, img=grid_img(a, new_grid), seed=6)
    check_model(model, case, x, pos=new_pos)


# ----------------------------------------------------------------------------------------------------
# Own format round trip
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["beit_ft", "dinov2_reg4", "ijepa", "deit3", "data2vec_hf_ft1k"])
def test_save_checkpoint_roundtrip_matches_naive(name, tmp_path):
    case = build(name, tmp_path)
    model = sr.load_model(str(case.path), **case.kwargs)
    path = tmp_path / "mine.safetensors"
    sr.save_checkpoint(model, str(path))
    again = sr.load_model(str(path))          # no hints: our own layout carries its config
    assert again.family == case.family        # model.family is kept in the metadata
    check_model(again, case, images(case.a))


def test_save_checkpoint_fresh_model_family(tmp_path):
    cfg = sr.ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_hidden=64,
                       layer_scale=True, rel_pos="per_block", pos_embed=False)
    torch.manual_seed(0)
    m = sr.ViT(cfg).eval()
    path = tmp_path / "fresh.safetensors"
    sr.save_checkpoint(m, str(path))
    m2 = sr.load_model(str(path))
    assert m2.family == "ssl_repsim"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        close(m2(x), m(x).double(), "fresh roundtrip model(x)")


# ----------------------------------------------------------------------------------------------------
# Safety and errors
# ----------------------------------------------------------------------------------------------------

def one_line(exc):
    msg = str(exc.value).strip()
    assert msg, "empty error message"
    assert len(msg.splitlines()) == 1, f"message is not one line: {msg!r}"


class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("container", ["torch_save", "raw_pickle", "nested_in_valid_checkpoint"])
def test_malicious_pickle_is_not_executed(container, tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    if container == "torch_save":
        torch.save({"model": _Evil(marker)}, path)
    elif container == "raw_pickle":
        with open(path, "wb") as f:
            pickle.dump({"model": _Evil(marker)}, f, protocol=2)
    else:
        case = build("deit", tmp_path)
        obj = torch.load(case.path, weights_only=True)
        obj["extra"] = _Evil(marker)
        torch.save(obj, path)
    with pytest.raises(sr.UsageError) as e:
        sr.load_model(str(path), num_heads=2)
    one_line(e)
    assert not marker.exists(), "pickle payload was executed"


def test_truncated_checkpoint(tmp_path):
    case = build("deit", tmp_path)
    data = case.path.read_bytes()
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(sr.UsageError) as e:
        sr.load_model(str(bad), num_heads=2)
    one_line(e)


@pytest.mark.parametrize("content", [b"", b"this is not a checkpoint\n" * 10, bytes(range(256)) * 4])
def test_garbage_file(content, tmp_path):
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(content)
    with pytest.raises(sr.UsageError) as e:
        sr.load_model(str(bad), num_heads=2)
    one_line(e)


def test_truncated_safetensors(tmp_path):
    case = build("dino_safetensors", tmp_path)
    data = case.path.read_bytes()
    bad = tmp_path / "trunc.safetensors"
    bad.write_bytes(data[: len(data) - 100])
    with pytest.raises(sr.UsageError) as e:
        sr.load_model(str(bad), num_heads=2)
    one_line(e)


def resnet_like_sd():
    r = rnd(20)
    sd = {"conv1.weight": r(8, 3, 7, 7)}
    sd.update(batchnorm(r, "bn1", 8))
    for blk in ("layer1.0", "layer1.1"):
        sd[blk + ".conv1.weight"] = r(8, 8, 3, 3)
        sd.update(batchnorm(r, blk + ".bn1", 8))
        sd[blk + ".conv2.weight"] = r(8, 8, 3, 3)
        sd.update(batchnorm(r, blk + ".bn2", 8))
    sd.update(linear(r, "fc", 10, 8))
    return sd


@pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
def test_wrong_layout_resnet(wrap, tmp_path):
    sd = resnet_like_sd()
    path = tmp_path / "resnet50.pth"
    torch.save(sd if wrap is None else {wrap: sd}, path)
    with pytest.raises(sr.UsageError) as e:
        sr.load_model(str(path), num_heads=2)
    one_line(e)


@pytest.mark.parametrize("kind", ["dino_linearweights", "dinov2_linear_head"])
def test_head_only_files_are_not_backbones(kind, tmp_path):
    r = rnd(21)
    if kind == "dino_linearweights":
        obj = {"state_dict": linear(r, "module.linear", 10, 64)}
    else:
        obj = linear(r, "", 10, 64)
        obj = {k.lstrip("."): v for k, v in obj.items()}
    path = tmp_path / f"{kind}.pth"
    torch.save(obj, path)
    with pytest.raises(sr.UsageError) as e:
        sr.load_model(str(path), num_heads=2)
    one_line(e)


@pytest.mark.parametrize("name,key", [
    ("deit", "blocks.1.mlp.fc2.bias"),
    ("dino_full", "blocks.0.attn.proj.weight"),
    ("beit", "blocks.1.norm1.bias"),
    ("mocov3", "norm.bias"),
    ("dinov2", "blocks.1.mlp.fc1.weight"),
    ("ijepa", "blocks.0.norm2.weight"),
    ("cae", "blocks.1.attn.qkv.weight"),
    ("mae", "patch_embed.proj.bias"),
])
def test_missing_backbone_key(name, key, tmp_path):
    case = build(name, tmp_path, drop=key)
    with pytest.raises(sr.UsageError) as e:
        sr.load_model(str(case.path), **case.kwargs)
    one_line(e)


def test_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(sr.UsageError) as e:
        sr.load_model(str(tmp_path / "nope.pth"))
    one_line(e)
    with pytest.raises(sr.UsageError) as e:
        sr.load_model("definitely_not_a_registered_model_name_xyz", download=False)
    one_line(e)


def test_family_hint(tmp_path):
    case = build("deit3", tmp_path)
    model = sr.load_model(str(case.path), family="deit3", num_heads=2)
    assert model.family == "deit3"
    check_model(model, case, images(case.a))
    for wrong in ("beit", "dinov2", "no_such_family"):
        with pytest.raises(sr.UsageError) as e:
            sr.load_model(str(case.path), family=wrong, num_heads=2)
        one_line(e)


def test_num_heads_must_divide_width(tmp_path):
    case = build("deit", tmp_path)
    with pytest.raises(sr.UsageError) as e:
        sr.load_model(str(case.path), num_heads=3)
    one_line(e)


@pytest.mark.parametrize("what", ["empty_dir", "config_only", "bad_json"])
def test_bad_hf_directory(what, tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    if what != "empty_dir":
        (d / "config.json").write_text("{not json" if what == "bad_json" else json.dumps(hf_config(Arch(), False)))
    if what == "bad_json":
        torch.save({}, d / "pytorch_model.bin")
    with pytest.raises(sr.UsageError) as e:
        sr.load_model(str(d))
    one_line(e)


@pytest.mark.parametrize("obj", [{}, [1, 2, 3], "a string"], ids=["empty_dict", "list", "str"])
def test_non_checkpoint_pickles(obj, tmp_path):
    path = tmp_path / "odd.pth"
    torch.save(obj, path)
    with pytest.raises(sr.UsageError) as e:
        sr.load_model(str(path), num_heads=2)
    one_line(e)


@pytest.mark.parametrize("mutation", ["fc1_shape", "qkv_shape", "unexpected_key", "pos_rows"])
def test_inconsistent_backbone(mutation, tmp_path):
    case = build("deit", tmp_path)
    obj = torch.load(case.path, weights_only=True)
    sd = obj["model"]
    if mutation == "fc1_shape":
        sd["blocks.1.mlp.fc1.weight"] = torch.zeros(64, 31)
    elif mutation == "qkv_shape":
        sd["blocks.0.attn.qkv.weight"] = torch.zeros(96, 31)
    elif mutation == "unexpected_key":
        sd["blocks.1.mystery.weight"] = torch.zeros(3)
    else:
        sd["pos_embed"] = sd["pos_embed"][:, :15]
    torch.save(obj, case.path)
    with pytest.raises(sr.UsageError) as e:
        sr.load_model(str(case.path), num_heads=2)
    one_line(e)


def test_half_precision_checkpoint_is_upcast(tmp_path):
    case = build("dino", tmp_path)
    sd = torch.load(case.path, weights_only=True)
    torch.save({k: v.half() for k, v in sd.items()}, case.path)

    def rounded(v):
        if isinstance(v, torch.Tensor):
            return v.half().float()
        if isinstance(v, dict):
            return {k: rounded(u) for k, u in v.items()}
        return [rounded(u) for u in v]

    case.P = rounded(case.P)
    model = sr.load_model(str(case.path), num_heads=2)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    check_model(model, case, images(case.a))


# ----------------------------------------------------------------------------------------------------
# Downloads
# ----------------------------------------------------------------------------------------------------

PAYLOAD = os.urandom(50_000)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    files = {"/good.bin": PAYLOAD}     # tests may add more

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path in self.files:
            body = self.files[self.path]
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/short.bin":
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(PAYLOAD) + 10_000))
            self.end_headers()
            self.wfile.write(PAYLOAD[:20_000])
            self.wfile.flush()
            self.close_connection = True
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()


@pytest.fixture(scope="module")
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_download_good(server, tmp_path):
    dest = tmp_path / "dl" / "weights.pth"
    dest.parent.mkdir()
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    out = sr.download_file(server + "/good.bin", dest, sha256=sha)
    assert Path(out) == dest
    assert dest.read_bytes() == PAYLOAD
    assert sorted(os.listdir(dest.parent)) == ["weights.pth"]


def test_download_without_checksum(server, tmp_path):
    dest = tmp_path / "weights.pth"
    sr.download_file(server + "/good.bin", str(dest))
    assert dest.read_bytes() == PAYLOAD


@pytest.mark.parametrize("case", ["bad_sha", "short", "404"])
def test_download_failures_leave_nothing(server, case, tmp_path):
    d = tmp_path / "dl"
    d.mkdir()
    dest = d / "weights.pth"
    url = {"bad_sha": "/good.bin", "short": "/short.bin", "404": "/missing.bin"}[case]
    sha = "0" * 64 if case == "bad_sha" else None
    with pytest.raises(sr.UsageError) as e:
        sr.download_file(server + url, dest, sha256=sha)
    one_line(e)
    assert os.listdir(d) == [], f"left behind: {os.listdir(d)}"


def test_registered_name_downloads_and_loads(server, tmp_path, monkeypatch):
    case = build("deit", tmp_path)
    data = case.path.read_bytes()
    monkeypatch.setitem(_Handler.files, "/deit_tiny_test.pth", data)
    row = dict(next(r for r in sr.REGISTRY.values() if r["family"] == "deit"))
    row.update(url=server + "/deit_tiny_test.pth", sha256=hashlib.sha256(data).hexdigest(), md5=None, num_heads=2,
               img_size=case.a.img)
    monkeypatch.setitem(sr.REGISTRY, "deit-tiny-test", row)
    wdir = tmp_path / "weights"
    wdir.mkdir()
    with pytest.raises(sr.UsageError) as e:
        sr.load_model("deit-tiny-test", weights_dir=wdir, download=False)
    one_line(e)
    assert os.listdir(wdir) == []
    model = sr.load_model("deit-tiny-test", weights_dir=wdir, progress=False)
    assert model.family == "deit"
    assert len(os.listdir(wdir)) == 1
    check_model(model, case, images(case.a))


def test_registered_name_bad_checksum_leaves_nothing(server, tmp_path, monkeypatch):
    row = dict(next(r for r in sr.REGISTRY.values() if r["family"] == "deit"))
    row.update(url=server + "/good.bin", sha256="f" * 64, md5=None)
    monkeypatch.setitem(sr.REGISTRY, "deit-bad-sum", row)
    wdir = tmp_path / "weights"
    wdir.mkdir()
    with pytest.raises(sr.UsageError) as e:
        sr.download("deit-bad-sum", weights_dir=wdir, progress=False)
    one_line(e)
    assert os.listdir(wdir) == []


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------

def run_cli(*args, timeout=240):
    return subprocess.run([sys.executable, str(HERE / "ssl_repsim.py"), *map(str, args)], cwd=str(HERE),
                          capture_output=True, text=True, timeout=timeout)


def test_cli_cka(tmp_path):
    # D=128 -> 2 heads by the D/64 rule (the CLI is not told num_heads)
    a = build("dino", tmp_path, D=128, mlp=128)
    b = build("mae", tmp_path, D=128, mlp=128)
    out = tmp_path / "out"
    p = run_cli("cka", a.path, b.path, "--n", 16, "--batch-size", 8, "--out", out, "--quiet", "--img-size", 32)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((out / "cka.json").read_text())
    for k in ("layers_a", "layers_b", "cka"):
        assert k in res, f"cka.json lacks {k!r}: {sorted(res)}"
    la, lb, m = res["layers_a"], res["layers_b"], res["cka"]
    assert len(la) >= 1 and len(lb) >= 1
    assert len(m) == len(la) and all(len(row) == len(lb) for row in m)
    vals = [v for row in m for v in row if v is not None and v == v]
    assert vals and all(-1e-6 <= v <= 1 + 1e-6 for v in vals)


@pytest.mark.parametrize("bad", ["missing", "garbage"])
def test_cli_bad_model_file_exit_2(bad, tmp_path):
    case = build("dino", tmp_path, D=128, mlp=128)
    bad_path = tmp_path / "does_not_exist.pth"
    if bad == "garbage":
        bad_path.write_bytes(b"PK\x03\x04 definitely not a zip" * 20)
    p = run_cli("cka", bad_path, case.path, "--n", 16, "--batch-size", 8,
                "--out", tmp_path / "out", "--quiet", "--img-size", 32)
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
