#!/usr/bin/env python3
"""ssl_repsim: how the training objective shapes self-supervised vision models.

Load any released self-supervised ViT (MAE, BEiT, SimMIM, data2vec, DINO, DINOv2, DINOv3, iBOT, MoCo v3, MSN, I-JEPA,
CAE, EVA-02; CLIP and SigLIP as language-supervised and DeiT / torchvision as supervised baselines), from its release
file, a transformers / timm / open_clip folder or a Hugging Face hub id, into one plain ViT — and the ResNet and
ConvNeXt releases of the same objectives (MoCo v2/v3, DINO, SwAV, Barlow Twins, VICReg, SparK, ConvNeXt-V2 FCMAE)
into one ResNet and one ConvNeXt — extract what every layer and sub-layer computes, and compare models: CKA maps across all layer pairs, per-layer linear probes and k-NN,
fine-tuning with the published recipes, and the analyses of "Objectives Matter" (Shekhar et al. 2023).

    python ssl_repsim.py cka mae dino            # CKA map of two registered checkpoints on built-in synthetic data
    python ssl_repsim.py --help                  # every subcommand

One file, read top to bottom:
  1 registry & config   2 model   3 checkpoints   4 data   5 extraction   6 similarity   7 probes
  8 fine-tuning   9 analyses   10 CLI
Hard dependencies: torch, numpy, safetensors. Pillow, matplotlib and tqdm are imported only where needed.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import contextvars
import copy
import dataclasses
import functools
import glob
import hashlib
import io
import itertools
import json
import logging
import math
import operator
import os
import pickle
import re
import shutil
import sys
import tempfile
import textwrap
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__version__ = "0.2.0"   # part of every feature-cache key: new preprocessing, new keys
__all__ = [  # noqa: RUF022 - in the order of the file's sections
    "UsageError", "FAMILIES", "REGISTRY", "ViTConfig", "ViT",                        # 1-2 registry, model
    "load_model", "save_checkpoint", "download",                                     # 3 checkpoints
    "ImageSet", "load_images", "split_train_val",                                    # 4 data
    "extract", "extract_many", "iter_features", "save_features", "read_features",    # 5 extraction
    "cka", "cka_matrix", "MinibatchCKA", "compare_models", "compare_features",       # 6 similarity
    "MEASURES", "similarity", "measure_maps", "calibration",
    "linear_probe", "mlp_probe", "knn_accuracy",                                     # 7 probes
    "FinetuneConfig", "finetune_recipe", "finetune",                                 # 8 fine-tuning
    "AnalysisOptions", "ANALYSES", "run_analyses", "gap_analysis", "info_analysis",  # 9 analyses
    "invariance_analysis", "attention_analysis", "spatial_analysis", "weights_analysis", "agreement_analysis",
    "main",                                                                          # 10 CLI
]

# ======================================================================================================================
# 1. Registry & config
# ======================================================================================================================


class UsageError(ValueError):
    """A user error (bad input, file or option): the CLI prints its message on one line and exits with code 2."""


class DownloadUnavailable(UsageError):
    """A registered file could not be fetched (no connection): the message says what to place where."""


_AS_FLAGS = contextvars.ContextVar("ssl_repsim_as_flags", default=False)   # main() sets it: messages name flags


def _opt(name: str, flag: str | None = None) -> str:
    """How a message names a setting: the parameter (`batch_size`) to a Python caller, its flag (`--batch-size`)
    on the command line."""
    return (flag or "--" + name.replace("_", "-")) if _AS_FLAGS.get() else name


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HALF_MEAN, HALF_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
FBAI = "https://dl.fbaipublicfiles.com"
IBOT = "https://lf3-nlp-opensource.bytetos.com/obj/nlp-opensource/archive/2022/ibot"
BEIT = "https://github.com/addf400/files/releases/download/v1.0"

# --- families: one row holds everything known about a family of checkpoints ------------------------------------


@dataclass(frozen=True)
class Layout:
    """How one released file layout maps to our ViT: which sub-dict, which prefix, which keys are not the backbone,
    and the layout's key names → ours."""
    match: Callable[[dict], bool]  # predicate on the file's top-level dict (never raises)
    pick: str | None = None       # sub-dict holding the evaluated network (teacher, target_encoder, ...)
    prefix: str | None = None     # prefix of backbone keys; None = whatever precedes patch_embed.proj.weight
    only_prefix: bool = False     # keys without the prefix belong to other networks: ignore them
    strip: str = r"$^"            # regex of class prefixes removed before `drop` (vit., dinov2., vision_model., ...)
    drop: str = r"$^"             # regex of keys that are not the backbone (heads, decoders, predictors, ...)
    renames: tuple[tuple[str, str], ...] = ()  # (regex, replacement), in order; () = the family's
    fallback: bool = False        # a catch-all: tried only after every other family's layouts
    named_only: bool = False      # the keys cannot tell this family: used only when the family is known
    reshape: Callable[[dict], dict] | None = None   # tensors stored in another shape (FCMAE's sparse kernels)


@dataclass(frozen=True)
class Family:
    """A family of checkpoints: its training objective, how its files are recognised and renamed, the architecture
    variant its code implies, position interpolation and head counts, its preprocessing, and where its files come
    from. A file is read with the first layout (of any family) that matches; the family named by the user, the
    registry, config.json or timm's architecture labels it."""
    objective: str                            # REC(onstruction) | JE (joint-embedding) | HYB (both) | SUP | LANG | ?
    layouts: tuple[Layout, ...] = ()
    renames: tuple[tuple[str, str], ...] = ()  # its foreign key names → ours (regex, replacement), in order
    arch: dict = dataclasses.field(default_factory=dict)   # ViTConfig fields its code fixes (rope, eps, act, ...)
    pos_interp: str = "bicubic"               # see interpolate_pos_embed
    pos_interp_registers: str | None = None   # ... when the file has register tokens (default: pos_interp)
    heads: dict = dataclasses.field(default_factory=dict)   # width → heads where it departs from HEADS_BY_WIDTH
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    interp: str = "bicubic"                   # resize interpolation of its evaluation transform
    crop_pct: float = 0.875
    crop_mode: str = "center"                 # center: shorter side to size/crop_pct | squash: both sides
    manual_download: bool = False             # published only behind a web page (Google Drive)
    hf_model_types: tuple[str, ...] = ()      # Hugging Face config.json `model_type`s of this family
    teacher: str = ""                         # the network whose features its objective regresses (EVA-02: CLIP)

    @property
    def preprocess(self) -> dict:
        return dict(mean=tuple(self.mean), std=tuple(self.std), interp=self.interp, crop_pct=self.crop_pct,
                    crop_mode=self.crop_mode)


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _sub(obj: dict, key: str) -> dict:
    return obj[key] if isinstance(obj.get(key), dict) else {}


def _any(d: dict, pattern: str) -> bool:
    return any(isinstance(k, str) and re.search(pattern, k) for k in d)


def _lm_head_is_square(sd: dict) -> bool:
    w = sd.get("lm_head.weight")
    return isinstance(w, torch.Tensor) and w.ndim == 2 and w.shape[0] == w.shape[1]


INDEX = r"relative_position_index$"
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
TORCHVISION_RENAMES = (
    (r"^conv_proj\.", "patch_embed.proj."), (r"^class_token$", "cls_token"),
    (r"^encoder\.pos_embedding$", "pos_embed"), (r"^encoder\.ln\.", "norm."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.", r"blocks.\1."), (r"\.ln_1\.", ".norm1."), (r"\.ln_2\.", ".norm2."),
    (r"\.self_attention\.in_proj_weight$", ".attn.qkv.weight"), (r"\.self_attention\.in_proj_bias$", ".attn.qkv.bias"),
    (r"\.self_attention\.out_proj\.", ".attn.proj."), (r"\.mlp\.(0|linear_1)\.", ".mlp.fc1."),
    (r"\.mlp\.(3|linear_2)\.", ".mlp.fc2."), (r"^heads\.head\.", "head."))
HF_RENAMES = (   # transformers ViT, DeiT, ViTMAE, DINOv2, BEiT, data2vec-vision (BERT-style names)
    (r"^(data2vec_vision|beit)\.", ""), (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.distillation_token$", "dist_token"), (r"^embeddings\.register_tokens$", "register_tokens"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.relative_position_bias\.", "rel_pos_bias."), (r"^encoder\.layer\.(\d+)\.", r"blocks.\1."),
    (r"\.attention\.attention\.relative_position_bias\.", ".attn."),
    (r"\.attention\.attention\.(q|k|v)\w*\.", r".attn.\1."), (r"\.attention\.output\.dense\.", ".attn.proj."),
    (r"\.layernorm_before\.", ".norm1."), (r"\.layernorm_after\.", ".norm2."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."), (r"\.output\.dense\.", ".mlp.fc2."), (r"\.lambda_([12])$", r".gamma_\1"),
    (r"\.layer_scale([12])\.lambda1$", r".gamma_\1"), (r"\.mlp\.weights_in\.", ".mlp.fc1."),
    (r"\.mlp\.weights_out\.", ".mlp.fc2."),
    (r"^pooler\.layernorm\.", "fc_norm."), (r"^layernorm\.", "norm."), (r"^classifier\.", "head."))
HF_CLIP_RENAMES = (   # transformers CLIP and SigLIP vision towers
    (r"^embeddings\.class_embedding$", "cls_token"), (r"^embeddings\.patch_embedding\.", "patch_embed.proj."),
    (r"^embeddings\.position_embedding\.weight$", "pos_embed"), (r"^pre_layrnorm\.", "norm_pre."),
    (r"^encoder\.layers\.(\d+)\.", r"blocks.\1."), (r"\.self_attn\.(q|k|v)_proj\.", r".attn.\1."),
    (r"\.self_attn\.out_proj\.", ".attn.proj."), (r"\.layer_norm([12])\.", r".norm\1."),
    (r"^post_layernorm\.", "norm."), (r"^visual_projection\.weight$", "proj.weight"),
    (r"^head\.probe$", "attn_pool.latent"), (r"^head\.attention\.in_proj_", "attn_pool.in_proj_"),
    (r"^head\.attention\.out_proj\.", "attn_pool.proj."), (r"^head\.layernorm\.", "attn_pool.norm."),
    (r"^head\.mlp\.", "attn_pool.mlp."))
HF_DINOV3_RENAMES = (   # transformers DINOv3ViTModel
    (r"^embeddings\.(cls_token|register_tokens)$", r"\1"), (r"^embeddings\.patch_embeddings\.", "patch_embed.proj."),
    (r"^layer\.(\d+)\.", r"blocks.\1."), (r"\.attention\.(q|k|v)_proj\.", r".attn.\1."),
    (r"\.attention\.o_proj\.", ".attn.proj."), (r"\.layer_scale([12])\.lambda1$", r".gamma_\1"),
    (r"\.mlp\.gate_proj\.", ".mlp.fc1_g."), (r"\.mlp\.up_proj\.", ".mlp.fc1_x."), (r"\.mlp\.down_proj\.", ".mlp.fc2."))
TIMM_RENAMES = (   # DINOv2 and timm spellings: block chunks, ls1/ls2, SwiGLU w12/w3, reg_token
    (r"^blocks\.\d+\.(\d+)\.", r"blocks.\1."), (r"\.ls([12])\.gamma$", r".gamma_\1"),
    (r"^reg_token$", "register_tokens"), (r"\.mlp\.w12\.", ".mlp.fc1."), (r"\.mlp\.w3\.", ".mlp.fc2."))
TIMM_EVA_RENAMES = (   # timm Eva (EVA-02, DINOv3): separate q/k/v, SwiGLU fc1_g/fc1_x, reg_token
    *TIMM_RENAMES, (r"\.attn\.(q|k|v)_proj\.", r".attn.\1."))
DINOV3_RENAMES = (   # the official DINOv3 release: storage tokens, SwiGLU w1/w2/w3, untied cls norm
    *TIMM_RENAMES, (r"^storage_tokens$", "register_tokens"), (r"\.mlp\.w1\.", ".mlp.fc1_g."),
    (r"\.mlp\.w2\.", ".mlp.fc1_x."))
OPENCLIP_RENAMES = (   # open_clip and OpenAI CLIP visual towers
    (r"^conv1\.", "patch_embed.proj."), (r"^class_embedding$", "cls_token"), (r"^positional_embedding$", "pos_embed"),
    (r"^ln_pre\.", "norm_pre."), (r"^transformer\.resblocks\.(\d+)\.", r"blocks.\1."), (r"\.ln_([12])\.", r".norm\1."),
    (r"\.attn\.in_proj_(weight|bias)$", r".attn.qkv.\1"), (r"\.attn\.out_proj\.", ".attn.proj."),
    (r"\.mlp\.c_fc\.", ".mlp.fc1."), (r"\.mlp\.c_proj\.", ".mlp.fc2."), (r"^ln_post\.", "norm."))
HF_CLASS_PREFIX = r"^(vit|deit|dinov2|beit|data2vec_vision|ijepa|vision_model)\."
HF_NOT_BACKBONE = (r"^(decoder\.|pooler\.dense\.|lm_head\.|cls_classifier\.|distillation_classifier\.|"
                   r"embeddings\.mask_token|text_model\.|text_projection|logit_)|" + INDEX)

# the layouts several families share: the family comes from config.json, timm's architecture or the user
HF_LAYOUT = Layout(lambda o: _any(o, r"(^|\.)embeddings\.patch_embeddings\.projection\.weight$"),
                   strip=HF_CLASS_PREFIX, drop=HF_NOT_BACKBONE, renames=HF_RENAMES)
HF_CLIP_LAYOUT = Layout(lambda o: _any(o, r"(^|\.)embeddings\.patch_embedding\.weight$"), strip=HF_CLASS_PREFIX,
                        drop=HF_NOT_BACKBONE, renames=HF_CLIP_RENAMES)
TIMM_EVA_LAYOUT = Layout(lambda o: _is_state_dict(o) and _any(o, r"^blocks\.0\.(attn\.[qkv]_proj|mlp\.fc1_g)\."),
                         drop=r"^head\.|rope|^mask_token$", renames=TIMM_EVA_RENAMES, named_only=True)
FLAT_LAYOUT = Layout(lambda o: _is_state_dict(o) and "patch_embed.proj.weight" in o,
                     drop=r"^(head|head_dist|mask_token)(\.|$)", renames=TIMM_RENAMES, named_only=True)

# CNNs: ResNets in torchvision's names (timm, MoCo, SwAV, DINO, Barlow Twins, VICReg and SparK use them too),
# ConvNeXts in the official repository's (downsample_layers.i, stages.i.j.{dwconv,norm,pwconv1,grn,pwconv2}, norm)
RESNET_RENAMES = ((r"^fc\.", "head."),)
HF_RESNET_RENAMES = (   # transformers ResNetModel / ResNetForImageClassification
    (r"^embedder\.embedder\.convolution\.", "conv1."), (r"^embedder\.embedder\.normalization\.", "bn1."),
    (r"^encoder\.stages\.(\d+)\.layers\.", lambda m: f"layer{int(m.group(1)) + 1}."),
    (r"\.shortcut\.convolution\.", ".downsample.0."), (r"\.shortcut\.normalization\.", ".downsample.1."),
    (r"\.layer\.(\d)\.convolution\.", lambda m: f".conv{int(m.group(1)) + 1}."),
    (r"\.layer\.(\d)\.normalization\.", lambda m: f".bn{int(m.group(1)) + 1}."), (r"^classifier\.1\.", "head."))
TIMM_CONVNEXT_RENAMES = (
    (r"^stem\.", "downsample_layers.0."), (r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2."), (r"\.conv_dw\.", ".dwconv."),
    (r"\.mlp\.fc1\.", ".pwconv1."), (r"\.mlp\.fc2\.", ".pwconv2."), (r"\.mlp\.grn\.weight$", ".grn.gamma"),
    (r"\.mlp\.grn\.bias$", ".grn.beta"), (r"^head\.norm\.", "norm."), (r"^head\.fc\.", "head."))
HF_CONVNEXT_RENAMES = (   # transformers ConvNextModel / ConvNextV2Model (+ForImageClassification)
    (r"^embeddings\.patch_embeddings\.", "downsample_layers.0.0."), (r"^embeddings\.layernorm\.", "downsample_layers.0.1."),
    (r"^encoder\.stages\.(\d+)\.downsampling_layer\.", r"downsample_layers.\1."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.", r"stages.\1.\2."), (r"\.layernorm\.", ".norm."),
    (r"\.layer_scale_parameter$", ".gamma"), (r"\.grn\.weight$", ".grn.gamma"), (r"\.grn\.bias$", ".grn.beta"),
    (r"^layernorm\.", "norm."), (r"^classifier\.", "head."))
FCMAE_RENAMES = ((r"\.(ln|linear)\.", "."), (r"\.kernel$", ".weight"))   # MinkowskiEngine modules → dense names


def _dense_kernels(sd: dict) -> dict:
    """FCMAE's sparse encoder as dense tensors, as ConvNeXt-V2's remap_checkpoint_keys reads it: a depthwise kernel
    (k², C) → (C, 1, k, k), a convolution's (k², in, out) → (out, in, k, k), each with its two spatial axes swapped;
    (1, C) biases → (C,)."""
    out = {}
    for k, v in sd.items():
        conv = re.search(r"(dwconv|^downsample_layers\.\d+\.1)\.weight$", k) and v.ndim in (2, 3)
        s = math.isqrt(v.shape[0]) if conv else 0
        if conv and s * s == v.shape[0]:
            v = v.permute(1, 0).reshape(-1, 1, s, s) if v.ndim == 2 else v.permute(2, 1, 0).reshape(
                v.shape[2], v.shape[1], s, s)
            v = v.transpose(3, 2)
        elif k.endswith("bias") and v.ndim == 2 and v.shape[0] == 1:
            v = v.reshape(-1)
        out[k] = v
    return _convnext_shapes(out)


def _convnext_shapes(sd: dict) -> dict:
    """A ConvNeXt's tensors in our shapes: GRN's γ, β stored (1, 1, 1, C) (official, transformers) → (C,), the MLP
    stored as 1×1 convolutions (timm's atto…nano) → linear weights."""
    return {k: v.reshape(-1) if re.search(r"\.grn\.(gamma|beta)$", k) else
            v.flatten(1) if re.search(r"\.pwconv[12]\.weight$", k) and v.ndim == 4 else v for k, v in sd.items()}


def _resnet_keys(o: dict) -> bool:
    return _is_state_dict(o) and "conv1.weight" in o and "layer1.0.conv1.weight" in o


TV_RESNET_LAYOUT = Layout(_resnet_keys, prefix="", renames=RESNET_RENAMES, named_only=True)
HF_RESNET_LAYOUT = Layout(lambda o: _any(o, r"^(resnet\.)?embedder\.embedder\.convolution\.weight$"), prefix="",
                          strip=r"^resnet\.", renames=HF_RESNET_RENAMES)
TIMM_CONVNEXT_LAYOUT = Layout(lambda o: _is_state_dict(o) and "stem.0.weight" in o
                              and _any(o, r"^stages\.0\.blocks\.0\.conv_dw\.weight$"), prefix="",
                              drop=r"^head\.pre_logits\.", renames=TIMM_CONVNEXT_RENAMES, named_only=True,
                              reshape=_convnext_shapes)   # the MLP head's pre_logits dropped
HF_CONVNEXT_LAYOUT = Layout(lambda o: _any(o, r"^(convnext(v2)?\.)?embeddings\.patch_embeddings\.weight$")
                            and _any(o, r"^(convnext(v2)?\.)?encoder\.stages\.0\.layers\.0\.dwconv\.weight$"),
                            prefix="", strip=r"^convnext(v2)?\.", renames=HF_CONVNEXT_RENAMES, reshape=_convnext_shapes)
CONVNEXT_LAYOUT = Layout(lambda o: _is_state_dict(o) and _any(o, r"^stages\.0\.0\.dwconv\.weight$"), prefix="",
                         named_only=True, reshape=_convnext_shapes)
CNN_LAYOUTS = (TV_RESNET_LAYOUT, HF_RESNET_LAYOUT, TIMM_CONVNEXT_LAYOUT, HF_CONVNEXT_LAYOUT, CONVNEXT_LAYOUT)
SHARED_LAYOUTS = (HF_LAYOUT, HF_CLIP_LAYOUT, TIMM_EVA_LAYOUT, FLAT_LAYOUT, *CNN_LAYOUTS)

# Rows are tried in this order (each row's layouts in turn), catch-all (fallback) layouts last.
FAMILIES: dict[str, Family] = {
    "mocov3": Family("JE", (Layout(lambda o: _any(_sub(o, "state_dict"), r"^module\.base_encoder\."),
                                   pick="state_dict", prefix="module.base_encoder.", only_prefix=True,
                                   drop=r"^(head|fc)\."),), heads={384: 12}, interp="bilinear"),   # R50: fc
    "mocov2": Family("JE", (Layout(lambda o: _any(_sub(o, "state_dict"), r"^module\.encoder_q\."), pick="state_dict",
                                   prefix="module.encoder_q.", only_prefix=True, drop=r"^fc\."),), interp="bilinear"),
    "swav": Family("JE", (Layout(lambda o: _is_state_dict(o) and _any(o, r"^(module\.)?prototypes\."), prefix="module.",
                                 drop=r"^(projection_head|prototypes)\."),), interp="bilinear",
                 std=(0.228, 0.224, 0.225)),   # eval_linear.py's
    "barlowtwins": Family("JE", interp="bilinear"),   # flat torchvision keys: known by name, digest or the user
    "vicreg": Family("JE", interp="bilinear"),
    "spark": Family("REC", manual_download=True, crop_pct=0.95),     # SparK R50 (timm-style keys), Tian et al. 2023
    "fcmae": Family("REC", (Layout(lambda o: _any(_sub(o, "model"), r"^encoder\.stages\.0\.0\.dwconv\.kernel$"),
                                   pick="model", prefix="encoder.", only_prefix=True, renames=FCMAE_RENAMES,
                                   reshape=_dense_kernels),)),   # ConvNeXt-V2 pretrained: decoder, mask, pred dropped
    "convnextv2": Family("REC+FT", (Layout(lambda o: _any(_sub(o, "model"), r"^stages\.0\.0\.grn\.gamma$"),
                                           pick="model", prefix="", drop=r"^head\.", reshape=_convnext_shapes),),
                                hf_model_types=("convnextv2",)),
    "convnext": Family("SUP", (Layout(lambda o: _any(_sub(o, "model"), r"^stages\.0\.0\.dwconv\.weight$"), pick="model",
                                      prefix="", drop=r"^head\.", reshape=_convnext_shapes),), hf_model_types=("convnext",)),
    "resnet": Family("SUP", interp="bilinear", hf_model_types=("resnet",)),   # torchvision / timm / transformers
    "ibot": Family("HYB", (Layout(lambda o: "teacher" in o and ("ibot_loss" in o
                                                                or _any(_sub(o, "teacher"), r"last_layer2")),
                                  pick="teacher", prefix="backbone.", only_prefix=True),
                           Layout(lambda o: "state_dict" in o, pick="state_dict", drop=r"^head\.|^masked_embed")),
                   pos_interp="offset"),
    "dino": Family("JE", (Layout(lambda o: _any(_sub(o, "teacher"), r"^module\.backbone\."), pick="teacher",
                                 prefix="module.backbone.", only_prefix=True),   # R50: a DDP-wrapped teacher
                          Layout(lambda o: "teacher" in o, pick="teacher", prefix="backbone.", only_prefix=True),
                          FLAT_LAYOUT), pos_interp="offset"),   # the flat release file: only when named
    "msn": Family("JE", (Layout(lambda o: _any(_sub(o, "target_encoder"), r"cls_token$"), pick="target_encoder",
                                prefix="module.", drop=r"^fc\."),), interp="bilinear",   # pos: size (g, g)
                 hf_model_types=("vit_msn",)),
    "ijepa": Family("JE", (Layout(lambda o: "target_encoder" in o, pick="target_encoder", prefix="module."),),
                    hf_model_types=("ijepa",)),
    "data2vec_ft": Family("HYB+FT", (Layout(lambda o: "module" in o, pick="module", drop=r"^head\.|" + INDEX),)),
    "simmim": Family("REC", (Layout(lambda o: _any(_sub(o, "model"),
                                                   r"^encoder\.(rel_pos_bias|blocks\.0\.attn\.relative_pos)"),
                                    pick="model", prefix="encoder.", only_prefix=True, drop=r"mask_token|" + INDEX),),
                     manual_download=True),
    "cae": Family("REC", (Layout(lambda o: "encoder.patch_embed.proj.weight" in _sub(o, "model"), pick="model",
                                 prefix="encoder.", only_prefix=True, drop=r"mask_token|" + INDEX),),
                  manual_download=True),
    "data2vec": Family("HYB", (Layout(lambda o: "model_ema" in o or _lm_head_is_square(_sub(o, "model")),
                                      pick="model", drop=r"^lm_head\.|mask_token|" + INDEX),)),
    "beit_ft": Family("REC+FT", (Layout(lambda o: _any(_sub(o, "model"), r"^blocks\.0\.attn\.relative_position_bias_"
                                                       r"table") and "fc_norm.weight" in _sub(o, "model"),
                                        pick="model", drop=r"^head\.|" + INDEX),), mean=HALF_MEAN, std=HALF_STD),
    "beit": Family("REC", (Layout(lambda o: _any(_sub(o, "model"), r"q_bias$"), pick="model",
                                  drop=r"^lm_head\.|^head\.|mask_token|" + INDEX),), mean=HALF_MEAN, std=HALF_STD,
                   hf_model_types=("beit",)),
    "deit3": Family("SUP", (Layout(lambda o: _any(_sub(o, "model"), r"gamma_1$"), pick="model", drop=r"^head\."),)),
    "mae_ft": Family("REC+FT", (Layout(lambda o: "fc_norm.weight" in _sub(o, "model"), pick="model",
                                       drop=r"^head\."),)),
    "deit": Family("SUP", (Layout(lambda o: "head.weight" in _sub(o, "model") and not _any(_sub(o, "model"),
                                                                                           r"^decoder"),
                                  pick="model", drop=r"^head(_dist)?\."),
                           Layout(lambda o: _is_state_dict(o) and "dist_token" in o and "patch_embed.proj.weight" in o,
                                  drop=r"^head(_dist)?\.", renames=TIMM_RENAMES)), hf_model_types=("deit",)),
    "mae": Family("REC", (Layout(lambda o: "model" in o, pick="model", drop=r"^decoder|^mask_token$"),)),
    "mae_hf": Family("REC", hf_model_types=("vit_mae",)),           # transformers ViTMAE
    "data2vec_hf": Family("HYB", hf_model_types=("data2vec-vision",)),
    "torchvision": Family("SUP", (Layout(lambda o: "conv_proj.weight" in o, drop=r"^heads\.(?!head\.)"),),
                          renames=TORCHVISION_RENAMES, interp="bilinear"),
    "dinov2": Family("HYB", (Layout(lambda o: "mask_token" in o and _any(o, r"^blocks\.0\.(ls1\.gamma|0\.)")
                                    and "storage_tokens" not in o, drop=r"^mask_token$"),),
                     renames=TIMM_RENAMES, pos_interp="offset", pos_interp_registers="antialias",
                     hf_model_types=("dinov2", "dinov2_with_registers")),
    "dinov3": Family("JE", (Layout(lambda o: _is_state_dict(o) and ("storage_tokens" in o or "rope_embed.periods" in o),
                                   drop=r"^(mask_token|rope_embed\.|local_cls_norm\.)", renames=DINOV3_RENAMES),
                            Layout(lambda o: _any(o, r"^(\w+\.)?embeddings\.patch_embeddings\.weight$")
                                   and _any(o, r"^(\w+\.)?layer\.0\."), strip=r"^dinov3\w*\.",
                                   drop=r"^embeddings\.mask_token$|rope", renames=HF_DINOV3_RENAMES)),
                     arch=dict(rope="dinov3", rope_theta=100.0, norm_eps=1e-5), hf_model_types=("dinov3_vit",)),
    "eva02": Family("REC", (TIMM_EVA_LAYOUT,), arch=dict(rope="eva02", rope_theta=10000.0, rope_grid=16),
                    pos_interp="antialias",
                    mean=OPENAI_MEAN, std=OPENAI_STD, crop_pct=0.9, teacher="EVA-CLIP"),
    "clip": Family("LANG", (HF_CLIP_LAYOUT,
                            Layout(lambda o: "visual.conv1.weight" in o, prefix="visual.", only_prefix=True,
                                   drop=r"^attn_pool", renames=OPENCLIP_RENAMES),      # open_clip / OpenAI CLIP
                            Layout(lambda o: "conv1.weight" in o and _any(o, r"^transformer\.resblocks\.0\."),
                                   drop=r"^attn_pool", renames=OPENCLIP_RENAMES)),     # ... their visual tower
                   arch=dict(act=None, norm_eps=1e-5, norm_pre=True, patch_bias=False), mean=OPENAI_MEAN, std=OPENAI_STD, crop_pct=1.0,
                   hf_model_types=("clip", "clip_vision_model")),   # act=None: the file's config must say
    "siglip": Family("LANG", (HF_CLIP_LAYOUT,), arch=dict(act="gelu_tanh"), mean=HALF_MEAN, std=HALF_STD,
                     crop_pct=1.0, crop_mode="squash", hf_model_types=("siglip", "siglip_vision_model")),
    "vit": Family("?", (HF_LAYOUT,), hf_model_types=("vit",)),   # transformers ViT: any training, say --family
    "unknown": Family("?", tuple(dataclasses.replace(lay, named_only=False, fallback=True)
                                 for lay in (FLAT_LAYOUT, *CNN_LAYOUTS)), renames=TIMM_RENAMES),
    "ssl_repsim": Family("?"),   # our own safetensors files: the config travels in the metadata
}
# timm architecture names (`arch.tag` in a timm hub folder's config.json) → family, first match
TIMM_FAMILIES = ((r"^eva02_(tiny|small|base|large)_patch14_(224|336|448)\.", "eva02"),   # not the post-norm CLIP
                 (r"dinov3", "dinov3"), (r"dinov2", "dinov2"), (r"siglip", "siglip"), (r"clip", "clip"),
                 (r"\.mae$", "mae"), (r"^deit3_", "deit3"), (r"^deit_", "deit"), (r"\.dino$", "dino"),
                 (r"^convnextv2_\w+\.fcmae$", "fcmae"), (r"^convnextv2_", "convnextv2"), (r"^convnext_", "convnext"),
                 (r"^(resnet|wide_resnet|resnext)\d", "resnet"))
TIMM_FINE_TUNED = r"\.\w*(_ft_|^ft_|_in1k$|in22k_in1k)"   # tags of weights fine-tuned after pretraining
# timm size names → heads (timm 1.0 model definitions), for hub folders whose config.json omits model_args; other
# names (giant, medium, betwixt, xsmall, ...) differ between families: their heads must be given
TIMM_HEADS = {"tiny": 3, "small": 6, "base": 12, "large": 16, "huge": 16, "huge_plus": 20, "so400m": 16}
# timm architectures whose model function sets the activation (timm 1.0.31 vision_transformer.py); others: exact GELU
TIMM_ACTIVATIONS = ((r"quickgelu", "quick_gelu"),
                    ((r"^vit_(base_patch32_siglip_(gap_)?256|large_patch16_siglip_(gap_)?512|so400m_patch16_siglip|"
                      r"giantopt_patch16_siglip)"), "gelu_tanh"))

# Heads are not recoverable from weights: by width, unless the registry, the family or num_heads= says otherwise.
HEADS_BY_WIDTH = {192: 3, 384: 6, 512: 8, 768: 12, 1024: 16, 1280: 16, 1408: 16, 1536: 24}


def objective(family: str, fine_tuned: bool = False) -> str:
    """The family's training objective, + FT for a checkpoint fine-tuned from it (by finetune())."""
    base = FAMILIES[family].objective if family in FAMILIES else "?"
    return base + "+FT" if fine_tuned and not base.endswith("+FT") else base


# --- released checkpoints: one row each ---------------------------------------------------------------------------

def _row(family, url, heads, *, img=224, sha256=None, md5=None, rep="cls_norm", aliases=(), crop=None):
    pre = {**FAMILIES[family].preprocess, **({"crop_pct": crop} if crop else {})}
    return dict(family=family, url=url, num_heads=heads, **pre, img_size=img, sha256=sha256, md5=md5, eval_repr=rep,
                aliases=tuple(aliases))


# One row per released checkpoint. rep = official linear-eval representation: cls_norm (cls after final norm),
# cls_raw (cls of the last block, no final norm), fc_norm_mean (fc_norm of the mean patch token), mean_tokens,
# cls4_norm (normed cls of the last 4 blocks), cls_mean (normed cls || mean patch), block_cls_mean (per block).
# sha256 / md5 hold the digest prefixes the authors publish (DeiT file suffixes, MAE README md5s).
REGISTRY: dict[str, dict] = {
    "mae-vitb16": _row("mae", f"{FBAI}/mae/pretrain/mae_pretrain_vit_base.pth", 12, md5="8cad7c", aliases=("mae",)),
    "mae-vitl16": _row("mae", f"{FBAI}/mae/pretrain/mae_pretrain_vit_large.pth", 16, md5="b8b06e"),
    "mae-vith14": _row("mae", f"{FBAI}/mae/pretrain/mae_pretrain_vit_huge.pth", 16, md5="9bdbb0"),
    "mae-ft-vitb16": _row("mae_ft", f"{FBAI}/mae/finetune/mae_finetuned_vit_base.pth", 12, md5="1b25e9",
                          rep="fc_norm_mean", aliases=("mae-ft",)),
    "mae-ft-vitl16": _row("mae_ft", f"{FBAI}/mae/finetune/mae_finetuned_vit_large.pth", 16, md5="51f550",
                          rep="fc_norm_mean"),
    "mae-ft-vith14": _row("mae_ft", f"{FBAI}/mae/finetune/mae_finetuned_vit_huge.pth", 16, md5="2541f2",
                          rep="fc_norm_mean"),
    "dino-vits16": _row("dino", f"{FBAI}/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth", 6,
                        rep="cls4_norm"),
    "dino-vits8": _row("dino", f"{FBAI}/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth", 6,
                       rep="cls4_norm"),
    "dino-vitb16": _row("dino", f"{FBAI}/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth", 12,
                        rep="cls_mean", aliases=("dino",)),
    "dino-vitb8": _row("dino", f"{FBAI}/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth", 12, rep="cls_mean"),
    "mocov3-vits16": _row("mocov3", f"{FBAI}/moco-v3/vit-s-300ep/vit-s-300ep.pth.tar", 12),
    "mocov3-vitb16": _row("mocov3", f"{FBAI}/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar", 12, aliases=("mocov3", "moco")),
    "msn-vits16": _row("msn", f"{FBAI}/msn/vits16_800ep.pth.tar", 6, rep="cls_raw"),
    "msn-vitb16": _row("msn", f"{FBAI}/msn/vitb16_600ep.pth.tar", 12, rep="cls_raw", aliases=("msn",)),
    "msn-vitl16": _row("msn", f"{FBAI}/msn/vitl16_600ep.pth.tar", 16, rep="cls_raw"),
    "msn-vitb4": _row("msn", f"{FBAI}/msn/vitb4_300ep.pth.tar", 12, rep="cls_raw"),
    "msn-vitl7": _row("msn", f"{FBAI}/msn/vitl7_200ep.pth.tar", 16, rep="cls_raw"),
    "ibot-vits16": _row("ibot", f"{IBOT}/vits_16/checkpoint_teacher.pth", 6, rep="cls4_norm"),
    "ibot-vitb16": _row("ibot", f"{IBOT}/vitb_16/checkpoint_teacher.pth", 12, rep="cls_mean", aliases=("ibot",)),
    "ibot-vitl16": _row("ibot", f"{IBOT}/vitl_16/checkpoint_teacher.pth", 16, rep="cls_mean"),
    "deit-vitti16": _row("deit", f"{FBAI}/deit/deit_tiny_patch16_224-a1311bcf.pth", 3, sha256="a1311bcf"),
    "deit-vits16": _row("deit", f"{FBAI}/deit/deit_small_patch16_224-cd65a155.pth", 6, sha256="cd65a155"),
    "deit-vitb16": _row("deit", f"{FBAI}/deit/deit_base_patch16_224-b5f2ef4d.pth", 12, sha256="b5f2ef4d",
                         aliases=("deit",)),
    "deit3-vits16": _row("deit3", f"{FBAI}/deit/deit_3_small_224_1k.pth", 6),
    "deit3-vitb16": _row("deit3", f"{FBAI}/deit/deit_3_base_224_1k.pth", 12, aliases=("deit3",)),
    "deit3-vitl16": _row("deit3", f"{FBAI}/deit/deit_3_large_224_1k.pth", 16),
    "deit3-vith14": _row("deit3", f"{FBAI}/deit/deit_3_huge_224_1k_v1.pth", 16),
    "ijepa-vith14": _row("ijepa", f"{FBAI}/ijepa/IN1K-vit.h.14-300e.pth.tar", 16, rep="mean_tokens",
                         aliases=("ijepa",)),
    "ijepa-vith16-448": _row("ijepa", f"{FBAI}/ijepa/IN1K-vit.h.16-448px-300e.pth.tar", 16, img=448,
                             rep="mean_tokens"),
    "ijepa-vith14-in22k": _row("ijepa", f"{FBAI}/ijepa/IN22K-vit.h.14-900e.pth.tar", 16, rep="mean_tokens"),
    "ijepa-vitg16-in22k": _row("ijepa", f"{FBAI}/ijepa/IN22K-vit.g.16-600e.pth.tar", 16, rep="mean_tokens"),
    "beit-vitb16": _row("beit", f"{BEIT}/beit_base_patch16_224_pt22k.pth", 12, rep="block_cls_mean",
                        aliases=("beit",)),
    "beit-vitl16": _row("beit", f"{BEIT}/beit_large_patch16_224_pt22k.pth", 16, rep="block_cls_mean"),
    "beit-ft-vitb16": _row("beit_ft", f"{BEIT}/beit_base_patch16_224_pt22k_ft22k.pth", 12, rep="fc_norm_mean"),
    "simmim-vitb16": _row("simmim", "https://drive.google.com/file/d/1dJn6GYkwMIcoP3zqOEyW1_iQfpBi8UOw/view", 12,
                          rep="fc_norm_mean", aliases=("simmim",)),
    "data2vec-vitb16": _row("data2vec", f"{FBAI}/fairseq/data2vec/data2vec_vision/base_800/checkpoint-799.pth", 12,
                            rep="mean_tokens", aliases=("data2vec",)),
    "data2vec-vitl16": _row("data2vec", f"{FBAI}/fairseq/data2vec/data2vec_vision/large_1600/checkpoint-799.pth", 16,
                            rep="mean_tokens"),
    "dinov2-vits14": _row("dinov2", f"{FBAI}/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth", 6, rep="cls_mean"),
    "dinov2-vitb14": _row("dinov2", f"{FBAI}/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth", 12, rep="cls_mean",
                          aliases=("dinov2",)),
    "dinov2-vitl14": _row("dinov2", f"{FBAI}/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth", 16, rep="cls_mean"),
    "dinov2-vitg14": _row("dinov2", f"{FBAI}/dinov2/dinov2_vitg14/dinov2_vitg14_pretrain.pth", 24, rep="cls_mean"),
    "dinov2-vits14-reg": _row("dinov2", f"{FBAI}/dinov2/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth", 6,
                              rep="cls_mean"),
    "dinov2-vitb14-reg": _row("dinov2", f"{FBAI}/dinov2/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth", 12,
                              rep="cls_mean"),
    "dinov2-vitl14-reg": _row("dinov2", f"{FBAI}/dinov2/dinov2_vitl14/dinov2_vitl14_reg4_pretrain.pth", 16,
                              rep="cls_mean"),
    "dinov2-vitg14-reg": _row("dinov2", f"{FBAI}/dinov2/dinov2_vitg14/dinov2_vitg14_reg4_pretrain.pth", 24,
                              rep="cls_mean"),
    "cae-vitb16": _row("cae", "https://drive.google.com/drive/folders/1wwhg7nj2GQuU9uthVuQLkEEXEjx90G7g", 12,
                       aliases=("cae",)),
    "supervised-vitb16": _row("torchvision", "https://download.pytorch.org/models/vit_b_16-c867db91.pth", 12,
                              sha256="c867db91", aliases=("supervised",)),
    # the Hugging Face hub (transformers folders) and timm (timm/<arch>.<tag>): read from / into the HF cache
    "facebook/dinov2-base": _row("dinov2", "hf:facebook/dinov2-base", 12, rep="cls_mean", aliases=("dinov2-hf",)),
    "facebook/dino-vitb16": _row("dino", "hf:facebook/dino-vitb16", 12, rep="cls_mean", aliases=("dino-hf",)),
    "facebook/vit-mae-base": _row("mae_hf", "hf:facebook/vit-mae-base", 12, aliases=("mae-hf",)),
    "facebook/vit-msn-base": _row("msn", "hf:facebook/vit-msn-base", 12, rep="cls_raw", aliases=("msn-hf",)),
    "facebook/ijepa_vith14_1k": _row("ijepa", "hf:facebook/ijepa_vith14_1k", 16, rep="mean_tokens",
                                     aliases=("ijepa-hf",)),
    "facebook/dinov3-vitb16-pretrain-lvd1689m": _row("dinov3", "hf:facebook/dinov3-vitb16-pretrain-lvd1689m", 12,
                                                     aliases=("dinov3", "dinov3-vitb16")),
    "openai/clip-vit-base-patch16": _row("clip", "hf:openai/clip-vit-base-patch16", 12, rep="pooled",
                                         aliases=("clip", "clip-vitb16")),
    "google/siglip-base-patch16-224": _row("siglip", "hf:google/siglip-base-patch16-224", 12, rep="pooled",
                                           aliases=("siglip", "siglip-vitb16")),
    "google/siglip-so400m-patch14-384": _row("siglip", "hf:google/siglip-so400m-patch14-384", 16, img=384,
                                             rep="pooled", aliases=("siglip-so400m",)),
    "timm/vit_base_patch14_dinov2.lvd142m": _row("dinov2", "hf:timm/vit_base_patch14_dinov2.lvd142m", 12, img=518,
                                                 rep="cls_mean", crop=1.0),
    "timm/vit_base_patch16_dinov3.lvd1689m": _row("dinov3", "hf:timm/vit_base_patch16_dinov3.lvd1689m", 12, img=256,
                                                  crop=1.0),
    "timm/eva02_base_patch14_224.mim_in22k": _row("eva02", "hf:timm/eva02_base_patch14_224.mim_in22k", 12,
                                                  rep="pooled", aliases=("eva02", "eva02-vitb14")),
    "timm/vit_base_patch16_clip_224.openai": _row("clip", "hf:timm/vit_base_patch16_clip_224.openai", 12,
                                                  rep="pooled", crop=0.9),
    "timm/vit_base_patch16_siglip_224.webli": _row("siglip", "hf:timm/vit_base_patch16_siglip_224.webli", 12,
                                                   rep="pooled", crop=0.9),
    "timm/vit_base_patch16_224.mae": _row("mae", "hf:timm/vit_base_patch16_224.mae", 12, crop=0.9),
    # CNNs of the same objectives, for "similar objectives learn similar features even across architectures"
    "mocov3-r50": _row("mocov3", f"{FBAI}/moco-v3/r-50-300ep/r-50-300ep.pth.tar", 0, rep="pooled",
                       aliases=("mocov3_r50",)),
    "mocov3-r50-1000ep": _row("mocov3", f"{FBAI}/moco-v3/r-50-1000ep/r-50-1000ep.pth.tar", 0, rep="pooled"),
    "mocov2-r50": _row("mocov2", f"{FBAI}/moco/moco_checkpoints/moco_v2_800ep/moco_v2_800ep_pretrain.pth.tar", 0,
                       md5="a04e12f8", rep="pooled", aliases=("mocov2", "mocov2_r50")),
    "dino-r50": _row("dino", f"{FBAI}/dino/dino_resnet50_pretrain/dino_resnet50_pretrain.pth", 0, rep="pooled",
                     aliases=("dino_r50",)),
    "swav-r50": _row("swav", f"{FBAI}/deepcluster/swav_800ep_pretrain.pth.tar", 0, rep="pooled",
                     aliases=("swav", "swav_r50")),
    "barlowtwins-r50": _row("barlowtwins", f"{FBAI}/barlowtwins/ljng/resnet50.pth", 0, rep="pooled", aliases=("barlowtwins", "barlowtwins_r50")),
    "vicreg-r50": _row("vicreg", f"{FBAI}/vicreg/resnet50.pth", 0, rep="pooled", aliases=("vicreg", "vicreg_r50")),
    "spark-r50": _row("spark", "https://drive.google.com/file/d/1H8605HbxGvrsu4x4rIoNr-Wkd7JkxFPQ/view", 0,
                      rep="pooled", aliases=("spark", "spark_r50")),
    "convnextv2-base-fcmae": _row("fcmae", f"{FBAI}/convnext/convnextv2/pt_only/convnextv2_base_1k_224_fcmae.pt", 0,
                                  rep="pooled", aliases=("fcmae", "convnextv2_base_fcmae")),
    "convnextv2-large-fcmae": _row("fcmae", f"{FBAI}/convnext/convnextv2/pt_only/convnextv2_large_1k_224_fcmae.pt", 0,
                                   rep="pooled", aliases=("convnextv2_large_fcmae",)),
    "convnextv2-base": _row("convnextv2", f"{FBAI}/convnext/convnextv2/im1k/convnextv2_base_1k_224_ema.pt", 0,
                            rep="pooled", aliases=("convnextv2", "convnextv2_base")),
    "convnext-base": _row("convnext", f"{FBAI}/convnext/convnext_base_1k_224_ema.pth", 0, rep="pooled",
                          aliases=("convnext", "convnext_base")),
    "resnet50-tv": _row("resnet", "https://download.pytorch.org/models/resnet50-0676ba61.pth", 0, sha256="0676ba61",
                        rep="pooled", aliases=("resnet50",)),
    "resnet50-tv2": _row("resnet", "https://download.pytorch.org/models/resnet50-11ad3fa6.pth", 0, sha256="11ad3fa6",
                         rep="pooled", crop=224 / 232),
    "timm/resnet50.a1_in1k": _row("resnet", "hf:timm/resnet50.a1_in1k", 0, rep="pooled", crop=0.95),
    "timm/convnextv2_base.fcmae": _row("fcmae", "hf:timm/convnextv2_base.fcmae", 0, rep="pooled"),
    "timm/convnext_base.fb_in1k": _row("convnext", "hf:timm/convnext_base.fb_in1k", 0, rep="pooled"),
    "microsoft/resnet-50": _row("resnet", "hf:microsoft/resnet-50", 0, rep="pooled", aliases=("resnet50-hf",)),
    "facebook/convnextv2-base-1k-224": _row("convnextv2", "hf:facebook/convnextv2-base-1k-224", 0, rep="pooled",
                                            aliases=("convnextv2-hf",)),
}
ALIASES_OF_TIMM = {name.removeprefix("timm/"): name for name in REGISTRY if name.startswith("timm/")}
ALIASES = {**ALIASES_OF_TIMM, **{a: name for name, row in REGISTRY.items() for a in row["aliases"]}}


def resolve_name(name: str) -> str:
    return ALIASES.get(name, name)


def split_family(spec: str) -> tuple[str | None, str]:
    """`FAMILY:SPEC` (e.g. dino:weights/my_dino.pth) → (FAMILY, SPEC) where FAMILY is a known family (so hf: and
    timm/ keep their meaning); any other spec → (None, spec)."""
    fam, sep, rest = spec.partition(":")
    return (fam, rest) if sep and rest and fam in FAMILIES and fam not in ("unknown", "ssl_repsim") else (None, spec)


# a release file's name → its registry row, where the name is one release's only (iBOT's checkpoint_teacher.pth is not)
_RELEASE_FILES = collections.Counter(row["url"].rsplit("/", 1)[-1] for row in REGISTRY.values())
RELEASE_FILES = {row["url"].rsplit("/", 1)[-1]: name for name, row in REGISTRY.items()
                 if not row["url"].startswith("hf:") and _RELEASE_FILES[row["url"].rsplit("/", 1)[-1]] == 1
                 and row["url"].endswith((".pth", ".pt", ".tar", ".bin", ".safetensors"))}   # not a web page's id
SIZE_WIDTHS = {"ti": 192, "s": 384, "b": 768, "l": 1024, "h": 1280}   # the width a row name's vit<size> implies


def row_fits(name: str, width: int) -> bool:
    """Whether a registry row's head count (and input size) fit a checkpoint of this width: the width its name
    implies (vits → 384, vitb → 768, ...), else one the heads divide."""
    m = re.search(r"vit(ti|s|b|l|h)\d", name)
    return width % REGISTRY[name]["num_heads"] == 0 and (m is None or SIZE_WIDTHS[m.group(1)] == width)


@dataclass
class ViTConfig:
    """The architecture of one ViT: sizes, and each family's variant as a switch (load_model infers it)."""
    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_hidden: int = 3072
    swiglu: bool = False          # DINOv2 ViT-g, EVA-02, DINOv3 H+: out = fc2(SiLU(x1) * x2), [x1, x2] = fc1(x)
    act: str = "gelu"             # the MLP's activation: gelu | gelu_tanh (SigLIP) | quick_gelu (OpenAI CLIP) | silu
    mlp_norm: bool = False        # EVA-02: a LayerNorm over the hidden units before fc2
    cls_token: bool = True        # I-JEPA, SigLIP have none
    dist_token: bool = False      # DeiT distilled: [cls, dist, patches]
    num_registers: int = 0        # DINOv2 *_reg4, DINOv3 storage tokens: [cls, registers, patches]
    patch_bias: bool = True       # CLIP's patch projection has no bias
    pos_embed: bool = True        # BEiT / SimMIM / data2vec pretrained use relative bias only; DINOv3 rotary only
    pos_cls_row: bool = True      # DeiT III, SigLIP: pos_embed covers patches only, cls unpositioned
    rel_pos: str | None = None    # None | "shared" (one table for all blocks) | "per_block"
    rope: str | None = None       # 2-D rotary embedding of q, k over patch tokens: None | "eva02" | "dinov3"
    rope_theta: float = 10000.0   # its base (EVA-02 10000, DINOv3 100)
    rope_grid: int = 0            # EVA-02: the patch grid its frequencies refer to (timm ref_feat_shape)
    norm_pre: bool = False        # CLIP: a LayerNorm over the tokens entering block 0 (ln_pre)
    layer_scale: bool = False     # gamma_1 / gamma_2
    norm_eps: float = 1e-6
    final_norm: bool = True       # MAE / BEiT fine-tuned: no token-level norm ...
    fc_norm: bool = False         # ... but fc_norm over the mean of patch tokens
    cls_norm: bool = False        # DINOv3 untied norms: prefix tokens get their own final norm
    attn_pool: int = 0            # SigLIP: hidden width of a multihead attention-pool (MAP) head giving the pooled output
    proj_dim: int = 0             # CLIP: the output projection (kept, not applied: see ViT.project)
    pool: str = ""                # "" = by the switches above (MAP, fc_norm, cls, mean) | "avg": mean patch token
    pos_interp: str = "bicubic"   # "bicubic" | "offset" (DINO, DINOv2: +0.1) | "antialias" (DINOv2 registers)
    num_classes: int = 0
    family: str = ""

    @property
    def num_prefix(self) -> int:
        return int(self.cls_token) + int(self.dist_token) + self.num_registers

    @property
    def pos_prefix_rows(self) -> int:   # prefix tokens whose position rows precede the grid in pos_embed
        return (int(self.cls_token) + int(self.dist_token)) * int(self.pos_cls_row)


log = logging.getLogger("ssl_repsim")   # notices and announcements; the CLI prints them on stderr as they happen


class Progress:
    """Progress on stderr: tqdm on a terminal when importable, else a built-in bar; in a batch log (stderr not a
    terminal) a plain line at every 10%; nothing when disabled."""

    def __init__(self, total, desc="", enabled=True, unit="it"):
        self.total, self.desc, self.n, self.unit, self._last, self._decile = total, desc, 0, unit, 0.0, 0
        self.enabled, self.tty = enabled, sys.stderr.isatty()
        self._tqdm = None
        if self.enabled and self.tty:
            with contextlib.suppress(ImportError):
                from tqdm import tqdm
                self._tqdm = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", leave=False)

    def update(self, k=1):
        self.n += k
        frac = self.n / self.total if self.total else 0.0
        if not self.enabled:
            return
        if self._tqdm is not None:
            self._tqdm.update(k)
        elif not self.tty:
            if int(10 * frac) > self._decile:
                self._decile = int(10 * frac)
                print(f"{self.desc}: {10 * self._decile}% ({self.n}/{self.total} {self.unit})", file=sys.stderr)
        elif time.time() - self._last > 0.2:
            self._last = time.time()
            bar = "#" * int(24 * frac)
            sys.stderr.write(f"\r{self.desc} [{bar:<24}] {self.n}/{self.total or '?'} {self.unit}")
            sys.stderr.flush()

    def close(self):
        if self._tqdm is not None:
            self._tqdm.close()
        elif self.enabled and self.tty:
            sys.stderr.write("\r" + " " * (len(self.desc) + 60) + "\r")
            sys.stderr.flush()


_STEPS: list[tuple[str, float]] = []   # the labelled steps in progress, innermost last: (label, start)


_HEARTBEAT_LOCK = threading.Lock()   # held while the CLI's heartbeat writes: a fork waits for it (_forked_analyses)
_LOCK_FDS: set[int] = set()          # descriptors holding this process's stage-folder locks (_try_lock)


@contextlib.contextmanager
def step(label: str):
    """A labelled stretch of work: announced on stderr as it starts; while it runs, the CLI's heartbeat names it
    whenever stderr has been silent for HEARTBEAT_SECONDS."""
    log.info(label)
    _STEPS.append((label, time.monotonic()))
    try:
        yield
    finally:
        _STEPS.pop()


# --- torch.distributed: every function behaves identically when no process group is initialised ---------------

def _dist_active(group=None) -> bool:  # `group` for symmetry with the callers; any initialised group counts
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


UNSHARDED = "unsharded"   # a `group` under which this process reads every batch, even under torch.distributed


def _rank_world(group=None) -> tuple[int, int]:
    if group != UNSHARDED and _dist_active(group):
        import torch.distributed as dist
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def _barrier():
    if _dist_active():
        import torch.distributed as dist
        dist.barrier()


def _all_reduce_sums(values: list[float], group=None) -> list[float]:
    """Each value summed over the process group (a float64 tensor on the backend's device: nccl needs CUDA)."""
    if not _dist_active(group):
        return list(values)
    import torch.distributed as dist
    cuda = dist.get_backend(group) == "nccl"
    t = torch.tensor(values, dtype=torch.float64, device=f"cuda:{torch.cuda.current_device()}" if cuda else "cpu")
    dist.all_reduce(t, group=group)
    return t.tolist()


def shard_batches(batches, group=None):
    """This process's share of a batch stream: batch i goes to rank i mod world (whole minibatches)."""
    rank, world = _rank_world(group)
    for i, b in enumerate(batches):
        if i % world == rank:
            yield b


def gather_batches(parts: list, group=None, keys: list | None = None) -> list:
    """Every rank's per-batch results in batch order: by `keys` (each part's first image index), so a rank that lost
    whole batches to unreadable images shifts nothing; without keys, rank r holding batches r, r + world, ..."""
    if not _dist_active(group):
        return parts
    import torch.distributed as dist
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    keys = list(keys) if keys is not None else [i * world + rank for i in range(len(parts))]
    if len(keys) != len(parts):
        raise ValueError(f"gather_batches: {len(keys)} keys for {len(parts)} parts")
    everything = [None] * world
    dist.all_gather_object(everything, list(zip(keys, parts, strict=True)), group=group)
    return [p for _, p in sorted((kp for e in everything for kp in e), key=operator.itemgetter(0))]


def _field(default, help: str, **meta):
    """A dataclass field whose help (and choices, and range: (low, high, bounds)) the CLI turns into a flag."""
    if "range" in meta:
        help += f" (range {_range_text(*meta['range'])})"
    return dataclasses.field(default=default, metadata=dict(help=help, **meta))


SEED_RANGE = (0, 2**63 - 1)   # torch.Generator().manual_seed's
USABLE_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _range_text(lo, hi, bounds="[]") -> str:
    return f"{'(-∞' if lo is None else bounds[0] + str(lo)}, {'∞)' if hi is None else str(hi) + bounds[1]}"


def in_range(name: str, value, lo=None, hi=None, bounds: str = "[]"):
    """`value` when it is a finite number within (lo, hi) with the given bounds ("[]", "[)", "(]", "()"), else a
    one-line UsageError naming the parameter and its meaningful range."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and (lo is None or (value > lo if bounds[0] == "(" else value >= lo)) \
        and (hi is None or (value < hi if bounds[1] == ")" else value <= hi))
    if not ok:
        raise UsageError(f"{_opt(name)} must lie in {_range_text(lo, hi, bounds)}, got {value!r}")
    return value


def check_ranges(obj):
    """Every field of a dataclass instance that declares a range, checked (in_range)."""
    for f in dataclasses.fields(obj):
        if "range" in f.metadata and getattr(obj, f.name) is not None:
            in_range(f.name, getattr(obj, f.name), *f.metadata["range"])
    return obj


# --- output files: written whole or not at all -------------------------------------------------------------

def atomic_write(path, data: bytes | str) -> Path:
    """Write to a temp file in the target directory, fsync, rename: a result file is whole or absent."""
    path = Path(path)
    if _rank_world()[0] != 0:  # under torchrun only rank 0 writes
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except (FileExistsError, NotADirectoryError):
        raise UsageError(f"cannot write {path}: a file stands where its folder {path.parent} should be") from None
    except OSError as e:
        raise UsageError(f"cannot write {path}: {_one_line(e)}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes 0600: give the file the user's usual mode
        os.replace(tmp, path)
    except OSError as e:   # a full disk, a read-only folder: a line naming the path, nothing left behind
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise UsageError(f"cannot write {path}: {e.strerror or _one_line(e)}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _jsonable(v):
    if isinstance(v, torch.Tensor):
        v = v.tolist()
    if isinstance(v, float):
        return None if math.isnan(v) or math.isinf(v) else v
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.floating, np.integer)):
        return _jsonable(v.item())
    if isinstance(v, Path):
        return str(v)
    return v


def write_json(path, obj) -> Path:
    return atomic_write(path, json.dumps(_jsonable(obj), indent=1, allow_nan=False) + "\n")


def write_csv(path, header, rows) -> Path:
    import csv
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows([["" if isinstance(c, float) and math.isnan(c) else c for c in r] for r in rows])
    return atomic_write(path, buf.getvalue())


# ======================================================================================================================
# 2. Model: one pre-norm ViT covering every family's variant, and a ResNet and a ConvNeXt beside it
# ======================================================================================================================


def stochastic_depth(x: torch.Tensor, p: float, training: bool, rng: torch.Generator | None = None) -> torch.Tensor:
    """Stochastic depth (Huang et al. 2016): drop the residual branch per sample with probability p."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - p, generator=rng)
    return x * keep / (1 - p)


def relative_position_index(gh: int, gw: int) -> torch.Tensor:
    """BEiT's (N+1)x(N+1) index into a [(2gh-1)(2gw-1)+3, H] table; the 3 last rows are cls->patch, patch->cls,
    cls->cls."""
    hh, ww = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    h, w = hh.flatten(), ww.flatten()
    rel = (h[:, None] - h[None, :] + gh - 1) * (2 * gw - 1) + (w[:, None] - w[None, :] + gw - 1)
    num = (2 * gh - 1) * (2 * gw - 1) + 3
    index = torch.empty(gh * gw + 1, gh * gw + 1, dtype=torch.long)
    index[1:, 1:] = rel
    index[0, :] = num - 3
    index[:, 0] = num - 2
    index[0, 0] = num - 1
    return index


def relative_position_bias(table: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """(H, N+1, N+1) bias from a BEiT table, resampled bicubically when the grid differs from the table's window
    (BEiT resamples with a geometric progression; bicubic agrees closely and is exact at the native size)."""
    w0 = round(math.sqrt(table.shape[0] - 3))  # 2W-1
    if (w0, w0) != (2 * gh - 1, 2 * gw - 1):
        grid = table[:-3].T.reshape(1, -1, w0, w0)
        grid = F.interpolate(grid.float(), size=(2 * gh - 1, 2 * gw - 1), mode="bicubic", align_corners=False)
        table = torch.cat([grid.reshape(table.shape[1], -1).T.to(table.dtype), table[-3:]])
    index = relative_position_index(gh, gw).to(table.device)
    return table[index].permute(2, 0, 1)


def interpolate_pos_embed(grid: torch.Tensor, gh: int, gw: int, method: str = "bicubic") -> torch.Tensor:
    """Resample a (1, M*M, D) position grid to (1, gh*gw, D) with the arithmetic of each family's code.
    bicubic: size=(gh, gw) (MAE, DeiT, timm); offset: scale_factor=((g+0.1)/M) (DINO, DINOv2 without registers);
    antialias: size=(gh, gw) with antialias=True (DINOv2 with registers)."""
    m = round(math.sqrt(grid.shape[1]))
    if m * m == gh * gw and gh == gw:
        return grid
    g = grid.reshape(1, m, m, -1).permute(0, 3, 1, 2).float()
    if method == "offset":
        g = F.interpolate(g, scale_factor=((gh + 0.1) / m, (gw + 0.1) / m), mode="bicubic", align_corners=False)
    else:
        g = F.interpolate(g, size=(gh, gw), mode="bicubic", align_corners=False, antialias=(method == "antialias"))
    if g.shape[-2:] != (gh, gw):
        raise UsageError(f"position-embedding interpolation gave {tuple(g.shape[-2:])}, expected {(gh, gw)}")
    return g.permute(0, 2, 3, 1).reshape(1, gh * gw, -1).to(grid.dtype)


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int, bias: bool = True):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(3, dim, patch, patch, bias=bias)

    def forward(self, x):
        if x.shape[-1] % self.patch or x.shape[-2] % self.patch:
            raise UsageError(f"image size {tuple(x.shape[-2:])} is not a multiple of the patch size {self.patch}")
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D), patches row-major


# --- 2-D rotary position embeddings (Su et al. 2021; Heo et al. 2024): one angle per (patch, channel) ---------------

def rope_angles_eva02(gh: int, gw: int, head_dim: int, theta: float, ref: int) -> torch.Tensor:
    """EVA-02 (timm RotaryEmbeddingCat, in_pixels=False): bands ω_k = θ^(−k/K), K = head_dim/4, at positions
    index·ref/grid per axis; angles [rows·ω, cols·ω], each repeated for its channel pair (2i, 2i+1)."""
    k = head_dim // 4
    omega = theta ** -(torch.arange(k, dtype=torch.float64) / k)
    r = torch.arange(gh, dtype=torch.float64) * ((ref or gh) / gh)
    c = torch.arange(gw, dtype=torch.float64) * ((ref or gw) / gw)
    r, c = torch.meshgrid(r, c, indexing="ij")
    return torch.cat([r.reshape(-1, 1) * omega, c.reshape(-1, 1) * omega], 1).repeat_interleave(2, -1)


def rope_angles_dinov3(gh: int, gw: int, head_dim: int, theta: float, ref: int) -> torch.Tensor:
    """DINOv3 (Siméoni et al. 2025): periods p_k = θ^(k/K), K = head_dim/4, at patch centres scaled to [−1, 1] per
    axis; angles 2π·[rows/p, cols/p], the whole row repeated for the two halves of the head."""
    k = head_dim // 4
    period = theta ** (torch.arange(k, dtype=torch.float64) / k)
    r = (torch.arange(gh, dtype=torch.float64) + 0.5) / gh * 2 - 1
    c = (torch.arange(gw, dtype=torch.float64) + 0.5) / gw * 2 - 1
    r, c = torch.meshgrid(r, c, indexing="ij")
    return 2 * math.pi * torch.cat([r.reshape(-1, 1) / period, c.reshape(-1, 1) / period], 1).tile(2)


# variant -> (angles, rotation): "pairs" rotates channels (2i, 2i+1), "halves" channels (i, i + head_dim/2)
ROPE_VARIANTS = {"eva02": (rope_angles_eva02, "pairs"), "dinov3": (rope_angles_dinov3, "halves")}


def apply_rope(x: torch.Tensor, rope, num_prefix: int) -> torch.Tensor:
    """x·cos θ + rot(x)·sin θ on the patch tokens of x (B, H, T, head_dim); prefix tokens pass unchanged."""
    cos, sin, style = rope
    pre, t = x[..., :num_prefix, :], x[..., num_prefix:, :]
    if style == "pairs":
        rot = torch.stack([-t[..., 1::2], t[..., ::2]], -1).reshape(t.shape)
    else:
        t1, t2 = t.chunk(2, -1)
        rot = torch.cat([-t2, t1], -1)
    return torch.cat([pre, t * cos.to(t.dtype) + rot * sin.to(t.dtype)], -2)


class Attention(nn.Module):
    """softmax(q kᵀ / √d_h + B_rel) v over H heads (Vaswani et al. 2017), qkv rows [q; k; v]; q, k rotated by the
    2-D rotary embedding where the family has one."""

    def __init__(self, dim: int, heads: int, table_rows: int | None = None):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(table_rows, heads)) if table_rows else None
        self.keep_attn = False   # set by attention_maps(): compute softmax explicitly and keep it in .attn_map
        self.attn_map = None

    def forward(self, x, bias=None, grid=None, rope=None):
        B, T, D = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            npre = T - rope[0].shape[0]
            q, k = apply_rope(q, rope, npre), apply_rope(k, rope, npre)
        if self.relative_position_bias_table is not None:
            bias = relative_position_bias(self.relative_position_bias_table, *grid)
        if bias is not None:
            bias = bias.to(q.dtype)
        if self.keep_attn:
            logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
            attn = (logits + bias if bias is not None else logits).softmax(-1)
            self.attn_map = attn.detach()
            out = attn @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(B, T, D))


class SwiGLUAct(nn.Module):
    def forward(self, x):
        x1, x2 = x.chunk(2, dim=-1)
        return F.silu(x1) * x2


class QuickGELU(nn.Module):
    """x·σ(1.702x), OpenAI CLIP's approximation of GELU."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": nn.GELU, "gelu_tanh": functools.partial(nn.GELU, approximate="tanh"), "quick_gelu": QuickGELU,
               "silu": nn.SiLU}


class Mlp(nn.Module):
    """fc2(norm(act(fc1(x)))): GELU (exact, tanh or quick), or SwiGLU where fc1 holds both halves (DINOv2 w12/w3);
    norm is EVA-02's LayerNorm over the hidden units, an identity elsewhere."""

    def __init__(self, dim: int, hidden: int, swiglu: bool = False, act: str = "gelu", norm_eps: float | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * hidden if swiglu else hidden)
        self.act = SwiGLUAct() if swiglu else ACTIVATIONS[act]()
        self.norm = nn.LayerNorm(hidden, eps=norm_eps) if norm_eps else nn.Identity()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.norm(self.act(self.fc1(x))))


class Block(nn.Module):
    """x ← x + γ₁·attn(norm1(x)); x ← x + γ₂·mlp(norm2(x)). `attn_residual` marks the stream between the two."""

    def __init__(self, cfg: ViTConfig, table_rows=None):
        super().__init__()
        d = cfg.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.attn = Attention(d, cfg.num_heads, table_rows)
        self.attn_residual = nn.Identity()
        self.norm2 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.mlp = Mlp(d, cfg.mlp_hidden, cfg.swiglu, cfg.act, cfg.norm_eps if cfg.mlp_norm else None)
        self.gamma_1 = nn.Parameter(torch.ones(d)) if cfg.layer_scale else None
        self.gamma_2 = nn.Parameter(torch.ones(d)) if cfg.layer_scale else None
        self.drop_path, self.rng = 0.0, None   # stochastic-depth rate and its generator (set by finetune)

    def forward(self, x, bias=None, grid=None, rope=None):
        a = self.attn(self.norm1(x), bias, grid, rope)
        a = a * self.gamma_1 if self.gamma_1 is not None else a
        x = self.attn_residual(x + stochastic_depth(a, self.drop_path, self.training, self.rng))
        m = self.mlp(self.norm2(x))
        m = m * self.gamma_2 if self.gamma_2 is not None else m
        return x + stochastic_depth(m, self.drop_path, self.training, self.rng)


class SharedRelPos(nn.Module):
    def __init__(self, rows, heads):
        super().__init__()
        self.relative_position_bias_table = nn.Parameter(torch.zeros(rows, heads))


class AttentionPool(nn.Module):
    """Multihead attention pooling (MAP; Zhai et al. 2022, SigLIP): a learned query attends over all final tokens,
    then o + mlp(norm(o)) is the pooled output."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        d, self.heads = cfg.embed_dim, cfg.num_heads
        self.latent = nn.Parameter(torch.zeros(1, 1, d))
        self.q, self.kv, self.proj = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)
        self.norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.mlp = Mlp(d, cfg.attn_pool, act=cfg.act)

    def forward(self, x):
        B, T, D = x.shape
        q = self.q(self.latent.expand(B, -1, -1)).reshape(B, 1, self.heads, D // self.heads).transpose(1, 2)
        k, v = self.kv(x).reshape(B, T, 2, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        o = self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, 1, D))
        return (o + self.mlp(self.norm(o)))[:, 0]


class Backbone(nn.Module):
    """What every model class here answers: forward = the pooled representation of forward_features, and logits
    through the classification head where there is one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.forward_features(x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            raise UsageError("this model has no classification head (load it with head=True or fine-tune it)")
        return self.head(self(x))


class ViT(Backbone):
    """Plain pre-norm ViT (Dosovitskiy et al. 2021) with every released variant as a config switch."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg, self.family = cfg, cfg.family
        d, g = cfg.embed_dim, cfg.img_size // cfg.patch_size
        rows = (2 * g - 1) ** 2 + 3
        self.patch_embed = PatchEmbed(cfg.patch_size, d, cfg.patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.cls_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.dist_token else None
        self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_registers, d)) if cfg.num_registers else None
        self.pos_embed = nn.Parameter(torch.zeros(1, g * g + cfg.pos_prefix_rows, d)) if cfg.pos_embed else None
        self.rel_pos_bias = SharedRelPos(rows, cfg.num_heads) if cfg.rel_pos == "shared" else None
        self.norm_pre = nn.LayerNorm(d, eps=cfg.norm_eps) if cfg.norm_pre else nn.Identity()
        self.embed = nn.Identity()
        self.blocks = nn.ModuleList(Block(cfg, rows if cfg.rel_pos == "per_block" else None)
                                    for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d, eps=cfg.norm_eps) if cfg.final_norm else nn.Identity()
        self.cls_norm = nn.LayerNorm(d, eps=cfg.norm_eps) if cfg.cls_norm else None
        self.fc_norm = nn.LayerNorm(d, eps=cfg.norm_eps) if cfg.fc_norm else None
        self.attn_pool = AttentionPool(cfg) if cfg.attn_pool else None
        self.proj = nn.Parameter(torch.zeros(d, cfg.proj_dim)) if cfg.proj_dim else None
        self.head = nn.Linear(d, cfg.num_classes) if cfg.num_classes else None
        # what load_model fills in from the registry / file; defaults for a model built in code
        self.input_size, self.source = cfg.img_size, dict(spec=cfg.family or "ViT", path=None, family=cfg.family)
        self.preprocess = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, interp="bicubic", crop_pct=0.875,
                               crop_mode="center")
        self._init_weights()
        self.eval()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        latent = self.attn_pool.latent if self.attn_pool is not None else None
        for p in (self.cls_token, self.dist_token, self.register_tokens, self.pos_embed, latent):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)

    def position_embedding(self, gh: int, gw: int) -> torch.Tensor:
        pos = self.pos_embed
        if pos is None:
            return None
        pre = self.cfg.pos_prefix_rows
        grid = interpolate_pos_embed(pos[:, pre:], gh, gw, self.cfg.pos_interp)
        return torch.cat([pos[:, :pre], grid], 1) if pre else grid

    def rotary(self, gh: int, gw: int, device) -> tuple | None:
        """(cos, sin, rotation style) of the family's rotary embedding on a gh×gw patch grid, or None."""
        if self.cfg.rope is None:
            return None
        angles_of, style = ROPE_VARIANTS[self.cfg.rope]
        angles = angles_of(gh, gw, self.cfg.embed_dim // self.cfg.num_heads, self.cfg.rope_theta, self.cfg.rope_grid)
        return angles.cos().float().to(device), angles.sin().float().to(device), style

    def tokens(self, x: torch.Tensor, keep: torch.Tensor | None = None):
        """Tokens entering block 0 in the order [cls, dist, registers, patches], and the patch grid. `keep` (B, K)
        keeps only those patches (MAE-style masking, after position embeddings are added)."""
        gh, gw = x.shape[-2] // self.cfg.patch_size, x.shape[-1] // self.cfg.patch_size
        x = self.patch_embed(x)
        pos = self.position_embedding(gh, gw)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.dist_token) if t is not None]
        if pos is not None and self.cfg.pos_prefix_rows:
            x = torch.cat([*prefix, x], 1) + pos
        else:
            x = x + pos if pos is not None else x
            x = torch.cat([*prefix, x], 1)
        if self.register_tokens is not None:
            c = len(prefix)
            x = torch.cat([x[:, :c], self.register_tokens.expand(x.shape[0], -1, -1), x[:, c:]], 1)
        if keep is not None:
            if self.cfg.rel_pos or self.cfg.rope:
                raise UsageError("masking is not defined for models with relative position bias or rotary "
                                 "embeddings")
            k = self.cfg.num_prefix
            x = torch.cat([x[:, :k], x[:, k:].gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))], 1)
        return self.embed(self.norm_pre(x)), (gh, gw)

    def forward_features(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """All tokens after the final norm (the last block's output where the checkpoint has no `norm`)."""
        x, grid = self.tokens(x, keep)
        bias = relative_position_bias(self.rel_pos_bias.relative_position_bias_table, *grid) \
            if self.rel_pos_bias is not None else None
        rope = self.rotary(*grid, x.device)
        for blk in self.blocks:
            x = blk(x, bias, grid, rope)
        return self.final_norm(x)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm over all tokens (prefix tokens through their own norm where the family unties them)."""
        if self.cls_norm is not None:
            npre = self.cfg.num_prefix
            return torch.cat([self.cls_norm(x[:, :npre]), self.norm(x[:, npre:])], 1)
        return self.norm(x)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """The family's pooled representation from final tokens."""
        if self.attn_pool is not None:
            return self.attn_pool(tokens)
        if self.fc_norm is not None:
            return self.fc_norm(tokens[:, self.cfg.num_prefix:].mean(1))
        if self.cfg.pool == "avg" or not self.cfg.cls_token:
            return tokens[:, self.cfg.num_prefix:].mean(1)
        if self.cfg.dist_token:
            return (tokens[:, 0] + tokens[:, 1]) / 2   # DeiT distilled: the mean of its two heads' inputs
        return tokens[:, 0]

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """CLIP's joint image-text embedding: the pooled output times the released projection."""
        if self.proj is None:
            raise UsageError("this model has no output projection")
        return pooled @ self.proj


@contextlib.contextmanager
def keep_attention(model: ViT):
    """Within the block, attention layers compute softmax explicitly and keep it in `.attn_map` (B, H, T, T)."""
    for blk in model.blocks:
        blk.attn.keep_attn = True
    try:
        yield
    finally:
        for blk in model.blocks:
            blk.attn.keep_attn, blk.attn.attn_map = False, None


def attention_maps(model: ViT, x: torch.Tensor, keep: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Attention probabilities of every block, a list of (B, H, T, T) (`keep`: patches kept, as in tokens())."""
    with keep_attention(model), torch.no_grad():
        model.forward_features(x, keep)
        return [blk.attn.attn_map for blk in model.blocks]


# --- convolutional backbones of the same objectives: ResNet and ConvNeXt, under their official releases' names ---

@dataclass
class CNNConfig:
    """The architecture of one CNN: a ResNet of bottleneck blocks (He et al. 2016; torchvision's layout, the stride
    on the 3×3 conv) or a ConvNeXt (Liu et al. 2022; V2 adds global response norm, Woo et al. 2023). load_model
    infers it from the weights; it answers what code written for ViTs asks of a config (no prefix tokens, no heads,
    its stride as the patch)."""
    arch: str = "resnet"                     # resnet | convnext
    depths: tuple = (3, 4, 6, 3)             # blocks per stage
    widths: tuple = (256, 512, 1024, 2048)   # each stage's output channels
    inner: tuple = (64, 128, 256, 512)       # ResNet: each stage's bottleneck width; ConvNeXt: its MLP's hidden width
    stem_width: int = 64                     # ResNet: channels of the 7×7 stem
    groups: int = 1                          # ResNeXt: groups of the 3×3 conv
    stride_in_1x1: bool = False              # the stride on the first 1×1 conv (transformers' downsample_in_bottleneck)
    kernel: int = 7                          # ConvNeXt: the depthwise kernel
    grn: bool = False                        # ConvNeXt V2: global response norm in each block's MLP
    layer_scale: bool = False                # ConvNeXt V1: a per-channel gamma on each block's branch
    final_norm: bool = True                  # ConvNeXt: a LayerNorm of the pooled features (FCMAE encoders have none)
    norm_eps: float = 1e-6                   # ConvNeXt's LayerNorms (ResNet's BatchNorms: 1e-5, torch's default)
    final_eps: float = 1e-6                  # ... its final one (transformers' layer_norm_eps)
    img_size: int = 224
    num_classes: int = 0
    family: str = ""
    num_prefix, cls_token, dist_token, num_registers, num_heads, rope, swiglu = 0, False, False, 0, 0, None, False
    patch_size = 32                          # both downsample 32×: stem 4× (ResNet: conv 2×, max-pool 2×), 3 × 2×

    @property
    def embed_dim(self) -> int:
        return self.widths[-1]

    @property
    def depth(self) -> int:
        return sum(self.depths)


class Bottleneck(nn.Module):
    """act3(bn3(conv3(act2(bn2(conv2(act1(bn1(conv1(x))))))) + downsample(x)): torchvision's bottleneck block."""

    def __init__(self, cin: int, width: int, cout: int, stride: int, cfg: CNNConfig):
        super().__init__()
        s1, s3 = (stride, 1) if cfg.stride_in_1x1 else (1, stride)
        self.conv1, self.bn1, self.act1 = nn.Conv2d(cin, width, 1, s1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, s3, 1, groups=cfg.groups, bias=False)
        self.bn2, self.act2 = nn.BatchNorm2d(width), nn.ReLU()
        self.conv3, self.bn3, self.act3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)) \
            if stride != 1 or cin != cout else None
        self.drop_path, self.rng = 0.0, None

    def forward(self, x):
        y = self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))))
        y = stochastic_depth(self.bn3(self.conv3(y)), self.drop_path, self.training, self.rng)
        return self.act3(y + (x if self.downsample is None else self.downsample(x)))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an (N, C, H, W) map: ConvNeXt's channels_first LayerNorm."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GRN(nn.Module):
    """Global response norm (Woo et al. 2023) of (N, H, W, C): x + γ·(x·N(x)) + β, N(x) = ‖x‖₂ over H, W divided by
    its mean over channels (+1e-6)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma, self.beta = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        g = torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True)
        return x + self.gamma * (x * (g / (g.mean(-1, keepdim=True) + 1e-6))) + self.beta


class ConvNeXtBlock(nn.Module):
    """x + γ·pwconv2(grn(act(pwconv1(norm(dwconv(x)))))), the MLP on channels-last positions (their hooks say so)."""

    def __init__(self, dim: int, hidden: int, cfg: CNNConfig):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, cfg.kernel, padding=cfg.kernel // 2, groups=dim)
        self.norm, self.pwconv1, self.act = nn.LayerNorm(dim, eps=cfg.norm_eps), nn.Linear(dim, hidden), nn.GELU()
        self.grn = GRN(hidden) if cfg.grn else None
        self.pwconv2 = nn.Linear(hidden, dim)
        self.gamma = nn.Parameter(torch.ones(dim)) if cfg.layer_scale else None
        for m in (self.norm, self.pwconv1, self.act, self.grn, self.pwconv2):
            if m is not None:
                m.channels_last = True
        self.drop_path, self.rng = 0.0, None

    def forward(self, x):
        y = self.act(self.pwconv1(self.norm(self.dwconv(x).permute(0, 2, 3, 1))))
        y = self.pwconv2(self.grn(y) if self.grn is not None else y)
        y = (y * self.gamma if self.gamma is not None else y).permute(0, 3, 1, 2)
        return x + stochastic_depth(y, self.drop_path, self.training, self.rng)


class ConvNet(Backbone):
    """What the two CNNs share with the ViT's interface: the final map as tokens (N, H·W, C), the pooled
    representation, a head, and their residual blocks in order (`block_names`, by module path)."""

    def _setup(self, cfg: CNNConfig):
        self.cfg, self.family = cfg, cfg.family
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes) if cfg.num_classes else None
        self.input_size, self.source = cfg.img_size, dict(spec=cfg.family or cfg.arch, path=None, family=cfg.family)
        self.preprocess = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, interp="bicubic", crop_pct=0.875,
                               crop_mode="center")

    @property
    def blocks(self) -> list[nn.Module]:
        return [self.get_submodule(n) for n in self.block_names]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_map(x).flatten(2).transpose(1, 2)


class ResNet(ConvNet):
    """conv1-bn1-relu-maxpool, then layer1…layer4 of bottleneck blocks (the first of layer2…4 strides 2); pooled:
    the global average of layer4's map."""

    def __init__(self, cfg: CNNConfig):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, cfg.stem_width, 7, 2, 3, bias=False), nn.BatchNorm2d(cfg.stem_width)
        self.relu, self.maxpool = nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        cin, self.block_names, self.stage_names = cfg.stem_width, [], []
        for s, (n, width, cout) in enumerate(zip(cfg.depths, cfg.inner, cfg.widths, strict=True)):
            blocks = [Bottleneck(cin if j == 0 else cout, width, cout, 2 if j == 0 and s else 1, cfg) for j in range(n)]
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
            self.block_names += [f"layer{s + 1}.{j}" for j in range(n)]
            self.stage_names.append(f"layer{s + 1}")
            cin = cout
        self.stem_name = "maxpool"
        self._setup(cfg)
        self.eval()

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return x

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.mean(1)


class ConvNeXt(ConvNet):
    """downsample_layers.0 (4×4 conv, LayerNorm), stages.0; then each downsample_layers.i (LayerNorm, 2×2 conv) and
    stages.i; pooled: the final LayerNorm of the global average (a LayerNorm without affine where the file has
    none, as timm computes an FCMAE encoder's)."""

    def __init__(self, cfg: CNNConfig):
        super().__init__()
        w, eps = cfg.widths, cfg.norm_eps
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(3, w[0], 4, 4), LayerNorm2d(w[0], eps=eps))]
            + [nn.Sequential(LayerNorm2d(w[i - 1], eps=eps), nn.Conv2d(w[i - 1], w[i], 2, 2)) for i in range(1, len(w))])
        self.stages = nn.ModuleList(nn.Sequential(*[ConvNeXtBlock(d, h, cfg) for _ in range(n)])
                                    for n, d, h in zip(cfg.depths, w, cfg.inner, strict=True))
        self.norm = nn.LayerNorm(w[-1], eps=cfg.final_eps) if cfg.final_norm else None
        self.block_names = [f"stages.{s}.{j}" for s, n in enumerate(cfg.depths) for j in range(n)]
        self.stage_names, self.stem_name = [f"stages.{s}" for s in range(len(w))], "downsample_layers.0"
        self._setup(cfg)
        self.eval()

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        for down, stage in zip(self.downsample_layers, self.stages, strict=True):
            x = stage(down(x))
        return x

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        p = tokens.mean(1)
        return self.norm(p) if self.norm is not None else F.layer_norm(p, p.shape[-1:], eps=self.cfg.final_eps)


CNN_ARCHS = {"resnet": ResNet, "convnext": ConvNeXt}


# ======================================================================================================================
# 3. Checkpoints: read safely, detect the layout, convert, download
# ======================================================================================================================

class _ConfigAsDict:
    """Stands in for a pickled yacs CfgNode (the `config` of SimMIM files): it unpickles as a plain OrderedDict of
    the node's items and attributes, so none of yacs' code is needed or run."""

    def __new__(cls, *args):
        return collections.OrderedDict()


# what weights_only loading may rebuild besides tensors and containers: the data-only objects released files pickle
SAFE_GLOBALS = [argparse.Namespace, (_ConfigAsDict, "yacs.config.CfgNode")]


def read_checkpoint(path) -> tuple[dict, dict]:
    """(object, safetensors metadata) of a checkpoint file. Pickles load with weights_only=True: only tensors,
    containers, argparse.Namespace (the `args` of DINO / iBOT / BEiT full files) and yacs configs (as plain
    dicts) are rebuilt; nothing runs code."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint not found: {path}")
    if path.name.endswith(".index.json"):
        return _read_shards(path), {}
    with open(path, "rb") as f:
        head = f.read(9)
    if path.suffix == ".safetensors" or (len(head) == 9 and head[8:9] == b"{"):   # by name, or by content
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = f.keys()   # a safe_open handle is not iterable
                meta = f.metadata() or {}
                meta = json.loads(meta["ssl_repsim"]) if "ssl_repsim" in meta else meta
                return {k: f.get_tensor(k) for k in keys}, meta
        except Exception as e:  # noqa: BLE001 - whatever safetensors raises, the file is the user's
            raise UsageError(f"{path}: not a readable safetensors file ({_one_line(e)})") from None
    with open(path, "rb") as f:
        head = f.read(8)
    if not (head[:2] == b"PK" or head[:1] == b"\x80"):   # neither torch.save's zip nor a pickle
        raise UsageError(f"{path}: not a checkpoint (neither a PyTorch file nor safetensors; starts {head[:8]!r})")
    _check_archive(path)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS), warnings.catch_warnings():
            warnings.simplefilter("ignore")   # torch's notes on legacy files: the one line below says what matters
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError for unsafe globals; RuntimeError, EOFError ... corrupt
        msg = _one_line(e)
        if "Unsupported global" in msg or "GLOBAL " in msg:
            found = re.findall(r"GLOBAL ([\w.]+)", msg)
            raise UsageError(f"{path}: refused to unpickle {found[0] if found else 'an object'} — the file would run "
                             "code on load; re-save its state dict with torch.save(state_dict) or as safetensors"
                             ) from None
        if "Weights only load failed" in msg:
            raise UsageError(f"{path}: a pickle that torch.load cannot read as data (a raw pickle rather than "
                             "torch.save? re-save it with torch.save or as safetensors)") from None
        raise UsageError(f"{path}: corrupt or unreadable checkpoint ({msg[:200]})") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{path}: holds a {type(obj).__name__}, not a state dict or a dict of state dicts")
    _refuse_inflated(obj, path)
    return obj, {}


def shard_names(index: Path) -> list[str]:
    """The shard files a sharded checkpoint's index names (its weight_map: parameter → file name), checked."""
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise UsageError(f"{index}: no weight_map")
    if not all(isinstance(sh, str) and re.fullmatch(r"[\w.-]+", sh) and sh not in (".", "..")
               and not sh.endswith(".json") for sh in weight_map.values()):
        raise UsageError(f"{index}: weight_map values must be shard file names beside the index")
    return sorted(set(weight_map.values()))


def _read_shards(index: Path) -> dict:
    """The state dict of a sharded checkpoint: every shard its index's weight_map names (each read safely), each
    tensor from the shard the index assigns it to."""
    weight_map = _read_json(index).get("weight_map")
    shards = shard_names(index)
    bad = [sh for sh in shards if not (index.parent / sh).is_file()]
    if bad:
        raise UsageError(f"{index}: shard {bad[0]!r} is not a weights file beside it")
    out = {}
    for shard in shards:
        obj, _ = read_checkpoint(index.parent / shard)
        clash = set(obj) & set(out)
        if clash:
            raise UsageError(f"{index}: {_keys_str(sorted(clash), 2)} stored in two shards")
        out.update(obj)
    missing = sorted(set(weight_map) - set(out))
    if missing:
        raise UsageError(f"{index}: {len(missing)} tensors missing from their shards ({_keys_str(missing, 3)})")
    return out


def memory_budget() -> int:
    """Half the memory this process may use (its address-space limit, or the machine's available memory), at least
    256 MiB: what a file may ask for once inflated."""
    limits = []
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource
        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            limits.append(soft)
    with contextlib.suppress(OSError, ValueError, StopIteration), open("/proc/meminfo") as f:
        limits.append(int(next(ln for ln in f if ln.startswith("MemAvailable:")).split()[1]) * 1024)
    if not limits:
        with contextlib.suppress(ValueError, OSError, AttributeError):
            limits.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return max(min(limits, default=1 << 36) // 2, 256 << 20)


def _check_archive(path: Path):
    """A zip archive (torch.save's format, an .npz) whose members would inflate past memory_budget() is refused from
    its central directory, before anything is inflated."""
    import zipfile
    try:
        with zipfile.ZipFile(path) as z:
            total = sum(i.file_size for i in z.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return   # not a readable zip: the reader that follows says what is wrong
    if total > memory_budget():
        raise UsageError(f"{path}: its contents would take {total / 2 ** 30:.1f} GiB once inflated, more than this "
                         f"process may use ({memory_budget() / 2 ** 30:.1f} GiB)")


def _refuse_inflated(obj, path, limit: int = 1 << 36):
    """Refuse tensors whose storage is smaller than their shape (expand()ed, stride 0: a small file that would
    become huge once copied) and files whose tensors add up to more than `limit` bytes (64 GiB; a ViT-g training
    file with its optimizer state holds about 20)."""
    total, stack = 0, [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple)):
            stack.extend(o)
        elif isinstance(o, torch.Tensor):
            size = o.numel() * o.element_size()
            if o.numel() and o.untyped_storage().nbytes() < size:
                raise UsageError(f"{path}: holds a tensor of shape {tuple(o.shape)} stored in "
                                 f"{o.untyped_storage().nbytes()} bytes (expanded): not a checkpoint to load")
            total += size
    if total > limit:
        raise UsageError(f"{path}: its tensors would take {total / 2 ** 30:.0f} GiB: larger than any released ViT")


def parse_json(text: str, where) -> object:
    """json.loads for files from elsewhere: Infinity / NaN, integers past 4300 digits and nesting past Python's
    recursion limit are one-line errors, not crashes."""
    def refuse(const):
        raise ValueError(f"{const} is not a JSON number")
    try:
        return json.loads(text, parse_constant=refuse)
    except (ValueError, RecursionError) as e:   # JSONDecodeError is a ValueError
        raise UsageError(f"{where}: unreadable JSON ({_one_line(e)[:150]})") from None


def _one_line(e: BaseException) -> str:
    """The message on one line, any bearer token in it redacted."""
    return _redacted(" ".join(str(e).split())) or type(e).__name__


def _redacted(text: str) -> str:
    return re.sub(r"(?i)(bearer\s+)\S+|\bhf_[A-Za-z0-9]{8,}", lambda m: (m.group(1) or "") + "<token>", text)


def _rename(key: str, renames) -> str:
    for pattern, repl in renames:
        key = re.sub(pattern, repl, key)
    return key


def _fuse_qkv(sd: dict) -> dict:
    """Separate q/k/v projections (transformers, timm Eva) and q/v-only biases (BEiT family, timm Eva: bias =
    [q_bias; 0; v_bias]) → one qkv Linear; DINOv3's masked k bias applied; an attention pool's packed in_proj → q, kv."""
    out = dict(sd)
    for q_key in [k for k in sd if k.endswith(".attn.q.weight")]:
        base = q_key[: -len(".q.weight")]
        if not all(f"{base}.{n}.weight" in out for n in "kv"):
            raise UsageError(f"{base}: a query projection without its key and value projections")
        w = [out.pop(f"{base}.{n}.weight") for n in "qkv"]
        out[f"{base}.qkv.weight"] = torch.cat(w)
        q, k, v = (out.pop(f"{base}.{n}.bias", None) for n in "qkv")
        if (q is None) != (v is None):
            raise UsageError(f"{base}: a {'value' if q is None else 'query'} bias without the "
                             f"{'query' if q is None else 'value'} one: the file is incomplete")
        if q is not None:
            out[f"{base}.qkv.bias"] = torch.cat([q, k if k is not None else torch.zeros_like(q), v])
    for q_key in [k for k in sd if k.endswith((".attn.q_bias", ".attn.v_bias"))]:
        base = q_key.rsplit(".", 1)[0]
        q, v = out.pop(f"{base}.q_bias", None), out.pop(f"{base}.v_bias", None)
        if q is None and v is None:
            continue
        if q is None or v is None:
            raise UsageError(f"{base}: q_bias and v_bias come in pairs; one is missing")
        out[f"{base}.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
    for m_key in [k for k in sd if k.endswith(".attn.qkv.bias_mask")]:
        bias_key = m_key[: -len("_mask")]
        mask = out.pop(m_key)
        if bias_key in out:
            out[bias_key] = out[bias_key] * mask.nan_to_num(0.0)   # the official forward: bias · mask
    if "attn_pool.in_proj_weight" in out:
        w, b = out.pop("attn_pool.in_proj_weight"), out.pop("attn_pool.in_proj_bias")
        d = w.shape[1]
        out.update({"attn_pool.q.weight": w[:d], "attn_pool.q.bias": b[:d], "attn_pool.kv.weight": w[d:],
                    "attn_pool.kv.bias": b[d:]})
    for w_key in [k for k in out if k.endswith(".attn.qkv.weight")]:
        out.setdefault(w_key[:-6] + "bias", torch.zeros(out[w_key].shape[0]))
    return out


def _fuse_mlp(sd: dict) -> dict:
    """A SwiGLU's separate gate and value projections (timm fc1_g/fc1_x, DINOv3 w1/w2, transformers gate/up) → one
    fc1 holding [gate; value]; a lone value projection (transformers up_proj) is fc1."""
    out = dict(sd)
    for x_key in [k for k in sd if re.search(r"\.mlp\.fc1_x\.(weight|bias)$", k)]:
        g = out.pop(x_key.replace("fc1_x", "fc1_g"), None)
        x = out.pop(x_key)
        out[x_key.replace("fc1_x", "fc1")] = torch.cat([g, x]) if g is not None else x
    return out


def _token_shapes(sd: dict) -> dict:
    """CLIP-style flat tokens and tables → our (1, n, D) shapes; transformers' projection Linear → proj (D, E)."""
    out = dict(sd)
    for k in ("cls_token", "dist_token", "register_tokens", "pos_embed"):
        if k in out and out[k].ndim in (1, 2):
            out[k] = out[k].reshape(1, -1, out[k].shape[-1])
    if "proj.weight" in out:
        out["proj"] = out.pop("proj.weight").T
    return out


# keys whose meaning depends on the family: a flat file holding them is not read as family `unknown`
def _rotary_keys(o: dict) -> bool:
    """timm Eva keys (separate q/k/v, split GLU), or EVA-02 tiny/small/base's: q/v biases beside a fused GLU fc1 of
    twice fc2's input, and no relative position table (BEiT has one; DINOv2-g's fused SwiGLU has no q bias)."""
    fc1, fc2 = o.get("blocks.0.mlp.fc1.weight"), o.get("blocks.0.mlp.fc2.weight")
    glu = isinstance(fc1, torch.Tensor) and isinstance(fc2, torch.Tensor) and fc1.ndim == fc2.ndim == 2 \
        and fc1.shape[0] == 2 * fc2.shape[1]
    return _any(o, r"^blocks\.0\.(attn\.[qkv]_proj|mlp\.fc1_g)\.") or (
        glu and "blocks.0.attn.q_bias" in o and not _any(o, r"relative_position|rel_pos_bias"))


AMBIGUOUS_KEYS = (
    (_rotary_keys, ("timm Eva keys: whether and how the model rotates its tokens "
                                                   "(EVA-02, DINOv3) is not in the file; pass {family} eva02 or "
                                                   "dinov3, or load its timm hub folder")),
    (r"^attn_pool\.", ("an attention-pool head: its activation is not in the file; pass {family} siglip, or load its "
                       "timm hub folder")),
    (r"^norm_pre\.", ("a CLIP-style pre-norm: its activation is not in the file; pass {family} clip {act} "
                      "gelu|quick_gelu, or load its hub folder")))


def detect_layout(obj: dict, family: str | None = None) -> tuple[str, Layout, str]:
    """(family, layout, the family row that owns the layout). A named family: its own layouts, then the shared
    formats (transformers, timm, flat), and it labels whichever matched; otherwise every layout that keys can tell,
    in table order, catch-alls last."""
    if family is not None and family not in FAMILIES:
        raise UsageError(f"unknown family {family!r}; known: {', '.join(sorted(FAMILIES))}")
    rows = [(name, lay) for name, fam in FAMILIES.items() for lay in fam.layouts]
    if family is not None:   # its own layouts, then the formats any family is saved in (transformers, timm, flat)
        candidates = [row for row in rows if row[0] == family] + [("", lay) for lay in SHARED_LAYOUTS]
    else:
        candidates = sorted((row for row in rows if not row[1].named_only), key=lambda row: row[1].fallback)
    for owner, layout in candidates:
        if layout.match(obj):
            label = family or owner
            if label == "unknown":
                for pattern, why in AMBIGUOUS_KEYS:
                    if pattern(obj) if callable(pattern) else _any(obj, pattern):
                        raise UsageError(f"a flat state dict with {why.format(family=_opt('family'), act=_opt('act'))}")
            return label, layout, owner
    raise UsageError(f"unknown checkpoint layout (top-level keys: {_keys_str(obj)}); pass {_opt('family')}")


def _keys_str(d, n=6) -> str:
    keys = list(d)
    return ", ".join(map(str, keys[:n])) + (f", ... ({len(keys)} keys)" if len(keys) > n else "")


def convert_state_dict(obj: dict, family: str | None = None, head: bool = False) -> tuple[dict, str]:
    """The backbone state dict in our key names, and the family that labels it."""
    family, layout, owner = detect_layout(obj, family)
    sd = obj[layout.pick] if layout.pick else obj
    if not _is_state_dict(sd):
        raise UsageError(f"{family} layout: {layout.pick or 'the file'} is not a state dict")
    prefix = layout.prefix
    if prefix is None:  # whatever precedes the patch embedding ("" for flat files, "module.backbone." ...)
        anchors = [k for k in sd if k.endswith("patch_embed.proj.weight")]
        prefix = min(anchors, key=len)[: -len("patch_embed.proj.weight")] if anchors else ""
    renames = layout.renames or (FAMILIES[owner].renames if owner else ())
    out = {}
    for k, v in sd.items():
        if prefix and not k.startswith(prefix):
            if layout.only_prefix:
                continue
        else:
            k = k[len(prefix):]
        k = re.sub(layout.strip, "", k)
        kept_head = head and re.fullmatch(r"(head|classifier)\.(weight|bias)", k) and v.ndim <= 2
        if (re.search(layout.drop, k) or k.endswith("relative_position_index")) and not kept_head:
            continue
        out[_rename(k, renames)] = v
    if not head:
        out = {k: v for k, v in out.items() if not k.startswith("head.")}
    out = layout.reshape(out) if layout.reshape else out
    return _token_shapes(_fuse_mlp(_fuse_qkv(out))), family


def infer_config(sd: dict, family: str, *, num_heads: int | None = None, width_table: bool = True,
                 **arch) -> ViTConfig:
    """Architecture from the shapes of a converted state dict; what weights cannot tell (heads, activation, eps,
    rotary variant) from `arch` (the file's config), else the family's row, else the tables — never a guess."""
    w = sd.get("patch_embed.proj.weight")
    if w is None or w.ndim != 4:
        raise UsageError(f"no ViT patch embedding found (keys: {_keys_str(sd)}): not a ViT checkpoint")
    d, patch = w.shape[0], w.shape[-1]
    present = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    depth = 1 + max(present, default=-1)
    if depth == 0:
        raise UsageError("no transformer blocks (blocks.N.*) in the checkpoint")
    if len(present) != depth:   # checked before anything is built: one stray blocks.100000 key builds nothing
        gaps = sorted(set(range(depth)) - present)
        raise UsageError(f"blocks {gaps[0]}…{gaps[-1]} ({len(gaps)} of {depth}) are missing from the checkpoint")
    fam = FAMILIES[family]
    arch = {**fam.arch, **{k: v for k, v in arch.items() if v is not None}}
    cls, dist = "cls_token" in sd, "dist_token" in sd
    regs = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    grid, pos_cls_row, rel_pos, table = _position_tables(sd, int(cls) + int(dist))
    if grid is None and not arch.get("rope"):
        raise UsageError(f"{family} checkpoint without any position information (no pos_embed, no relative "
                         f"position table): a rotary-embedding model? pass {_opt('family')} eva02 or dinov3, or load "
                         "its hub folder")
    fc1, fc2 = sd.get("blocks.0.mlp.fc1.weight"), sd.get("blocks.0.mlp.fc2.weight")
    if fc1 is None or fc2 is None:
        raise UsageError("blocks.0.mlp.fc1/fc2 weights missing: not a ViT checkpoint of a known layout")
    heads = table.shape[1] if table is not None else num_heads or fam.heads.get(d) or (
        HEADS_BY_WIDTH.get(d) if width_table else None)
    if heads is None:
        raise UsageError(f"width {d}: its number of attention heads is not in the file, and no config or registry "
                         f"row gives it: pass {_opt('num_heads')}")
    if d % heads or (arch.get("rope") and (d // heads) % 4):
        raise UsageError(f"num_heads={heads} does not fit the width {d}")
    if arch.get("act", "gelu") is None:
        raise UsageError(f"{family} checkpoint: its MLP activation is not in the file (OpenAI CLIP weights use "
                         f"QuickGELU, open_clip's own GELU): pass {_opt('act')} quick_gelu or gelu")
    interp = (fam.pos_interp_registers or fam.pos_interp) if regs else fam.pos_interp
    pool = sd.get("attn_pool.mlp.fc1.weight")
    img = grid * patch if grid else 224 if 224 % patch == 0 else 14 * patch   # rotary-only: the common 224
    return ViTConfig(img_size=img, patch_size=patch, embed_dim=d, depth=depth, num_heads=heads,
                     mlp_hidden=fc2.shape[1], swiglu=fc1.shape[0] == 2 * fc2.shape[1],
                     mlp_norm="blocks.0.mlp.norm.weight" in sd, cls_token=cls, dist_token=dist, num_registers=regs,
                     patch_bias=arch.get("patch_bias", True), pos_embed="pos_embed" in sd, pos_cls_row=pos_cls_row,
                     rel_pos=rel_pos, norm_pre=arch.get("norm_pre", False), layer_scale="blocks.0.gamma_1" in sd,
                     final_norm="norm.weight" in sd, fc_norm="fc_norm.weight" in sd, cls_norm="cls_norm.weight" in sd,
                     attn_pool=pool.shape[0] if pool is not None else 0,
                     proj_dim=sd["proj"].shape[1] if "proj" in sd else 0,
                     num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0, family=family,
                     **{"pos_interp": interp, **{k: v for k, v in arch.items() if k in VIT_HINTS}})


def cnn_arch(sd: dict) -> str | None:
    """resnet or convnext, where a converted state dict holds one (its stem and first block), else None."""
    if "conv1.weight" in sd and "layer1.0.conv1.weight" in sd:
        return "resnet"
    return "convnext" if "downsample_layers.0.0.weight" in sd and "stages.0.0.dwconv.weight" in sd else None


def _stage_depths(sd: dict, pattern: str, first: int) -> list[int]:
    """Blocks per stage of keys `pattern` (groups: stage, block), checked to number 0… without gaps."""
    found = collections.defaultdict(set)
    for k in sd:
        if m := re.match(pattern, k):
            found[int(m.group(1))].add(int(m.group(2)))
    stages = sorted(found)
    if stages != list(range(first, first + len(stages))) or any(found[s] != set(range(len(found[s]))) for s in stages):
        raise UsageError(f"the checkpoint's stages and blocks are not numbered without gaps ({_keys_str(sd)})")
    return [len(found[s]) for s in stages]


CNN_HINTS = ("stride_in_1x1", "final_eps")   # CNNConfig fields a file's config may set


def infer_cnn_config(sd: dict, family: str, **arch) -> CNNConfig:
    """A ResNet's or ConvNeXt's architecture from the shapes of a converted state dict."""
    hints = {k: v for k, v in arch.items() if k in CNN_HINTS and v is not None}
    classes = sd["head.weight"].shape[0] if "head.weight" in sd else 0
    if cnn_arch(sd) == "resnet":
        depths = _stage_depths(sd, r"layer(\d+)\.(\d+)\.", 1)
        if "layer1.0.conv3.weight" not in sd:
            raise UsageError("a ResNet of basic blocks (ResNet-18/34): only bottleneck ResNets (50, 101, 152, wide, "
                             "ResNeXt) are supported")
        first = [f"layer{s + 1}.0" for s in range(len(depths))]
        inner = tuple(sd[f"{b}.conv1.weight"].shape[0] for b in first)
        return CNNConfig("resnet", tuple(depths), tuple(sd[f"{b}.conv3.weight"].shape[0] for b in first), inner,
                         stem_width=sd["conv1.weight"].shape[0], groups=inner[0] // sd["layer1.0.conv2.weight"].shape[1],
                         num_classes=classes, family=family, **hints)
    depths = _stage_depths(sd, r"stages\.(\d+)\.(\d+)\.", 0)
    first = [f"stages.{s}.0" for s in range(len(depths))]
    return CNNConfig("convnext", tuple(depths), tuple(sd[f"{b}.dwconv.weight"].shape[0] for b in first),
                     tuple(sd[f"{b}.pwconv1.weight"].shape[0] for b in first),
                     kernel=sd["stages.0.0.dwconv.weight"].shape[-1], grn="stages.0.0.grn.gamma" in sd,
                     layer_scale="stages.0.0.gamma" in sd, final_norm="norm.weight" in sd, num_classes=classes,
                     family=family, **hints)


def _position_tables(sd: dict, prefix: int) -> tuple[int | None, bool, str | None, torch.Tensor | None]:
    """(stored patch grid, whether pos_embed has prefix rows, relative-position kind, its table) of a converted
    state dict."""
    grid, pos_cls_row = None, True
    if "pos_embed" in sd:
        rows = sd["pos_embed"].shape[1]
        if prefix and _is_square(rows - prefix):
            grid = math.isqrt(rows - prefix)
        elif _is_square(rows):
            grid, pos_cls_row = math.isqrt(rows), False
        else:
            raise UsageError(f"pos_embed has {rows} rows: neither a square grid nor a square grid plus {prefix} "
                             "prefix rows")
    rel_pos, table = None, None
    if "rel_pos_bias.relative_position_bias_table" in sd:
        rel_pos, table = "shared", sd["rel_pos_bias.relative_position_bias_table"]
    elif "blocks.0.attn.relative_position_bias_table" in sd:
        rel_pos, table = "per_block", sd["blocks.0.attn.relative_position_bias_table"]
    if grid is None and table is not None:
        grid = (math.isqrt(table.shape[0] - 3) + 1) // 2
    return grid, pos_cls_row, rel_pos, table


VIT_HINTS = ("act", "norm_eps", "rope", "rope_theta", "rope_grid", "pool", "pos_interp")   # config fields a file's config may set


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def build_model(sd: dict, cfg: ViTConfig | CNNConfig) -> ViT | ConvNet:
    """A ViT (or CNN) holding exactly these weights; missing or unexpected keys and wrong shapes are user errors.
    The skeleton is built without memory (meta device) and takes the file's tensors as its parameters; BatchNorm's
    step counters, which no forward reads, start at 0."""
    with torch.device("meta"):
        model = ViT(cfg) if isinstance(cfg, ViTConfig) else CNN_ARCHS[cfg.arch](cfg)
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        parts = ([f"missing {_keys_str(missing, 4)}"] if missing else []) + \
                ([f"unexpected {_keys_str(unexpected, 4)}"] if unexpected else [])
        raise UsageError(f"{cfg.family} checkpoint does not match the ViT it describes: " + "; ".join(parts))
    bad = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if sd[k].shape != v.shape]
    if bad:
        raise UsageError(f"{cfg.family} checkpoint: shape mismatch: {'; '.join(bad[:3])}")
    odd = [f"{k} ({v.dtype})" for k, v in sd.items() if v.dtype not in WEIGHT_DTYPES]
    if odd:   # an int8 / bool / complex / float8 tensor cast to float32 would compute with other numbers
        raise UsageError(f"{cfg.family} checkpoint: weights must be float16, bfloat16, float32 or float64, not "
                         f"{_keys_str(odd, 3)} (a quantised or damaged file)")
    broken = [k for k, v in sd.items() if not torch.isfinite(v).all()]
    if broken:
        raise UsageError(f"{cfg.family} checkpoint: NaN or Inf in {_keys_str(broken, 3)}: the file is damaged")
    steps = {k: torch.zeros((), dtype=torch.long) for k in model.state_dict() if k.endswith("num_batches_tracked")}
    model.load_state_dict({**{k: v.float().contiguous() for k, v in sd.items()}, **steps}, assign=True)
    return model.eval()


def default_weights_dir() -> Path:
    return Path(os.environ.get("SSL_REPSIM_WEIGHTS") or Path(__file__).resolve().parent / "weights")


def registry_path(name: str, weights_dir=None) -> Path:
    row = REGISTRY[name]
    url = row["url"]
    suffix = ".pth.tar" if url.endswith(".pth.tar") else Path(url).suffix or ".pth"
    return Path(weights_dir or default_weights_dir()) / f"{name}{suffix}"


def file_sha256(path) -> str:
    """Hex sha256 of a file (remembered while its size and modification time stay the same)."""
    path = Path(path)
    st = path.stat()
    return _sha256_of(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def load_model(spec, family: str | None = None, *, weights_dir=None, offline: bool = False,
               num_heads: int | None = None, img_size: int | None = None, act: str | None = None,
               head: bool = False, progress: bool = True) -> ViT:
    """A ViT from a registered name, a checkpoint file, a model folder (transformers, timm or open_clip: config and
    weights) or a hub spec (org/name[@rev], hf:org/name, timm/<arch>.<tag>, a bare timm <arch>.<tag>; read from the
    Hugging Face cache, else downloaded into it): locate, read safely, detect the layout, convert its keys, infer
    the architecture, build. `family` overrides what the keys and config files say; `head=True` keeps a linear
    classifier; num_heads / act give what neither the file nor its config holds."""
    if not str(spec).strip():
        raise UsageError("an empty model name: give a registered name, a checkpoint file, a model folder or a hub id")
    prefixed, spec = split_family(str(spec))
    family, given = prefixed or family, str(spec if prefixed is None else f"{prefixed}:{spec}")
    for what, v, hi in (("num_heads", num_heads, 1024), ("img_size", img_size, 4096)):
        if v is not None:
            in_range(what, v, 1, hi)
    if act is not None and act not in ACTIVATIONS:
        raise UsageError(f"act must be one of {', '.join(ACTIVATIONS)}, got {act!r}")
    path, hints = _locate_checkpoint(spec, weights_dir, offline, progress)
    try:
        obj, meta = read_checkpoint(path)
    except UsageError as e:
        if hints.get("registry") and not hints.get("hub"):
            raise UsageError(f"{_one_line(e)} (re-download it: rm {path} && python ssl_repsim.py download "
                             f"{hints['registry']})") from None
        raise
    if meta.get("format") == "ssl_repsim":  # our own files carry their config, preprocessing and input size
        model = _build_own(obj, meta, head)
    else:
        sd, family = convert_state_dict(obj, family or hints.get("family"), head)
        hints = _row_hints_that_fit(hints, sd, spec)
        arch = {**hints.get("arch", {}), **({"act": act} if act else {})}
        if cnn_arch(sd) and (num_heads or act):
            log.warning(f"notice: {given} is a CNN: {_opt('num_heads')} and {_opt('act')} set a ViT's heads and "
                        "activation, and do not apply to it")
        cfg = infer_cnn_config(sd, family, **arch) if cnn_arch(sd) else infer_config(
            sd, family, num_heads=num_heads or hints.get("num_heads"), width_table=hints.get("width_table", True),
            **arch)
        model = build_model(sd, cfg)
        model.preprocess = {**FAMILIES[family].preprocess, **hints.get("preprocess", {})}
        model.input_size = hints.get("img_size") or cfg.img_size
    model.input_size = img_size or model.input_size
    _check_input_size(model, given)
    _check_preprocess(model.preprocess, given)
    model.source = dict(spec=given, path=str(path), family=model.family, registry=hints.get("registry"),
                        hub=hints.get("hub"),
                        fine_tuned=parse_json(meta.get("fine_tuned", "false"), path) is True or hints.get("fine_tuned", False))
    return model


def _locate_checkpoint(spec: str, weights_dir, offline: bool, progress: bool) -> tuple[Path, dict]:
    """The file a spec names, and what is known about it before reading (registry row, config files)."""
    name = resolve_name(spec)
    if name in REGISTRY and not Path(spec).exists():
        row = REGISTRY[name]
        known = _row_hints(name)
        if row["url"].startswith("hf:"):
            path, hints = _model_folder(hub_snapshot(*hub_spec(row["url"]), offline=offline, progress=progress))
            return path, {**known, **hints, "family": row["family"], "registry": name,
                          "preprocess": {**known["preprocess"], **hints.get("preprocess", {})}}
        path = registry_path(name, weights_dir)
        if not path.exists():
            if offline:
                raise UsageError(f"{name} is not in {path.parent} (offline): run `python ssl_repsim.py download "
                                 f"{name}` or put the file at {path}")
            download(name, weights_dir, progress=progress)
        _verify_recorded(name, path)
        return path, known
    if Path(spec).is_dir():
        return _model_folder(Path(spec))
    if Path(spec).is_file():
        return Path(spec), _release_hints(Path(spec))
    if (repo := hub_spec(spec)) is not None and not Path(spec).exists():
        return _model_folder(hub_snapshot(*repo, offline=offline, progress=progress))
    raise UsageError(f"unknown model {spec!r}: not a registered name (see `python ssl_repsim.py list`), a "
                     "checkpoint file, a model folder or a hub id (org/name, timm/<arch>.<tag>)")


MAX_TOKENS = 16384   # patches per image (a 128 × 128 grid): ViT-g/14 at 518 px has 1369


def _check_input_size(model, where: str):
    """An input size the model can be run at: from the patch size to 4096 px and at most MAX_TOKENS patches (a config's
    image_size of 10⁶ or --img-size 100000 would ask for terabytes)."""
    size, patch = model.input_size, model.cfg.patch_size
    if not (isinstance(size, int) and patch <= size <= 4096 and (size // patch) ** 2 <= MAX_TOKENS):
        raise UsageError(f"{where}: input size {size!r} px with patch {patch} is outside [{patch}, 4096] px or past "
                         f"{MAX_TOKENS} patches")


def _check_preprocess(pp: dict, where: str):
    """Normalisation and crop a model can be fed with: finite, std in [0.01, 10], |mean| ≤ 10, crop_pct in
    [0.1, 2] (a std of 1e-300 passes a positivity check and turns every input into Inf)."""
    mean, std, crop = pp.get("mean", IMAGENET_MEAN), pp.get("std", IMAGENET_STD), pp.get("crop_pct", 0.875)
    num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not (isinstance(mean, (list, tuple)) and isinstance(std, (list, tuple)) and len(mean) == len(std) == 3 and all(num(v) and abs(v) <= 10 for v in mean)
            and all(num(v) and 0.01 <= v <= 10 for v in std)):
        raise UsageError(f"{where}: normalisation mean {list(mean)} / std {list(std)} out of range (3 finite values "
                         "each; std in [0.01, 10], |mean| ≤ 10)")
    if not (num(crop) and 0.1 <= crop <= 2):
        raise UsageError(f"{where}: crop_pct {crop!r} out of range [0.1, 2]")


def _row_hints(name: str) -> dict:
    row = REGISTRY[name]
    return dict(registry=name, family=row["family"], num_heads=row["num_heads"], img_size=row["img_size"],
                preprocess={k: row[k] for k in ("mean", "std", "interp", "crop_pct", "crop_mode")})


def _release_hints(path: Path) -> dict:
    """What a file passed by path is, when it is a release: its name is a registry row's release file name (or the
    row's own name, as `download` saves it), else its sha256 starts with a row's published digest."""
    name = RELEASE_FILES.get(path.name) or next((r for r, row in REGISTRY.items() if not row["url"].startswith("hf:")
                                                 and registry_path(r, path.parent).name == path.name), None)
    how = f"its file name {path.name}"
    if name is None:
        published = {r: row["sha256"] for r, row in REGISTRY.items() if row.get("sha256")}
        if published and path.suffix.lower() in (".pth", ".pt", ".tar", ".bin", ".safetensors"):
            digest = file_sha256(path)
            name = next((r for r, d in published.items() if digest.startswith(d)), None)
            how = f"its sha256 {digest[:12]}…"
    if name is None:
        return {}
    log.info(f"notice: {path} is read as the release {name} (family {REGISTRY[name]['family']}), by {how}; "
             f"prefix it with FAMILY: to say otherwise")
    return {**_row_hints(name), "recognised": True}


def _row_hints_that_fit(hints: dict, sd: dict, spec: str) -> dict:
    """A registry row's head count and input size apply only to a file of the width the row implies; otherwise they
    are dropped, with a notice, and the width table (or --num-heads) decides."""
    w = sd.get("patch_embed.proj.weight")
    name = hints.get("registry")
    if name not in REGISTRY or w is None or w.ndim != 4 or row_fits(name, w.shape[0]):
        return hints
    log.warning(f"notice: {spec} has width {w.shape[0]}, not {name}'s: its family {hints.get('family')} is kept, its "
                f"{REGISTRY[name]['num_heads']} heads and {REGISTRY[name]['img_size']}px input are not")
    return {k: v for k, v in hints.items() if k not in ("num_heads", "img_size")}


CONFIG_CHOICES = {"act": tuple(ACTIVATIONS), "rope": (None, *ROPE_VARIANTS), "rel_pos": (None, "shared", "per_block"),
                  "pool": ("", "avg"), "pos_interp": ("bicubic", "offset", "antialias")}
CONFIG_COUNTS = ("num_registers", "rope_grid", "attn_pool", "proj_dim", "num_classes")   # ≥ 0; other ints ≥ 1


def _check_config(cfg: ViTConfig, where: str):
    """Every field of a ViTConfig read from a file: its type and a meaningful value, else one line naming it."""
    for f in dataclasses.fields(cfg):
        v, default = getattr(cfg, f.name), f.default
        if f.name in CONFIG_CHOICES:
            ok = v in CONFIG_CHOICES[f.name]
        elif isinstance(default, bool):
            ok = isinstance(v, bool)
        elif isinstance(default, int):
            ok = isinstance(v, int) and not isinstance(v, bool) and (0 if f.name in CONFIG_COUNTS else 1) <= v <= 1 << 20
        elif isinstance(default, float):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
        else:
            ok = isinstance(v, str)
        if not ok:
            raise UsageError(f"{where}: config {f.name} = {str(v)[:40]!r} is not a valid value")
    if cfg.embed_dim % cfg.num_heads or cfg.norm_eps >= 1:
        raise UsageError(f"{where}: config num_heads {cfg.num_heads} does not divide embed_dim {cfg.embed_dim}, or "
                         f"norm_eps {cfg.norm_eps} ≥ 1")


def _cnn_config(fields: dict, where: str) -> CNNConfig:
    """A CNNConfig from our file's metadata, every field checked (the weights' shapes are build_model's to check)."""
    cfg = CNNConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    counts = (cfg.depths, cfg.widths, cfg.inner)
    ints = lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1 << 16
    ok = (all(isinstance(c, tuple) and 1 <= len(c) <= 8 and len(c) == len(cfg.depths) and all(map(ints, c))
              for c in counts) and all(ints(v) for v in (cfg.stem_width, cfg.groups, cfg.kernel, cfg.img_size))
          and all(isinstance(v, bool) for v in (cfg.stride_in_1x1, cfg.grn, cfg.layer_scale, cfg.final_norm))
          and all(isinstance(v, float) and 0 < v < 1 for v in (cfg.norm_eps, cfg.final_eps))
          and isinstance(cfg.num_classes, int) and cfg.num_classes >= 0 and isinstance(cfg.family, str))
    if not ok:
        raise UsageError(f"{where}: a CNN config with an invalid field ({str(fields)[:120]})")
    return cfg


def _build_own(obj: dict, meta: dict, head: bool) -> ViT | ConvNet:
    try:
        fields = parse_json(meta["config"], "checkpoint metadata")
        cnn = isinstance(fields, dict) and fields.get("arch") in CNN_ARCHS
        cfg = _cnn_config(fields, "checkpoint metadata") if cnn else ViTConfig(**fields)
        if not cnn:
            _check_config(cfg, "checkpoint metadata")
        blocks = {int(m.group(1)) for k in obj if (m := re.match(r"blocks\.(\d+)\.", k))}
        size = parse_json(meta.get("input_size", "null"), "checkpoint metadata") or cfg.img_size
        ok = ((cnn or blocks == set(range(cfg.depth))) and isinstance(size, int) and 0 < size <= 8192
              and (cnn or size % cfg.patch_size == 0) and 0 < cfg.norm_eps < 1)
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"ssl_repsim checkpoint with unreadable metadata ({_one_line(e)[:120]})") from None
    if not ok:
        raise UsageError(f"ssl_repsim checkpoint whose metadata does not describe its weights (depth {cfg.depth}, "
                         f"input {size}, patch {cfg.patch_size}, eps {cfg.norm_eps})")
    if not head:
        cfg.num_classes = 0
        obj = {k: v for k, v in obj.items() if not k.startswith("head.")}
    model = build_model(obj, cfg)
    pp = parse_json(meta.get("preprocess", "null"), "checkpoint metadata") or model.preprocess
    if not isinstance(pp, dict) or pp.get("interp", "bicubic") not in PIL_FILTERS \
            or pp.get("crop_mode", "center") not in ("center", "squash"):
        raise UsageError(f"checkpoint metadata: preprocess {str(pp)[:60]} is not a preprocessing (interp bicubic or "
                         "bilinear, crop_mode center or squash)")
    model.preprocess = pp
    model.input_size = size
    return model


# --- model folders: transformers (config.json with model_type), timm (config.json with architecture), open_clip ----

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
                "open_clip_model.safetensors", "open_clip_pytorch_model.bin")   # the first present is read
CONFIG_FILES = ("config.json", "preprocessor_config.json", "open_clip_config.json")
# transformers' config-class defaults, which save_pretrained may leave out of config.json
HF_DEFAULTS = {"vit": dict(layer_norm_eps=1e-12, hidden_act="gelu", num_attention_heads=12, image_size=224),
               "dinov2": dict(layer_norm_eps=1e-6, hidden_act="gelu", num_attention_heads=12, image_size=224),
               "clip_vision_model": dict(layer_norm_eps=1e-5, hidden_act="quick_gelu", num_attention_heads=12,
                                         image_size=224),
               "siglip_vision_model": dict(layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
                                           num_attention_heads=12, image_size=224),
               "dinov3_vit": dict(layer_norm_eps=1e-5, hidden_act="gelu", num_attention_heads=12, image_size=224,
                                  rope_theta=100.0)}
HF_DEFAULTS.update({t: HF_DEFAULTS["vit"] for t in ("vit_mae", "deit", "beit", "data2vec-vision", "ijepa")})
HF_DEFAULTS["vit_msn"] = {**HF_DEFAULTS["vit"], "layer_norm_eps": 1e-6}   # ViTMSNConfig's default
HF_DEFAULTS.update({"dinov2_with_registers": HF_DEFAULTS["dinov2"], "clip": HF_DEFAULTS["clip_vision_model"],
                    "siglip": HF_DEFAULTS["siglip_vision_model"]})
HF_ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                  "silu": "silu"}
HF_FINE_TUNED = {"BeitForImageClassification": "beit_ft"}   # architectures whose backbone was fine-tuned
HF_POS_INTERP = {"dinov2": "bicubic"}   # transformers resizes DINOv2's table to size=(h, w), without DINO's offset
PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}


JSON_LIMIT = 16 << 20   # bytes: a config or index file is kilobytes; a 400 MB one is not read


def _read_json(path: Path) -> dict:
    try:
        if path.stat().st_size > JSON_LIMIT:
            raise UsageError(f"{path}: {path.stat().st_size >> 20} MB, larger than any config or index file")
        obj = parse_json(path.read_text(), path)
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: unreadable JSON ({_one_line(e)})") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{path}: not a JSON object")
    return obj


def _model_folder(d: Path) -> tuple[Path, dict]:
    """A model folder's weights file and what its config files say (family, heads, eps, activation, input size,
    preprocessing)."""
    cfg = _read_json(d / "config.json") if (d / "config.json").is_file() else None
    if cfg is not None and "architecture" in cfg:
        hints = _timm_hints(cfg, d / "config.json")
    elif cfg is not None:
        hints = _transformers_hints(cfg, d / "config.json")
        if (d / "preprocessor_config.json").is_file():
            hints.update(_hf_preprocess(_read_json(d / "preprocessor_config.json"), d / "preprocessor_config.json"))
    elif (d / "open_clip_config.json").is_file():
        hints = _open_clip_hints(_read_json(d / "open_clip_config.json"), d / "open_clip_config.json")
    else:
        raise UsageError(f"{d}: a model folder needs config.json (transformers, timm) or open_clip_config.json")
    for fname in WEIGHT_FILES:
        if (d / fname).is_file():
            return d / fname, hints
    raise UsageError(f"{d}: no weights beside its config ({', '.join(WEIGHT_FILES)})")


def _positive(value, what: str, where, kind=int):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e9 or (
            kind is int and value != int(value)):
        raise UsageError(f"{where}: {what} must be a positive {'integer' if kind is int else 'number'} below 10⁹, "
                         f"got {str(value)[:40]}")
    return kind(value)


def _three(value, what: str, where, positive=False) -> tuple | None:
    """An RGB triple of numbers (mean, std)."""
    if value is None:
        return None
    ok = isinstance(value, (list, tuple)) and len(value) == 3 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v > 0 or not positive)
        for v in value)
    if not ok:
        raise UsageError(f"{where}: {what} must be 3 {'positive ' if positive else ''}numbers, got {value!r}")
    return tuple(float(v) for v in value)


def _dict(value, what: str, where) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UsageError(f"{where}: {what} must be a JSON object, got {type(value).__name__}")
    return value


def _text(value, what: str, where) -> str | None:
    if value is not None and not isinstance(value, str):
        raise UsageError(f"{where}: {what} must be a string, got {value!r}")
    return value


def _transformers_hints(hf: dict, where: Path) -> dict:
    model_type = _text(hf.get("model_type"), "model_type", where)
    archs = hf.get("architectures") or [None]
    if not isinstance(archs, list) or not all(a is None or isinstance(a, str) for a in archs):
        raise UsageError(f"{where}: architectures must be a list of class names, got {archs!r}")
    fam = HF_FINE_TUNED.get(archs[0]) or next(
        (name for name, f in FAMILIES.items() if model_type in f.hf_model_types), None)
    if fam is None:
        known = sorted(t for f in FAMILIES.values() for t in f.hf_model_types)
        raise UsageError(f"{where}: transformers model_type {model_type!r} is not supported (supported: "
                         f"{', '.join(known)})")
    if model_type in HF_CNN_TYPES:
        return _transformers_cnn_hints(hf, fam, where)
    vision = _dict(hf.get("vision_config"), "vision_config", where) if model_type in ("clip", "siglip") else hf
    c = {**HF_DEFAULTS.get(model_type, {}), **vision}
    act = c.get("hidden_act")
    if not isinstance(act, str) or act not in HF_ACTIVATIONS:
        raise UsageError(f"{where}: hidden_act {act!r} is not supported ({', '.join(HF_ACTIVATIONS)})")
    eps = _positive(c.get("layer_norm_eps"), "layer_norm_eps", where, float)
    if eps is not None and eps >= 1:
        raise UsageError(f"{where}: layer_norm_eps must be a small positive number, got {eps!r}")
    arch = dict(norm_eps=eps, act=HF_ACTIVATIONS[act], pos_interp=HF_POS_INTERP.get(model_type),
                rope_theta=_positive(c.get("rope_theta"), "rope_theta", where, float) if fam == "dinov3" else None)
    return dict(family=fam, num_heads=_positive(c.get("num_attention_heads"), "num_attention_heads", where),
                img_size=_positive(c.get("image_size"), "image_size", where), arch=arch)


HF_CNN_TYPES = ("resnet", "convnext", "convnextv2")


def _transformers_cnn_hints(hf: dict, fam: str, where: Path) -> dict:
    """transformers ResNet / ConvNeXt configs: what the weights cannot say (where a ResNet strides, the final
    norm's eps), and what this CNN cannot be (basic blocks, a strided first stage, another activation)."""
    act = hf.get("hidden_act", "relu" if hf.get("model_type") == "resnet" else "gelu")
    if hf.get("model_type") == "resnet":
        if hf.get("layer_type", "bottleneck") != "bottleneck" or hf.get("downsample_in_first_stage") or act != "relu":
            raise UsageError(f"{where}: only bottleneck ResNets with ReLU and an unstrided first stage are supported "
                             f"(layer_type {hf.get('layer_type')!r}, hidden_act {act!r})")
        arch = dict(stride_in_1x1=bool(hf.get("downsample_in_bottleneck", False)))
    else:
        if act != "gelu":
            raise UsageError(f"{where}: hidden_act {act!r}: ConvNeXt is supported with exact GELU")
        eps = _positive(hf.get("layer_norm_eps", 1e-12), "layer_norm_eps", where, float)
        if eps >= 1:
            raise UsageError(f"{where}: layer_norm_eps must be a small positive number, got {eps!r}")
        arch = dict(final_eps=eps)
    return dict(family=fam, img_size=_positive(hf.get("image_size"), "image_size", where), arch=arch)


def _side(v, what: str, where) -> int | None:
    """A size of preprocessor_config.json: an int, or {"shortest_edge": n}, or a square {"height": n, "width": n}."""
    if v is None or isinstance(v, int) and not isinstance(v, bool):
        return _positive(v, what, where)
    if isinstance(v, dict) and ("shortest_edge" in v or "height" in v):
        if "height" in v and v.get("width", v["height"]) != v["height"]:
            raise UsageError(f"{where}: {what} {v} is not square; only square inputs are supported")
        return _positive(v.get("shortest_edge", v.get("height")), what, where)
    raise UsageError(f"{where}: {what} must be a positive integer or {{shortest_edge | height, width}}, got {v!r}")


def _hf_preprocess(pp: dict, where: Path) -> dict:
    """preprocessor_config.json → our transform: resize (shorter side, or both sides), centre crop, mean/std;
    settings we do not implement are refused rather than ignored."""
    size, crop = pp.get("size"), pp.get("crop_size")
    resize = _side(size, "size", where)
    cropped = _side(crop, "crop_size", where) if pp.get("do_center_crop", crop is not None) else None
    if pp.get("do_resize", True) is not True or pp.get("do_normalize", True) is not True or \
            abs(_positive(pp.get("rescale_factor", 1 / 255), "rescale_factor", where, float) * 255 - 1) > 1e-6:
        raise UsageError(f"{where}: only resize + rescale by 1/255 + normalise is supported (do_resize, "
                         "do_normalize, rescale_factor)")
    resample = pp.get("resample", 3)
    if resize is None or not isinstance(resample, int) or isinstance(resample, bool) or resample not in PIL_RESAMPLE:
        raise UsageError(f"{where}: a resize size and resample 2 (bilinear) or 3 (bicubic) are needed, got size "
                         f"{size!r}, resample {resample!r}")
    if cropped and cropped > resize:
        raise UsageError(f"{where}: crop_size {cropped} exceeds the resize {resize}")
    warped = False
    if cropped is None and pp.get("crop_pct") is not None:   # ConvNeXt's processor: resize size / crop_pct, crop size
        if resize < 384:
            cropped, resize = resize, resize / _positive(pp["crop_pct"], "crop_pct", where, float)
        else:   # ... and from 384 px a square resize, no crop
            warped = True
    out = dict(mean=_three(pp.get("image_mean"), "image_mean", where) or IMAGENET_MEAN,
               std=_three(pp.get("image_std"), "image_std", where, positive=True) or IMAGENET_STD,
               interp=PIL_RESAMPLE[resample], crop_pct=(cropped or resize) / resize,
               crop_mode="squash" if isinstance(size, dict) and "height" in size or warped else "center")
    return dict(preprocess=out, img_size=cropped or resize)


def _timm_hints(cfg: dict, where: Path) -> dict:
    arch = cfg["architecture"]
    pc, margs = _dict(cfg.get("pretrained_cfg"), "pretrained_cfg", where), _dict(cfg.get("model_args"), "model_args",
                                                                                 where)
    if not isinstance(arch, str) or not arch:
        raise UsageError(f"{where}: architecture must be a timm model name, got {arch!r}")
    tag = _text(pc.get("tag"), "pretrained_cfg.tag", where)
    name = f"{arch}.{tag}" if tag else arch
    fam = next((f for pattern, f in TIMM_FAMILIES if re.search(pattern, name)), "unknown")
    size = re.search(r"_(tiny|small|base|large|huge_plus|huge|so400m)_", f"_{arch}_")
    heads = _positive(margs.get("num_heads"), "model_args.num_heads", where) or (TIMM_HEADS[size.group(1)] if size
                                                                                   else None)
    act = next((a for pattern, a in TIMM_ACTIVATIONS if re.search(pattern, arch)), None) or \
        _text(margs.get("act_layer"), "model_args.act_layer", where) or "gelu"
    if act not in ACTIVATIONS:
        raise UsageError(f"{where}: timm act_layer {act!r} is not supported ({', '.join(ACTIVATIONS)})")
    arch_hints = dict(pool="avg" if cfg.get("global_pool", margs.get("global_pool")) == "avg" else None, act=act,
                      pos_interp="antialias")   # timm resamples position tables bicubic with antialias
    if fam == "eva02" and margs.get("ref_feat_shape") is not None:
        ref = margs["ref_feat_shape"]
        ref = [ref, ref] if isinstance(ref, int) else ref
        if not isinstance(ref, list) or len(ref) != 2 or ref[0] != ref[1]:
            raise UsageError(f"{where}: model_args.ref_feat_shape must be a square grid, got {ref!r}")
        arch_hints["rope_grid"] = _positive(ref[0], "model_args.ref_feat_shape", where)
    return dict(family=fam, num_heads=heads, width_table=heads is not None, img_size=_timm_input_size(pc, where),
                arch=arch_hints, preprocess=_timm_preprocess(pc, where),
                fine_tuned=bool(tag and re.search(TIMM_FINE_TUNED, "." + tag)) and FAMILIES[fam].objective != "SUP")


def _timm_input_size(pc: dict, where) -> int | None:
    size = pc.get("input_size")
    if size is None:
        return None
    if not (isinstance(size, list) and len(size) == 3 and size[1] == size[2]):
        raise UsageError(f"{where}: pretrained_cfg.input_size must be [3, n, n], got {size!r}")
    return _positive(size[2], "pretrained_cfg.input_size", where)


def _timm_preprocess(pc: dict, where) -> dict:
    mode, interp = pc.get("crop_mode", "center"), pc.get("interpolation", "bicubic")
    if mode not in ("center", "squash") or interp not in ("bicubic", "bilinear"):
        raise UsageError(f"{where}: timm crop_mode {mode!r} / interpolation {interp!r} are not supported")
    crop = _positive(pc.get("crop_pct"), "pretrained_cfg.crop_pct", where, float)
    if crop is not None and crop > 1:
        raise UsageError(f"{where}: pretrained_cfg.crop_pct must lie in (0, 1], got {crop}")
    pre = dict(mean=_three(pc.get("mean"), "pretrained_cfg.mean", where),
               std=_three(pc.get("std"), "pretrained_cfg.std", where, positive=True), interp=interp, crop_pct=crop,
               crop_mode=mode)
    return {k: v for k, v in pre.items() if v is not None}


def _open_clip_hints(oc: dict, where: Path) -> dict:
    mc = _dict(oc.get("model_cfg"), "model_cfg", where)
    vc, pp = _dict(mc.get("vision_cfg"), "model_cfg.vision_cfg", where), _dict(oc.get("preprocess_cfg"),
                                                                              "preprocess_cfg", where)
    width = _positive(vc.get("width", 768), "vision_cfg.width", where)
    head_width = _positive(vc.get("head_width", 64), "vision_cfg.head_width", where)
    if width % head_width:
        raise UsageError(f"{where}: vision_cfg.width {width} is not a multiple of head_width {head_width}")
    unsupported = [k for k, ok in (("attentional_pool", not vc.get("attentional_pool")),
                                   ("pool_type", vc.get("pool_type", "tok") == "tok"),
                                   ("act_kwargs", not mc.get("act_kwargs")), ("norm_kwargs", not mc.get("norm_kwargs")),
                                   ("resize_mode", pp.get("resize_mode", "shortest") in ("shortest", "squash")),
                                   ("interpolation", pp.get("interpolation", "bicubic") in ("bicubic", "bilinear")))
                   if not ok]
    if unsupported:
        raise UsageError(f"{where}: open_clip settings not supported: {', '.join(unsupported)}")
    pre = dict(mean=_three(pp.get("mean"), "preprocess_cfg.mean", where) or OPENAI_MEAN,
               std=_three(pp.get("std"), "preprocess_cfg.std", where, positive=True) or OPENAI_STD,
               interp=pp.get("interpolation", "bicubic"), crop_pct=1.0,
               crop_mode="squash" if pp.get("resize_mode") == "squash" else "center")
    return dict(family="clip", num_heads=width // head_width,
                img_size=_positive(vc.get("image_size", 224), "vision_cfg.image_size", where),
                arch=dict(act="quick_gelu" if mc.get("quick_gelu") else "gelu"), preprocess=pre)


def save_checkpoint(model: ViT, path, extra: dict | None = None) -> Path:
    """Our own layout: safetensors of the ViT state dict, config and preprocessing in the metadata."""
    from safetensors.torch import save as st_save
    cfg = dataclasses.replace(model.cfg, family=getattr(model, "family", model.cfg.family) or "ssl_repsim")
    meta = {"format": "ssl_repsim", "config": json.dumps(dataclasses.asdict(cfg)), "version": __version__,
            "preprocess": json.dumps(getattr(model, "preprocess", {})),
            "input_size": json.dumps(getattr(model, "input_size", cfg.img_size))}
    meta.update({k: json.dumps(v) for k, v in (extra or {}).items()})
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    # one metadata entry, its keys sorted: safetensors orders several entries at random, so equal models would
    # otherwise give files that differ byte-wise
    return atomic_write(path, st_save(tensors, metadata={"ssl_repsim": json.dumps(meta, sort_keys=True)}))


STALL_SECONDS = 60           # a download with no byte for this long, or slower than ...
MIN_BYTES_PER_SECOND = 4096  # ... this over a whole STALL_SECONDS window, is abandoned


def download_file(url: str, dest, sha256: str | None = None, md5: str | None = None, progress: bool = False, *,
                  headers: dict | None = None, size: int | None = None, container: bool = True,
                  git_sha1: str | None = None) -> Path:
    """Stream `url` into a temp file beside `dest`, verify it, then rename into place: the size must match
    Content-Length and `size` where given, a checkpoint (`container`) must be a whole zip, safetensors or pickle
    container, the digest must match where known (a published prefix is enough; `git_sha1` for the Hub's regular
    files), a web page is never a checkpoint, and a stalled or crawling transfer is abandoned. On any failure, or
    SIGINT/SIGTERM, nothing is left behind."""
    dest = Path(dest)
    if urllib.parse.urlsplit(url).scheme.lower() not in ("http", "https"):
        raise UsageError(f"refusing to download {url[:80]!r}: only http(s) URLs are fetched")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    except OSError as e:
        raise UsageError(f"cannot download into {dest.parent}: {_one_line(e)}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            req = urllib.request.Request(url, headers={"User-Agent": f"ssl_repsim/{__version__}", **(headers or {})})
            with urllib.request.build_opener(_KeepAuthOnHost).open(req, timeout=STALL_SECONDS) as resp:
                total = _announced_length(resp, url, size)
                done, h256, h5 = _receive(resp, f, url, Progress(total or size, f"download {dest.name}",
                                                                 enabled=progress, unit="B"), limit=size or total)
            if total and done != total:
                raise UsageError(f"download of {url} interrupted: {done} of {total} bytes")
            f.flush()
            os.fsync(f.fileno())
        if size is not None and done != size:
            raise UsageError(f"download of {url}: {done} bytes where the Hub announced {size}")
        if git_sha1 and _git_blob_sha1(tmp) != git_sha1:
            raise UsageError(f"checksum mismatch for {url}: git blob sha1 differs from the Hub's {git_sha1[:12]}…")
        if container and not _whole_container(tmp):
            raise UsageError(f"download of {url} is incomplete or not a checkpoint ({done} bytes: not a whole zip / "
                             "safetensors / pickle file)")
        if sha256 and not h256.hexdigest().startswith(sha256.lower()):
            raise UsageError(f"checksum mismatch for {url}: sha256 {h256.hexdigest()[:16]}…, expected {sha256}")
        if md5 and not h5.hexdigest().startswith(md5.lower()):
            raise UsageError(f"checksum mismatch for {url}: md5 {h5.hexdigest()[:12]}…, expected {md5}")
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, dest)
        return dest
    except UsageError:
        _unlink(tmp)
        raise
    except Exception as e:  # noqa: BLE001 - URLError, HTTPError, IncompleteRead, timeouts, disk full
        _unlink(tmp)
        raise UsageError(f"download of {url} failed: {_one_line(e)}") from None
    except BaseException:
        _unlink(tmp)
        raise


def _announced_length(resp, url: str, size: int | None) -> int:
    """The response's Content-Length (0 when absent), checked before anything is read: a web page is never a
    checkpoint, and a length other than the Hub's announced size is refused."""
    if resp.headers.get("Content-Type", "").startswith("text/html"):
        raise UsageError(f"download of {url} returned a web page, not a checkpoint (a login or error page?)")
    length = (resp.headers.get("Content-Length") or "").strip()
    total = int(length) if length.isdigit() and len(length) < 19 else 0
    if size is not None and total and total != size:
        raise UsageError(f"download of {url}: {total} bytes sent where the Hub announced {size}")
    return total


class _KeepAuthOnHost(urllib.request.HTTPRedirectHandler):
    """Redirects followed to http(s) URLs only, the Authorization header dropped when one leads to another scheme,
    host or port (a CDN, or a downgrade to http)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise UsageError(f"download of {req.full_url} redirects to {newurl[:80]!r}: only http(s) is followed")
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and _origin(newurl) != _origin(req.full_url):
            for k in [k for k in new.headers if k.lower() == "authorization"]:
                del new.headers[k]
            new.unredirected_hdrs.pop("Authorization", None)
        return new


def _receive(resp, f, url: str, bar: Progress, limit: int | None = None):
    """Copy the response body into f as it arrives, hashing it; cut it the moment it passes `limit` (the announced
    size); abandon a transfer that brings fewer than MIN_BYTES_PER_SECOND over a STALL_SECONDS window. Returns
    (bytes, sha256, md5)."""
    h256, h5, done = hashlib.sha256(), hashlib.md5(), 0
    window_start, window_bytes = time.monotonic(), 0
    while chunk := resp.read1(1 << 20):
        if limit and done + len(chunk) > limit:
            raise UsageError(f"download of {url} sends more than the {limit} bytes announced: cut")
        f.write(chunk)
        h256.update(chunk)
        h5.update(chunk)
        done += len(chunk)
        window_bytes += len(chunk)
        bar.update(len(chunk))
        if time.monotonic() - window_start >= STALL_SECONDS:
            if window_bytes < MIN_BYTES_PER_SECOND * STALL_SECONDS:
                raise UsageError(f"download of {url} abandoned: {window_bytes} bytes in the last {STALL_SECONDS} s")
            window_start, window_bytes = time.monotonic(), 0
    bar.close()
    return done, h256, h5


def _unlink(p):
    with contextlib.suppress(OSError):
        os.unlink(p)


# parameters of the backbones registry rows name (timm's and the official definitions'), for a download's expected size
BACKBONE_PARAMS = ((r"vitti\d", 5.7e6), (r"vits\d", 22e6), (r"vitb\d", 86e6), (r"vitl\d", 304e6), (r"vith\d", 632e6),
                   (r"vitg\d", 1.1e9), (r"r50", 25.6e6), (r"resnet50", 25.6e6), (r"-base", 89e6), (r"-large", 198e6))


def approximate_size(name: str) -> str:
    """What a registered file weighs, roughly: its backbone's float32 weights (training files hold more)."""
    params = next((p for pattern, p in BACKBONE_PARAMS if re.search(pattern, name)), None)
    if params is None:
        return "size not known"
    return f"about {4 * params / 1e6:,.0f} MB of float32 backbone weights; a training checkpoint holds more"


def download(name: str, weights_dir=None, progress: bool = True) -> Path:
    """Fetch a registered checkpoint into the weights dir (verified where a digest is published) and record its
    sha256 in the dir's SHA256SUMS, against which later loads check it; leftovers of killed downloads are swept.
    Hub models (registered or any hub id) go to the Hugging Face cache; their snapshot folder is returned."""
    name = resolve_name(name)
    repo = hub_spec(REGISTRY[name]["url"] if name in REGISTRY else name)
    if repo is not None and (name not in REGISTRY or REGISTRY[name]["url"].startswith("hf:")):
        return hub_snapshot(*repo, progress=progress)   # hub models live in the Hugging Face cache
    if name not in REGISTRY:
        raise UsageError(f"unknown model {name!r} (see `python ssl_repsim.py list`)")
    row, dest = REGISTRY[name], registry_path(name, weights_dir)
    if dest.exists():
        return dest
    if FAMILIES[row["family"]].manual_download:
        raise UsageError(f"{name} is published only on a web page ({row['url']}): download it by hand to {dest}")
    with _folder_lock(dest.parent):   # one process downloads; the others find the file there
        if dest.exists():
            return dest
        for stale in dest.parent.glob(f".{dest.name}.*.part"):   # a killed download's: none of ours is running
            _unlink(stale)
        try:
            download_file(row["url"], dest, sha256=row["sha256"], md5=row["md5"], progress=progress)
        except UsageError as e:
            if " failed: " not in str(e):    # a bad file, not a missing connection: said as it is
                raise
            raise DownloadUnavailable(f"{e}. Without the internet: fetch {row['url']} ({approximate_size(name)}) on a "
                             f"machine that has it, place it at {dest}" + (f" (sha256 {row['sha256']})" if row["sha256"] else
                                          f" (md5 beginning {row['md5']})" if row["md5"] else " (no published digest)")
                             + ", then run the same command again: it reads the placed file and downloads "
                               "nothing") from None
        sums = _recorded_sums(dest.parent)   # SHA256SUMS updated under the same lock: no line is lost
        sums[dest.name] = file_sha256(dest)
        atomic_write(dest.parent / "SHA256SUMS", "".join(f"{h}  {n}\n" for n, h in sorted(sums.items())))
    return dest


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """An exclusive lock on a folder (flock on the folder itself: no lock file left behind), held across processes
    (torchrun's ranks, two shells) for the duration; none where fcntl is missing (Windows: downloads stay verified
    and atomic, only not deduplicated)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY)
    except OSError as e:
        raise UsageError(f"cannot use {folder}: {_one_line(e)}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:   # a file system without locks (some NFS mounts): go on, said
            log.warning(f"notice: cannot lock {folder} ({e.strerror}): concurrent downloads into it are not "
                        "deduplicated")
        yield
    finally:
        os.close(fd)   # releases the lock


def _recorded_sums(folder: Path) -> dict[str, str]:
    """{file name: sha256} of a weights folder's SHA256SUMS (sha256sum's format)."""
    path = Path(folder) / "SHA256SUMS"
    if not path.is_file():
        return {}
    return {ln.split(None, 1)[1].strip(): ln.split(None, 1)[0] for ln in path.read_text().splitlines()
            if len(ln.split(None, 1)) == 2}


def _verify_recorded(name: str, path: Path):
    """A registered file whose sha256 differs from the one recorded when it was downloaded is a one-line error."""
    with _folder_lock(path.parent):   # a download in progress writes its line before it lets go
        expected = _recorded_sums(path.parent).get(path.name)
    if expected and file_sha256(path) != expected:
        raise UsageError(f"{path} changed since it was downloaded (sha256 differs from SHA256SUMS): re-download "
                         f"it with `rm {path} && python ssl_repsim.py download {name}`")


def _whole_container(path) -> bool:
    """Whether a file is a whole zip (torch.save), safetensors or protocol-2+ pickle (legacy torch) container."""
    import zipfile
    with open(path, "rb") as f:
        head = f.read(8)
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size >= 8 and head[:2] == b"PK":
            return zipfile.is_zipfile(path)
        if size >= 8 and 0 < int.from_bytes(head, "little") <= size - 8:   # safetensors: header length, JSON
            f.seek(8)
            header = f.read(int.from_bytes(head, "little"))
            with contextlib.suppress(ValueError, TypeError, KeyError, AttributeError, RecursionError):
                meta = {k: v for k, v in json.loads(header).items() if k != "__metadata__"}
                end = max((v["data_offsets"][1] for v in meta.values()), default=0)
                return size == 8 + len(header) + end          # every tensor's bytes are there, nothing after
            return False
        f.seek(size - 1)
        return head[:1] == b"\x80" and f.read(1) == b"."                   # pickle: PROTO ... STOP


def _git_blob_sha1(path) -> str:
    """The git blob id of a file (sha1 of "blob <size>\0" + bytes): the Hub's ETag of a regular file."""
    data = Path(path).read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


# --- the Hugging Face hub: its cache layout and resolve protocol, spoken without huggingface_hub --------------------

HUB_ENDPOINT = "https://huggingface.co"
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".tar", ".safetensors", ".npz", ".npy", ".ckpt", ".json")
TIMM_NAME = r"[a-z][a-z0-9]*(_[a-z0-9]+)+\.[a-z0-9_]+"   # <arch>.<tag>, as timm publishes under timm/


def hub_spec(spec: str) -> tuple[str, str] | None:
    """(repo id, revision) of hf:org/name, hf-hub:org/name, org/name[@revision] or a bare timm <arch>.<tag>
    (→ timm/<arch>.<tag>); None when the spec is none of these."""
    s, explicit = spec, spec.startswith(("hf:", "hf-hub:"))
    s = s.split(":", 1)[1] if explicit else s
    s, _, rev = s.partition("@")
    if not explicit and s.lower().endswith(CHECKPOINT_SUFFIXES):
        return None
    if rev and (not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)*", rev) or ".." in rev.split("/")):
        raise UsageError(f"{spec!r}: not a valid revision {rev!r} (a branch, tag or commit)")
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", s) and ".." not in s and "--" not in s \
            and not s.endswith("."):
        return s, rev or "main"
    if re.fullmatch(TIMM_NAME, s):
        return f"timm/{s}", rev or "main"
    return None


def hub_cache_dir() -> Path:
    """huggingface_hub's cache: HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def hub_repo_dir(repo: str) -> Path:
    """A repo's folder in the cache: models--<org>--<name>."""
    return hub_cache_dir() / f"models--{repo.replace('/', '--')}"


def hub_offline(offline: bool = False) -> bool:
    flags = (os.environ.get(v, "").strip().lower() for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return offline or any(f in ("1", "true", "yes", "on") for f in flags)


def hub_snapshot(repo: str, revision: str = "main", *, offline: bool = False, progress: bool = True) -> Path:
    """The snapshot folder of a hub repo at a revision: from the cache when it is complete there, else downloaded
    into the cache (config files, then the weights) exactly as huggingface_hub lays it out, so transformers and
    timm share it. HF_HUB_OFFLINE=1 or offline=True never touch the network."""
    root = hub_repo_dir(repo)
    cached = _cached_snapshot(root, revision, offline=hub_offline(offline))
    if cached is not None:
        return _verified_snapshot(root, cached)
    if hub_offline(offline):
        raise UsageError(f"{repo}@{revision} is not in the Hugging Face cache {root} and the hub is offline "
                         f"(HF_HUB_OFFLINE / {_opt('offline')})")
    try:
        with _folder_lock(root):   # one process downloads; the others find the snapshot complete
            cached = _cached_snapshot(root, revision, offline=False)
            return _verified_snapshot(root, cached) if cached is not None else \
                _download_snapshot(repo, revision, root, progress)
    except UsageError as e:
        usable = _cached_snapshot(root, revision, offline=True) if "cannot reach" in str(e) else None
        if usable is None:
            raise
        log.info(f"{repo}: the hub is unreachable; using the cached snapshot {usable.name[:12]}")
        return _verified_snapshot(root, usable)


def _cached_snapshot(root: Path, revision: str, offline: bool = True) -> Path | None:
    """The cached snapshot of a revision when it holds a config and whole weights, and (online) every config file
    a download would fetch, present or recorded absent in .no_exist — whoever filled the cache (transformers fetches
    no preprocessor_config.json, open_clip no config.json), the model is read from the same files."""
    commit = revision if re.fullmatch(r"[0-9a-f]{40}", revision) else None
    ref = root / "refs" / revision
    if commit is None and ref.is_file():
        with open(ref, "rb") as f:   # 40 hex digits: a huge (sparse) file is not read whole
            commit = f.read(64).decode("ascii", "replace").strip()
    if commit is None or not re.fullmatch(r"[0-9a-f]{40}", commit):
        return None
    snap = root / "snapshots" / commit
    if not any((snap / c).is_file() for c in ("config.json", "open_clip_config.json")):
        return None
    weights = next((snap / f for f in WEIGHT_FILES if (snap / f).is_file()), None)
    if weights is None or weights.name.endswith(".index.json") and not all(
            (snap / sh).is_file() for sh in shard_names(weights)):
        return None
    unknown = [c for c in _configs_read_with(snap) if not (snap / c).is_file()
               and not (root / ".no_exist" / commit / c).exists()]
    if unknown and not offline:
        return None
    if unknown:
        log.info(f"{root.name}: {', '.join(unknown)} not in the cache (offline): read without it")
    return snap


def _verified_snapshot(root: Path, snap: Path) -> Path:
    """The snapshot, once every file the loader reads from it (configs, the weights, an index's shards) is checked
    against its blob's name: sha256 for LFS blobs, the git blob sha1 for regular ones. A blob overwritten in place, or
    a link into another blob, is refused rather than loaded (a copied file, where links are not possible, is read as
    it is)."""
    weights = next((f for f in WEIGHT_FILES if (snap / f).is_file()), None)
    files = [f for f in CONFIG_FILES if (snap / f).is_file()] + ([weights] if weights else [])
    if weights and weights.endswith(".index.json"):
        files += shard_names(snap / weights)
    blobs = (root / "blobs").resolve()
    for f in files:
        link = snap / f
        if not link.is_symlink():
            continue
        blob = link.resolve()
        if blob.parent != blobs:
            raise UsageError(f"{link}: the cache links outside its blobs folder ({blob}): delete {root} and download "
                             "again")
        name = blob.name
        digest = file_sha256(blob) if len(name) == 64 else _git_blob_sha1(blob) if len(name) == 40 else None
        if digest != name:
            raise UsageError(f"{link}: the cached blob {name[:12]}… holds other bytes ({(digest or '?')[:12]}…): "
                             f"delete {blob} and download again")
    return snap


def _configs_read_with(snap: Path) -> list[str]:
    """The other config files that change how a snapshot is read: a transformers config.json is read with
    preprocessor_config.json; an open_clip_config.json only where no (timm) config.json exists."""
    if not (snap / "config.json").is_file():
        return ["config.json"]
    return [] if "architecture" in _read_json(snap / "config.json") else ["preprocessor_config.json"]


def _hub_headers(url: str) -> dict:
    """HF_TOKEN as a bearer token, sent to the endpoint's own scheme, host and port only: never to a CDN elsewhere,
    never over http unless the endpoint itself is http."""
    endpoint = os.environ.get("HF_ENDPOINT") or HUB_ENDPOINT
    if _origin(url) != _origin(endpoint):
        return {}
    token = (os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or _stored_token() or "").strip()
    if any(ord(c) < 32 or ord(c) == 127 for c in token):
        raise UsageError("the Hugging Face token holds a control character (a line break from a file edited on "
                         "Windows?): fix HF_TOKEN or the token file (the token is not shown)")
    return {"Authorization": f"Bearer {token}"} if token else {}


def _origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of a URL, the port made explicit: what a token is bound to."""
    u = urllib.parse.urlsplit(url)
    try:
        port = u.port or {"http": 80, "https": 443}.get(u.scheme)
    except ValueError:
        port = -1
    return u.scheme.lower(), (u.hostname or "").lower(), port


def _stored_token() -> str | None:
    """The token `hf auth login` stores: HF_TOKEN_PATH, else $HF_HOME/token."""
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    path = Path(os.environ.get("HF_TOKEN_PATH") or Path(home) / "token").expanduser()
    with contextlib.suppress(OSError, UnicodeDecodeError):
        return path.read_text().strip() or None
    return None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None   # a HEAD reads the file's metadata from the redirect itself


def _hub_head(repo: str, revision: str, fname: str) -> dict | None:
    """What the Hub says about one file (commit, etag, size, whether it is an LFS file, where to GET it), or None
    when the repo has no such file (404 EntryNotFound)."""
    endpoint = (os.environ.get("HF_ENDPOINT") or HUB_ENDPOINT).rstrip("/")
    url = f"{endpoint}/{repo}/resolve/{urllib.parse.quote(revision, safe='')}/{fname}"
    for _ in range(4):   # a renamed repo redirects on the same host, without LFS headers: follow it
        status, h = _head(url, endpoint, repo)
        location = urllib.parse.urljoin(url, h.get("Location", ""))
        same_host = urllib.parse.urlsplit(location).netloc == urllib.parse.urlsplit(url).netloc
        if status not in (301, 302, 307, 308) or "X-Linked-Etag" in h or not same_host or location == url:
            break
        url = location
    code = h.get("X-Error-Code", "")
    if status == 404 and code == "EntryNotFound":
        return None
    if status in (401, 403):
        raise UsageError(f"{repo}: the hub refused access ({status} {code or 'unauthorized'}): a gated or private "
                         "repository (accept its licence on the hub, then set HF_TOKEN), or no such repository (nor "
                         "a local file or folder of that name)")
    if status == 404:
        raise UsageError(f"{repo}@{revision}: {code or 'not found'} on the hub")
    if status not in (200, 301, 302, 303, 307, 308):
        raise UsageError(f"{repo}/{fname}: the hub answered {status}")
    etag = (h.get("X-Linked-Etag") or h.get("ETag") or "").removeprefix("W/").strip('"')
    commit = h.get("X-Repo-Commit", "")
    if "X-Linked-Etag" in h and not re.fullmatch(r"[0-9a-f]{64}", etag):
        raise UsageError(f"{repo}/{fname}: the hub's LFS etag {etag[:70]!r} is not a sha256 (64 hex digits)")
    if not re.fullmatch(r"[0-9a-f]{40}", commit) or not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", etag):
        raise UsageError(f"{repo}/{fname}: the hub's answer lacks a commit or an etag (HF_ENDPOINT a mirror that "
                         "does not speak the resolve protocol?)")
    location = urllib.parse.urljoin(url, h["Location"]) if status != 200 and h.get("Location") else url
    size = h.get("X-Linked-Size") or h.get("Content-Length")
    if size is not None and (not size.strip().isdigit() or len(size.strip()) > 18):
        raise UsageError(f"{repo}/{fname}: the hub announced a size of {size!r}")
    return dict(commit=commit, etag=etag, lfs="X-Linked-Etag" in h, size=int(size) if size else None, url=location)


def _head(url: str, endpoint: str, repo: str):
    """(status, headers) of a HEAD that does not follow redirects."""
    req = urllib.request.Request(url, method="HEAD", headers={"User-Agent": f"ssl_repsim/{__version__}",
                                                              "Accept-Encoding": "identity", **_hub_headers(url)})
    try:
        resp = urllib.request.build_opener(_NoRedirect).open(req, timeout=STALL_SECONDS)
        return resp.status, resp.headers
    except urllib.error.HTTPError as e:
        return e.code, e.headers
    except Exception as e:  # noqa: BLE001 - URLError, timeouts, refused connections
        raise UsageError(f"cannot reach the Hugging Face hub at {endpoint} for {repo}: {_one_line(e)} (set "
                         "HF_HUB_OFFLINE=1 to use the cache only)") from None


def _download_snapshot(repo: str, revision: str, root: Path, progress: bool) -> Path:
    """Config files (each optional), then the first weights file the repo holds (and an index's shards), into
    blobs/<etag> linked from snapshots/<commit>/<name>; refs/<revision> written last."""
    found, commit = {}, revision if re.fullmatch(r"[0-9a-f]{40}", revision) else None
    absent = []
    for fname in (*CONFIG_FILES, *WEIGHT_FILES):
        if fname in WEIGHT_FILES and any(f in WEIGHT_FILES for f in found):
            break
        meta = _hub_head(repo, commit or revision, fname)
        if meta is not None:
            found[fname], commit = meta, meta["commit"]
        elif fname in CONFIG_FILES:
            absent.append(fname)
    if not any(f in found for f in ("config.json", "open_clip_config.json")) or not set(found) & set(WEIGHT_FILES):
        raise UsageError(f"{repo}@{revision}: neither a transformers/timm/open_clip config nor weights "
                         f"({', '.join(WEIGHT_FILES)}) on the hub")
    snap = root / "snapshots" / commit
    for fname in absent:   # as huggingface_hub records a file the repo does not have
        (root / ".no_exist" / commit).mkdir(parents=True, exist_ok=True)
        (root / ".no_exist" / commit / fname).touch()
    for fname, meta in list(found.items()):
        _hub_fetch(root, snap, fname, meta, progress)
        if fname.endswith(".index.json"):
            for shard in shard_names(snap / fname):
                _hub_fetch(root, snap, shard, _hub_head(repo, commit, shard) or {}, progress)
    if revision != commit:
        atomic_write(root / "refs" / revision, commit)
    return snap


def _hub_fetch(root: Path, snap: Path, fname: str, meta: dict, progress: bool):
    """blobs/<etag> (verified: sha256 for LFS files, git sha1 for regular ones; size as announced), linked from the
    snapshot the way huggingface_hub links it."""
    if not meta:
        raise UsageError(f"{snap.name[:12]}: {fname} is named by the index but absent on the hub")
    blob = root / "blobs" / meta["etag"]
    if not blob.is_file():
        download_file(meta["url"], blob, sha256=meta["etag"] if meta["lfs"] else None, progress=progress,
                      headers=_hub_headers(meta["url"]), size=meta["size"],
                      container=meta["lfs"] and not fname.endswith(".json"),
                      git_sha1=None if meta["lfs"] else meta["etag"])
    link = snap / fname
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    try:
        link.symlink_to(os.path.relpath(blob, link.parent))
    except OSError:   # no symlinks here (Windows without developer mode): a copy, as huggingface_hub does
        shutil.copyfile(blob, link)


# ======================================================================================================================
# 4. Data: image folders, tensor files, a synthetic labelled set; preprocessing in torch ops
# ======================================================================================================================

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
TENSOR_SUFFIXES = {".pt", ".pth", ".npy", ".npz", ".safetensors"}
SYNTHETIC_CLASSES = ("disk", "square", "triangle", "ring", "cross", "h-stripes", "v-stripes", "diagonal",
                     "checker", "dots", "blob-pair", "frame")


@dataclass
class ImageSet:
    """Images (paths, or a tensor N×3×H×W uint8 / float in [0, 1]) with optional labels and per-pixel masks."""
    items: object
    labels: torch.Tensor | None
    classes: list
    name: str
    masks: torch.Tensor | None = None   # (N, H, W) long: 0 background, 1 + class where the object is
    strict: bool = False
    unreadable: set = dataclasses.field(default_factory=set)
    workers: int = 0                   # decoding processes (0: in this process)
    rows: list | None = None           # each item's row in the source (tensor data); None = 0, 1, ...
    origin: str | None = None          # images_fingerprint of the set this one was drawn from (origin_key)

    @property
    def skipped(self) -> int:
        return len(self.unreadable)

    def readable_labels(self) -> torch.Tensor | None:
        """The labels of the images read so far without error, in order: the rows of their features."""
        if self.labels is None or not self.unreadable:
            return self.labels
        keep = torch.tensor([i not in self.unreadable for i in range(len(self))])
        return self.labels[keep]

    def __len__(self):
        return len(self.items)

    def subset(self, idx) -> ImageSet:
        idx = torch.as_tensor(idx, dtype=torch.long)
        items = self.items[idx] if isinstance(self.items, torch.Tensor) else [self.items[i] for i in idx.tolist()]
        rows = [(self.rows or range(len(self)))[i] for i in idx.tolist()]
        return dataclasses.replace(self, items=items, labels=None if self.labels is None else self.labels[idx],
                                   masks=None if self.masks is None else self.masks[idx], unreadable=set(), rows=rows,
                                   origin=self.origin_key())

    def origin_key(self) -> str:
        """What identifies the set this one was drawn from (its content: images_fingerprint), with `rows` the
        position of each item there: the key under which a command keeps its features (FeatureSession)."""
        if self.origin is None:
            self.origin = images_fingerprint(self)
        return self.origin

    def image(self, i: int) -> torch.Tensor | None:
        """Image i as a uint8 or float tensor (3, H, W); None if unreadable (counted, or an error when strict)."""
        if isinstance(self.items, torch.Tensor):
            return self.items[i]
        _, ims, err = _Decoder(self.items)[i]
        return self._kept(i, ims[0] if ims else None, err)

    def _kept(self, i: int, im, err):
        """The image, or None for an unreadable one (recorded; an error under strict)."""
        if err is not None:
            if self.strict:
                raise UsageError(f"unreadable image {self.items[i]}: {err}")
            self.unreadable.add(i)
        return im

    def decoded(self, batch_size: int, start: int = 0, stop: int | None = None, targets=(), group=None):
        """Batches (indices, [images per target]) of items[start:stop] — this process's whole batches under
        torch.distributed — each image decoded once, by `workers` processes with prefetch, then resized in Pillow
        and cropped for every target (side, interp, crop_mode, crop) the models of the run need (_Decoder._fitted),
        stacked into one uint8 tensor per target. No target: the decoded images themselves (a list). Unreadable
        images are left out of every batch (recorded, or an error under strict)."""
        stop = len(self) if stop is None else stop
        rank, world = _rank_world(group)
        batches = [list(range(b, min(b + batch_size, stop))) for b in range(start, stop, batch_size)][rank::world]
        if isinstance(self.items, torch.Tensor):
            for idx in batches:
                yield idx, [self.items[idx[0]:idx[-1] + 1]] * max(len(targets), 1)
            return
        kept = _DECODED.get()
        if kept is not None and targets and (replay := kept.replay(self.items, batches, targets)) is not None:
            for idx, per_target, errors in replay:   # decoded earlier in this command
                for i, err in errors:
                    self._kept(i, None, err)
                if per_target:
                    yield [i for i in idx if i not in {j for j, _ in errors}], per_target
            return
        loader = torch.utils.data.DataLoader(_Decoder(self.items, tuple(targets)), batch_sampler=batches,
                                             num_workers=min(self.workers, len(batches)), collate_fn=_collated,
                                             prefetch_factor=4 if min(self.workers, len(batches)) else None,
                                             worker_init_fn=_decoder_yields)
        for idx, per_target, errors in loader:
            if kept is not None and targets:
                kept.keep(self.items, idx, per_target, errors, targets)
            for i, err in errors:
                self._kept(i, None, err)
            bad = {i for i, _ in errors}
            if len(bad) < len(idx):
                yield [i for i in idx if i not in bad], per_target


class DecodedImages:
    """The images one command decoded, at each target size (uint8, as the decoders fitted them), held within
    `budget` bytes and keyed by the file's path, size and modification time and the target: a later pass over any of
    them (a subset, another analysis, augmented views, a model alone) reads them here instead of decoding again
    (what a target gets never depends on the other targets decoded with it: _Decoder)."""

    def __init__(self, budget: int):
        self.budget, self.held, self.images = budget, 0, {}

    @staticmethod
    def key(path, target) -> tuple:
        st = os.stat(path)
        return (str(path), st.st_size, st.st_mtime_ns, tuple(target))

    def keep(self, items, idx, per_target, errors, targets):
        bad = dict(errors)
        good = [i for i in idx if i not in bad]
        with contextlib.suppress(OSError):
            for t, batch in zip(targets, per_target if good else [[]] * len(targets), strict=True):
                for i, im in zip(good, batch, strict=True):
                    key = self.key(items[i], t)
                    if key in self.images:
                        continue
                    if self.held + im.numel() > self.budget:
                        return
                    self.images[key] = im.clone()
                    self.held += im.numel()
            for i, err in bad.items():
                for t in targets:
                    self.images[self.key(items[i], t)] = err

    def replay(self, items, batches, targets):
        """The batches as the decoders would give them, or None unless every image is held at every target."""
        try:
            got = {(i, k): self.images[self.key(items[i], t)] for b in batches for i in b
                   for k, t in enumerate(targets)}
        except (KeyError, OSError):
            return None

        def batches_of():   # stacked one batch at a time, as they are asked for
            for b in batches:
                errors = [(i, got[i, 0]) for i in b if isinstance(got[i, 0], str)]
                good = [i for i in b if not isinstance(got[i, 0], str)]
                per_target = [[got[i, k] for i in good] for k in range(len(targets))] if good else []
                yield b, [torch.stack(ims) if all(im.shape == ims[0].shape for im in ims) else ims
                          for ims in per_target], errors
        return batches_of()


_DECODED: contextvars.ContextVar = contextvars.ContextVar("ssl_repsim_decoded_images", default=None)


def _decoder_yields(_worker_id: int):
    """A decoding process runs at the lowest CPU priority (nice 19), with one intra-op thread: it takes the cycles
    the model's forward leaves idle, and yields the cores to it whenever both want them."""
    torch.set_num_threads(1)
    with contextlib.suppress(OSError, AttributeError):
        os.nice(19)


class _Decoder(torch.utils.data.Dataset):
    """Image i of a list of files as (i, [uint8 (3, H, W) upright RGB per target], None), or (i, None, the error):
    an image Pillow refuses, or one over its decompression-bomb limit, is unreadable. Each target (side, interp,
    crop_mode, crop) is one Pillow resize (antialiased) of the decoded image and a crop; a JPEG at least 8× a target's
    side is decoded for it in draft mode (DCT scaling, both sides kept ≥ 4 × that side, where the resize hides it) —
    per target, so that what a model sees never depends on which other models are decoded with it."""

    def __init__(self, paths, targets=()):
        self.paths, self.targets = paths, targets

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            sides = list(dict.fromkeys(t[0] for t in self.targets)) or [0]
            decoded = self._decoded(i, sides)
            if not self.targets:
                return i, [torch.from_numpy(np.array(decoded[0], dtype=np.uint8)).permute(2, 0, 1)], None
            return i, [self._fitted(decoded[t[0]], *t) for t in self.targets], None
        except Exception as e:  # noqa: BLE001 - whatever Pillow raises, the image is unreadable
            return i, None, _one_line(e)

    def _decoded(self, i: int, sides: list) -> dict:
        """{side: image i upright as 8-bit RGB}, decoded in draft mode (4 × side) where it is a JPEG at least 8× the
        side: one open and decode per distinct draft request (one, for most images)."""
        Image = _pillow()
        by_draft, out = {}, {}
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(self.paths[i]) as im:
                drafts = {s: 4 * s if s and im.format == "JPEG" and min(im.size) >= 8 * s else 0 for s in sides}
                first = drafts[sides[0]]
                by_draft[first] = self._rgb(im, first)
            for s in sides:
                if drafts[s] not in by_draft:
                    with Image.open(self.paths[i]) as im:
                        by_draft[drafts[s]] = self._rgb(im, drafts[s])
                out[s] = by_draft[drafts[s]]
        return out

    @staticmethod
    def _rgb(im, draft: int):
        from PIL import Image, ImageOps
        if draft:
            im.draft("RGB", (draft, draft))
        im = ImageOps.exif_transpose(im)
        return Image.fromarray(_rgb_uint8(im)) if im.mode in ("I", "F") or im.mode.startswith("I;16") \
            else im.convert("RGB")   # 16-bit and float images scaled to 8 bits, not clipped

    @staticmethod
    def _fitted(im, side: int, interp: str, mode: str, crop: int) -> torch.Tensor:
        """The model's input before normalisation: both sides resized to `side` (squash), or the shorter side with
        the sizes resize_crop_normalize computes; then its centre crop × crop, as resize_crop_normalize places it."""
        w, h = im.size
        if mode == "squash":
            nw, nh = side, side
        else:
            nw, nh = (max(side, int(w * side / h)), side) if h <= w else (side, max(side, int(h * side / w)))
        top, left = (nh - crop) // 2, (nw - crop) // 2
        if (nw, nh) == (w, h):
            a = np.array(im, dtype=np.uint8)[top:top + crop, left:left + crop]
        else:   # only the kept crop is resampled: Pillow maps it through the same scale and filter support
            sx, sy = w / nw, h / nh
            a = np.array(im.resize((crop, crop), PIL_FILTERS[interp],
                                   box=(left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)), dtype=np.uint8)
        return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)


def _collated(batch: list):
    """(indices, per target the batch's images stacked into one uint8 tensor (a list when sizes differ), errors)."""
    kept = [ims for _, ims, _ in batch if ims is not None]
    per_target = []
    for k in range(len(kept[0]) if kept else 0):
        ims = [x[k] for x in kept]
        per_target.append(torch.stack(ims) if all(im.shape == ims[0].shape for im in ims) else ims)
    return [i for i, _, _ in batch], per_target, [(i, e) for i, ims, e in batch if ims is None]


def _rgb_uint8(im) -> np.ndarray:
    """(H, W, 3) uint8 of a PIL image, upright by its EXIF orientation; 16-bit images (and 32-bit integer ones with
    values above 255) scaled from their 0..65535 range, not clipped at 255; float images from [0, 1]."""
    from PIL import ImageOps
    im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        a = np.asarray(im, dtype=np.float64)
        a = a * (255.0 if im.mode == "F" else 1.0 if im.mode == "I" and a.max() <= 255 else 255.0 / 65535.0)
        return np.repeat(np.clip(np.round(a), 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    return np.array(im.convert("RGB"), dtype=np.uint8)   # a writable copy


def _pillow():
    try:
        from PIL import Image
    except ImportError:
        raise UsageError("reading image folders needs Pillow: pip install pillow") from None
    return Image


def _synthetic_shape(c: int, xs, ys, cx, cy, r, freq, phase) -> torch.Tensor:
    """The pixels of shape class c (SYNTHETIC_CLASSES' order) at centres (cx, cy), radii r, stripe frequency and
    phase (each (m, 1, 1)) on the grid xs, ys: (m, H, W)."""
    dx, dy = xs - cx, ys - cy
    dist = (dx ** 2 + dy ** 2).sqrt()
    box = (dx.abs() < r) & (dy.abs() < r)
    wave = lambda t: torch.sin(2 * math.pi * freq * t + phase) > 0
    shapes = [lambda: dist < r, lambda: box, lambda: (dy < r) & (dy > -r) & (dx.abs() < (dy + r) / 2),
              lambda: (dist < r) & (dist > r / 2),
              lambda: ((dx.abs() < r / 3) & (dy.abs() < r)) | ((dy.abs() < r / 3) & (dx.abs() < r)),
              lambda: box & wave(ys), lambda: box & wave(xs), lambda: box & wave((xs + ys) / 2),
              lambda: box & (wave(xs) ^ wave(ys)), lambda: box & wave(xs) & wave(ys),
              lambda: ((xs - cx + r / 2) ** 2 + dy ** 2).sqrt().lt(r / 2) | ((xs - cx - r / 2) ** 2 + dy ** 2).sqrt().lt(r / 2),
              lambda: box & ~((dx.abs() < r * 0.6) & (dy.abs() < r * 0.6))]
    return shapes[c]()


def synthetic_images(n: int = 256, size: int = 224, seed: int = 0, num_classes: int = 12) -> ImageSet:
    """A deterministic labelled procedural set: shapes and textures of random colour, place and scale, over a
    noisy background, balanced over classes; masks give each pixel's label (for spatial probes)."""
    if not 2 <= num_classes <= len(SYNTHETIC_CLASSES):
        raise UsageError(f"synthetic data has 2..{len(SYNTHETIC_CLASSES)} classes")
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=g)]
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    u = lambda *s: torch.rand(*s, generator=g)
    cx, cy, r = 0.3 + 0.4 * u(n, 1, 1), 0.3 + 0.4 * u(n, 1, 1), 0.12 + 0.16 * u(n, 1, 1)
    freq, phase = 6 + 10 * u(n, 1, 1), 2 * math.pi * u(n, 1, 1)
    mask = torch.zeros(n, size, size, dtype=torch.bool)
    for c in range(num_classes):                    # each image's own shape only
        i = (labels == c).nonzero().flatten()
        mask[i] = _synthetic_shape(c, xs, ys, cx[i], cy[i], r[i], freq[i], phase[i])
    fg, bg = u(n, 3, 1, 1), u(n, 3, 1, 1)
    img = torch.where(mask[:, None], fg, bg * 0.6) + 0.08 * torch.randn(n, 3, size, size, generator=g)
    img = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    masks = torch.where(mask, labels[:, None, None] + 1, 0)
    return ImageSet(img, labels, list(SYNTHETIC_CLASSES[:num_classes]), f"synthetic(n={n},seed={seed})", masks)


def _files_under(root: Path) -> list[Path]:
    """Every file under root, following links to folders (a class folder may be a link) but never into one already
    visited (a link loop, or a folder linked twice, is read once)."""
    seen, files = set(), []
    for top, dirs, names in os.walk(root, followlinks=True):
        st = os.stat(top)
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs.sort()
        files += [Path(top) / n for n in names]
    return files


def image_folder(root) -> ImageSet:
    """Every image under root, searched recursively (linked folders followed); first-level sub-folders are classes
    (ImageFolder style)."""
    root = Path(root)
    files = sorted(p for p in _files_under(root) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UsageError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    tops = [p.relative_to(root).parts for p in files]
    if all(len(t) > 1 for t in tops):
        classes = sorted({t[0] for t in tops})
        labels = torch.tensor([classes.index(t[0]) for t in tops])
    else:
        classes, labels = [], None
    return ImageSet(files, labels, classes, str(root))


def tensor_file(path) -> ImageSet:
    """Images [N,3,H,W] (uint8, or float in [0,1]; channels-last accepted) and optional labels from .pt / .npy /
    .npz / .safetensors (keys `images` and `labels`, or a bare tensor)."""
    path = Path(path)
    try:
        if path.suffix == ".npy":
            obj = {"images": torch.from_numpy(np.load(path, allow_pickle=False))}
        elif path.suffix == ".npz":
            _check_archive(path)
            with np.load(path, allow_pickle=False) as z:
                obj = {k: torch.from_numpy(z[k]) for k in z.files}
        else:
            obj, _ = read_checkpoint(path)
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever numpy / torch raise, the file is the user's
        raise UsageError(f"{path}: unreadable tensor file ({_one_line(e)[:200]})") from None
    if isinstance(obj, torch.Tensor):
        obj = {"images": obj}
    if not isinstance(obj, dict) or "images" not in obj:
        raise UsageError(f"{path}: expected a tensor or a dict with key 'images' (and optionally 'labels')")
    _refuse_inflated(obj, path, memory_budget())   # a stride-0 tensor of a few KB would become gigabytes
    x = obj["images"]
    if not isinstance(x, torch.Tensor):
        raise UsageError(f"{path}: 'images' must be a tensor or array, got {type(x).__name__}")
    if x.ndim == 4 and x.shape[1] != 3 and x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    if x.ndim != 4 or x.shape[1] != 3 or x.shape[0] == 0:
        raise UsageError(f"{path}: images must be [N,3,H,W] with N > 0, got {tuple(x.shape)}")
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise UsageError(f"{path}: images hold NaN or Inf pixels")
    if x.is_floating_point() and (x.min() < -1e-3 or x.max() > 1 + 1e-3):
        raise UsageError(f"{path}: float images must lie in [0, 1] (unnormalised); got [{x.min():.3g}, {x.max():.3g}]")
    if not x.is_floating_point() and x.dtype != torch.uint8:
        raise UsageError(f"{path}: images must be uint8 or float, got {x.dtype}")
    y = obj.get("labels")
    if y is not None:
        y = torch.as_tensor(y)
        if y.is_floating_point() or y.is_complex() or y.ndim != 1:
            raise UsageError(f"{path}: labels must be a 1-D tensor of integer class indices, got {y.dtype} "
                             f"{tuple(y.shape)}")
        y = y.long()
        if len(y) != len(x):
            raise UsageError(f"{path}: {len(y)} labels for {len(x)} images")
        if len(y) and y.min() < 0:
            raise UsageError(f"{path}: labels must be class indices ≥ 0")
    classes = []
    if y is not None:   # classes are the distinct labels; labels become their indices 0 … C−1
        values, y = torch.unique(y, return_inverse=True)
        classes = [str(int(v)) for v in values]
    return ImageSet(x, y, classes, str(path))


def load_images(source="synthetic", n: int | None = None, seed: int = 0, strict: bool = False,
                synthetic_n: int = 256, workers: int = 0) -> ImageSet:
    """An ImageSet from `synthetic`, an image folder or a tensor file; `n` draws a fixed subset by `seed`;
    `workers` processes decode image files."""
    source = str(source)
    if n is not None and n < 1:
        raise UsageError(f"{_opt('n')} must be ≥ 1, got {n}")
    if not 0 <= workers <= USABLE_CPUS:
        raise UsageError(f"{_opt('workers')} must lie in [0, {USABLE_CPUS}] (the CPUs this process may use), got {workers}")
    if source == "synthetic":
        if (n or synthetic_n) * 3 * 224 * 224 > memory_budget():
            raise UsageError(f"{_opt('n')} {n}: the synthetic set would take {(n or synthetic_n) * 3 * 224 * 224 / 2 ** 30:.1f} "
                             f"GiB, more than this process may use ({memory_budget() / 2 ** 30:.1f} GiB)")
        images = synthetic_images(n or synthetic_n, seed=seed)
        log.info(f"data: built-in synthetic set, {len(images)} images of {len(images.classes)} classes "
                 f"(pass {_opt('data')} DIR|FILE for your own)")
    elif Path(source).is_dir():
        images = image_folder(source)
    elif Path(source).is_file() and Path(source).suffix.lower() in TENSOR_SUFFIXES:
        images = tensor_file(source)
    elif Path(source).exists():
        raise UsageError(f"{source}: data must be an image folder, a tensor file "
                         f"({', '.join(sorted(TENSOR_SUFFIXES))}) or 'synthetic'")
    else:
        raise UsageError(f"data not found: {source}")
    images.strict, images.workers = strict, workers
    if n is not None and source != "synthetic":
        if n > len(images):
            raise UsageError(f"{_opt('n')} {n} exceeds the {len(images)} images in {source}")
        images = images.subset(torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n].sort()[0])
    return images


def resize_crop_normalize(img: torch.Tensor, size: int, crop_pct: float = 0.875, interp: str = "bicubic",
                           mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_mode: str = "center") -> torch.Tensor:
    """Resize the shorter side (crop_mode center) or both sides (squash) to size/crop_pct (antialiased), centre-crop
    size×size, scale to [0,1], normalise. img: (3,H,W) or (B,3,H,W), uint8 or float in [0,1]."""
    x = img.unsqueeze(0) if img.ndim == 3 else img
    h, w = x.shape[-2:]
    short = int(size / crop_pct)
    if crop_mode == "squash":
        nh, nw = short, short
    else:
        nh, nw = (short, max(short, int(w * short / h))) if h <= w else (max(short, int(h * short / w)), short)
    top, left = (nh - size) // 2, (nw - size) // 2
    if (nh, nw) != (h, w):
        x = x.float() / 255 if not x.is_floating_point() else x.float()
        x = F.interpolate(x, size=(nh, nw), mode=interp, align_corners=False, antialias=True)
        x = x[..., top:top + size, left:left + size]
    else:   # nothing to resize: crop first, convert only what is kept
        x = x[..., top:top + size, left:left + size]
        x = x.float().div_(255) if not x.is_floating_point() else x.float()
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    x = (x - m).div_(s)
    return x if img.ndim == 4 else x[0]


PIL_FILTERS = {"bicubic": 3, "bilinear": 2}   # Pillow's resampling codes


def preprocess_kw(model: ViT) -> dict:
    """resize_crop_normalize's arguments for a model: its registry's resize, crop, mean and std; its input size."""
    pp, size = getattr(model, "preprocess", {}), getattr(model, "input_size", model.cfg.img_size)
    return dict(size=size, crop_pct=pp.get("crop_pct", 0.875), interp=pp.get("interp", "bicubic"),
                mean=pp.get("mean", IMAGENET_MEAN), std=pp.get("std", IMAGENET_STD),
                crop_mode=pp.get("crop_mode", "center"))


def _decode_target(kw: dict) -> tuple[int, str, str, int]:
    """The Pillow resize and crop a model's preprocessing starts with: (side, interpolation, crop mode, crop)."""
    return int(kw["size"] / kw["crop_pct"]), kw["interp"], kw["crop_mode"], kw["size"]


def _preprocessed(ims, kw, fitted: bool = False) -> torch.Tensor:
    """Model input from raw images (resized, cropped, normalised), or from images the decoder fitted already
    (normalised only)."""
    if fitted:   # (v / 255 − mean) / std as one scale and one shift, in place on the converted batch
        m, s = torch.tensor(kw["mean"]).view(1, 3, 1, 1), torch.tensor(kw["std"]).view(1, 3, 1, 1)
        x = ims if isinstance(ims, torch.Tensor) else torch.stack(ims)
        return x.float().mul_(1 / (255 * s)).sub_(m / s)
    if isinstance(ims, torch.Tensor):
        return resize_crop_normalize(ims, **kw)
    return torch.stack([resize_crop_normalize(im, **kw) for im in ims])


def _distinct_preprocessing(kws: list[dict]) -> tuple[list[str], dict, list]:
    """(the distinct preprocessings' keys in first-seen order, key → settings, the decoder's target for each)."""
    of_key = {repr(kw): kw for kw in kws}
    return list(of_key), of_key, [_decode_target(kw) for kw in of_key.values()]


def shared_batches(models, images: ImageSet, batch_size: int = 64, start: int = 0, stop: int | None = None,
                   group=None):
    """Per decoded batch, (its image indices, [(x, y) for each model]): every image decoded once for all models and
    resized in Pillow once per distinct preprocessing, then cropped and normalised as each model's registry row says
    (models preprocessed alike share one tensor; this process's batches under torch.distributed)."""
    return preprocessed_batches([preprocess_kw(m) for m in models], images, batch_size, start, stop, group)


def preprocessed_batches(kws: list[dict], images: ImageSet, batch_size: int = 64, start: int = 0,
                         stop: int | None = None, group=None):
    """shared_batches for resize_crop_normalize settings `kws` (one per input wanted)."""
    keys, of_key, targets = _distinct_preprocessing(kws)
    for idx, per_target in images.decoded(batch_size, start, stop, targets, group):
        y = images.labels[idx] if images.labels is not None else None
        fitted = not isinstance(images.items, torch.Tensor)   # files: the decoder resized and cropped them
        done = {k: _preprocessed(ims, of_key[k], fitted) for k, ims in zip(keys, per_target, strict=True)}
        yield idx, [(done[repr(kw)], y) for kw in kws]


def model_batches(model: ViT, images: ImageSet, batch_size: int = 64, start: int = 0, stop: int | None = None,
                  group=None):
    """Yield (x, y) batches preprocessed for `model` (its registry's resize, crop, mean and std; its input size);
    under torch.distributed only this process's batches."""
    for _, ((x, y),) in shared_batches([model], images, batch_size, start, stop, group):
        yield x, y


def batch_order(n: int, seed: int) -> torch.Tensor:
    """The order in which an estimator that consumes batches reads n images: a permutation drawn from `seed`."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def per_model(streams, n: int) -> list:
    """n iterators over one stream of per-model lists: the i-th yields each list's i-th item (consumed in step)."""
    return [map(operator.itemgetter(i), s) for i, s in enumerate(itertools.tee(streams, n))]   # i bound now


def per_model_batches(models, images: ImageSet, batch_size: int, group=None) -> tuple[list, list]:
    """(per_model streams of shared_batches, the list each batch's first image index is appended to as the streams
    are read in step): what gathering rows or terms in batch order needs."""
    firsts = []

    def batches():
        for idx, per in shared_batches(models, images, batch_size, group=group):
            firsts.append(idx[0])
            yield per
    return per_model(batches(), len(models)), firsts


def split_train_val(images: ImageSet, fraction: float = 0.2, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """A deterministic random split (by seed) into training and validation sets."""
    if not 0 < fraction < 1:
        raise UsageError(f"{_opt('val_fraction')} must lie in (0, 1)")
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed + 1))
    k = max(1, round(len(images) * fraction))
    if len(images) - k < 2:
        raise UsageError(f"{len(images)} images are too few to split into training and validation sets")
    return images.subset(perm[k:].sort()[0]), images.subset(perm[:k].sort()[0])


# ======================================================================================================================
# 5. Extraction: named points, token reductions, streaming, feature cache
# ======================================================================================================================

SUBLAYERS = ("norm1", "attn", "attn.qkv", "attn.proj", "norm2", "mlp", "mlp.fc1", "mlp.act", "mlp.fc2")
TOKENS = ("all", "flat", "cls", "mean", "patch", "official")
# each family's published linear-evaluation representation (REGISTRY's eval_repr), read from the last blocks
OFFICIAL_REPRESENTATIONS = {
    "cls_norm": "cls token after the final norm (MAE --cls_token, MoCo v3, DeiT)",
    "cls_raw": "cls token of the last block, no final norm (MSN)",
    "fc_norm_mean": "fc_norm of the mean patch token (MAE / BEiT fine-tuned; a LayerNorm without affine where the "
                    "file has no fc_norm)",
    "mean_tokens": "mean of the final patch tokens (I-JEPA, data2vec)",
    "cls4_norm": "cls tokens of the last 4 blocks, each after the final norm, concatenated (DINO / iBOT ViT-S)",
    "cls_mean": "cls token ‖ mean patch token, after the final norm (DINO / iBOT ViT-B, DINOv2)",
    "block_cls_mean": "cls token ‖ mean patch token of the last block (BEiT's per-layer probe, last layer)",
    "pooled": "the model's own pooled output (CLIP's normed cls, SigLIP's attention pool, EVA-02's fc_norm mean; a "
              "CNN's global average pool of its last stage, ConvNeXt's then through its final norm)",
}
CNN_SUBLAYERS = {"resnet": ("conv1", "bn1", "act1", "conv2", "bn2", "act2", "conv3", "bn3", "downsample"),
                 "convnext": ("dwconv", "norm", "pwconv1", "act", "grn", "pwconv2")}


def cnn_point_shapes(model: ConvNet) -> dict[str, tuple[int, int]]:
    """(positions, channels) of every module a CNN's forward runs at its input size, from a forward on the meta
    device: exact, and free (no weights, no memory); remembered per config and size."""
    return _cnn_point_shapes(json.dumps(dataclasses.asdict(model.cfg)), model.input_size)


@functools.lru_cache(maxsize=64)
def _cnn_point_shapes(cfg_json: str, size: int) -> dict[str, tuple[int, int]]:
    cfg = _cnn_config(json.loads(cfg_json), "CNN config")
    with torch.device("meta"):
        m = CNN_ARCHS[cfg.arch](cfg)
    shapes = {}
    hooks = [mod.register_forward_hook(lambda mod, _i, out, n=n: shapes.__setitem__(n, tuple(as_tokens(mod, out).shape[1:])))
             for n, mod in m.named_modules() if n]
    m.feature_map(torch.empty(1, 3, size, size, device="meta"))
    for h in hooks:
        h.remove()
    return shapes


def cnn_points(model: ConvNet, points) -> list[str] | None:
    """A CNN's points for a keyword, by module path: blocks (every residual block's output), stages, stem,
    sublayers (the modules inside each block), all (stem, then each block's sub-layers and output); None for
    names."""
    subs = lambda b: [f"{b}.{s}" for s in CNN_SUBLAYERS[model.cfg.arch] if getattr(model.get_submodule(b), s, None)
                      is not None]
    table = {"blocks": model.block_names, "stages": model.stage_names, "stem": [model.stem_name],
             "sublayers": [p for b in model.block_names for p in subs(b)],
             "all": [model.stem_name] + [p for b in model.block_names for p in [*subs(b), b]]}
    return table.get("blocks" if points is None else points) if points is None or isinstance(points, str) else None


def resolve_points(model: ViT, points=None) -> list[str]:
    """Point names from a keyword (blocks | sublayers | all; a CNN's also stages | stem), a comma list or a list of
    module names."""
    depth = len(model.blocks)
    if isinstance(model, ConvNet) and (named := cnn_points(model, points)) is not None:
        return named
    if points is None or points == "blocks":
        return [f"blocks.{i}" for i in range(depth)]
    if points == "sublayers":
        return [f"blocks.{i}.{s}" for i in range(depth) for s in SUBLAYERS]
    if points == "all":
        per_block = SUBLAYERS[:4] + ("attn_residual",) + SUBLAYERS[4:]
        return ["embed"] + [p for i in range(depth) for p in [f"blocks.{i}.{s}" for s in per_block] + [f"blocks.{i}"]] \
            + ["norm"]
    names = [p.strip() for p in points.split(",")] if isinstance(points, str) else list(points)
    modules = cnn_point_shapes(model) if isinstance(model, ConvNet) else dict(model.named_modules())
    if isinstance(model, ConvNet) and (pooled := [p for p in names if p in ("norm", "head")]):
        raise UsageError(f"point {pooled[0]}: a CNN's {pooled[0]} acts on the pooled features, not a feature map: use "
                         f"{_opt('tokens')} official for the pooled representation")
    bad = [p for p in names if p not in modules or p == ""]
    if bad:
        eg = f"{model.stem_name}, {model.block_names[0]}, {model.block_names[0]}.{CNN_SUBLAYERS[model.cfg.arch][0]}" \
            if isinstance(model, ConvNet) else "embed, blocks.0, blocks.0.attn.qkv, blocks.0.attn_residual, norm"
        kinds = "blocks | stages | stem | sublayers | all" if isinstance(model, ConvNet) else "blocks | sublayers | all"
        raise UsageError(f"unknown point(s) {', '.join(bad[:3])}: use {kinds} or names like {eg} (depth {depth})")
    twice = sorted({p for p in names if names.count(p) > 1})
    if twice:
        raise UsageError(f"point(s) {', '.join(twice[:3])} named more than once in {_opt('points')}")
    return names


def reduce_tokens(t: torch.Tensor, tokens: str, num_prefix: int, has_cls: bool) -> torch.Tensor:
    """(B, T, C) → all (B,T,C) | flat (B,T·C) | cls (B,C) | mean of patch tokens (B,C) | patch (B,P,C)."""
    if t.ndim == 2:
        return t
    if tokens == "all":
        return t
    if tokens == "flat":
        return t.flatten(1)
    if tokens == "cls":
        if not has_cls:
            raise UsageError("tokens=cls: this model has no cls token (use mean; a CNN's mean is its global average "
                             "pool)")
        return t[:, 0]
    if tokens == "mean":
        return t[:, num_prefix:].mean(1)
    if tokens == "patch":
        return t[:, num_prefix:]
    raise UsageError(f"unknown tokens {tokens!r}: choose from {', '.join(TOKENS)}")


def as_tokens(module: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """A module's output as tokens: a feature map (N, C, H, W), or (N, H, W, C) inside a ConvNeXt block, → (N, H·W,
    C); anything else as it is."""
    if out.ndim != 4:
        return out
    return out.flatten(1, 2) if getattr(module, "channels_last", False) else out.flatten(2).transpose(1, 2)


def eval_representation(model: ViT) -> str:
    """The model's published linear-eval representation: its registry row's, else that of the registered checkpoint
    of its family with as many heads (its width class), else cls after the final norm (mean without cls); a CNN's
    is its pooled output."""
    if isinstance(model, ConvNet):
        return "pooled"
    rows = [REGISTRY[model.source["registry"]]] if model.source.get("registry") in REGISTRY else \
        [r for r in REGISTRY.values() if r["family"] == model.family and r["num_heads"] == model.cfg.num_heads]
    kind = rows[0]["eval_repr"] if rows else "cls_norm"
    return kind if model.cfg.cls_token or kind in ("mean_tokens", "fc_norm_mean", "pooled") else "mean_tokens"


def official_representation(model: ViT, kind: str, blocks: list[torch.Tensor]) -> torch.Tensor:
    """(B, D') representation `kind` (OFFICIAL_REPRESENTATIONS) from the last blocks' outputs (B, T, D), last one
    last."""
    if isinstance(model, ConvNet):
        return model.pool(blocks[-1])
    norm, npre, last = model.norm, model.cfg.num_prefix, blocks[-1]
    if kind == "cls_norm":
        return norm(last)[:, 0]
    if kind == "cls_raw":
        return last[:, 0]
    if kind == "fc_norm_mean":
        m = last[:, npre:].mean(1)
        return model.fc_norm(m) if model.fc_norm is not None else F.layer_norm(m, m.shape[-1:], eps=model.cfg.norm_eps)
    if kind == "mean_tokens":
        return norm(last)[:, npre:].mean(1)
    if kind == "cls4_norm":
        return torch.cat([norm(b)[:, 0] for b in blocks[-4:]], -1)
    if kind == "cls_mean":
        t = norm(last)
        return torch.cat([t[:, 0], t[:, npre:].mean(1)], -1)
    if kind == "block_cls_mean":
        return torch.cat([last[:, 0], last[:, npre:].mean(1)], -1)
    if kind == "pooled":
        return model.pool(model.final_norm(last))
    raise UsageError(f"unknown representation {kind!r}: choose from {', '.join(OFFICIAL_REPRESENTATIONS)}")


def _point_names(model: ViT, points, tokens: str) -> list[str]:
    """The names extract() returns: the resolved points, or the one "official" representation."""
    return ["official"] if tokens == "official" else resolve_points(model, points)


def as_device(device) -> torch.device:
    """torch.device(device) (default: cuda when available), or a one-line error for a name torch does not know or
    a GPU this machine does not have."""
    if not device:
        return default_device()
    if isinstance(device, torch.device):
        return device
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"device {device!r}: features are computed on cpu, cuda, cuda:N or mps")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UsageError(f"device {device} is not available here")
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise UsageError(f"device {device} is not available here ({torch.cuda.device_count()} CUDA devices)")
    return dev


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _autocast(device: torch.device, dtype):
    if dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


def iter_features(model: ViT, batches, points=None, tokens: str = "all", device=None, dtype=None):
    """Yield ({point: (b, ...) float32 tensor on `device`}, labels) per batch, one forward pass each. tokens
    "official": one point, "official", the model's published representation (eval_representation)."""
    device = as_device(device)
    dtype = _parse_dtype(dtype)
    official = eval_representation(model) if tokens == "official" else None
    names = _raw_points(model, points, tokens)
    modules = dict(model.named_modules())
    store = {}
    npre, has_cls = model.cfg.num_prefix, model.cfg.cls_token

    def hook(name):
        def fn(m, _inp, out):
            out = as_tokens(m, out)
            store[name] = out.float() if official else reduce_tokens(out, tokens, npre, has_cls).float()
        return fn

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        with _placed(model, device):
            for batch in batches:
                x, y = batch if isinstance(batch, (tuple, list)) else (batch, None)
                store.clear()
                if device.type == "cuda" and x.device.type == "cpu":
                    x = x.pin_memory()   # page-locked: the copy below overlaps with the GPU's work
                with torch.no_grad(), _autocast(device, dtype):  # not held across `yield`: the caller's mode stays
                    model.forward_features(x.to(device, non_blocking=True))
                    out = {"official": official_representation(model, official, [store[n] for n in names]).float()} \
                        if official else {n: store[n] for n in names}
                yield out, y
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _placed(model: nn.Module, device: torch.device, train: bool = False):
    """The model on `device` in eval (or train) mode for the duration; then back on the caller's device and in the
    caller's mode."""
    p = next(model.parameters(), None)
    home, mode = (p.device if p is not None else device), model.training
    model.to(device).train(train)
    try:
        yield model
    finally:
        if p is not None and next(model.parameters()).device != home:
            model.to(home)
        model.train(mode)


def _parse_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise UsageError(f"unknown dtype {dtype!r}: choose float32, bfloat16 or float16")
    return table[dtype]


def _check_finite(named):
    """A NaN or Inf feature is a user error naming the layer (bad weights or inputs), never a 'constant layer'."""
    for name, v in named:      # a NaN or Inf makes the sum so (one fast pass); only a sum that is not finite needs
        v = torch.as_tensor(v)   # the elementwise check (finite values can overflow a sum)
        if v.is_floating_point() and not bool(torch.isfinite(v.sum())) and not bool(torch.isfinite(v).all()):
            raise UsageError(f"layer {name} has NaN or Inf features: check the checkpoint's weights and the images")


def extract(model: ViT, images, points=None, tokens: str = "all", batch_size: int = 64, device=None, dtype=None,
            progress: bool = False, group=None) -> dict[str, torch.Tensor]:
    """Features at every requested point for all images, concatenated on the CPU (float32).
    images: a preprocessed tensor (n,3,H,W), an ImageSet (preprocessed per model), or an iterable of batches.
    Under torch.distributed each process extracts whole batches i ≡ rank (mod world) and all gather them."""
    if isinstance(images, ImageSet):
        return extract_many([model], images, [points], tokens, batch_size, device, dtype, progress, group)[0]
    if isinstance(images, torch.Tensor):
        batches, total = images.split(batch_size), len(images)
    else:
        batches, total = images, None
    parts = []
    bar = Progress(total, "extract", enabled=progress and _rank_world(group)[0] == 0, unit="img")
    for feats, _ in iter_features(model, shard_batches(batches, group), points, tokens, device, dtype):
        parts.append({k: v.cpu() for k, v in feats.items()})
        bar.update(len(next(iter(feats.values()))) * _rank_world(group)[1])
    bar.close()
    parts = gather_batches(parts, group)
    if not parts:
        raise UsageError("no images to extract features from")
    out = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    _check_finite((f"{model.source.get('spec', 'model')} {k}", v) for k, v in out.items())
    return out


class FeatureSession:
    """What one command has extracted, held in memory: per model (the very object, its parameters and buffers as
    they are now) and image set of origin (its content's fingerprint), every point's tokens (n, T, D) by the image's
    row there, so that a later float32 request for those images or a subset of them, those points or fewer, and any
    token reduction or the official representation is read here, not computed again (a copy: callers may change
    it). A model's first extraction also takes the points `plan` names for it, where they fit `budget` bytes.
    Changes a model's parameters' version counters do not see (writes through `.data`, swapped parameter-free
    modules) are not detected: make them outside a session."""

    def __init__(self, budget: int):
        self.budget, self.held, self.entries, self.plans = budget, 0, {}, {}

    @staticmethod
    def key(model, images: ImageSet, dtype) -> tuple:
        tensors = itertools.chain(model.parameters(), model.buffers())
        return (id(model), tuple((t.data_ptr(), t._version) for t in tensors), model.input_size,
                json.dumps(model.preprocess, sort_keys=True, default=str), str(_parse_dtype(dtype)),
                images.origin_key())

    def plan(self, model, points):
        self.plans[id(model)] = list(resolve_points(model, points))

    def holds(self, model, images: ImageSet, points, tokens: str, dtype) -> dict | None:
        """The entry that holds every row of `images` at every point the request needs, or None."""
        entry = self.entries.get(self.key(model, images, dtype))
        names = _raw_points(model, points, tokens)
        rows = images.rows or range(len(images))
        if entry is None or entry["model"]() is not model or not all(n in entry["points"] for n in names) or \
                not all(r in entry["index"] or r in entry["unreadable"] for r in rows):
            return None
        return entry

    def lookup(self, model, images: ImageSet, points, tokens: str, dtype) -> dict | None:
        entry = self.holds(model, images, points, tokens, dtype)
        if entry is None:
            return None
        names = _raw_points(model, points, tokens)
        rows = images.rows or range(len(images))
        for i, r in enumerate(rows):   # what the decoders found, said again for this set
            if r in entry["unreadable"]:
                images._kept(i, None, entry["unreadable"][r])
        take = torch.tensor([entry["index"][r] for r in rows if r in entry["index"]], dtype=torch.long)
        return {k: _own(v) for k, v in _from_raw(model, {n: entry["points"][n][take] for n in names}, points,
                                                  tokens).items()}   # indexing copied the tokens

    def wanted(self, model, images: ImageSet, points, tokens: str, reserved: int = 0) -> list[str] | None:
        """The points a miss extracts as tokens: the request's and, where all fit the budget (less what this
        call already reserved for other models), the plan's; None where not even the request's fit (it is
        extracted as asked, and not kept)."""
        names = _raw_points(model, points, tokens)
        more = names + [p for p in self.plans.get(id(model), []) if p not in names]
        fits = lambda pts: feature_bytes(model, pts, "all", len(images)) <= self.budget - self.held - reserved
        return more if fits(more) else names if fits(names) else None

    def store(self, model, images: ImageSet, raw: dict, dtype):
        """Keep `raw`, the tokens extract returned for `images` (the tensors themselves: the caller hands them over);
        beside what the entry for the same model, set of origin and points holds already (another subset: train
        after validation), else in its place."""
        key = self.key(model, images, dtype)
        rows = images.rows or range(len(images))
        read = [r for i, r in enumerate(rows) if i not in images.unreadable]   # the rows extract returned
        old = self.entries.pop(key, None)
        self.held -= old["size"] if old else 0
        if old and old["model"]() is model and set(old["points"]) == set(raw):
            new = [k for k, r in enumerate(read) if r not in old["index"]]
            raw = {n: torch.cat([old["points"][n], raw[n][new]]) for n in raw}
            read = list(old["index"]) + [read[k] for k in new]   # the held rows, in order, then the new ones
            unreadable = {**old["unreadable"], **{rows[i]: "unreadable" for i in images.unreadable}}
        else:   # taken over: the caller keeps no reference to these tensors
            unreadable = {rows[i]: "unreadable" for i in images.unreadable}
        size = sum(v.numel() * v.element_size() for v in raw.values())
        if size > self.budget - self.held:
            return
        self.entries[key] = dict(model=weakref.ref(model), index={r: k for k, r in enumerate(read)}, size=size,
                                 points=raw, unreadable=unreadable)
        self.held += size


def _own(t: torch.Tensor) -> torch.Tensor:
    """t, or a copy where t is a view into a larger tensor (a cls token of all tokens): the rest is then let go."""
    return t.clone() if t._base is not None and t._base.numel() > t.numel() else t


_SESSION: contextvars.ContextVar = contextvars.ContextVar("ssl_repsim_feature_session", default=None)


@contextlib.contextmanager
def feature_session(budget: int | None = None):
    """Within the block, extract_many reads what an earlier call extracted (FeatureSession; default budget: a
    quarter of memory_budget()) and ImageSet.decoded what an earlier pass decoded (DecodedImages, a quarter of
    that)."""
    budget = memory_budget() // 4 if budget is None else budget
    token, decoded = _SESSION.set(FeatureSession(budget)), _DECODED.set(DecodedImages(budget // 4))
    try:
        yield _SESSION.get()
    finally:
        _SESSION.reset(token)
        _DECODED.reset(decoded)


def _raw_points(model, points, tokens: str) -> list[str]:
    """The points whose tokens a request needs: its points, or for `official` the blocks the representation reads."""
    if tokens != "official":
        return list(resolve_points(model, points))
    if isinstance(model, ConvNet):
        return model.block_names[-1:]
    depth = len(model.blocks)
    return [f"blocks.{i}" for i in range(max(0, depth - 4), depth)]


def _from_raw(model, raw: dict, points, tokens: str) -> dict:
    """A request's features from the tokens its points computed (as iter_features reduces them)."""
    if tokens != "official":
        npre, has_cls = model.cfg.num_prefix, model.cfg.cls_token
        return {n: reduce_tokens(v, tokens, npre, has_cls) for n, v in raw.items()}
    dev = next(model.parameters()).device
    with torch.no_grad():
        rep = official_representation(model, eval_representation(model), [v.to(dev) for v in raw.values()])
    return {"official": rep.float().cpu()}


def extract_many(models, images: ImageSet, points_list, tokens: str = "all", batch_size: int = 64, device=None,
                 dtype=None, progress: bool = False, group=None) -> list[dict[str, torch.Tensor]]:
    """extract() for several models in one pass over the images: each image is decoded once and fed, preprocessed
    for each, to every model. Within a feature_session, what an earlier call extracted is read, not computed."""
    session = _SESSION.get()
    if session is None or _dist_active(group) or _parse_dtype(dtype) not in (None, torch.float32):
        return _extract_many(models, images, points_list, tokens, batch_size, device, dtype, progress, group)
    out = [session.lookup(m, images, pts, tokens, dtype) for m, pts in zip(models, points_list, strict=True)]
    wanted, reserved = {}, 0
    for k in (k for k, f in enumerate(out) if f is None):   # the budget shared by this call's models
        wanted[k] = session.wanted(models[k], images, points_list[k], tokens, reserved)
        reserved += feature_bytes(models[k], wanted[k], "all", len(images)) if wanted[k] else 0
    kept, direct = [k for k, w in wanted.items() if w is not None], [k for k, w in wanted.items() if w is None]
    if direct:   # too large to keep: as asked
        for k, f in zip(direct, _extract_many([models[k] for k in direct], images, [points_list[k] for k in direct],
                                              tokens, batch_size, device, dtype, progress, group), strict=True):
            out[k] = f
    if kept:
        raw = _extract_many([models[k] for k in kept], images, [wanted[k] for k in kept], "all", batch_size, device,
                            dtype, progress, group)
        for k, r in zip(kept, raw, strict=True):
            names = _raw_points(models[k], points_list[k], tokens)
            out[k] = {n: v.clone() for n, v in _from_raw(models[k], {n: r[n] for n in names}, points_list[k],
                                                           tokens).items()}   # the session keeps `r` itself
            session.store(models[k], images, r, dtype)
    return out


def _extract_many(models, images: ImageSet, points_list, tokens: str = "all", batch_size: int = 64, device=None,
                  dtype=None, progress: bool = False, group=None) -> list[dict[str, torch.Tensor]]:
    streams, firsts = per_model_batches(models, images, batch_size, group)   # rows gathered in batch order
    gens = [iter_features(m, st, pts, tokens, device, dtype) for m, st, pts in zip(models, streams, points_list,
                                                                                    strict=True)]
    parts = [[] for _ in models]
    rank, world = _rank_world(group)
    bar = Progress(len(images), "extract" + (f" ({len(models)} models)" if len(models) > 1 else ""),
                   enabled=progress and rank == 0, unit="img")
    for outs in zip(*gens, strict=True):
        for k, (feats, _) in enumerate(outs):
            parts[k].append({key: v.cpu() for key, v in feats.items()})
        bar.update(len(next(iter(outs[0][0].values()))) * world)
    bar.close()
    if _dist_active(group):   # every process learns which images the others could not read
        import torch.distributed as dist
        sets = [None] * world
        dist.all_gather_object(sets, sorted(images.unreadable), group=group)
        images.unreadable.update(i for st in sets for i in st)
    out = []
    for p in parts:
        p = gather_batches(p, group, firsts)
        if not p:
            raise UsageError(f"no images to extract features from ({len(images.unreadable)} of {len(images)} in "
                             f"{images.name} unreadable)")
        out.append({k: torch.cat([b[k] for b in p]) for k in p[0]})
    for m, f in zip(models, out, strict=True):   # no command writes, probes or compares NaN features
        _check_finite((f"{m.source.get('spec', 'model')} {k}", v) for k, v in f.items())
    return out


def sample_ids(images: ImageSet) -> list[str]:
    """Stable ids of the images that were read: the path within the folder and the first 16 hex digits of the file's
    sha256 (train/x/a.jpg and val/x/a.jpg are two images unless their bytes are the same; a copy of the folder, under
    any name, holds the same ones), or source#row for tensor data (the file, or the synthetic set with its size and
    seed, and the row there)."""
    keep = [i for i in range(len(images)) if i not in images.unreadable]
    if isinstance(images.items, torch.Tensor):
        rows = images.rows or range(len(images))
        return [f"{Path(images.name).name}#{rows[i]}" for i in keep]
    root = Path(images.name)
    rel = lambda p: Path(p).relative_to(root).as_posix() if root.is_dir() and Path(p).is_relative_to(root) else str(p)
    return [f"{rel(images.items[i])}#{file_sha256(images.items[i])[:16]}" for i in keep]


FEATURES_FORMAT = "ssl_repsim-features"


def save_features(path, feats: dict, ids: list[str], labels=None, meta: dict | None = None) -> Path:
    """A feature file: safetensors of {point: (n, d)} or, keeping the token axis, (n, T, d) (and `labels`), the
    sample ids, point order and `meta` in its metadata; written whole or not at all."""
    from safetensors.torch import save as st_save
    bad = [k for k, v in feats.items() if v.ndim not in (2, 3) or len(v) != len(ids)]
    if bad:
        raise UsageError(f"features {bad[0]!r}: {tuple(feats[bad[0]].shape)} is not one row of (n, d) or (n, T, d) "
                         f"per sample id ({len(ids)})")
    tensors = {k: v.detach().float().contiguous() for k, v in feats.items()}
    if labels is not None:
        tensors["labels"] = torch.as_tensor(labels).long().contiguous()
    doc = dict(format=FEATURES_FORMAT, sample_ids=list(ids), points=list(feats), meta=meta or {}, version=__version__)
    return atomic_write(path, st_save(tensors, metadata={"ssl_repsim": json.dumps(doc, default=_jsonable)}))


def read_features(path) -> tuple[dict[str, torch.Tensor], list[str], dict]:
    """({point: (n, d)}, sample ids, metadata) of a feature file: ours, or any .safetensors / .npz / .pt holding
    {point: (n, d)} and `sample_ids` (strings or integers); one line for anything else. A point stored with its
    token axis (n, T, d) is read flattened, (n, T·d): the flat tokens."""
    path = Path(path)
    if path.suffix == ".npz":
        _check_archive(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                raw = {k: z[k] for k in z.files}
        except Exception as e:  # noqa: BLE001 - a damaged archive, or object arrays (which would need pickle)
            raise UsageError(f"{path}: not a readable .npz of plain arrays ({_one_line(e)[:120]})") from None
        meta = {}
    elif path.suffix == ".safetensors" or path.suffix in (".pt", ".pth"):
        raw, meta = read_checkpoint(path)
        meta = parse_json(meta["ssl_repsim"], path) if isinstance(meta.get("ssl_repsim"), str) else meta
    else:
        raise UsageError(f"{path}: feature files are .safetensors, .npz or .pt")
    ids = meta.get("sample_ids") if isinstance(meta, dict) and "sample_ids" in meta else raw.get("sample_ids")
    for k in ("sample_ids", "labels"):
        raw.pop(k, None)
    ids = _ids_list(ids, path)
    order = meta.get("points") if isinstance(meta.get("points"), list) else [k for k, v in raw.items()
                                                                             if _floating(v)]
    ignored = sorted(set(raw) - set(order))
    if ignored:
        log.info(f"{path.name}: {', '.join(ignored)} read as other data, not features (not floating point)")
    feats = {}
    for k in order:
        v = raw.get(k)
        v = torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
        v = v.flatten(1) if isinstance(v, torch.Tensor) and v.ndim == 3 else v
        if not isinstance(v, torch.Tensor) or v.ndim != 2 or len(v) != len(ids) or not v.is_floating_point():
            raise UsageError(f"{path}: {k!r} is not an (n, d) float array with one row per sample id ({len(ids)})")
        feats[k] = v.float()
    if not feats or len(set(ids)) != len(ids):
        raise UsageError(f"{path}: {'no feature arrays' if not feats else 'repeated sample ids'}")
    return feats, ids, meta.get("meta", {}) if isinstance(meta.get("meta"), dict) else {}


def _floating(v) -> bool:
    return v.is_floating_point() if isinstance(v, torch.Tensor) else isinstance(v, np.ndarray) and v.dtype.kind == "f"


def _ids_list(ids, path) -> list[str]:
    """Sample ids as text: a list, an array of strings / bytes / integers, or a JSON list in metadata."""
    if isinstance(ids, str):
        with contextlib.suppress(UsageError):
            ids = parse_json(ids, path)
    if ids is None or isinstance(ids, str):
        raise UsageError(f"{path}: a feature file needs sample_ids (one per row) beside its {{point: (n, d)}} arrays")
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]


def is_feature_file(spec) -> bool:
    """Whether a model argument names a feature file rather than a checkpoint: an .npz, ours, or a safetensors /
    torch file holding sample_ids."""
    path = Path(str(spec))
    if not path.is_file() or path.suffix not in (".npz", ".safetensors", ".pt", ".pth"):
        return False
    if path.suffix == ".npz":
        return True
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        with contextlib.suppress(Exception), safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            return FEATURES_FORMAT in meta.get("ssl_repsim", "") or "sample_ids" in meta or \
                "sample_ids" in f.keys()  # noqa: SIM118 - a safe_open handle has keys(), not __contains__
        return False
    obj, _ = read_checkpoint(path)
    return "sample_ids" in obj


def aligned_features(sets: list[tuple[str, dict, list[str]]], align: bool) -> tuple[list[dict], list[str]]:
    """The feature sets on one list of samples: identical ids in identical order, or with align=True the ids
    they share, in the first set's order; a one-line error naming the first mismatch otherwise."""
    (name0, _, ids0), *rest = sets
    if not align:
        for name, _, ids in rest:
            if ids != ids0:
                k = next((i for i, (a, b) in enumerate(zip(ids0, ids, strict=False)) if a != b),
                         min(len(ids0), len(ids)))
                first = f"row {k}: {ids0[k] if k < len(ids0) else '(none)'!r} vs {ids[k] if k < len(ids) else '(none)'!r}"
                raise UsageError(f"{name0} and {name} hold different samples ({len(ids0)} vs {len(ids)} rows; first "
                                 f"difference at {first}): pass {_opt('align')} to match them by id")
        return [f for _, f, _ in sets], ids0
    common = set(ids0).intersection(*(set(ids) for _, _, ids in rest))
    keep = [i for i in ids0 if i in common]
    if len(keep) < 4:
        raise UsageError(f"{_opt('align')}: only {len(keep)} sample ids are common to all inputs")
    dropped = sum(len(ids) for _, _, ids in sets) - len(keep) * len(sets)
    if dropped:
        log.warning(f"notice: {_opt('align')}: {dropped} row(s) whose id is not in every input left out; {len(keep)} kept")
    out = []
    for _, f, ids in sets:
        where = {i: r for r, i in enumerate(ids)}
        rows = torch.tensor([where[i] for i in keep])
        out.append({k: v[rows] for k, v in f.items()})
    return out, keep


def images_fingerprint(images: ImageSet) -> str:
    """A digest of exactly which images (and labels) an ImageSet holds: each file's path, size and modification
    time (an edited, replaced or newly readable file changes it), or the tensor's bytes."""
    h = hashlib.sha256()
    if isinstance(images.items, torch.Tensor):
        h.update(str((tuple(images.items.shape), images.items.dtype)).encode())
        h.update(_tensor_sha256(images.items).encode())     # any dtype (bfloat16 has no numpy view)
    else:
        for p in images.items:   # file names as bytes: a name that is not UTF-8 is still a name
            try:
                st = os.stat(p)
                h.update(os.fsencode(p) + f"\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(os.fsencode(p) + b"\0missing\n")
    if images.labels is not None:
        h.update(images.labels.numpy().tobytes())
    return h.hexdigest()


def _state_sha256(model: nn.Module) -> str:
    """sha256 of a model's state dict (names and raw bytes): the weights it computes with, whatever files they
    were read from, however converted."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def features_cache_key(model: ViT, images: ImageSet, points, tokens: str, dtype=None) -> str:
    """The model as it computes (its weights and its resolved ViTConfig: heads, activation, family switches), the
    images, points, tokens, preprocessing and dtype: a changed architecture or file never reuses features."""
    key = json.dumps([_state_sha256(model), dataclasses.asdict(model.cfg), images_fingerprint(images), list(points),
                      tokens, model.input_size, model.preprocess, str(dtype), __version__], default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def cached_extract(model: ViT, images: ImageSet, points, tokens, *, cache_dir=None, batch_size=64, device=None,
                   dtype=None, progress=False, group=None) -> dict[str, torch.Tensor]:
    """extract(), saved to / loaded from a safetensors file keyed by the checkpoint's hash, the exact images,
    points, tokens, preprocessing and dtype."""
    return cached_extract_many([model], images, [points], tokens, cache_dir=cache_dir, batch_size=batch_size,
                               device=device, dtype=dtype, progress=progress, group=group)[0]


def cached_extract_many(models, images: ImageSet, points_list, tokens, *, cache_dir=None, batch_size=64, device=None,
                        dtype=None, progress=False, group=None) -> list[dict[str, torch.Tensor]]:
    """cached_extract for several models: the ones the cache holds are read, the others extracted in one pass
    (each image decoded once) and cached."""
    points_list = [pts if tokens != "official" else None for pts in points_list]
    paths = [_cache_path(m, images, pts, tokens, cache_dir, dtype) if cache_dir else None   # each key hashed once
             for m, pts in zip(models, points_list, strict=True)]
    out = [_cache_lookup(path, _point_names(m, pts, tokens)) if path else None
           for path, m, pts in zip(paths, models, points_list, strict=True)]
    todo = [k for k, f in enumerate(out) if f is None]
    if todo:
        feats = extract_many([models[k] for k in todo], images, [points_list[k] for k in todo], tokens, batch_size,
                             device, dtype, progress, group)
        for k, f in zip(todo, feats, strict=True):
            out[k] = f
            if cache_dir and not images.unreadable:   # rows depend on which files read: one set for every model
                _cache_store(paths[k], images, f)
    return out


def _cache_path(model: ViT, images: ImageSet, points, tokens, cache_dir, dtype) -> Path:
    key = features_cache_key(model, images, _point_names(model, points, tokens), tokens, dtype)
    return Path(cache_dir) / f"features-{key}.safetensors"


def _cache_lookup(path: Path, names: list[str]):
    if not path.is_file():
        return None
    cached = _read_cached_features(path, names)
    if cached is None:
        log.warning(f"notice: the feature cache {path.name} is damaged or incomplete: recomputing it")
    return cached


def _cache_store(path: Path, images: ImageSet, feats: dict):
    from safetensors.torch import save as st_save
    ids = list(range(len(images))) if isinstance(images.items, torch.Tensor) else \
        [os.fsencode(p).decode("utf-8", "backslashreplace") for p in images.items]
    meta = {"rows": str(len(ids)), "sample_ids": json.dumps(ids),   # the rows' images: tensor index, or path
            "sha256": json.dumps({k: _tensor_sha256(v) for k, v in feats.items()})}
    try:
        atomic_write(path, st_save({k: v.contiguous() for k, v in feats.items()}, metadata=meta))
    except UsageError as e:      # a cache that cannot be written costs speed, not the run
        log.warning(f"notice: features not cached ({_one_line(e)})")


def _tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _read_cached_features(path: Path, names: list[str]) -> dict[str, torch.Tensor] | None:
    """{name: tensor} from a cache file whose every tensor matches its recorded sha256 and row count, else None: a
    damaged or foreign file is never reused."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            sums, rows = json.loads(meta["sha256"]), int(meta["rows"])
            if len(json.loads(meta["sample_ids"])) != rows:
                return None
            feats = {k: f.get_tensor(k) for k in names}
    except Exception:  # noqa: BLE001 - unreadable, truncated, missing names or metadata: not reusable
        return None
    if any(len(v) != rows or sums.get(k) != _tensor_sha256(v) for k, v in feats.items()):
        return None
    return feats


# ======================================================================================================================
# 6. Similarity: Grams, centring, HSIC estimators, CKA maps, minibatch accumulator, summaries
# ======================================================================================================================

GRAM_BUDGET_BYTES = 4 << 30   # Grams held at once by cka_matrix; beyond it the map is computed in groups
CHUNK = 1 << 18               # elements per float32 product before accumulating in float64 (error ≈ √len · ε)


def gram_linear(x: torch.Tensor) -> torch.Tensor:
    """K = X Xᵀ."""
    return x @ x.T


def gram_rbf(x: torch.Tensor, threshold: float = 1.0) -> torch.Tensor:
    """K_ij = exp(−‖x_i − x_j‖² / (2 t² · median_kl ‖x_k − x_l‖²)) (Kornblith et al. 2019, median over all pairs)."""
    _check_rbf_threshold(threshold)
    x = x.double()
    sq = (x * x).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp_min_(0)
    return _rbf_of_distances(d2, threshold)


def _rbf_of_distances(d2: torch.Tensor, threshold: float) -> torch.Tensor:
    """exp(−d² / (2 t² · median d²)), the median over all pairs (the diagonal's zeros included, as Kornblith et al.)."""
    flat = d2.flatten()
    m = flat.numel()
    lo = flat.kthvalue((m + 1) // 2).values
    med = lo if m % 2 else (lo + flat.kthvalue(m // 2 + 1).values) / 2
    return torch.exp(-d2 / (2 * threshold ** 2 * med))


def _check_rbf_threshold(threshold):
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold > 0):
        raise UsageError(f"the RBF threshold must be a positive number, got {threshold}")


def center_gram(k: torch.Tensor, unbiased: bool = False, dtype=torch.float64, inplace: bool = False) -> torch.Tensor:
    """H K H (biased), or the U-centred Gram of Székely & Rizzo 2014 (zero diagonal), whose inner product over
    n(n−3) is the unbiased HSIC of Song et al. 2012. Computed in `dtype` (float64 unless the caller's Gram is
    already well conditioned, e.g. built from centred features); `inplace` reuses k when it has that dtype."""
    k = k if inplace and k.dtype == dtype else k.to(dtype=dtype, copy=True)
    n = k.shape[0]
    if not unbiased:
        return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()
    k.fill_diagonal_(0)
    means = k.sum(1).double() / (n - 2)   # row sums (K is symmetric): contiguous, cascade-summed
    means -= means.sum() / (2 * (n - 1))
    means = means.to(dtype)
    k -= means[:, None]
    k -= means[None, :]
    return k.fill_diagonal_(0)


def _flat64(x) -> torch.Tensor:
    x = torch.as_tensor(x)
    return x.reshape(x.shape[0], -1).double()


def cka(x, y, kernel: str = "linear", debiased: bool = False, rbf_threshold: float = 1.0) -> float:
    """CKA(K, L) = ⟨K_c, L_c⟩_F / (‖K_c‖_F ‖L_c‖_F) (Kornblith et al. 2019); float64 throughout."""
    x, y = _flat64(x), _flat64(y)
    if x.shape[0] != y.shape[0]:
        raise UsageError(f"cka: {x.shape[0]} vs {y.shape[0]} samples")
    _check_n(x.shape[0], debiased)
    if kernel == "linear" and not debiased and x.shape[0] > max(x.shape[1], y.shape[1]):
        xc, yc = x - x.mean(0), y - y.mean(0)  # feature form: ‖YᵀX‖² / (‖XᵀX‖ ‖YᵀY‖)
        return float((yc.T @ xc).square().sum() / ((xc.T @ xc).norm() * (yc.T @ yc).norm()))
    kc, lc = (center_gram(_gram(v, kernel, rbf_threshold), debiased) for v in (x, y))
    return float((kc * lc).sum() / (kc.norm() * lc.norm()))


def _gram(x, kernel, threshold):
    if kernel == "linear":
        return gram_linear(x)
    if kernel == "rbf":
        return gram_rbf(x, threshold)
    raise UsageError(f"unknown kernel {kernel!r}: choose linear or rbf")


def _check_n(n, debiased):
    need = 4 if debiased else 2
    if n < need:
        raise UsageError(f"{'debiased ' if debiased else ''}CKA needs at least {need} samples, got {n}")


def _named(xs) -> tuple[list[str], list[torch.Tensor]]:
    if isinstance(xs, dict):
        return list(xs), list(xs.values())
    xs = list(xs)
    return [str(i) for i in range(len(xs))], xs


def _dot64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ bᵀ for (m, N) × (k, N) float32, summed over N in chunks, accumulated in float64."""
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
    step = max(1, CHUNK // max(a.shape[0], b.shape[0], 1))
    for s in range(0, a.shape[1], step):
        out += (a[:, s:s + step] @ b[:, s:s + step].T).double()
    return out


def _centred32(x) -> torch.Tensor:
    """x − mean(x) with the mean accumulated in float64: subtracting its float32 rounding is exact wherever x lies
    within a factor 2 of it (Sterbenz), so a large shared offset leaves only a constant shift ≤ ulp(mean), which
    the Gram of the result does not see; a constant column becomes exactly 0."""
    x = torch.as_tensor(x).reshape(x.shape[0], -1)
    if x.dtype == torch.float64:
        return x - x.mean(0)
    return x.float() - x.mean(0, dtype=torch.float64).float()


def _unit_scaled(xc: torch.Tensor) -> torch.Tensor:
    """xc divided by the power of two nearest its largest magnitude: exact, leaves CKA unchanged (each layer's
    scale cancels) and keeps float32 Gram products of Grams far from overflow whatever the features' magnitude."""
    top = float(xc.abs().max()) if xc.numel() else 0.0
    return xc if top == 0.0 or not math.isfinite(top) else xc * 2.0 ** -math.floor(math.log2(top))


def _feature_products(xs, ys) -> torch.Tensor:
    """‖X_aᵀ Y_b‖²_F for all pairs of centred features, products in float32 over row chunks of n, summed in float64."""
    out = torch.zeros(len(xs), len(ys), dtype=torch.float64, device=xs[0].device)
    yall = torch.cat(ys, 1)
    widths = [y.shape[1] for y in ys]
    n = yall.shape[0]
    rows = 2048  # float32 products over 2048 samples at a time, summed in float64
    for i, x in enumerate(xs):
        acc = torch.zeros(x.shape[1], yall.shape[1], dtype=torch.float64, device=x.device)
        for s in range(0, n, rows):
            acc += (x[s:s + rows].T @ yall[s:s + rows]).double()
        out[i] = torch.stack([blk.square().sum() for blk in acc.split(widths, 1)])
    return out


def cka_form_flops(n: int, dims_a: list[int], dims_b: list[int]) -> tuple[int, int]:
    """FLOPs of an all-pairs linear CKA map in the Gram form, 2n²(Σd_a + Σd_b) + 2·L_a·L_b·n², and in the feature
    form, 2n·Σd_a·Σd_b + 2n(Σd_a² + Σd_b²) (the self-terms ‖X_cᵀX_c‖)."""
    gram = 2 * n * n * (sum(dims_a) + sum(dims_b)) + 2 * len(dims_a) * len(dims_b) * n * n
    feature = 2 * n * sum(dims_a) * sum(dims_b) + 2 * n * (sum(d * d for d in dims_a) + sum(d * d for d in dims_b))
    return gram, feature


def cka_matrix(xs, ys, kernel: str = "linear", debiased: bool = False, rbf_threshold: float = 1.0) -> torch.Tensor:
    """CKA between every layer of xs and every layer of ys, (len(xs), len(ys)) float64.
    Linear CKA (biased or debiased) takes the Gram form (centred Grams, 2n²d each, then n² per pair) or the
    feature form (‖X_cᵀY_c‖², 2n·d_a·d_b per pair, plus O(n) terms for the U-statistic), whichever costs fewer
    FLOPs; RBF uses Grams. A constant layer gives NaN entries and a warning naming it."""
    na, xs = _named(xs)
    nb, ys = _named(ys)
    if not xs or not ys:
        raise UsageError("cka_matrix needs at least one layer on each side")
    n = xs[0].shape[0]
    if any(v.shape[0] != n for v in xs + ys):
        raise UsageError("cka_matrix: every layer must hold the same samples (same first dimension)")
    _check_n(n, debiased)
    _check_finite(zip(na + nb, xs + ys, strict=True))
    da, db = [x[0].numel() for x in xs], [y[0].numel() for y in ys]
    gram_flops, feature_flops = cka_form_flops(n, da, db)
    if kernel == "linear" and feature_flops < gram_flops and max(da) * sum(db) * 8 <= GRAM_BUDGET_BYTES:
        xy, xx, yy = _feature_form_hsic(xs, ys, debiased)
    else:
        xy, xx, yy = _gram_form_hsic(xs, ys, kernel, debiased, rbf_threshold)
    return _cka_from_hsic(xy, xx, yy, na, nb)


def _cka_from_hsic(xy: torch.Tensor, xx: torch.Tensor, yy: torch.Tensor, names_a, names_b) -> torch.Tensor:
    """CKA = HSIC(K, L) / √(HSIC(K, K) HSIC(L, L)) from the (scaled) HSIC sums of all pairs. A layer constant over
    the samples has X_c = 0 exactly (its float64 mean is exact), so a zero self-term: its entries are NaN, with a
    warning naming it (NaN self-terms too: an RBF bandwidth of 0)."""
    const_a, const_b = ~(xx > 0), ~(yy > 0)
    for name, c in list(zip(names_a, const_a.tolist(), strict=True)) + list(zip(names_b, const_b.tolist(),
                                                                                   strict=True)):
        if c:
            warnings.warn(f"layer {name} is constant over the samples: its CKA entries are NaN", stacklevel=3)
    out = xy / (xx.sqrt()[:, None] * yy.sqrt()[None, :])
    out[const_a] = float("nan")
    out[:, const_b] = float("nan")
    return out.cpu()


def _feature_form_hsic(xs, ys, debiased: bool):
    """n²-scaled HSIC sums (all pairs, and each side's self-terms) from centred features: ‖X_cᵀY_c‖²_F, or for the
    U-statistic Song et al.'s HSIC₁ from features (for centred X, K̃1 = −a with a_i = ‖x_i‖², K̃ = K − diag K)."""
    xc, yc = [_unit_scaled(_centred32(x)) for x in xs], [_unit_scaled(_centred32(y)) for y in ys]
    xy = _feature_products(xc, yc)
    xx = torch.stack([_feature_products([x], [x])[0, 0] for x in xc])
    yy = torch.stack([_feature_products([y], [y])[0, 0] for y in yc])
    if not debiased:
        return xy, xx, yy
    n = xc[0].shape[0]
    a = torch.stack([x.double().square().sum(1) for x in xc])
    b = torch.stack([y.double().square().sum(1) for y in yc])

    def u_stat(p, u, v):  # n(n−3)·HSIC₁ = tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1/((n−1)(n−2)) − 2·1ᵀK̃L̃1/(n−2)
        return p - (u @ v.T) * (1 + 2 / (n - 2)) + torch.outer(u.sum(1), v.sum(1)) / ((n - 1) * (n - 2))
    return (u_stat(xy, a, b), torch.diagonal(u_stat(torch.diag(xx), a, a)).clone(),
            torch.diagonal(u_stat(torch.diag(yy), b, b)).clone())


def _centred_grams(vs, kernel: str, debiased: bool, threshold: float) -> torch.Tensor:
    """(len(vs), n²) centred (or U-centred) Grams, float32 unless the features are float64 (linear: Grams of
    float64-centred features, HKH = X_c X_cᵀ)."""
    n = vs[0].shape[0]
    dt = torch.float64 if vs[0].dtype == torch.float64 else torch.float32
    out = torch.empty(len(vs), n * n, device=vs[0].device, dtype=dt)
    for i, v in enumerate(vs):
        if kernel == "linear":
            xc = _unit_scaled(_centred32(v))
            torch.mm(xc, xc.T, out=out[i].view(n, n))
            if debiased:
                center_gram(out[i].view(n, n), True, dt, inplace=True)
        else:
            out[i] = center_gram(_gram(v.reshape(n, -1), kernel, threshold), debiased).flatten()
    return out


def _gram_form_hsic(xs, ys, kernel: str, debiased: bool, threshold: float):
    """HSIC sums ⟨K_c, L_c⟩ of all pairs and self-terms, with the A and B Grams in groups that fit the memory
    budget; each group pair is one float32 matmul summed in float64."""
    n = xs[0].shape[0]
    per_group = max(2, GRAM_BUDGET_BYTES // (4 * n * n))
    gb = max(1, min(len(ys), per_group // 2))
    ga = max(1, min(len(xs), per_group - gb))
    dev = xs[0].device
    xy = torch.zeros(len(xs), len(ys), dtype=torch.float64, device=dev)
    xx = torch.zeros(len(xs), dtype=torch.float64, device=dev)
    yy = torch.zeros(len(ys), dtype=torch.float64, device=dev)
    for b0 in range(0, len(ys), gb):
        gy = _centred_grams(ys[b0:b0 + gb], kernel, debiased, threshold)
        yy[b0:b0 + gb] = torch.stack([_dot64(g[None], g[None])[0, 0] for g in gy])
        for a0 in range(0, len(xs), ga):
            gx = _centred_grams(xs[a0:a0 + ga], kernel, debiased, threshold)
            xy[a0:a0 + ga, b0:b0 + gb] = _dot64(gx, gy)
            if b0 == 0:
                xx[a0:a0 + ga] = torch.stack([_dot64(g[None], g[None])[0, 0] for g in gx])
            del gx
    return xy, xx, yy


def _u_centred_grams(xs: list[torch.Tensor]) -> torch.Tensor:
    """(L, b²) flattened U-centred Grams (as center_gram(unbiased=True)) of L layers of one minibatch, float64;
    features centred first (U-centring ignores the shift); layers of equal width share one batched product."""
    b = xs[0].shape[0]
    out = torch.empty(len(xs), b * b, dtype=torch.float64, device=xs[0].device)
    groups: dict[int, list[int]] = {}
    for i, x in enumerate(xs):
        groups.setdefault(x[0].numel(), []).append(i)
    for idx in groups.values():
        xc = torch.stack([_centred32(xs[i]) for i in idx])                 # (g, b, d)
        k = torch.bmm(xc, xc.transpose(1, 2)).double()                      # (g, b, b)
        k.diagonal(dim1=1, dim2=2).zero_()
        means = k.sum(2) / (b - 2)
        means -= means.sum(1, keepdim=True) / (2 * (b - 1))
        k -= means[:, :, None] + means[:, None, :]
        k.diagonal(dim1=1, dim2=2).zero_()
        out[idx] = k.flatten(1)
    return out


class MinibatchCKA:
    """CKA = Σ_b HSIC₁(K_b, L_b) / √(Σ_b HSIC₁(K_b, K_b) · Σ_b HSIC₁(L_b, L_b)) (Nguyen et al. 2021), HSIC₁ the
    unbiased estimator of Song et al. 2012; float64 sums, memory independent of n. Each batch's terms are kept
    (L_a·L_b numbers a batch) so that bootstrap() can resample batches."""

    def __init__(self, num_a: int, num_b: int, device=None):
        kw = dict(dtype=torch.float64, device=device)
        self.xy, self.xx, self.yy = torch.zeros(num_a, num_b, **kw), torch.zeros(num_a, **kw), torch.zeros(num_b, **kw)
        self.batches = 0
        self.terms: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []   # per batch (xy, xx, yy), on CPU

    def update(self, xs, ys):
        _, xs = _named(xs)
        _, ys = _named(ys)
        if len(xs) != len(self.xx) or len(ys) != len(self.yy):
            raise UsageError(f"MinibatchCKA({len(self.xx)}, {len(self.yy)}) updated with {len(xs)} and {len(ys)} "
                             "layers")
        b = xs[0].shape[0]
        if b < 4 or any(v.shape[0] != b for v in xs + ys):
            raise UsageError(f"minibatch CKA needs batches of at least 4 samples, the same for every layer (got {b})")
        _check_finite([(f"a{i}", x) for i, x in enumerate(xs)] + [(f"b{j}", y) for j, y in enumerate(ys)])
        dev = self.xy.device
        self.update_grams(_u_centred_grams([x.to(dev) for x in xs]), _u_centred_grams([y.to(dev) for y in ys]))

    def update_grams(self, ga: torch.Tensor, gb: torch.Tensor):
        """update() from the batch's U-centred Grams (_u_centred_grams), computed once per model and batch
        when several pairs share them."""
        if len(ga) != len(self.xx) or len(gb) != len(self.yy):
            raise UsageError(f"MinibatchCKA({len(self.xx)}, {len(self.yy)}) updated with {len(ga)} and {len(gb)} "
                             "layers")
        b = math.isqrt(ga.shape[1]) if ga.ndim == 2 else 0
        if b < 4 or b * b != ga.shape[1] or gb.shape != (len(gb), b * b):
            raise UsageError(f"update_grams takes flattened (layers, b²) U-centred Grams of one batch of ≥ 4 samples, "
                             f"got {tuple(ga.shape)} and {tuple(gb.shape)}")
        scale = 1.0 / (b * (b - 3))
        terms = (scale * ga @ gb.T, scale * (ga * ga).sum(1), scale * (gb * gb).sum(1))
        for acc, t in zip((self.xy, self.xx, self.yy), terms, strict=True):
            acc += t
        self.terms.append(tuple(t.cpu() for t in terms))
        self.batches += 1

    def all_reduce(self, group=None, keys=None):
        """Sum the accumulators, and gather the per-batch terms in batch order (`keys`: each term's first image
        index, see gather_batches), over a torch.distributed process group (no-op when none is initialised)."""
        if _dist_active(group):
            import torch.distributed as dist
            for t in (self.xy, self.xx, self.yy):
                dist.all_reduce(t, group=group)
            self.terms = gather_batches(self.terms, group, keys)
        return self

    def compute(self, names_a=None, names_b=None) -> torch.Tensor:
        """The map; a layer constant within every batch (U-centred Grams of exactly 0) gives NaN entries."""
        if self.batches == 0 and not _dist_active(None):
            raise UsageError("MinibatchCKA.compute() before any update()")
        return _cka_from_hsic(self.xy, self.xx, self.yy, names_a or [f"a{i}" for i in range(len(self.xx))],
                              names_b or [f"b{j}" for j in range(len(self.yy))])

    def bootstrap(self, resamples: int = 1000, seed: int = 0) -> torch.Tensor:
        """(resamples, L_a, L_b) maps of batches drawn with replacement (Efron & Tibshirani 1993): the sampling
        spread of the map over batches."""
        xy, xx, yy = (torch.stack([t[k] for t in self.terms]) for k in range(3))
        g = torch.Generator().manual_seed(seed)
        counts = torch.stack([torch.bincount(torch.randint(0, len(xy), (len(xy),), generator=g), minlength=len(xy))
                              for _ in range(resamples)]).double()                     # (R, batches)
        sxy = (counts @ xy.flatten(1)).view(resamples, *xy.shape[1:])
        sxx, syy = counts @ xx, counts @ yy
        with torch.no_grad():
            return sxy / (sxx.clamp_min(0).sqrt()[:, :, None] * syy.clamp_min(0).sqrt()[:, None, :])


JACKKNIFE_GROUPS = 10   # intervals: the map with each tenth of the images (a seeded partition) left out


def jackknife_groups(n: int, groups: int, seed: int) -> torch.Tensor:
    """Each image's group (0 … groups − 1) of the delete-a-group jackknife: a seeded random partition, the same for
    every model and measure of a comparison."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)) % max(1, min(groups, n))


def _raw_kernel(x, kernel: str) -> torch.Tensor:
    """What a subset's Gram is cut from: the centred features' Gram (linear; any centring before the subset's own
    cancels), or the squared distances (RBF, whose median bandwidth is the subset's own)."""
    xc = _centred64(x)
    if kernel == "linear":
        return xc @ xc.T
    sq = (xc * xc).sum(1)
    return (sq[:, None] + sq[None, :] - 2 * xc @ xc.T).clamp_min_(0)


def _subset_gram(raw: torch.Tensor, keep: torch.Tensor, kernel: str, debiased: bool, threshold: float):
    """The unit-norm centred (or U-centred) Gram of the images in `keep`, flattened, from _raw_kernel."""
    k = raw[keep][:, keep]
    k = center_gram(_rbf_of_distances(k, threshold) if kernel == "rbf" else k, debiased)
    return (k / k.norm().clamp_min(1e-300)).flatten()


def _kept_sums(k: torch.Tensor, l: torch.Tensor, part: torch.Tensor, groups: int) -> tuple:
    """For stacked Grams k (A, n, n), l (B, n, n) and each group g of `part` left out (keep w = part ≠ g): Σᵢⱼ wᵢwⱼ
    KᵢⱼLᵢⱼ (G, A, B), wᵀKw (G, A), wᵀLw (G, B) and Σᵢ wᵢ(Kw)ᵢ(Lw)ᵢ (G, A, B), by subtracting the left-out rows and
    columns from the full sums (symmetric Grams): each group costs its own rows, not a new n × n product."""
    full = k.flatten(1) @ l.flatten(1).T
    ks, ls = k.sum(-1), l.sum(-1)                                                # (A, n), (B, n): K1, L1
    out = [torch.empty(groups, *shape, dtype=torch.float64) for shape in
           ((len(k), len(l)), (len(k),), (len(l),), (len(k), len(l)))]
    for g in range(groups):
        h, w = (part == g).nonzero().flatten(), (part != g).double()
        rows = k[:, h].flatten(1) @ l[:, h].flatten(1).T
        both = k[:, h][:, :, h].flatten(1) @ l[:, h][:, :, h].flatten(1).T
        kw, lw = ks - k[:, :, h].sum(-1), ls - l[:, :, h].sum(-1)                 # K w, L w
        out[0][g], out[1][g], out[2][g] = full - 2 * rows + both, kw @ w, lw @ w
        out[3][g] = (kw * w) @ lw.T
    return tuple(out)


def _jackknife_hsic(k, l, part, groups: int, debiased: bool) -> torch.Tensor:
    """(G, A, B) HSIC-proportional sums of every subset (Song et al.'s U-statistic numerator on zero-diagonal Grams,
    or tr(K H L H) on full ones), from _kept_sums."""
    t, sk, sl, p = _kept_sums(k, l, part, groups)
    m = torch.tensor([float((part != g).sum()) for g in range(groups)], dtype=torch.float64)[:, None, None]
    if debiased:
        return t + sk[:, :, None] * sl[:, None, :] / ((m - 1) * (m - 2)) - 2 / (m - 2) * p
    return t - 2 / m * p + sk[:, :, None] * sl[:, None, :] / (m * m)


def _linear_cka_jackknife(xs, ys, part, groups: int, debiased: bool) -> torch.Tensor:
    """(G, L_a, L_b) linear CKA of every jackknife subset from the full Grams of the centred features (diagonal
    zeroed for the U-statistic), by the subset sums of _jackknife_hsic: no subset Gram is formed or re-centred."""
    def grams(vs):   # in the features' precision (float32 products, as cka_matrix's), summed in float64 below
        g = torch.stack([(c @ c.T).double() for c in map(_centred32, vs)])
        if debiased:
            g.diagonal(dim1=1, dim2=2).zero_()
        return g
    ka, kb = grams(xs), grams(ys)
    xy = _jackknife_hsic(ka, kb, part, groups, debiased)
    xx = torch.stack([_jackknife_hsic(ka[i:i + 1], ka[i:i + 1], part, groups, debiased)[:, 0, 0]
                      for i in range(len(ka))], 1)
    yy = torch.stack([_jackknife_hsic(kb[j:j + 1], kb[j:j + 1], part, groups, debiased)[:, 0, 0]
                      for j in range(len(kb))], 1)
    return xy / (xx.clamp_min(1e-300).sqrt()[:, :, None] * yy.clamp_min(1e-300).sqrt()[:, None, :])


def cka_jackknife(xs, ys, kernel: str = "linear", rbf_threshold: float = 1.0, debiased: bool = False,
                  groups: int = JACKKNIFE_GROUPS, seed: int = 0) -> torch.Tensor | None:
    """(G, L_a, L_b): the CKA map with each group of images (jackknife_groups) left out (the delete-a-group
    jackknife, Quenouille 1956; Tukey 1958), each subset's Grams cut from the full ones and centred anew, so the map
    of every subset costs n² per entry, not a new Gram. None when the Grams do not fit the memory budget."""
    _, xs = _named(xs)
    _, ys = _named(ys)
    n = xs[0].shape[0]
    if (len(xs) + len(ys)) * n * n * 8 > GRAM_BUDGET_BYTES or groups < 3 or n < 2 * groups:
        return None
    part = jackknife_groups(n, groups, seed)
    if kernel == "linear":
        return _linear_cka_jackknife(xs, ys, part, groups, debiased)
    ra, rb = [_raw_kernel(x, kernel) for x in xs], [_raw_kernel(y, kernel) for y in ys]
    out = torch.empty(groups, len(xs), len(ys), dtype=torch.float64)
    for g in range(groups):
        keep = part != g
        ga = torch.stack([_subset_gram(r, keep, kernel, debiased, rbf_threshold) for r in ra])
        gb = torch.stack([_subset_gram(r, keep, kernel, debiased, rbf_threshold) for r in rb])
        out[g] = ga @ gb.T
    return out


def cka_influence(xs, ys, kernel: str = "linear", rbf_threshold: float = 1.0,
                  debiased: bool = False) -> torch.Tensor | None:
    """(L_a, L_b, n) influence of each sample on each CKA entry, by the infinitesimal jackknife (Jaeckel 1972;
    Efron 1982): for HSIC = ⟨K̃, L̃⟩/n² with K̃ = HKH the centring terms cancel and sample m's influence is
    2(h_m − HSIC), h_m = (1/n) Σ_j K̃_mj L̃_mj; CKA's follows by the delta method, and SE² = Σ_m IF_m² / n². For
    the debiased estimator the rows come from the U-centred Grams (Székely & Rizzo), whose row means average to
    the U-statistic, so the spread is that of the estimate reported (the biased rows are inflated exactly where the
    two differ: wide features, small n). Where the Grams do not fit the memory budget, linear CKA's rows come from
    the d×d products of the centred features (biased rows: n is then large enough for the two to agree); None
    when neither fits."""
    _, xs = _named(xs)
    _, ys = _named(ys)
    n = xs[0].shape[0]
    dmax = max(v[0].numel() for v in xs + ys)
    if len(ys) * n * n * 4 <= GRAM_BUDGET_BYTES:
        gram = lambda v: _centred_grams([v], kernel, debiased, rbf_threshold)[0].view(n, n)
        grams = [gram(y) for y in ys]
        rows = lambda x: _gram_rows(gram(x), grams)
        self_rows = torch.stack([(g * g).mean(1).double() for g in grams])
    elif kernel == "linear" and dmax * dmax * 4 <= GRAM_BUDGET_BYTES:
        yc = [_unit_scaled(_centred32(y).float()) for y in ys]
        rows = lambda x: _feature_rows(_unit_scaled(_centred32(x).float()), yc)
        self_rows = torch.stack([_feature_self_rows(y) for y in yc])
    else:
        return None
    C = self_rows.mean(1)
    out = torch.empty(len(xs), len(ys), n)
    for a, x in enumerate(xs):
        r_ab, r_aa = rows(x)
        A, B = r_ab.mean(1), r_aa.mean()
        norm = (B * C).clamp_min(1e-300).sqrt()
        cka = A / norm
        rel_a = (r_aa - B) / B.clamp_min(1e-300)
        rel_b = (self_rows - C[:, None]) / C.clamp_min(1e-300)[:, None]
        out[a] = (2 * (r_ab - A[:, None]) / norm[:, None] - cka[:, None] * (rel_a + rel_b)).float()
    return out


def _gram_rows(g: torch.Tensor, others: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row means of K̃∘L̃ for every L̃ in others (L_b, n), and of K̃∘K̃ (n,)."""
    return torch.stack([(g * h).mean(1).double() for h in others]), (g * g).mean(1).double()


def _feature_rows(x: torch.Tensor, ys: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Gram-free row means for linear CKA: (1/n) Σ_j (x_m·x_j)(y_m·y_j) = x_mᵀ (XᵀY) y_m / n for every y (L_b, n),
    and x's own (n,)."""
    return torch.stack([_cross_rows(x, y) for y in ys]), _feature_self_rows(x)


def _cross_rows(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((x @ (x.T @ y)) * y).sum(1).double() / x.shape[0]


def _feature_self_rows(x: torch.Tensor) -> torch.Tensor:
    return _cross_rows(x, x)


MIN_BOOTSTRAP_BATCHES = 8   # a bootstrap over fewer batches gives no interval (4 batches covered 89%, issue 22)
NULL_BUDGET_FLOPS = 2e12    # a permutation null costing more (K maps of L_a · L_b · n² each) is left out, said


@dataclass
class Spread:
    """The sampling spread of a CKA map: bootstrap replicates (R, L_a, L_b) of the minibatch estimator over its
    `units` batches, or the per-sample influence (L_a, L_b, n) of a full-batch one. se(entries) is the standard error
    of the mean of those entries (a summary such as a matched-layer mean), so summaries get intervals too; dof, the
    degrees of freedom of the t quantile its intervals use (units − 1 batches or groups; None = normal). A measure
    other than CKA has "jackknife" replicates (G, L_a, L_b): the map with each of G groups of images left out."""
    kind: str              # "bootstrap" | "influence" | "jackknife"
    values: torch.Tensor
    units: int | None = None
    range: tuple[float, float] = (0.0, 1.0)   # of the measure: intervals are kept within it
    scale: str = "raw"     # "logit": a jackknife interval made on the logit of the value's place in the range

    @property
    def dof(self) -> int | None:
        return self.units - 1 if self.kind != "influence" and self.units and self.units >= 3 else None

    def interval(self, estimate, entries=None, level: float = 0.95):
        """The normal (or t) interval, kept within the measure's range (a bound past it is set to it) and around
        the estimate; with scale "logit", u = logit((v − a)/(b − a)) of the estimate and of each replicate, u ∓ q·se(u)
        mapped back (an interval that respects the bounds and the skew near them)."""
        a, b = self.range
        if self.scale == "logit" and self.kind == "jackknife" and math.isfinite(a) and math.isfinite(b):
            est = torch.as_tensor(estimate, dtype=torch.float64)
            reps = (self.values if entries is None else self._picked(entries)).double()
            place = lambda v: (v - a) / (b - a)
            u_lo, u_hi = normal_interval(torch.logit(place(est)), self._se(torch.logit(place(reps))), level, self.dof)
            r_lo, r_hi = normal_interval(est, self._se(reps), level, self.dof)
            inner = ((place(reps) > 1e-4) & (place(reps) < 1 - 1e-4)).all(0) & (place(est) > 1e-4) \
                & (place(est) < 1 - 1e-4)        # at or past a bound the logit is undefined: the t interval there
            lo = torch.where(inner, a + (b - a) * torch.sigmoid(u_lo), r_lo)
            hi = torch.where(inner, a + (b - a) * torch.sigmoid(u_hi), r_hi)
            if entries is not None or not isinstance(estimate, torch.Tensor):
                lo, hi = float(lo), float(hi)
        else:
            lo, hi = normal_interval(estimate, self.se(entries), level, self.dof)
        if isinstance(lo, torch.Tensor):
            est = torch.as_tensor(estimate, dtype=lo.dtype)
            return torch.minimum(lo.clamp(a, b), est), torch.maximum(hi.clamp(a, b), est)
        return min(max(lo, a), b, estimate), max(min(hi, b), a, estimate)

    def contrast(self, entries_a, entries_b) -> Spread:
        """The spread of (mean of entries_a) − (mean of entries_b) of the same map: paired, image by image."""
        a, b = self.range
        return Spread(self.kind, self._picked(entries_a) - self._picked(entries_b), self.units, (a - b, b - a))

    def at(self, i: int, j: int) -> Spread:
        """The spread of the single map entry (i, j)."""
        v = self.values[i, j] if self.kind == "influence" else self.values[:, i, j]
        return Spread(self.kind, v, self.units, self.range, self.scale)

    def se(self, entries=None) -> torch.Tensor | float:
        """Per-entry (L_a, L_b) standard errors, or that of the mean of the listed (i, j) entries."""
        if entries is None:
            return self._se(self.values)
        return float(self._se(self._picked(entries)))

    def _picked(self, entries) -> torch.Tensor:
        """The spread's values of the mean of the listed (i, j) entries."""
        i, j = torch.tensor([e[0] for e in entries]), torch.tensor([e[1] for e in entries])
        return self.values[i, j].mean(0) if self.kind == "influence" else self.values[:, i, j].mean(-1)

    def _se(self, v: torch.Tensor) -> torch.Tensor:
        if self.kind == "jackknife":          # √((G − 1)/G · Σ_g (θ₋g − θ̄)²), Quenouille–Tukey
            g = len(v)
            return ((g - 1) / g * (v.double() - v.double().mean(0)).square().sum(0)).sqrt()
        if self.kind == "bootstrap":          # the spread of the replicates, × √(B/(B−1)) for B batches
            if self.units is None or self.units < MIN_BOOTSTRAP_BATCHES:
                return torch.full(v.shape[1:], float("nan"), dtype=torch.float64) if v.ndim > 1 else \
                    torch.tensor(float("nan"), dtype=torch.float64)
            return v.double().std(0) * math.sqrt(self.units / (self.units - 1))
        return v.double().square().sum(-1).sqrt() / v.shape[-1]   # √(Σ_m IF_m²) / n (last axis)


def normal_interval(estimate, se, level: float = 0.95, dof: int | None = None):
    """estimate ∓ q·se, q the (1 + level)/2 quantile of the standard normal (1.96 at 95%), or of Student's t with
    dof degrees of freedom."""
    q = t_quantile(0.5 + level / 2, dof)
    return estimate - q * se, estimate + q * se


def two_sided_p(t: float, dof: int | None = None) -> float:
    """P(|T| ≥ |t|) for Student's t with dof degrees of freedom (Abramowitz & Stegun 26.7.3–4, exact for integer dof),
    or the standard normal for dof None."""
    if not math.isfinite(t):
        return 0.0 if abs(t) == math.inf else float("nan")
    if dof is None:
        return math.erfc(abs(t) / math.sqrt(2))
    th = math.atan(abs(t) / math.sqrt(dof))
    c2, term, acc = math.cos(th) ** 2, 1.0, 1.0
    if dof % 2:                                  # odd: (2/π)[θ + sin θ cos θ (1 + 2/3 cos²θ + …)]
        for k in range(3, dof, 2):
            term *= (k - 1) / k * c2
            acc += term
        inside = (2 / math.pi) * (th + (math.sin(th) * math.cos(th) * acc if dof > 1 else 0.0))
    else:                                        # even: sin θ (1 + 1/2 cos²θ + 1·3/(2·4) cos⁴θ + …)
        for k in range(2, dof, 2):
            term *= (k - 1) / k * c2
            acc += term
        inside = math.sin(th) * acc
    return min(1.0, max(0.0, 1 - inside))


def t_quantile(p: float, dof: int | None = None) -> float:
    """Quantile of Student's t (the normal's for dof None): two_sided_p inverted by bisection, so an interval and its
    p-value always agree."""
    import statistics
    z = statistics.NormalDist().inv_cdf(p)
    if dof is None or p == 0.5:
        return z
    lo, hi, target = 0.0, max(1.0, abs(z)), 2 * min(p, 1 - p)
    while two_sided_p(hi, dof) > target:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if two_sided_p(mid, dof) > target else (lo, mid)
    return math.copysign((lo + hi) / 2, p - 0.5)


def matched_pairs(la: int, lb: int) -> list[tuple[int, int]]:
    """(i, j) of matched layers: the diagonal, or for rectangular maps layer i of A with the layer of B at the same
    relative depth."""
    return [(i, round(i * (lb - 1) / max(la - 1, 1))) for i in range(la)]


def matched_diagonal(m: torch.Tensor) -> list[float]:
    """CKA of matched layers (see matched_pairs)."""
    return [float(m[i, j]) for i, j in matched_pairs(*m.shape)]


def diagonal_mean(m: torch.Tensor) -> float:
    """Mean CKA of matched layers (see matched_diagonal)."""
    return float(torch.tensor(matched_diagonal(m)).mean())   # a NaN entry (a constant layer) shows, not hidden


def distance_pairs(la: int, lb: int) -> list[list[tuple[int, int]]]:
    """For d = 0 … min(la, lb) − 1, the layer pairs (i, j) with |i − j| = d."""
    return [[(i, j) for i in range(la) for j in range(lb) if abs(i - j) == d] for d in range(min(la, lb))]


def cka_vs_distance(m: torch.Tensor) -> list[float]:
    """Mean CKA over layer pairs (i, j) with |i − j| = d, for d = 0 … L−1 (square maps)."""
    return [float(torch.stack([m[i, j] for i, j in pairs]).mean()) for pairs in distance_pairs(*m.shape)]


SUBLAYER_TYPES = {"normalization": ("norm1", "norm2"), "attention": ("attn", "attn.qkv", "attn.proj"),
                  "mlp": ("mlp", "mlp.fc1", "mlp.act", "mlp.fc2"), "residual": ("attn_residual", "")}


def sublayer_type(point: str) -> str:
    m = re.fullmatch(r"blocks\.\d+(?:\.(.*))?", point)
    if not m:
        return "other"
    sub = m.group(1) or ""
    return next((t for t, subs in SUBLAYER_TYPES.items() if sub in subs), "other")


def slice_by_type(m: torch.Tensor, names_a, names_b) -> dict[str, dict]:
    """The map restricted to points of one kind on both sides: normalization, attention, MLP, residual stream."""
    out = {}
    for t in SUBLAYER_TYPES:
        ia = [i for i, p in enumerate(names_a) if sublayer_type(p) == t]
        ib = [j for j, p in enumerate(names_b) if sublayer_type(p) == t]
        if ia and ib:
            sub = m[ia][:, ib]
            out[t] = dict(layers_a=[names_a[i] for i in ia], layers_b=[names_b[j] for j in ib], cka=sub,
                          matched=[(ia[i], ib[j]) for i, j in matched_pairs(len(ia), len(ib))],
                          diagonal_mean=diagonal_mean(sub))
    return out


# --- measures beyond CKA: one function on two feature matrices and one row of MEASURES each ------------------------
# A measure reads each layer once (prep: a state per layer) and scores layer pairs from the states (score), so a
# layer × layer map prepares each layer once; similarity(x, y, m) = score(prep(x), prep(y)). A state is permuted
# (rows, or rows and columns of an n × n one) for the permutation null without re-reading the features.

def _centred64(x) -> torch.Tensor:
    x = _flat64(x)
    return x - x.mean(0)


def _reduced(x) -> torch.Tensor:
    """The centred features in at most n columns with the same Gram (U·√λ of X̃X̃ᵀ when d > n): every measure
    invariant to rotations of the feature space reads this instead of 100,000 flattened columns."""
    xc = _centred64(x)
    if xc.shape[1] <= xc.shape[0]:
        return xc
    lam, u = torch.linalg.eigh(xc @ xc.T)
    keep = lam > lam.max().clamp_min(1e-300) * 1e-12
    return u[:, keep] * lam[keep].sqrt()


KNN_BLOCK = 1 << 24   # entries of the similarity block a k-NN search holds at once: n = 50,000 never forms n × n


def _cosine_knn(x, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's k nearest neighbours by cosine, itself excluded: ((n, k) cosines, (n, k) indices), found a block
    of rows at a time on the features' device (memory O(n·k + block), not O(n²))."""
    xn = F.normalize(_flat64(x), dim=1)
    n = len(xn)
    if not 1 <= k < n:
        raise UsageError(f"k = {k} neighbours need more than {k} images, got {n}")
    vals, idx, step = [], [], max(1, KNN_BLOCK // n)
    for lo in range(0, n, step):
        rows = torch.arange(lo, min(n, lo + step), device=xn.device)
        s = xn[rows] @ xn.T
        s[torch.arange(len(rows)), rows] = -math.inf
        v, i = s.topk(k, dim=1)
        vals.append(v)
        idx.append(i)
    return torch.cat(vals), torch.cat(idx)


def mknn_prep(x, k: int = 10) -> torch.Tensor:
    return _cosine_knn(x, k)[1]


def mknn_score(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mutual k-NN alignment (Huh et al. 2024): mean over images of |N_A(i) ∩ N_B(i)| / k (a, b: (n, k) indices)."""
    return float((a[:, :, None] == b[:, None, :]).sum().double() / a.numel())


def jaccard_score(a: torch.Tensor, b: torch.Tensor) -> float:
    """k-NN Jaccard similarity (Schumacher et al. 2021; ReSi's jaccard_similarity): mean over images of
    |N_A(i) ∩ N_B(i)| / |N_A(i) ∪ N_B(i)|, k nearest by cosine excluding self (a, b: (n, k) indices)."""
    both = (a[:, :, None] == b[:, None, :]).sum((1, 2)).double()
    return float((both / (2 * a.shape[1] - both)).mean())


def _sparse_hsic_u(n: int, i: torch.Tensor, j: torch.Tensor, kv: torch.Tensor, lv: torch.Tensor) -> float:
    """Song et al. 2012's unbiased HSIC of two n × n kernels with zero diagonals that are zero outside the entries
    (i, j) (no pair twice), with values kv, lv there (they need not be symmetric): [Σᵢⱼ KᵢⱼLⱼᵢ + 1ᵀK1·1ᵀL1/((n−1)(n−2))
    − 2/(n−2)·1ᵀKL1] / (n(n−3)). Σ KᵢⱼLⱼᵢ pairs each entry with its transpose, found by sorting the keys i·n + j."""
    key = i * n + j
    order = key.argsort()
    at = torch.searchsorted(key[order], j * n + i).clamp(max=len(key) - 1)
    hit = key[order][at] == j * n + i
    t1 = (kv * torch.where(hit, lv[order][at], torch.zeros_like(lv))).sum()
    colsum_k = torch.zeros(n, dtype=kv.dtype, device=kv.device).index_add_(0, j, kv)
    rowsum_l = torch.zeros(n, dtype=lv.dtype, device=lv.device).index_add_(0, i, lv)
    return float((t1 + kv.sum() * lv.sum() / ((n - 1) * (n - 2)) - 2 * (colsum_k @ rowsum_l) / (n - 2))
                 / (n * (n - 3)))


def _mutual_entries(a, b) -> tuple:
    """The entries (i, j) with j among both layers' k nearest neighbours of i, with each layer's cosine there."""
    (va, ia), (vb, ib) = a[:2], b[:2]
    match = ia[:, :, None] == ib[:, None, :]                                         # (n, k, k)
    both = match.any(-1)
    rows = torch.arange(len(ia), device=ia.device)[:, None].expand_as(ia)
    return rows[both], ia[both], va[both], (match.to(vb.dtype) * vb[:, None, :]).sum(-1)[both]


def cknna_prep(x, k: int = 10) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(each image's k nearest cosines and their indices, the layer's own alignment Align(M⊙K, M⊙K)), read once."""
    v, i = _cosine_knn(x, k)
    return v, i, _sparse_hsic_u(len(v), *_mutual_entries((v, i), (v, i)))


def cknna_score(a, b) -> float:
    """CKNNA (Huh et al. 2024): CKA's unbiased HSIC restricted to pairs that are neighbours in both (α = M_K ⊙ M_L):
    Align(α⊙K, α⊙L) / √(Align(M_K⊙K, M_K⊙K) Align(M_L⊙L, M_L⊙L)); cosine Grams, k nearest excluding self."""
    sa, sb = a[2], b[2]
    return _sparse_hsic_u(len(a[0]), *_mutual_entries(a, b)) / math.sqrt(sa * sb) if sa * sb > 0 else float("nan")


def cka_prep(x) -> torch.Tensor:
    """The U-centred linear Gram (Song et al. 2012), scaled to unit Frobenius norm."""
    k = center_gram(gram_linear(_flat64(x)), unbiased=True)
    return k / k.norm().clamp_min(1e-300)


def cka_score(a: torch.Tensor, b: torch.Tensor) -> float:
    """Debiased linear CKA = ⟨K̃, L̃⟩_F / (‖K̃‖_F ‖L̃‖_F) on U-centred Grams (Kornblith et al. 2019; Song et al. 2012)."""
    return float((a * b).sum())


def procrustes_prep(x) -> torch.Tensor:
    r = _reduced(x)
    return r / r.norm().clamp_min(1e-300)


def procrustes_score(a: torch.Tensor, b: torch.Tensor) -> float:
    """Normalised Bures similarity ‖X̃ᵀỸ‖_* / (‖X̃‖_F ‖Ỹ‖_F) (Williams et al. 2021; Ding et al. 2021): the cosine of
    the Procrustes angle between the centred representations; the angular distance is its arccos."""
    m = a.T @ b if a.shape[1] <= b.shape[1] else b.T @ a                     # the narrower side's square
    return float(torch.linalg.eigvalsh(m @ m.T).clamp_min(0).sqrt().sum().clamp(max=1))   # Σ singular values


_SAID: set = set()   # notices already given in this process


def _principal_basis(x, var: float = 0.99) -> torch.Tensor:
    """An orthonormal (n, k) basis of the fewest principal directions of the centred features that hold `var` of
    their variance (Raghu et al. 2017), at most n / 2 of them: CCA of more directions than images saturates."""
    u, s, _ = torch.linalg.svd(_reduced(x), full_matrices=False)
    frac = (s * s).cumsum(0) / (s * s).sum().clamp_min(1e-300)
    k = int((frac < var).sum()) + 1
    cap = max(1, len(u) // 2)
    if k > cap and (k, cap) not in _SAID:
        _SAID.add((k, cap))
        log.warning(f"notice: SVCCA / PWCCA keep {cap} of the {k} principal directions holding {var:.0%} of the "
                    f"variance: no more than n / 2 = {cap} at n = {len(u)} images (more images, or fewer dimensions, "
                    "to keep them all)")
    return u[:, :min(k, cap)]


def svcca_score(a: torch.Tensor, b: torch.Tensor) -> float:
    """SVCCA (Raghu et al. 2017): mean canonical correlation between the principal subspaces, i.e. the mean cosine of
    the principal angles between them (singular values of QₐᵀQ_b)."""
    rho = torch.linalg.svdvals(a.T @ b)[: min(a.shape[1], b.shape[1])]
    return float(rho.clamp(max=1).mean())


def _inverse_sqrt(s: torch.Tensor) -> torch.Tensor:
    lam, v = torch.linalg.eigh(s)
    inv = torch.where(lam > lam.max() * 1e-12, lam.clamp_min(1e-300).rsqrt(), torch.zeros_like(lam))
    return (v * inv) @ v.T


def pwcca_prep(x) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the centred features, or their principal components (svcca's rule) where they have more than n / 2 columns;
    the inverse square root of their covariance; the covariance itself), read once."""
    xc = _centred64(x)
    if xc.shape[1] > len(xc) // 2:
        u = _principal_basis(x)
        xc = u * (u.T @ xc).norm(dim=1)   # the components' scores: an orthogonal basis with their variances
    c = xc.T @ xc
    return xc, _inverse_sqrt(c), c


def pwcca_score(a: torch.Tensor, b: torch.Tensor) -> float:
    """PWCCA (Morcos et al. 2018): canonical correlations ρᵢ weighted by how much of the narrower representation each
    canonical direction accounts for, αᵢ ∝ Σⱼ |⟨pᵢ, xⱼ⟩| (pᵢ the orthonormalised directions X̃uᵢ, xⱼ its neurons):
    Σ αᵢρᵢ / Σ αᵢ. The weights come from the side with fewer neurons (the first on a tie), as in google/svcca. With
    X̃U = PR (RᵀR = UᵀCU, C = X̃ᵀX̃), PᵀX̃ = R⁻ᵀUᵀC: d × d work, no n × d orthonormalisation."""
    if a[0].shape[1] > b[0].shape[1]:
        a, b = b, a
    (a, ia, ca), (b, ib, _) = a, b
    u, rho, _ = torch.linalg.svd(ia @ (a.T @ b) @ ib)
    r, bad = torch.linalg.cholesky_ex(u.T @ ca @ u, upper=True)
    if bad:   # a rank-deficient side: orthonormalise the n × d directions themselves
        p = torch.linalg.qr(a @ u).Q
        w = (p.T @ a).abs().sum(1)
    else:
        w = torch.linalg.solve_triangular(r.T, u.T @ ca, upper=False).abs().sum(1)
    w = w[: len(rho)]
    return float((w * rho.clamp(max=1)).sum() / w.sum())


def _ranks(v: torch.Tensor) -> torch.Tensor:
    """Ranks 1 … m of a vector, ties sharing their average rank (as scipy's rankdata)."""
    order = v.argsort()
    _, inverse, counts = torch.unique_consecutive(v[order], return_inverse=True, return_counts=True)
    ends = counts.cumsum(0)
    out = torch.empty_like(v)
    out[order] = ((ends - counts + ends + 1).double() / 2)[inverse].to(v.dtype)
    return out


def rsa_prep(x) -> torch.Tensor:
    """The correlation-distance RDM (1 − Pearson between images) as standardised ranks of its upper triangle, kept as
    a symmetric n × n matrix (zero diagonal) so that a permutation of the images re-indexes it."""
    z = _flat64(x)
    z = F.normalize(z - z.mean(1, keepdim=True), dim=1)
    n = len(z)
    iu = torch.triu_indices(n, n, 1)
    r = _ranks((1 - z @ z.T)[iu[0], iu[1]])
    r = (r - r.mean()) / (r - r.mean()).norm().clamp_min(1e-300)
    out = torch.zeros(n, n, dtype=torch.float64)
    out[iu[0], iu[1]] = r
    return out + out.T


def rsa_score(a: torch.Tensor, b: torch.Tensor) -> float:
    """RSA (Kriegeskorte et al. 2008): Spearman's ρ between the two RDMs' upper triangles."""
    return float((a * b).sum() / 2)


RIDGE_ALPHAS = tuple(10.0 ** (e / 2) for e in range(-6, 13))   # λ grid of the inner generalised cross-validation
RIDGE_FOLDS = 5


def ridge_prep(x) -> tuple[list, torch.Tensor]:
    """(what each fold's fit needs of the features as predictors, read once: _ridge_fold; the centred features
    themselves, as targets)."""
    xr = _reduced(x)
    return [_ridge_fold(xr, test) for test in _folds(len(xr))], _centred64(x)


def _folds(n: int, k: int = RIDGE_FOLDS) -> list[torch.Tensor]:
    """k contiguous folds, the first n mod k one image larger (scikit-learn's KFold without shuffling)."""
    sizes = [n // k + (f < n % k) for f in range(k)]
    starts = [sum(sizes[:f]) for f in range(k)]
    return [torch.arange(s, s + m) for s, m in zip(starts, sizes, strict=True)]


def _ridge_fold(x: torch.Tensor, test: torch.Tensor) -> tuple:
    """One fold's predictors: (training mask, test rows, the squared singular values s² of the centred training
    rows X̃ = U S Vᵀ, U, the test rows' coordinates (x − x̄) V S). Directions of s = 0 are left out: they add nothing
    to the fit, and a residual keeps its full component there."""
    train = torch.ones(len(x), dtype=torch.bool)
    train[test] = False
    xm = x[train].mean(0)
    u, sv, vt = torch.linalg.svd(x[train] - xm, full_matrices=False)   # min(n, d) directions
    keep = sv > sv.max().clamp_min(1e-300) * 1e-10
    return train, test, sv[keep] ** 2, u[:, keep], ((x[test] - xm) @ vt[keep].T) * sv[keep]


def gcv_lambda(s2: torch.Tensor, uy: torch.Tensor, total: float, m: int) -> float:
    """Ridge regression's λ for m centred training rows with squared singular values s2 (r of them), targets Ỹ with
    uy = UᵀỸ and ‖Ỹ‖² = total: the RIDGE_ALPHAS value of least generalised cross-validation error (Golub, Heath &
    Wahba 1979), RSS(λ) / (m − tr H(λ))², the rotation-invariant form of leave-one-out, read off the singular values
    at no refit, as sums of non-negative terms (a difference of near-equal sums picks a near-interpolating λ once
    d ≥ n and the features are large): RSS = Σₖ (1 − fₖ)² ‖uₖᵀỸ‖² + ‖Ỹ − UUᵀỸ‖², m − tr H = Σₖ (1 − fₖ) + (m − 1 − r),
    fₖ = sₖ²/(sₖ² + λ); the second term of RSS is 0 when the r = m − 1 directions span every centred target."""
    lam = torch.tensor(RIDGE_ALPHAS, dtype=torch.float64)[:, None]
    g = lam / (s2 + lam)                                                 # (A, r): 1 − fₖ, computed without cancelling
    outside = 0.0 if len(s2) >= m - 1 else max(float(total - uy.square().sum()), 0.0)
    rss = (g * g * uy.square().sum(1)).sum(1) + outside                  # Σ (1 − fₖ)² ‖uₖᵀỸ‖² + ‖Ỹ − UUᵀỸ‖²
    dof = g.sum(1) + (m - 1 - len(s2))                                   # m − tr H = Σ (1 − fₖ) + (m − 1 − r)
    gcv = torch.where(dof > 0, rss / dof.clamp_min(1e-300) ** 2, math.inf)
    return RIDGE_ALPHAS[int(gcv.argmin())]                                              # the first of equal errors


def _ridge_predict(fold: tuple, y: torch.Tensor) -> torch.Tensor:
    """The test rows' predictions of ridge regression (with intercept) fitted on the training rows, one λ for all
    targets (gcv_lambda)."""
    train, _, s2, u, cross = fold
    ym = y[train].mean(0)
    yt = y[train] - ym
    uy = u.T @ yt
    best = gcv_lambda(s2, uy, float(yt.square().sum()), len(yt))
    return ym + cross @ (uy / (s2 + best)[:, None])          # (x − x̄) V S (S² + λ)⁻¹ Uᵀ Ỹ = (x − x̄) ŵ


def ridge_score(a, b) -> float:
    """Linear predictivity: out-of-fold R² of predicting b's features from a's by ridge regression (5 contiguous
    folds; λ by generalised cross-validation within each training fold), averaged uniformly over b's features (the
    similarity repository's ridge-…-r2-cv=5folds protocol, λ chosen instead of fixed). Asymmetric: a predicts b."""
    y = b[1]
    pred = torch.empty_like(y)
    for fold in a[0]:
        pred[fold[1]] = _ridge_predict(fold, y)
    sse, sst = ((y - pred) ** 2).sum(0), ((y - y.mean(0)) ** 2).sum(0)
    r2 = torch.where(sst > 0, 1 - sse / sst.clamp_min(1e-300), (sse == 0).double())
    return float(r2.mean())


# transformations of a representation (the same for every image unless said) a measure may be invariant to; the
# tests apply each a row declares, and a common permutation of the images to every order_free row
INVARIANCES = ("orthogonal", "isotropic scaling", "translation", "permutation of features", "per-image scaling",
               "per-image shift")


@dataclass(frozen=True)
class Measure:
    """One similarity measure: prep(x) reads a layer's (n, d) features once; score(a, b) compares two layers' states;
    `permute` says how a state follows a permutation of the images: "rows", "both" (rows and columns of an n × n
    state), "neighbours" ((n, k) image indices), "keep", or a comma list of those for a tuple."""
    prep: Callable
    score: Callable
    symmetric: bool
    range: tuple[float, float]          # of the population value (ridge's R² has no lower bound: -inf)
    invariance: tuple[str, ...]         # INVARIANCES of either representation that leave it unchanged
    permute: str                        # "rows" | "both" | "neighbours" | "keep", or a comma list for a tuple
    streaming: bool                     # has a minibatch (streaming) form
    resi_id: str                        # its name in the similarity-repository's naming
    cite: str
    chance: Callable | None = None      # (n, options) -> the value expected of unrelated features, when known
    order_free: bool = True             # a common permutation of the images leaves it unchanged (not ridge: its CV
                                        # folds are contiguous runs of images, as scikit-learn's KFold)
    inner: float = 0.0                  # score(a, b) = inner · ⟨a, b⟩ of n × n states: a map, and each null map, is
                                        # one matrix product of the stacked states


MEASURES: dict[str, Measure] = {
    "cka": Measure(cka_prep, cka_score, True, (0.0, 1.0), ("orthogonal", "isotropic scaling", "translation"), "both",
                   True, "cka-kernel=linear-hsic=song-score", "Kornblith et al. 2019; Song et al. 2012 (debiased)",
                   inner=1.0),
    "mknn": Measure(mknn_prep, mknn_score, True, (0.0, 1.0), ("orthogonal", "isotropic scaling", "per-image scaling"),
                    "neighbours", False, "mutual_knn-k=10", "Huh et al. 2024, platonic-rep metrics.mutual_knn",
                    chance=lambda n, k=10: k / (n - 1)),
    "jaccard": Measure(mknn_prep, jaccard_score, True, (0.0, 1.0), ("orthogonal", "isotropic scaling",
                                                                    "per-image scaling"), "neighbours", False,
                       "jaccard_similarity-k=10", "Schumacher et al. 2021; Klabunde et al. 2025 (ReSi)"),
    "cknna": Measure(cknna_prep, cknna_score, True, (-1.0, 1.0), ("orthogonal", "isotropic scaling", "per-image scaling"),
                     "rows,neighbours,keep", False,
                     "cknna-k=10", "Huh et al. 2024, platonic-rep metrics.cknna"),
    "procrustes": Measure(procrustes_prep, procrustes_score, True, (0.0, 1.0),
                          ("orthogonal", "isotropic scaling", "translation"), "rows", False, "procrustes-nbs",
                          "Williams et al. 2021; Ding et al. 2021 (normalised Bures similarity)"),
    "svcca": Measure(_principal_basis, svcca_score, True, (0.0, 1.0), ("orthogonal", "isotropic scaling",
                                                                       "translation"), "rows", False, "svcca-var=0.99", "Raghu et al. 2017"),
    "pwcca": Measure(pwcca_prep, pwcca_score, False, (0.0, 1.0), ("isotropic scaling", "translation",
                                                                 "permutation of features"), "rows,keep,keep", False, "pwcca", "Morcos et al. 2018"),
    "rsa": Measure(rsa_prep, rsa_score, True, (-1.0, 1.0), ("isotropic scaling", "permutation of features",
                                                             "per-image scaling", "per-image shift"), "both", False,
                   "rsa-rdm=correlation-compare=spearman", "Kriegeskorte et al. 2008", inner=0.5),
    "ridge": Measure(ridge_prep, ridge_score, False, (-math.inf, 1.0), ("translation", "permutation of features"),
                     "keep,rows", False, "ridge-lambda=gcv-r2-cv=5folds",
                     "linear predictivity (Yamins et al. 2014; Klabunde et al. 2025)", order_free=False),
}


def measure(name: str) -> Measure:
    if name not in MEASURES:
        raise UsageError(f"unknown measure {name!r}: choose from {', '.join(MEASURES)}")
    return MEASURES[name]


def similarity(x, y, measure_name: str = "cka") -> float:
    """One measure (a MEASURES row) between two (n, d) feature matrices of the same n images."""
    m = measure(measure_name)
    if len(x) != len(y):
        raise UsageError(f"similarity: {len(x)} vs {len(y)} images")
    return m.score(m.prep(x), m.prep(y))


def permuted(state, how: str, perm: torch.Tensor):
    """A layer's state as if its images came in the order `perm` (rows, or rows and columns, re-indexed)."""
    if "," in how:
        return tuple(permuted(s, h, perm) for s, h in zip(state, how.split(","), strict=True))
    if how == "keep":   # a part that does not depend on the images' order (a count), or that the null never reads
        return state      # (ridge's fits of b as predictor: the null permutes b as the target only)
    if how == "neighbours":   # (n, k) image indices: rows re-ordered and each index renamed to its new position
        return torch.empty_like(perm).scatter_(0, perm, torch.arange(len(perm), device=perm.device))[state[perm]]
    return state[perm] if how == "rows" else state[perm][:, perm]


# --- every measure's maps with intervals over images and a permutation null ----------------------------------------

CALIBRATION_ALPHA = 0.05
NULLS = ("moments", "exact")   # the CKA null: analytic from the exact permutation moments, or K permutations
ANALYTIC_P_FLOOR = 1e-10       # an analytic p below it is given as it: the approximation is not checked that far out
NULL_MOMENTS_SAID = (
    "analytic: the second model's images permuted (one permutation for all its layers), each entry's null a Pearson "
    "type III with the permutation distribution's exact mean, variance and skewness; the matched-layer mean's with its "
    f"exact variance and an approximate (conservative) skewness; p its upper tail (at least {ANALYTIC_P_FLOOR:g}); "
    f"calibrated score of Gröger et al. 2026 at α = {CALIBRATION_ALPHA} (τ its 95% quantile); max_p: the union bound "
    "over the map's entries at its largest (family-wise)")


def calibration(observed: torch.Tensor, null: torch.Tensor, smax: float = 1.0, alpha: float = CALIBRATION_ALPHA):
    """Permutation p-value and calibrated score (Gröger, Wen & Brbić 2026), entrywise: with K null values,
    p = (1 + #{null ≥ obs}) / (K + 1); τ = the ⌈(1 − α)(K + 1)⌉-th smallest of the observed and null values;
    calibrated = clip((obs − τ) / (smax − τ), 0, 1). Returns (p, calibrated, τ)."""
    k = len(null)
    tau = torch.cat([observed[None], null]).sort(0).values[math.ceil((1 - alpha) * (k + 1)) - 1]
    p = (1 + (null >= observed).sum(0)).double() / (k + 1)
    cal = ((observed - tau) / (smax - tau).clamp_min(1e-12)).clamp(0, 1)
    undefined = observed.isnan() | null.isnan().any(0)          # a constant layer: no value, so no p-value either
    return p.masked_fill(undefined, float("nan")), cal.masked_fill(undefined, float("nan")), tau


# --- the analytic permutation null of debiased CKA: its first three moments, exact, and a Pearson type III --------

# E T³ of T = Σ_{i≠j} Ã_ij B̃_π(i)π(j), π a uniform permutation of the n images and Ã, B̃ U-centred Grams (zero diagonal,
# zero row sums): Σ_v [c₁ t_A t_B + c₂ (t_A s_B + s_A t_B) + c₃ s_A s_B] / (n)_v over the v distinct images of a term,
# t = tr X³, s = Σ_ij X_ij³ (Möbius inversion over the partitions of the six indices; checked against all 7!
# permutations). For three layers under one permutation, E[T₁T₂T₃] is the same with t = tr X₁X₂X₃, s = Σ X₁∘X₂∘X₃.
THIRD_MOMENT_TERMS = {2: (0, 0, 4), 3: (8, 0, 24), 4: (24, -24, 80), 5: (48, -96, 192), 6: (64, -128, 256)}


def permutation_moments(n: int, ta, sa, tb, sb):
    """(sd, skewness) of debiased CKA under permutation of one model's images, between unit-norm U-centred states
    with cube invariants (ta, sa) and (tb, sb) (tensors broadcast): E T = 0, E T² = 2‖Ã‖²‖B̃‖² / (n(n − 3)), E T³ as
    THIRD_MOMENT_TERMS (a term over v > n distinct images is empty)."""
    var = 2 / (n * (n - 3))
    third = sum((c1 * ta * tb + c2 * (ta * sb + sa * tb) + c3 * sa * sb) / math.prod(float(n - k) for k in range(v))
                for v, (c1, c2, c3) in THIRD_MOMENT_TERMS.items() if v <= n)   # no term has more images than n
    return math.sqrt(var), third / var ** 1.5


def pearson3_tail(x, sd, skew) -> torch.Tensor:
    """P(X ≥ x) for X of mean 0, standard deviation sd and skewness γ as a Pearson type III: sign(γ)·θ(G − k) with G
    gamma of shape k = 4/γ² and θ = sd·|γ|/2 (the normal where |γ| < 1e-6)."""
    x, sd, skew = torch.broadcast_tensors(*(torch.as_tensor(v, dtype=torch.float64) for v in (x, sd, skew)))
    z = x / sd
    flat = skew.abs() < 1e-6
    g = torch.where(flat, torch.ones_like(skew), skew)
    k = 4 / g ** 2
    w = (k + 2 * z / g).clamp_min(0)
    tail = torch.where(g > 0, torch.special.gammaincc(k, w), torch.special.gammainc(k, w))
    return torch.where(flat, 0.5 * torch.special.erfc(z / math.sqrt(2)), tail)


def pearson3_quantile(q: float, sd, skew) -> torch.Tensor:
    """The q-quantile of pearson3_tail's distribution, by bisection (so a quantile and its tail always agree)."""
    sd, skew = torch.broadcast_tensors(torch.as_tensor(sd, dtype=torch.float64), torch.as_tensor(skew,
                                                                                                dtype=torch.float64))
    lo, hi = torch.full_like(sd, -50.0), torch.full_like(sd, 50.0)      # in units of sd: far past any useful q
    for _ in range(80):
        mid = (lo + hi) / 2
        above = pearson3_tail(mid * sd, sd, skew) > 1 - q
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return (lo + hi) / 2 * sd


def moment_calibration(observed, sd, skew, smax: float = 1.0, alpha: float = CALIBRATION_ALPHA):
    """calibration() against a Pearson type III null of the given moments: p its upper tail at the observed value,
    τ its (1 − α) quantile, calibrated = clip((obs − τ) / (smax − τ), 0, 1). Returns (p, calibrated, τ); p is at
    least ANALYTIC_P_FLOOR."""
    observed = torch.as_tensor(observed, dtype=torch.float64)
    p = pearson3_tail(observed, sd, skew).clamp_min(ANALYTIC_P_FLOOR)
    tau = pearson3_quantile(1 - alpha, sd, skew)
    cal = ((observed - tau) / (smax - tau).clamp_min(1e-12)).clamp(0, 1)
    undefined = observed.isnan() | torch.as_tensor(skew).isnan()
    return p.masked_fill(undefined, float("nan")), cal.masked_fill(undefined, float("nan")), tau


def _p_text(p: float) -> str:
    """"= 0.0123", or "≤ 1e-10" at the analytic null's floor."""
    return f"≤ {ANALYTIC_P_FLOOR:g}" if p <= ANALYTIC_P_FLOOR else f"= {p:.3g}"


def _trace_cube_lowrank(x: torch.Tensor) -> tuple[float, float]:
    """(tr Ã³, ‖Ã‖²) of the U-centred linear Gram Ã of x (n × d) in O(n d²), never forming Ã: Ã = M − diag M with
    M = F Gᵀ, F = [x, r, 1], G = [x, −1/(n − 2), c − r/(n − 2)], r_i = Σ_{j≠i} x_i·x_j, c = Σr / ((n − 1)(n − 2));
    with C = GᵀF and D = diag M: tr Ã³ = tr C³ − 3 Σ_i D_i f_iᵀ C g_i + 2 Σ D_i³ and ‖Ã‖² = tr C² − Σ D_i²."""
    n, x = len(x), x.double()
    x = x - x.mean(0)               # Ã does not change; a large offset would cancel catastrophically below (review)
    sq = (x * x).sum(1)
    r = x @ x.sum(0) - sq
    c = r.sum() / ((n - 1) * (n - 2))
    one = torch.ones(n, 1, dtype=torch.float64)
    f = torch.cat([x, r[:, None], one], 1).float()      # the two n × d² products in float32, the rest in float64
    g = torch.cat([x, -one / (n - 2), c - r[:, None] / (n - 2)], 1).float()
    cc = (g.T @ f).double()
    d = (f.double() * g.double()).sum(1)
    diag_m2 = ((f @ cc.float()).double() * g.double()).sum(1)               # (M²)_ii = f_iᵀ C g_i
    trace = torch.trace(cc @ cc @ cc) - 3 * (d * diag_m2).sum() + 2 * (d ** 3).sum()
    return float(trace), float((cc * cc.T).sum() - (d * d).sum())


def cube_invariants(state: torch.Tensor, x: torch.Tensor | None = None) -> tuple[float, float]:
    """(tr S³, Σ_ij S_ij³) of a unit-norm U-centred Gram S. Given the linear kernel's features x (n, d) with
    2d² < n² (two n·d² products against the n³ one), tr S³ comes from them (_trace_cube_lowrank)."""
    s = float(state.double().pow(3).sum())
    if x is not None and 2 * math.prod(x.shape[1:]) ** 2 < len(state) ** 2:     # flattened tokens: never a copy
        trace, sq = _trace_cube_lowrank(_flat64(x))
        if sq > 0 and abs(trace / sq ** 1.5) <= 1:         # |tr S³| ≤ ‖S‖³ = 1: else precision was lost, go direct
            return trace / sq ** 1.5, s
    s32 = state.double() if len(state) <= 1024 else state.float()   # float32 past that: the skewness needs no more
    return float(((s32 @ s32) * s32).double().sum()), s


def _score_map(m: Measure, sa: list, sb: list) -> torch.Tensor:
    if m.inner:
        return m.inner * torch.stack([a.flatten() for a in sa]) @ torch.stack([b.flatten() for b in sb]).T
    return torch.tensor([[m.score(a, b) for b in sb] for a in sa], dtype=torch.float64)


def _null_maps(m: Measure, sa: list, sb: list, perms: list) -> torch.Tensor:
    """(K, L_a, L_b): the map with b's images in each permutation's order, the same for all of b's layers. An inner-
    product measure re-indexes b's stacked n × n states and takes one product per permutation."""
    if not m.inner:
        return torch.stack([_score_map(m, sa, [permuted(s, m.permute, p) for s in sb]) for p in perms])
    n = len(sb[0])                     # float32 products (a p-value needs no more), one gather per permutation
    a, b = (m.inner * torch.stack([s.flatten() for s in sa])).float(), torch.stack(sb).flatten(1).float()
    return torch.stack([(a @ b[:, (p[:, None] * n + p[None, :]).flatten()].T).double() for p in perms])


def _states(m: Measure, feats: dict, names, rows=None) -> list:
    return [m.prep(feats[p] if rows is None else feats[p][rows]) for p in names]


def _prepared(m: Measure, feats: dict, groups: int, seed: int) -> tuple[list, list | None]:
    """A model's layers read once for a measure: (their states, and the states with each jackknife group of images
    left out; None when the n images are too few for `groups` groups). The partition is drawn from `seed`, so every
    model of a comparison leaves out the same images."""
    names, n = list(feats), len(next(iter(feats.values())))
    part = jackknife_groups(n, groups, seed)
    jack = [_states(m, feats, names, part != k) for k in range(groups)] if groups >= 3 and n >= 2 * groups else None
    return _states(m, feats, names), jack


def measure_maps(fa: dict, fb: dict, name: str, *, permutations: int = 200, groups: int = JACKKNIFE_GROUPS,
                 seed: int = 0, prepared=None, measure_row: Measure | None = None, n: int | None = None) -> dict:
    """One measure between every layer of two models ({point: (n, d)} on the same images): the map (rows: a's layers),
    for an asymmetric measure the reverse map (b's layer predicting a's, same orientation), the delete-a-group
    jackknife spread over images (Spread "jackknife"), and the permutation null (K, L_a, L_b): b's images permuted,
    the same permutation for all its layers (aggregation-aware, so a summary's null is the summary of the nulls).
    The jackknife partition is drawn from `seed`, the permutations from `seed + 1`. `prepared`: the two models'
    _prepared(...) when a caller reuses them across pairs (then `n`, the number of images, with them), `measure_row`
    a row in place of MEASURES[name]."""
    m = measure_row or measure(name)
    n = n or len(next(iter(fa.values())))
    (sa, ja), (sb, jb) = prepared or (_prepared(m, fa, groups, seed), _prepared(m, fb, groups, seed))
    out = dict(map=_score_map(m, sa, sb), reverse=None if m.symmetric else _score_map(m, sb, sa).T)
    if ja is not None:
        reps = [_score_map(m, a, b) for a, b in zip(ja, jb, strict=True)]
        out["spread"] = Spread("jackknife", torch.stack(reps), units=len(reps), range=m.range, scale="logit")
    if permutations:
        g = torch.Generator().manual_seed(seed + 1)
        perms = [torch.randperm(n, generator=g) for _ in range(permutations)]
        out["null"] = _null_maps(m, sa, sb, perms)
    return out


def _measure_entry(name: str, r: dict, ci: float) -> dict:
    """What a pair's result records of one measure: the map with [low, high], p and calibrated per entry, and the
    matched-layer mean with the same (its null the mean of the null maps)."""
    m, est = MEASURES[name], r["map"]
    entry = dict(id=m.resi_id, map=est)
    if r.get("reverse") is not None:
        entry["reverse"] = r["reverse"]
    matched = matched_pairs(*est.shape)
    entry["diagonal_mean"] = diagonal_mean(est)
    if "spread" in r and ci:
        entry["low"], entry["high"] = r["spread"].interval(est, None, ci)
        entry["diagonal_mean_ci"] = list(r["spread"].interval(entry["diagonal_mean"], matched, ci))
    if "null" in r:
        smax = m.range[1]
        entry["p"], entry["calibrated"], _ = calibration(est, r["null"], smax)
        i, j = torch.tensor([e[0] for e in matched]), torch.tensor([e[1] for e in matched])
        p, cal, _ = calibration(torch.tensor(entry["diagonal_mean"]), r["null"][:, i, j].mean(-1), smax)
        entry["diagonal_mean_p"], entry["diagonal_mean_calibrated"] = float(p), float(cal)
    return entry


def _measure_matrix(name: str, specs, at, results: dict, entries: dict, ci: float) -> dict:
    """One measure between every two models at their `at` points: value, [low, high], p, calibrated (from each pair's
    _measure_entry), and the jackknife replicates there (paired summaries across pairs: the report's). matrix[x, y]
    is s(x, y): for an asymmetric measure x predicts y, and (j, i) holds the reverse map's value (its interval,
    p-value and replicates are not computed: NaN), so no paired differences are formed for it."""
    k, symmetric = len(specs), MEASURES[name].symmetric
    out = {key: torch.full((k, k), float("nan"), dtype=torch.float64)
           for key in ("matrix", "low", "high", "p", "calibrated")}
    for (i, j), r in results.items():
        if "spread" in r:   # the replicates at the models' points: paired summaries across pairs (report)
            reps = r["spread"].values[:, at[i], at[j]]
            out.setdefault("jackknife", torch.full((k, k, len(reps)), float("nan"), dtype=torch.float64))
            out["jackknife"][i, j] = reps
            if symmetric:
                out["jackknife"][j, i] = reps
        e = entries[(i, j)]
        for key, src in (("matrix", "map"), ("low", "low"), ("high", "high"), ("p", "p"),
                         ("calibrated", "calibrated")):
            if src in e:
                out[key][i, j] = e[src][at[i], at[j]]
                if symmetric:
                    out[key][j, i] = out[key][i, j]
        if not symmetric and e.get("reverse") is not None:
            out["matrix"][j, i] = e["reverse"][at[i], at[j]]          # b's layer predicting a's
    if "jackknife" in out and k >= 3 and ci and symmetric:   # the same groups left out for every pair: paired
        g = out["jackknife"].shape[-1]
        out["differences"] = paired_differences(specs, out["matrix"], {
            p: Spread("jackknife", out["jackknife"][p], units=g) for p in results if "spread" in results[p]},
            ci, MEASURES[name].range)
    return dict(models=list(specs), id=MEASURES[name].resi_id, **out)


def measures_info(names, permutations, ci: float) -> dict:
    """How each measure's numbers are to be read: range, invariances, chance, interval and null (`permutations`: a
    count for all, or {name: count}; "moments": the comparison's analytic CKA null)."""
    k = permutations if isinstance(permutations, dict) else dict.fromkeys(names, permutations)
    return {n: dict(id=MEASURES[n].resi_id, cite=MEASURES[n].cite, range=list(MEASURES[n].range),
                    invariance=list(MEASURES[n].invariance), symmetric=MEASURES[n].symmetric,
                    interval=f"delete-a-group jackknife over images ({JACKKNIFE_GROUPS} groups), logit scale where "
                             "the range is bounded, t quantile, within "
                             "the range" if ci else None,
                    null=NULL_MOMENTS_SAID if k[n] == "moments" else
                    f"{k[n]} permutations of the second model's images (the same for all its layers); "
                    f"calibrated score of Gröger et al. 2026 at α = {CALIBRATION_ALPHA}" if k[n] else None)
            for n in names}


MEASURE_NULL_SCORES = 4000   # a non-product measure's null evaluates at most this many layer pairs × permutations


def _null_size(name: str, permutations: int, pairs, feats, n: int) -> int:
    """How many permutations a measure's null affords: an inner-product measure as the CKA null (NULL_BUDGET_FLOPS),
    any other MEASURE_NULL_SCORES score evaluations; at least 19 (a p-value of 1/20), else none."""
    cells = sum(len(feats[i]) * len(feats[j]) for i, j in pairs)
    if not cells:
        return 0
    affordable = int(NULL_BUDGET_FLOPS // (2 * n * n * cells)) if MEASURES[name].inner else MEASURE_NULL_SCORES // cells
    return permutations if permutations <= affordable else affordable if affordable >= 19 else 0


ESTIMATORS = ("auto", "biased", "debiased", "minibatch")   # and "full", the former name of "biased"


def _check_batches(n: int, batch_size: int, estimator: str):
    if estimator == "minibatch" and (batch_size < 4 or n < 4):
        raise UsageError(f"minibatch CKA needs {_opt('batch_size')} ≥ 4 and {_opt('n')} ≥ 4 (got batch {batch_size}, n {n})")
    if estimator == "debiased" and n < 4:
        raise UsageError(f"debiased CKA (what {_opt('estimator')} auto chooses at this size) needs n ≥ 4 images, got {n}")
    if n < 2:
        raise UsageError(f"CKA needs at least 2 images, got {n}")


def feature_bytes(model: ViT, points, tokens: str, n: int) -> int:
    """Bytes extract() would hold for n images (float32); a CNN's from each point's stage (its stride and width)."""
    if isinstance(model, ConvNet):
        shapes = cnn_point_shapes(model)
        return 4 * n * sum(shapes[p][1] * (shapes[p][0] if tokens in ("all", "flat", "patch") else 1) for p in points)
    g = (model.input_size // model.cfg.patch_size) ** 2
    t = {"all": g + model.cfg.num_prefix, "flat": g + model.cfg.num_prefix, "patch": g}.get(tokens, 1)
    d, h = model.cfg.embed_dim, model.cfg.mlp_hidden
    width = {"attn.qkv": 3 * d, "mlp.fc1": h * (2 if model.cfg.swiglu else 1), "mlp.act": h}
    return 4 * n * t * sum(width.get(p.split(".", 2)[-1] if p.count(".") >= 2 else "", d) for p in points)


def choose_estimator(models, points_per_model, tokens, n, requested=None, budget=2 << 30, kernel="linear") -> str:
    """What a requested estimator means: biased (Kornblith et al.'s HSIC₀; "full" is its former name), debiased
    (Song et al.'s U-statistic), minibatch (Nguyen et al.), or auto (None): always an unbiased one — debiased when
    every model's features fit the budget (or the kernel is not linear), else minibatch, whose memory does not grow
    with n. Both estimate the same population HSIC, so maps at any n compare; biased is never chosen unasked."""
    requested = {None: "auto", "full": "biased"}.get(requested, requested)
    if requested not in ESTIMATORS:
        raise UsageError(f"unknown estimator {requested!r}: choose {', '.join(ESTIMATORS)}")
    if requested != "auto":
        return requested
    if kernel != "linear":
        return "debiased"
    need = sum(feature_bytes(m, p, tokens, n) for m, p in zip(models, points_per_model, strict=True))
    return "debiased" if need <= budget else "minibatch"


def _comparison(specs, names, at, maps, spreads, n, ci, estimator, **extra) -> dict:
    """A comparison's result: every pair's map entry, the model matrix, and how to read them."""
    kinds = {sp.kind for sp in spreads.values()}
    g = next((sp.units for sp in spreads.values() if sp.kind == "jackknife"), JACKKNIFE_GROUPS)
    how = "; ".join({"bootstrap": "bootstrap over batches",
                     "jackknife": f"delete-a-group jackknife over images ({g} seeded groups), logit scale inside the "
                                  f"range, t with {g - 1} degrees of freedom",
                     "influence": "infinitesimal jackknife over images (the Grams exceeded the memory budget)"}[k]
                    for k in sorted(kinds)) or "none"
    return dict(pairs=[_pair_entry(specs, names, i, j, m, spreads.get((i, j)), ci) for (i, j), m in maps.items()],
                model_matrix=_model_matrix(specs, names, at, maps, spreads, ci), estimator=estimator, n=n,
                ci=ci or None, interval=f"{how}, within [0, 1]" if ci else None,
                **{"batch_size": None, "batch_order": None, **extra})


def compare_features(feature_sets: list[dict], specs: list[str], *, estimator=None, kernel="linear",
                     rbf_threshold=1.0, model_point: str | None = None, ci: float = 0.95, measures=None,
                     permutations: int = 200, seed: int = 0, null: str = "moments") -> dict:
    """compare_models() for features already extracted (each a {point: (n, d)} dict on the same samples in the same
    order, see aligned_features): the debiased estimator unless `estimator` = "biased"; `measures` and `null` as
    there."""
    measures = _checked_measures(measures, permutations)
    if null not in NULLS:
        raise UsageError(f"unknown null {null!r}: choose {', '.join(NULLS)}")
    estimator = {None: "debiased", "auto": "debiased", "full": "biased"}.get(estimator, estimator)
    if estimator not in ("biased", "debiased"):
        raise UsageError(f"features in memory: {_opt('estimator')} biased or debiased (auto = debiased), not "
                         f"{estimator}")
    if not 0 <= ci < 1:
        raise UsageError(f"{_opt('ci')} must lie in [0, 1) (0 = no intervals), got {ci}")
    names = [list(f) for f in feature_sets]
    _check_n(len(next(iter(feature_sets[0].values()))), estimator == "debiased")
    pairs = [(i, j) for i in range(len(specs)) for j in range(i + 1, len(specs))]
    maps, spreads, n = _maps_of_features(feature_sets, specs, pairs, kernel, estimator == "debiased", rbf_threshold,
                                         ci > 0, seed)
    at = [_point_index(nm, model_point) for nm in names]
    out = _comparison(specs, names, at, maps, spreads, n, ci, estimator)
    per_permutation = 2 * n * n * sum(len(feature_sets[i]) * len(feature_sets[j]) for i, j in pairs)
    held = 12 * n * n * sum(len(f) for f in feature_sets)     # every model's Grams in float64, and a float32 copy
    if held > GRAM_BUDGET_BYTES:
        log.warning(f"notice: no permutation null: every model's n × n Grams would hold {held / 2 ** 30:.1f} GiB, more "
                    f"than the {GRAM_BUDGET_BYTES / 2 ** 30:.0f} GiB budget (fewer {_opt('n')} or {_opt('points')})")
    analytic = null == "moments" and estimator == "debiased" and bool(permutations)   # costs no permutation
    k = 0 if held > GRAM_BUDGET_BYTES else permutations if analytic else _null_size("cka", permutations, pairs,
                                                                                      feature_sets, n)
    if 0 < k < permutations or (permutations and not k and held <= GRAM_BUDGET_BYTES):
        log.warning(f"notice: {permutations} permutations of {len(pairs)} CKA maps at n = {n} would take "
                    f"{permutations * per_permutation / 1e12:.1f} TFLOP: "
                    + (f"the null rests on {k} (the smallest p-value is 1/{k + 1})" if k else "no permutation null")
                    + f" (lower {_opt('permutations')} or fewer {_opt('points')})")
    if k:
        _with_cka_null(out, feature_sets, at, pairs, k, seed, estimator == "debiased", kernel, rbf_threshold, null)
    elif permutations:
        out["null"] = ("none: the Grams are over GRAM_BUDGET_BYTES" if held > GRAM_BUDGET_BYTES else
                       f"none: {per_permutation / 1e12:.2f} TFLOP per permutation, over NULL_BUDGET_FLOPS")
    same = bool(k) and estimator == "debiased" and kernel == "linear" and k == permutations
    return _with_measures(out, feature_sets, specs, at, pairs, measures, permutations, ci, seed,
                          reuse_cka_null="moments" if same and analytic else same)


def _cka_as_measure(debiased: bool, kernel: str, rbf_threshold: float) -> Measure:
    """The CKA a comparison computed (its estimator and kernel) as an inner-product MEASURES row, for its null."""
    def prep(x):
        x = _flat64(x)
        k = center_gram(gram_linear(x) if kernel == "linear" else gram_rbf(x, rbf_threshold), unbiased=debiased)
        return k / k.norm().clamp_min(1e-300)
    return dataclasses.replace(MEASURES["cka"], prep=prep)


def _null_state(x) -> torch.Tensor:
    """A layer's unit-norm U-centred linear Gram in float32: what the analytic null reads of it (cube invariants and
    inner products between layers, to a relative 1e-4 or better)."""
    x = _centred32(x).float()       # Ã does not change; float32 products of far-off features would be rounding
    k = center_gram(x @ x.T, unbiased=True, dtype=torch.float32, inplace=True)
    return k / k.norm().clamp_min(1e-30)


def _null_invariants(states: list, feats: dict | None) -> dict:
    """What the analytic null needs of one model's layers: each unit-norm state's cube invariants (t, s) and the
    layers' inner products ⟨S_k, S_l⟩ (the covariances of their nulls under one permutation)."""
    xs = list(feats.values()) if feats is not None else [None] * len(states)
    inv = [cube_invariants(s, x) for s, x in zip(states, xs, strict=True)]
    flat = torch.stack([s.flatten().float() for s in states])
    return dict(t=torch.tensor([v[0] for v in inv], dtype=torch.float64),
                s=torch.tensor([v[1] for v in inv], dtype=torch.float64), inner=(flat @ flat.T).double())


def _moment_null_entry(entry: dict, ia: dict, ib: dict, n: int):
    """A pair's p-values and calibrated scores from the analytic null: every entry's own Pearson III (exact sd and
    skewness); the matched-layer mean's from its exact variance under one permutation for all of b's layers,
    Var = sd² · mean_{kl} ρ_kl with ρ_kl = ⟨A_k, A_l⟩⟨B_k′, B_l′⟩, and its third cumulant approximated as
    sd³ · mean_{klm} (γ_k γ_l γ_m)^⅓ (ρ_kl ρ_lm ρ_km)^½ (exact when the layers' nulls are equal or independent;
    against the exact cross moments it overstated the skewness by 0–17%, the conservative side); max_p the union
    bound Σ P(T_kl ≥ the map's largest entry)."""
    est = torch.as_tensor(entry["cka"], dtype=torch.float64)
    sd, skew = permutation_moments(n, ia["t"][:, None], ia["s"][:, None], ib["t"][None], ib["s"][None])
    entry["cka_p"], entry["cka_calibrated"], _ = moment_calibration(est, sd, skew)
    matched = matched_pairs(*est.shape)
    r, c = torch.tensor([e[0] for e in matched]), torch.tensor([e[1] for e in matched])
    rho = ia["inner"][r][:, r] * ib["inner"][c][:, c]
    shrink = math.sqrt(max(float(rho.mean()), 0.0))
    dr = torch.diag(torch.sign(skew[r, c]) * skew[r, c].abs() ** (1 / 3)) @ rho.clamp_min(0).sqrt()
    third = float(torch.trace(dr @ dr @ dr)) / len(matched) ** 3        # mean_klm (γγγ)^⅓ (ρρρ)^½, in sd³
    skew_mean = third / shrink ** 3 if shrink > 0 else 0.0
    p, cal, _ = moment_calibration(torch.tensor(entry["diagonal_mean"]), sd * shrink, skew_mean)
    entry["diagonal_mean_p"], entry["diagonal_mean_calibrated"] = float(p), float(cal)
    finite = est.isfinite()
    union = float(pearson3_tail(est[finite].max(), sd, skew[finite]).sum()) if finite.any() else float("nan")
    entry["max_p"] = union if math.isnan(union) else min(1.0, max(ANALYTIC_P_FLOOR, union))


def _exact_null_entry(entry: dict, sa: list, sb: list, m: Measure, permutations: int, seed: int, n: int):
    """A pair's p-values and calibrated scores from `permutations` null maps: b's images permuted, one permutation
    for all its layers (the matched-layer mean's null is the mean of each null map there; max_p compares the map's
    largest entry with each null map's largest)."""
    null = measure_maps({}, {}, "cka", permutations=permutations, seed=seed, prepared=((sa, None), (sb, None)),
                        measure_row=m, n=n)["null"]
    est = torch.as_tensor(entry["cka"], dtype=torch.float64)
    entry["cka_p"], entry["cka_calibrated"], _ = calibration(est, null)
    matched = matched_pairs(*est.shape)
    r, c = torch.tensor([e[0] for e in matched]), torch.tensor([e[1] for e in matched])
    p, cal, _ = calibration(torch.tensor(entry["diagonal_mean"]), null[:, r, c].mean(-1))
    entry["diagonal_mean_p"], entry["diagonal_mean_calibrated"] = float(p), float(cal)
    finite = est.isfinite()                              # the largest defined entry, against the null's
    entry["max_p"] = float(calibration(est[finite].max(), null[:, finite].max(1).values)[0]) if finite.any() \
        else float("nan")


def _with_cka_null(out: dict, feats, at, pairs, permutations: int, seed: int, debiased: bool, kernel: str,
                   rbf_threshold: float, null: str = "moments"):
    """p-values and calibrated scores (Gröger et al. 2026) beside every CKA map and summary: `cka_p`, `cka_calibrated`
    (same shape as `cka`), `diagonal_mean_p` / `_calibrated`, `max_p` (family-wise over the map); `cka_p` /
    `cka_calibrated` in the model matrix. The null permutes b's images, one permutation for all its layers: for
    debiased CKA with null "moments" a Pearson III of its exact first three moments (_moment_null_entry), else
    `permutations` permutations (_exact_null_entry)."""
    m = _cka_as_measure(debiased, kernel, rbf_threshold)
    used = sorted({k for p in pairs for k in p})
    analytic = null == "moments" and debiased
    prep = _null_state if analytic and kernel == "linear" else m.prep      # moments need no float64 states
    states = {k: [prep(f) for f in feats[k].values()] for k in used}
    if analytic:
        with step(f"the analytic CKA null: cube invariants of {sum(len(states[k]) for k in used)} layers"):
            inv = {k: _null_invariants(states[k], feats[k] if kernel == "linear" else None) for k in used}
    mm = out["model_matrix"]
    mm["cka_p"], mm["cka_calibrated"] = (torch.full_like(mm["cka"], float("nan")) for _ in range(2))
    for (i, j), entry in zip(pairs, out["pairs"], strict=True):
        n = len(next(iter(feats[i].values())))
        if analytic:
            _moment_null_entry(entry, inv[i], inv[j], n)
        else:
            _exact_null_entry(entry, states[i], states[j], m, permutations, seed, n)
        for key in ("cka_p", "cka_calibrated"):
            mm[key][i, j] = mm[key][j, i] = entry[key][at[i], at[j]]
    out["null"] = (NULL_MOMENTS_SAID if analytic else
                   f"{permutations} permutations of the second model's images, the same for all its layers; p = (1 + "
                   f"#null ≥ observed) / (K + 1); calibrated score of Gröger et al. 2026 at α = {CALIBRATION_ALPHA}; "
                   "max_p: the map's largest entry against each null map's largest (family-wise over the map)")


def compare_models(models: list[ViT], images: ImageSet, *, points=None, tokens="flat", estimator=None,
                   kernel="linear", rbf_threshold=1.0, batch_size=32, device=None, dtype=None, cache_dir=None,
                   progress=False, group=None, model_point: str | None = None, ci: float = 0.95,
                   ci_resamples: int = 1000, seed: int = 0, measures=None, permutations: int = 200,
                   null: str = "moments") -> dict:
    """CKA maps of every pair of models (each extracted once) and the models×models matrix at `model_point`
    (default: each model's last point; "last"/"first" or a point name present in every model's list). estimator
    None = auto (see choose_estimator: always an unbiased one). With ci > 0 every map and summary carries a
    `ci`-level interval: bootstrap over batches for minibatch, the delete-a-group jackknife over images otherwise.
    Under torch.distributed each process takes whole minibatches i ≡ rank (mod world): minibatch sums are
    all-reduced, full-batch features gathered, so every estimator equals the single-process result. `measures`
    (MEASURES names) adds each measure's maps, intervals, permutation p-values and calibrated scores (measure_maps).
    Every CKA map and summary carries a p-value and calibrated score against "no relation" (0 `permutations`: none):
    for debiased CKA with `null` "moments" from its permutation distribution's exact moments, else from
    `permutations` permutations of the second model's images (see _with_cka_null)."""
    measures = _checked_measures(measures, permutations)
    if null not in NULLS:
        raise UsageError(f"unknown null {null!r}: choose {', '.join(NULLS)}")
    names = [resolve_points(m, points) for m in models]
    at = [_point_index(n, model_point) for n in names]
    estimator = choose_estimator(models, names, tokens, len(images), estimator, kernel=kernel)
    check_cka_options(estimator, kernel, len(images), batch_size, measures, ci, rbf_threshold)
    usable = len(images) // batch_size + (len(images) % batch_size >= 4)   # a last batch under 4 images is skipped
    if estimator == "minibatch" and ci and usable < MIN_BOOTSTRAP_BATCHES:
        log.warning(f"notice: no intervals: the bootstrap over batches needs at least {MIN_BOOTSTRAP_BATCHES} batches "
                    f"(with fewer it under-covers), and {len(images)} "
                    f"images at {_opt('batch_size')} {batch_size} make {usable} usable (lower "
                    f"{_opt('batch_size')})")
        ci = 0
    run = dict(batch_size=batch_size, device=device, dtype=dtype, progress=progress, group=group)
    specs = [m.source["spec"] for m in models]
    if estimator != "minibatch":   # features in memory: the one path compare_features takes
        feats = cached_extract_many(models, images, names, tokens, cache_dir=cache_dir, **run)
        return compare_features(feats, specs, estimator=estimator, kernel=kernel, rbf_threshold=rbf_threshold,
                                model_point=model_point, ci=ci, measures=measures, permutations=permutations, seed=seed,
                                null=null)
    pairs = [(i, j) for i in range(len(models)) for j in range(i + 1, len(models))]
    maps, spreads, n = _minibatch_maps(models, images, names, pairs, tokens, resamples=ci_resamples if ci else 0,
                                       seed=seed, **run)
    return _comparison(specs, names, at, maps, spreads, n, ci, estimator, batch_size=batch_size,
                       batch_order=f"random (seed {seed})")


def check_cka_options(estimator: str, kernel: str, n: int, batch_size: int, measures, ci: float,
                      rbf_threshold: float):
    """What a comparison's settings must satisfy before anything is extracted (the CLI calls it before reading any
    model, for an estimator it was given)."""
    if estimator in ("debiased", "minibatch", "biased"):
        _check_batches(n, batch_size, estimator)
    if measures and estimator == "minibatch":
        raise UsageError(f"{_opt('measures')} read every image's features at once, the minibatch estimator never holds "
                         f"them: give {_opt('estimator')} debiased (or biased), fewer {_opt('points')} or narrower "
                         f"{_opt('tokens')}")
    if kernel != "linear" and estimator == "minibatch":
        raise UsageError(f"the minibatch estimator is linear only: use {_opt('estimator')} biased or debiased with "
                         f"{_opt('kernel')} rbf")
    if not 0 <= ci < 1:
        raise UsageError(f"{_opt('ci')} must lie in [0, 1) (0 = no intervals), got {ci}")
    if kernel == "rbf":
        _check_rbf_threshold(rbf_threshold)


def _checked_measures(measures, permutations: int) -> list[str]:
    """Measure names from a list or a comma list ("all": every MEASURES row), each known, none twice."""
    if measures is None:
        return []
    names = [t.strip() for t in (measures.split(",") if isinstance(measures, str) else measures) if t.strip()]
    names = list(MEASURES) if names == ["all"] else names
    for n in names:
        measure(n)
    if len(set(names)) != len(names):
        raise UsageError(f"measures named twice in {','.join(names)}")
    in_range("permutations", permutations, 0, 100000)
    return names


def _with_measures(out: dict, feats, specs, at, pairs, measures: list[str], permutations: int, ci: float,
                   seed: int, reuse_cka_null: bool | str = False) -> dict:
    """A comparison's result with every measure's entries added: per pair `measures` {name: _measure_entry}, and
    `model_matrix["measures"]` {name: _measure_matrix}; `measures` at the top says how to read each. Each null is
    as large as its budget affords (_null_size, said); with reuse_cka_null the cka measure takes the comparison's
    own CKA null (the same statistic) instead of computing it again ("moments": that null is the analytic one)."""
    if not measures:
        return out
    n, sizes = len(next(iter(feats[0].values()))), {}
    for name in measures:
        reuse = reuse_cka_null and name == "cka"
        sizes[name] = k = 0 if reuse else _null_size(name, permutations, pairs, feats, n)
        if 0 < k < permutations or (permutations and not k and not reuse):
            log.warning(f"notice: {name}: {permutations} permutations of {len(pairs)} map(s) are over the budget; its "
                        + (f"null rests on {k} (the smallest p-value is 1/{k + 1})" if k else "has no null"))
        results, entries, prepared = {}, {}, {}   # each model's layers read once for this measure
        for (i, j), entry in zip(pairs, out["pairs"], strict=True):
            for m in (i, j):
                if m not in prepared:
                    prepared[m] = _prepared(MEASURES[name], feats[m], min(JACKKNIFE_GROUPS, n // 2), seed)
            with _logged_warnings(f"{specs[i]} vs {specs[j]} ({name}): "):
                results[(i, j)] = measure_maps(feats[i], feats[j], name, permutations=k, seed=seed,
                                               prepared=(prepared[i], prepared[j]))
            e = entries[(i, j)] = _measure_entry(name, results[(i, j)], ci)
            if reuse:
                e.update(p=entry["cka_p"], calibrated=entry["cka_calibrated"], diagonal_mean_p=entry["diagonal_mean_p"],
                         diagonal_mean_calibrated=entry["diagonal_mean_calibrated"])
            entry.setdefault("measures", {})[name] = e
        out["model_matrix"].setdefault("measures", {})[name] = _measure_matrix(name, specs, at, results, entries, ci)
        if reuse:
            sizes[name] = "moments" if reuse_cka_null == "moments" else permutations
    out["measures"] = measures_info(measures, sizes, ci)
    return out


def _model_matrix(specs, names, at, maps, spreads, ci) -> dict:
    """CKA between every two models at their `at` points (1 on the diagonal), with intervals."""
    matrix = torch.eye(len(specs), dtype=torch.float64)
    low, high = matrix.clone(), matrix.clone()
    for (i, j), m in maps.items():
        matrix[i, j] = matrix[j, i] = m[at[i], at[j]]
        lo, hi = spreads[(i, j)].interval(float(m[at[i], at[j]]), [(at[i], at[j])], ci) if (i, j) in spreads else \
            (float("nan"), float("nan"))       # no spread for this pair: no interval, never a zero-width one
        low[i, j] = low[j, i] = lo
        high[i, j] = high[j, i] = hi
    out = dict(models=specs, point=[n[k] for n, k in zip(names, at, strict=True)], cka=matrix)
    if spreads and all(s.kind == "jackknife" for s in spreads.values()):   # the same groups for every pair: the
        g = next(iter(spreads.values())).units                            # replicates of paired summaries (report)
        out["jackknife"] = torch.full((len(specs), len(specs), g), float("nan"), dtype=torch.float64)
        for (i, j), s in spreads.items():
            out["jackknife"][i, j] = out["jackknife"][j, i] = s.values[:, at[i], at[j]]
    if ci and spreads:
        out["cka_low"], out["cka_high"] = low, high
        if len(specs) >= 3:
            out["differences"] = paired_differences(specs, matrix, {p: s.at(at[p[0]], at[p[1]])
                                                                    for p, s in spreads.items()}, ci)
    return out


def paired_test(spread: Spread, diff: float, level: float, searched: int = 1) -> dict:
    """A difference of two similarities on the same images with its `level` interval and two-sided p from the
    difference's own spread (`spread`: influences, bootstrap draws or jackknife groups of the difference); p × searched
    (Bonferroni, at most 1) when the difference was picked among `searched` candidates after looking at the data."""
    se = float(spread.se())
    low, high = (float(v) for v in spread.interval(diff, None, level))
    if not math.isfinite(se) or not math.isfinite(diff):
        p = float("nan")                                   # no spread (too few batches, a constant layer): no test
    else:
        p = two_sided_p(diff / se if se > 0 else (0.0 if diff == 0 else math.inf), spread.dof)
    return dict(diff=diff, low=low, high=high, p=p if math.isnan(p) else min(1.0, p * searched), searched=searched)


def paired_differences(specs, matrix: torch.Tensor, spread_of: dict, level: float,
                       value_range=(0.0, 1.0)) -> list[dict]:
    """For every model X and two others Y, Z: s(X, Y) − s(X, Z) with its `level` interval and two-sided p-value from
    the joint spread of the two similarities on the same images (`spread_of[(i, j)]`, i < j: the entry's influences,
    shared bootstrap draws or jackknife groups, whose difference is the difference's): the paired test, not the
    overlap of two intervals."""
    lo, hi = value_range
    out = []
    for x, y, z in itertools.permutations(range(len(specs)), 3):
        if y > z or (min(x, y), max(x, y)) not in spread_of or (min(x, z), max(x, z)) not in spread_of:
            continue
        a, b = spread_of[(min(x, y), max(x, y))], spread_of[(min(x, z), max(x, z))]
        d = Spread(a.kind, a.values - b.values, a.units, range=(lo - hi, hi - lo))
        t = paired_test(d, float(matrix[x, y] - matrix[x, z]), level)
        out.append(dict(a=specs[x], b=specs[y], c=specs[z], diff=t["diff"], low=t["low"], high=t["high"], p=t["p"]))
    return out


def _pair_entry(specs, names, i: int, j: int, m: torch.Tensor, spread: Spread | None, ci: float) -> dict:
    """One pair's map with its summaries (matched-layer mean, CKA vs layer distance, per sub-layer type), and
    with a spread their intervals: cka_low/cka_high beside cka, [low, high] beside each summary."""
    entry = dict(a=specs[i], b=specs[j], index=[i, j], layers_a=names[i], layers_b=names[j], cka=m,
                 diagonal_mean=diagonal_mean(m))
    summaries = {"diagonal_mean": (entry["diagonal_mean"], matched_pairs(*m.shape))}
    if m.shape[0] == m.shape[1]:
        entry["cka_vs_distance"] = cka_vs_distance(m)
    types = slice_by_type(m, names[i], names[j])
    if len(types) > 1:
        entry["by_type_diagonal_mean"] = {t: v["diagonal_mean"] for t, v in types.items()}
    if spread is None:
        return entry
    entry["cka_low"], entry["cka_high"] = spread.interval(m, None, ci)
    ci_of = lambda est, entries: list(spread.interval(est, entries, ci))
    entry["diagonal_mean_ci"] = ci_of(*summaries["diagonal_mean"])
    if "cka_vs_distance" in entry:
        entry["cka_vs_distance_ci"] = [ci_of(v, p) for v, p in zip(entry["cka_vs_distance"],
                                                                    distance_pairs(*m.shape), strict=True)]
    if "by_type_diagonal_mean" in entry:
        entry["by_type_diagonal_mean_ci"] = {t: ci_of(v["diagonal_mean"], v["matched"]) for t, v in types.items()}
        entry["by_type_first_quarter"], quarter = {}, {}     # matched-layer mean over the first quarter of the blocks
        for t, v in types.items():
            quarter[t] = v["matched"][: max(1, len(v["matched"]) // 4)]
            mean = float(torch.stack([m[i, j] for i, j in quarter[t]]).mean())
            entry["by_type_first_quarter"][t] = [mean, *ci_of(mean, quarter[t])]
        early = {t: v for t, v in entry["by_type_first_quarter"].items() if t != "residual"}
        if len(early) > 1:
            entry["least_agreeing_type"] = _least_agreeing(early, quarter, spread, ci)
    ra, rb = ([k for k, la in enumerate(nm) if re.fullmatch(r"blocks\.\d+", la)] for nm in (names[i], names[j]))
    if len(ra) > 1 and len(rb) > 1:    # residual streams matched to residual streams at the same relative depth
        entry["lowest_block"] = _lowest_block(m, [(ra[p], rb[q]) for p, q in matched_pairs(len(ra), len(rb))],
                                              spread, ci)
    return entry


def _lowest_block(m: torch.Tensor, cells: list, spread: Spread, level: float) -> dict:
    """The block (among the matched residual-stream cells) where the two models agree least, and how far CKA falls
    there from the first block: a paired test, Bonferroni over the len(cells) − 1 later blocks searched. Block 0
    itself may be the lowest: then there is no fall to test."""
    low = min(range(len(cells)), key=lambda c: float(m[cells[c]]))
    out = dict(block=low, first=float(m[cells[0]]), lowest=float(m[cells[low]]))
    if low == 0:
        return dict(out, diff=0.0, low=float("nan"), high=float("nan"), p=float("nan"), searched=len(cells) - 1)
    return dict(out, **paired_test(spread.contrast([cells[0]], [cells[low]]), out["first"] - out["lowest"], level,
                                   searched=len(cells) - 1))


def _least_agreeing(means: dict, entries: dict, spread: Spread, level: float) -> dict:
    """The sub-layer type with the least first-quarter CKA, tested against every other type by a paired test; the
    claim "it agrees least" needs all of them, searched among the T types: p = T × the largest p (Bonferroni over
    the candidates, an intersection-union test for each)."""
    worst = min(means, key=lambda t: means[t][0])
    tests = {t: paired_test(spread.contrast(entries[t], entries[worst]), means[t][0] - means[worst][0], level)
             for t in means if t != worst}
    ps = [v["p"] for v in tests.values()]
    return dict(type=worst, vs=tests, p=float("nan") if any(map(math.isnan, ps)) else min(1.0, len(means) * max(ps)),
                correction=f"Bonferroni over the {len(means)} types searched")


def _feature_batches(models, images: ImageSet, names, tokens, batch_size, device, dtype, group):
    """Per batch of `images` in order, (its first image's index, every model's features at its points), the models
    run in step on each decoded batch (this process's batches under torch.distributed)."""
    streams, firsts = per_model_batches(models, images, batch_size, group)
    gens = [iter_features(m, st, pts, tokens, device, dtype) for m, st, pts in zip(models, streams, names, strict=True)]
    for outs in zip(*gens, strict=True):
        yield firsts[-1], [f for f, _ in outs]


def _held_batches(models, images: ImageSet, names, tokens, batch_size, dtype, group):
    """_feature_batches read from the feature session, where it holds every model's features of every image (in one
    process, float32), else None: a batch at a time, never all at once. Images the decoders could not read are left
    out of their batch, as there."""
    session = _SESSION.get()
    if session is None or _dist_active(group) or _parse_dtype(dtype) not in (None, torch.float32) or not all(
            session.holds(m, images, pts, tokens, dtype) for m, pts in zip(models, names, strict=True)):
        return None

    def batches():
        for start in range(0, len(images), batch_size):
            idx = list(range(start, min(start + batch_size, len(images))))
            part = images.subset(idx)
            feats = [session.lookup(m, part, pts, tokens, dtype) for m, pts in zip(models, names, strict=True)]
            images.unreadable.update(idx[i] for i in part.unreadable)
            if len(part.unreadable) < len(idx):
                yield next(i for k, i in enumerate(idx) if k not in part.unreadable), feats
    return batches()


def _minibatch_maps(models, images, names, pairs, tokens, *, resamples, seed, batch_size, device, dtype, progress,
                    group) -> tuple[dict, dict, int]:
    """Every model's features batch by batch, accumulated into one MinibatchCKA per pair (memory independent of n);
    the maps, their bootstrap spreads (resamples > 0) and the number of images used. The images are read in a
    random order drawn from `seed` (Nguyen et al.'s estimator needs i.i.d. batches, never a folder's class order);
    under torch.distributed every process draws the same order and takes its whole batches of it."""
    dev = as_device(device)
    order = batch_order(len(images), seed)
    images, source = images.subset(order), images
    accs = {p: MinibatchCKA(len(names[p[0]]), len(names[p[1]]), device=dev) for p in pairs}
    keys = []   # the first image index of each batch used: the order of the bootstrap terms
    held = _held_batches(models, images, names, tokens, batch_size, dtype, group)
    bar = Progress(len(images), ("CKA of held features" if held else "extract+CKA") + f" ({len(models)} models)",
                   enabled=progress, unit="img")
    skipped = used = 0
    for first, feats in held or _feature_batches(models, images, names, tokens, batch_size, device, dtype, group):
        b = next(iter(feats[0].values())).shape[0]
        bar.update(b)
        if b < 4:
            skipped += b
            continue
        used += b
        keys.append(first)
        if sum(map(len, names)) * b * b * 8 > GRAM_BUDGET_BYTES:   # too many to hold: pair by pair
            for (i, j), acc in accs.items():
                acc.update([feats[i][p] for p in names[i]], [feats[j][p] for p in names[j]])
            continue
        for k, f in enumerate(feats):
            _check_finite([(f"{models[k].source['spec']} {p}", f[p]) for p in names[k]])
        grams = [_u_centred_grams([f[p].to(dev) for p in nm]) for f, nm in zip(feats, names, strict=True)]  # once
        for (i, j), acc in accs.items():
            acc.update_grams(grams[i], grams[j])
    bar.close()
    source.unreadable.update(int(order[i]) for i in images.unreadable)
    if not int(_all_reduce_sums([used], group)[0]):
        raise UsageError(f"no image of {source.name} could be used for minibatch CKA ({len(source.unreadable)} of "
                         f"{len(source)} unreadable, the rest in batches below 4)")
    if skipped:
        log.warning(f"notice: {skipped} image(s) in batches below 4 (after unreadable ones) were left out of "
                    "minibatch CKA")
    maps, spreads = {}, {}
    for (i, j), acc in accs.items():
        with _logged_warnings(f"{models[i].source['spec']} vs {models[j].source['spec']}: "):
            maps[(i, j)] = acc.all_reduce(group, keys).compute(names[i], names[j])
        if resamples:
            spreads[(i, j)] = Spread("bootstrap", acc.bootstrap(resamples, seed), units=len(acc.terms))
    return maps, spreads, int(_all_reduce_sums([used], group)[0])


def _maps_of_features(feats, specs, pairs, kernel, debiased, rbf_threshold, spread,
                      seed: int = 0) -> tuple[dict, dict, int]:
    """Every pair's CKA map and its spread: the delete-a-group jackknife (logit-scale intervals, t with G − 1
    degrees of freedom) where the Grams fit the memory budget and n ≥ 2·G, else the infinitesimal jackknife (where
    the per-image influence fits), else none (said)."""
    maps, spreads = {}, {}
    n = len(next(iter(feats[0].values())))
    groups = min(JACKKNIFE_GROUPS, n // 2)
    for i, j in pairs:
        with _logged_warnings(f"{specs[i]} vs {specs[j]}: "):
            maps[(i, j)] = cka_matrix(feats[i], feats[j], kernel=kernel, debiased=debiased,
                                      rbf_threshold=rbf_threshold)
        jack = cka_jackknife(feats[i], feats[j], kernel, rbf_threshold, debiased, groups, seed) if spread else None
        if jack is not None:
            spreads[(i, j)] = Spread("jackknife", jack, units=groups, scale="logit")
            continue
        fits = maps[(i, j)].numel() * n * 4 <= GRAM_BUDGET_BYTES
        influence = cka_influence(feats[i], feats[j], kernel, rbf_threshold, debiased) if spread and fits else None
        if influence is not None:
            spreads[(i, j)] = Spread("influence", influence)
        elif spread:
            log.warning("notice: no intervals for this map: its per-image influence would not fit in memory "
                        f"({_opt('estimator')} minibatch gives bootstrap intervals at any n)")
    return maps, spreads, len(next(iter(feats[0].values())))


@contextlib.contextmanager
def _logged_warnings(prefix: str = ""):
    """Python warnings raised inside the block become `ssl_repsim` log warnings (one line each)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        log.warning(f"warning: {prefix}{w.message}")


def _point_index(names: list[str], point: str | None) -> int:
    if point in (None, "last"):
        return len(names) - 1
    if point == "first":
        return 0
    if point not in names:
        raise UsageError(f"{_opt('model_point')} {point} is not among the points ({names[0]} ... {names[-1]})")
    return names.index(point)


# ======================================================================================================================
# 7. Probes: batched linear probes, MLP and concatenated-layer probes, weighted k-NN
# ======================================================================================================================

WEIGHT_DECAYS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)


def _layers(feats) -> dict[str, torch.Tensor]:
    if isinstance(feats, dict):
        return {k: v.reshape(v.shape[0], -1) for k, v in feats.items()}
    if isinstance(feats, torch.Tensor):
        return {"0": feats.reshape(feats.shape[0], -1)}
    return {str(i): v.reshape(v.shape[0], -1) for i, v in enumerate(feats)}


def _check_probe_inputs(train, y_train, test, y_test):
    train, test = _layers(train), _layers(test)
    if set(train) != set(test):
        raise UsageError("probe: train and test must hold the same layers")
    y_train, y_test = torch.as_tensor(y_train).long(), torch.as_tensor(y_test).long()
    for k in train:
        if len(train[k]) != len(y_train) or len(test[k]) != len(y_test):
            raise UsageError(f"probe: layer {k} has {len(train[k])}/{len(test[k])} samples for "
                             f"{len(y_train)}/{len(y_test)} labels")
    if len(y_train) < 2 or y_train.unique().numel() < 2:
        raise UsageError("probe: the training set needs at least two classes")
    _check_finite([(f"{k} (train)", v) for k, v in train.items()] + [(f"{k} (test)", v) for k, v in test.items()])
    return train, y_train, test, y_test


def topk_accuracy(logits: torch.Tensor, y: torch.Tensor, k: int = 1) -> float:
    return float((logits.topk(k, -1).indices == y[:, None]).any(-1).float().mean())


def standardize(train: torch.Tensor, *others):
    """(x − μ_train) / σ_train: what an affine-free BatchNorm head (MAE) applies at evaluation."""
    mu, sd = train.mean(0), train.std(0).clamp_min(1e-6)
    return [(x - mu) / sd for x in (train, *others)]


def _fit_softmax(xs: torch.Tensor, y: torch.Tensor, num_classes: int, wd: torch.Tensor, max_iter: int = 500,
                 history: int = 10, tol: float = 1e-4, gram: int = 0, start: tuple | None = None):
    """Multinomial logistic regression for a stack of independent problems xs (P, n, d) with L2 penalties wd (P,):
    minimise CE(x_p W_p + b_p, y) + wd_p ‖W_p‖² for every p at once by L-BFGS (Nocedal & Wright 2006, alg. 7.4)
    whose two-loop recursion, curvature pairs and Armijo backtracking are all per problem, so the batch converges
    as P separate solvers would. gram = d: xs holds the scaled Grams K = X Xᵀ / d (P, n, n) of d-dimensional
    features and the problem is solved in the dual variables A, W = Xᵀ A / d (the minimiser lies in the span of
    the samples; ‖W‖² = tr(AᵀKA) / d): the same problem in n·C unknowns instead of d·C, on entries of order one;
    returns (A, b), logits = K(test, train) A + b. start: the (W or A, b) to start from (default zeros)."""
    P, n, d = xs.shape
    C = num_classes
    wd = wd.to(xs.device, xs.dtype) / (gram or 1)
    dual, K, m = bool(gram), xs, d
    tol = tol / math.sqrt(gram) if gram else tol   # ∂/∂A = X ∂/∂W / d, of norm ‖∂/∂W‖ / √d: the primal's criterion

    onehot = F.one_hot(y.to(xs.device), C).to(xs.dtype)[None]

    def loss_grad(x):   # the gradient by hand: ∂CE/∂logits = (softmax − onehot) / n
        a, b = x[:, :m * C].view(P, m, C), x[:, m * C:].view(P, 1, C)
        logits = torch.baddbmm(b, K if dual else xs, a)
        logp = torch.log_softmax(logits, -1)
        ce = -(logp * onehot).sum(-1).mean(1)
        gl = (logp.exp() - onehot) / n
        if dual:   # loss + wd tr(AᵀKA): ∂/∂A = K (G + 2 wd A), K symmetric
            ka = torch.bmm(K, a)
            losses = ce + wd * (a * ka).sum((1, 2))
            ga = torch.bmm(K, gl) + 2 * wd[:, None, None] * ka
        else:
            losses = ce + wd * a.square().sum((1, 2))
            ga = torch.bmm(xs.transpose(1, 2), gl) + 2 * wd[:, None, None] * a
        return losses, torch.cat([ga.reshape(P, m * C), gl.sum(1)], 1)

    x = torch.zeros(P, m * C + C, device=xs.device, dtype=xs.dtype) if start is None else \
        torch.cat([start[0].reshape(P, m * C), start[1].reshape(P, C)], 1).to(xs.device, xs.dtype)
    f, g = loss_grad(x)
    pairs = []   # the last `history` curvature pairs (s, y, 1/sᵀy) of every problem
    for _ in range(max_iter):
        if float(g.abs().max()) < tol:
            break
        done = g.abs().amax(1, keepdim=True) < tol         # converged problems stay where they are
        direction, slope = _descent_direction(g, pairs, done)
        t, f_new, g_new = _armijo_step(loss_grad, x, f, direction, slope, done)
        s, yv = t * direction, g_new - g
        x, f, g = x + s, f_new, g_new
        sy = _dot(s, yv)
        pairs.append((s, yv, torch.where(sy > 1e-12, 1.0 / sy.clamp_min(1e-12), torch.zeros_like(sy))))
        del pairs[:-history]
    return x[:, :m * C].view(P, m, C), x[:, m * C:].view(P, 1, C)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-problem inner products of (P, m) stacks, (P, 1)."""
    return (a * b).sum(1, keepdim=True)


def _descent_direction(g: torch.Tensor, pairs: list, done: torch.Tensor):
    """L-BFGS two-loop recursion −H g per problem (−g where that is not a descent direction), and its slope gᵀp."""
    q, alphas = g.clone(), []
    for s, yv, rho in reversed(pairs):
        a = rho * _dot(s, q)
        q -= a * yv
        alphas.append(a)
    if pairs:
        s, yv, _ = pairs[-1]
        gamma = _dot(s, yv) / _dot(yv, yv).clamp_min(1e-30)
    else:
        gamma = 1.0 / g.abs().sum(1, keepdim=True).clamp_min(1.0)
    r = gamma * q
    for (s, yv, rho), a in zip(pairs, reversed(alphas), strict=True):
        r += s * (a - rho * _dot(yv, r))
    direction = torch.where(done, torch.zeros_like(r), -r)
    slope = _dot(g, direction)
    bad = (slope >= 0) & ~done
    return torch.where(bad, -g, direction), torch.where(bad, -_dot(g, g), slope)


def _armijo_step(loss_grad, x, f, direction, slope, done, max_halvings: int = 30):
    """Backtracking from t = 1, each problem its own step, until f(x + t p) ≤ f(x) + 1e-4 t gᵀp (or within float32
    noise of a converged problem). Returns t and the loss and gradient there."""
    t = torch.ones(x.shape[0], 1, device=x.device, dtype=x.dtype)
    for _ in range(max_halvings):
        f_new, g_new = loss_grad(x + t * direction)
        ok = (f_new[:, None] <= f[:, None] + 1e-4 * t * slope) | done | (t < 1e-10) \
            | (f_new[:, None] <= f[:, None] * (1 + 1e-7))
        if bool(ok.all()):
            break
        t = torch.where(ok, t, t * 0.5)
    return t, f_new, g_new


def _stacked_standardized(train: dict, test: dict, names: list, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, n, d) stacks of the named layers' train and test features, standardised on train."""
    pairs = [standardize(train[k], test[k]) for k in names]
    return torch.stack([p[0] for p in pairs]).to(device), torch.stack([p[1] for p in pairs]).to(device)


def _stack_groups(layers: dict[str, torch.Tensor]) -> dict[int, list[str]]:
    groups: dict[int, list[str]] = {}
    for k, v in layers.items():
        groups.setdefault(v.shape[1], []).append(k)
    return groups


def ridge_classifier(train: dict, y_train, test: dict, y_test) -> dict:
    """{layer: accuracies + ridge_lambda}: one linear classifier per layer in closed form, regularised least-squares
    classification (Rifkin & Lippert 2007): ridge regression of the one-hot labels on the features standardised on
    the training rows (with intercept), λ by generalised cross-validation (gcv_lambda), the class of the largest
    output. One d × d eigendecomposition per layer, whatever the number of rows and classes (the spatial probes')."""
    train, y_train, test, y_test = _check_probe_inputs(train, y_train, test, y_test)
    C = int(max(y_train.max(), y_test.max())) + 1
    y = F.one_hot(torch.as_tensor(y_train).long(), C).double()
    ym = y.mean(0)
    yc = y - ym
    out = {}
    for k, x in train.items():
        x, xt = x.double(), test[k].double()
        mu, sd = x.mean(0), x.std(0).clamp_min(1e-12)
        x, xt = (x - mu) / sd, (xt - mu) / sd
        ev, v = torch.linalg.eigh(x.T @ x)                        # X̃ = U S Vᵀ: s² and V from X̃ᵀX̃
        keep = ev > ev.max().clamp_min(1e-300) * 1e-10
        s2, v = ev[keep], v[:, keep]
        sy = v.T @ (x.T @ yc)                                     # S UᵀỸ
        lam = gcv_lambda(s2, sy / s2.sqrt()[:, None], float(yc.square().sum()), len(x))
        out[k] = dict(accuracies(xt @ (v @ (sy / (s2 + lam)[:, None])) + ym, y_test, C), ridge_lambda=lam)
    return out


def linear_probe(train, y_train, test, y_test, *, weight_decay=None, weight_decays=WEIGHT_DECAYS,
                 val_fraction: float = 0.2, max_iter: int = 500, seed: int = 0, device=None, method: str = "lbfgs",
                 progress: bool = False, dual: bool | None = None, **mae_opts) -> dict:
    """{layer: {"top1", "top5" (with ≥ 5 classes), "weight_decay"}}: test accuracy of one linear classifier per layer.
    Features are standardised on the training set; the L2 weight decay is chosen per layer on a held-out part of
    the training set (never on test; fits of at most SELECTION_ITERS iterations), then the classifier is refit on
    the whole training set, starting from the chosen one; `weight_decay`
    fixes it (a float) or gives the grid (a list). Where d > n (or dual=True) each problem is solved in its dual
    on the n × n Gram: the same problem, at a cost that does not grow with d (the same classifier once converged;
    on nearly separable data at tiny weight decays neither solver converges in max_iter, and the two stop at
    different points). method="mae" runs MAE's protocol
    instead (affine-free BatchNorm, LARS, warmup + cosine; see mae_linear_probe)."""
    train, y_train, test, y_test = _check_probe_inputs(train, y_train, test, y_test)
    if method == "mae":
        return mae_linear_probe(train, y_train, test, y_test, seed=seed, device=device, **mae_opts)
    if method != "lbfgs":
        raise UsageError(f"unknown probe method {method!r}: lbfgs or mae")
    if mae_opts:
        raise UsageError(f"linear_probe: unknown option(s) {', '.join(mae_opts)} for method lbfgs")
    if weight_decay is not None:
        weight_decays = [weight_decay] if isinstance(weight_decay, (int, float)) else list(weight_decay)
    device = as_device(device)
    C = int(max(y_train.max(), y_test.max())) + 1
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y_train), generator=g)
    n_val = int(len(y_train) * val_fraction) if len(weight_decays) > 1 else 0
    val_idx, fit_idx = perm[:n_val], perm[n_val:]
    wds = torch.tensor(weight_decays, dtype=torch.float64)
    out = {}
    groups = _stack_groups(train)
    unknowns = sum(len(v) * min(d, len(y_train)) for d, v in groups.items()) * C * (len(wds) + 1)
    bar = Progress(len(train), "linear probe", enabled=progress and unknowns > 1e7, unit="layer")
    if unknowns > 1e7:
        log.info(f"linear probe: {len(train)} layers × {len(wds)} weight decays, n = {len(y_train)}, "
                 f"{unknowns:.1e} unknowns in all" + (" (layers wider than n solved in the dual)"
                                                       if dual is not False and max(groups) > len(fit_idx) else ""))
    for d, names in groups.items():
        step = max(1, int(2e8 // max(len(y_train) * max(C, d) * len(wds), 1)))
        for s in range(0, len(names), step):
            chunk = names[s:s + step]
            tr, te = _stacked_standardized(train, test, chunk, device)
            rows, against = _probe_inputs(tr, te, d > len(fit_idx) if dual is None else dual)   # Grams if d > n
            gram = d if rows is not tr else 0
            best, start = _chosen_decays(rows, y_train, fit_idx, val_idx, C, wds, max_iter, gram) if n_val else \
                (wds[:1].repeat(len(chunk)), None)
            w, b = _fit_softmax(rows, y_train, C, best, max_iter, gram=gram, start=start)
            logits = torch.baddbmm(b, against, w).cpu()
            for i, k in enumerate(chunk):
                out[k] = dict(accuracies(logits[i], y_test, C), weight_decay=float(best[i]))
            bar.update(len(chunk))
    bar.close()
    return {k: out[k] for k in train}


SELECTION_ITERS = 100   # L-BFGS iterations of the fits that choose a probe's weight decay (scikit-learn's default)


def _chosen_decays(rows, y, fit_idx, val_idx, C, wds, max_iter, gram) -> tuple[torch.Tensor, tuple]:
    """Per problem, the weight decay whose classifier, fitted on fit_idx by at most SELECTION_ITERS iterations, is
    most accurate on val_idx (the first, smallest, among ties); and that classifier, where the final fit on all rows
    starts (in the dual, the held-out rows' variables at 0: the same W = Xᵀ A / d)."""
    P = len(rows)
    fit = rows[:, fit_idx][:, :, fit_idx] if gram else rows[:, fit_idx]
    w, b = _fit_softmax(fit.repeat_interleave(len(wds), 0), y[fit_idx], C, wds.repeat(P),
                        min(max_iter, SELECTION_ITERS), gram=gram)
    held = rows[:, val_idx][:, :, fit_idx] if gram else rows[:, val_idx]
    logits = torch.baddbmm(b, held.repeat_interleave(len(wds), 0), w)
    acc = (logits.argmax(-1).cpu() == y[val_idx]).float().mean(1).view(P, len(wds))
    pick = (acc.argmax(1) + torch.arange(P) * len(wds)).to(w.device)
    w, b = w[pick], b[pick]
    if gram:
        w = torch.zeros(P, rows.shape[1], w.shape[-1], dtype=w.dtype, device=w.device).index_copy_(
            1, fit_idx.to(w.device), w)
    return wds[acc.argmax(1)], (w, b)


def _probe_inputs(tr: torch.Tensor, te: torch.Tensor, dual: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(what the classifier is fitted on, what it is applied to): the features, or where d > n the Grams
    tr trᵀ / d and te trᵀ / d, on which the dual problem is solved (see _fit_softmax)."""
    if not dual:
        return tr, te
    d = tr.shape[-1]
    return torch.bmm(tr, tr.transpose(1, 2)) / d, torch.bmm(te, tr.transpose(1, 2)) / d


def accuracies(logits: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict:
    """{"top1", "top1_ci", "top5", "top5_ci", "correct"}: accuracies with Wilson 95% intervals (top-5 only with at
    least 5 classes) and which validation images were right (top-1), for paired comparisons (mcnemar)."""
    return _with_intervals(topk_accuracy(logits, y), topk_accuracy(logits, y, 5) if num_classes >= 5 else None,
                           len(y), logits.argmax(1).cpu() == torch.as_tensor(y).cpu())


def wilson_interval(k: float, n: int, level: float = 0.95) -> list[float]:
    """Wilson's score interval for k successes in n trials (Wilson 1927): (p̂ + z²/2n ± z√(p̂(1−p̂)/n + z²/4n²)) /
    (1 + z²/n)."""
    import statistics
    z = statistics.NormalDist().inv_cdf(0.5 + level / 2)
    p = k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n))
    return [(centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)]


def _with_intervals(top1: float, top5: float | None, n: int, correct=None) -> dict:
    out = dict(top1=top1, top1_ci=wilson_interval(round(top1 * n), n))
    if top5 is not None:
        out.update(top5=top5, top5_ci=wilson_interval(round(top5 * n), n))
    if correct is not None:
        out["correct"] = "".join("1" if c else "0" for c in torch.as_tensor(correct).flatten().tolist())
    return out


def mcnemar(correct_a, correct_b) -> dict:
    """McNemar's test of two classifiers on the same images (McNemar 1947): of the n₁₀ images only a gets right and
    the n₀₁ only b gets right, p = P(min ≤ Bin(n₁₀ + n₀₁, ½)) × 2 (exact; the continuity-corrected normal beyond
    5,000 discordant images). correct_*: bools, or strings of 0/1 as the results store them."""
    a, b = ([c == "1" for c in v] if isinstance(v, str) else torch.as_tensor(v).bool().tolist()
            for v in (correct_a, correct_b))
    if len(a) != len(b):
        raise UsageError(f"mcnemar: {len(a)} vs {len(b)} images")
    n10, n01 = sum(x and not y for x, y in zip(a, b, strict=True)), sum(y and not x for x, y in zip(a, b, strict=True))
    m, k = n10 + n01, min(n10, n01)
    if m == 0:
        p = 1.0
    elif m <= 5000:
        p = min(1.0, 2 * sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m)
    else:
        p = math.erfc(max(abs(n10 - n01) - 1, 0) / math.sqrt(m) / math.sqrt(2))
    return dict(a_only=n10, b_only=n01, diff=(n10 - n01) / len(a), p=p)


def chance_level(y) -> float:
    """The accuracy of always predicting the most frequent class (the majority-class rate)."""
    y = torch.as_tensor(y)
    return int(torch.bincount(y).max()) / len(y)


def top1(results: dict) -> dict[str, float]:
    """{layer: top-1} of a probe or k-NN result {layer: {"top1", ...}}."""
    return {k: v["top1"] for k, v in results.items()}


def cosine_lr(step: int, total: int, warmup: int, base: float, min_lr: float = 0.0) -> float:
    """Linear warmup, then half-cycle cosine to min_lr (MAE util/lr_sched.py, per iteration)."""
    if step < warmup:
        return base * step / max(warmup, 1)
    t = (step - warmup) / max(total - warmup, 1)
    return min_lr + (base - min_lr) * 0.5 * (1 + math.cos(math.pi * t))


MAE_PROBE_BUDGET = 6.4 * 90 * math.ceil(1281167 / 16384)   # lr × steps of MAE's published ImageNet run (≈ 45,000)


def _say_mae_probe_budget(budget: float):
    """A notice when this run's lr × steps is far below the published run's, and that the augmented views are not
    used on fixed features (MAE trains its probe on RandomResizedCrop(224, bicubic) + flip views)."""
    if ("mae-probe", round(budget)) in _SAID:
        return
    _SAID.add(("mae-probe", round(budget)))
    if budget < MAE_PROBE_BUDGET / 100:
        log.warning(f"notice: the MAE-protocol probe's budget, lr × steps = {budget:.0f}, is "
                    f"{MAE_PROBE_BUDGET / budget:.0f}× below the published ImageNet run's ({MAE_PROBE_BUDGET:.0f}): at "
                    f"this n it is likely under-trained (compare {_opt('method', '--method')} lbfgs)")
    log.warning("notice: the MAE-protocol probe trains on fixed features: MAE's RandomResizedCrop(224, bicubic) + "
                "flip views of each training image are not used")


def mae_linear_probe(train, y_train, test, y_test, *, epochs: int = 90, batch_size: int = 256, blr: float = 0.1,
                     warmup_epochs: int = 10, seed: int = 0, device=None) -> dict:
    """MAE's linear-probe protocol (He et al. 2022, main_linprobe.py): BatchNorm1d(affine=False) → Linear (init
    std 0.01), LARS (momentum 0.9, trust 0.001, no weight decay), peak lr = blr·batch/256 (MAE's rule: blr 0.1, so
    6.4 at MAE's batch 16384 and 0.1 at batch 256) with 10 warmup epochs then a per-iteration half-cycle cosine,
    90 epochs. Evaluation BatchNorm statistics = training-set mean/variance, so features are standardised once."""
    in_range("epochs", epochs, 1, 100000)
    train, y_train, test, y_test = _check_probe_inputs(train, y_train, test, y_test)
    device = as_device(device)
    C = int(max(y_train.max(), y_test.max())) + 1
    out = {}
    for d, names in _stack_groups(train).items():
        tr, te = _stacked_standardized(train, test, names, device)
        g = torch.Generator().manual_seed(seed)
        w = (torch.randn(len(names), d, C, generator=g) * 0.01).to(device)
        b = torch.zeros(len(names), 1, C, device=device)
        mom = [torch.zeros_like(w), torch.zeros_like(b)]
        n = tr.shape[1]
        steps_per_epoch = math.ceil(n / batch_size)
        total, lr0 = epochs * steps_per_epoch, blr * batch_size / 256
        _say_mae_probe_budget(lr0 * total)
        for step in range(total):
            if step % steps_per_epoch == 0:
                perm = torch.randperm(n, generator=g)
            idx = perm[(step % steps_per_epoch) * batch_size:][:batch_size]
            w.requires_grad_(True)
            b.requires_grad_(True)
            with torch.enable_grad():
                logits = torch.baddbmm(b, tr[:, idx], w)
                loss = F.cross_entropy(logits.reshape(-1, C), y_train[idx].to(device).repeat(len(names)),
                                       reduction="sum") / len(idx)
                gw, gb = torch.autograd.grad(loss, [w, b])
            w, b = w.detach(), b.detach()
            lr = cosine_lr(step, total, warmup_epochs * steps_per_epoch, lr0)
            # LARS on the weight matrix: scale each problem's gradient by 0.001·‖w‖/‖g‖ (trust ratio)
            wn, gn = w.norm(dim=(1, 2), keepdim=True), gw.norm(dim=(1, 2), keepdim=True)
            trust = torch.where((wn > 0) & (gn > 0), 0.001 * wn / gn, torch.ones_like(wn))
            mom[0] = 0.9 * mom[0] + gw * trust
            mom[1] = 0.9 * mom[1] + gb
            w, b = w - lr * mom[0], b - lr * mom[1]
        logits = torch.baddbmm(b, te, w).cpu()
        for i, k in enumerate(names):
            out[k] = accuracies(logits[i], y_test, C)
    return {k: out[k] for k in train}


class AdamW:
    """AdamW (Loshchilov & Hutter 2019) with torch.optim.AdamW's update and defaults (β = 0.9, 0.999; ε = 1e-8):
    p ← p (1 − lr λ), then p ← p − lr / (1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε); each step reads and clears the
    gradients. Written out because torch.optim imports torch._dynamo (about a second) on first use."""

    def __init__(self, params, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params, self.wd, self.betas, self.eps, self.t = list(params), weight_decay, betas, eps, 0
        self.m, self.v = ([torch.zeros_like(p) for p in self.params] for _ in range(2))

    @torch.no_grad()
    def step(self, lr: float):
        self.t += 1
        b1, b2 = self.betas
        for p, m, v in zip(self.params, self.m, self.v, strict=True):
            if p.grad is None:
                continue
            p.mul_(1 - lr * self.wd)
            m.lerp_(p.grad, 1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            p.addcdiv_(m, (v.sqrt() / math.sqrt(1 - b2 ** self.t)).add_(self.eps), value=-lr / (1 - b1 ** self.t))
            p.grad = None


def mlp_probe(train, y_train, test, y_test, *, depth: int = 2, hidden: int | None = None, epochs: int = 100,
              batch_size: int = 256, lr: float = 1e-3, weight_decay: float = 1e-4, seed: int = 0,
              device=None) -> dict:
    """Per layer, an MLP head of `depth` linear layers (hidden width d, BatchNorm + ReLU between) trained with
    AdamW and a cosine schedule on standardised features; depth 1 is a linear head. Returns top-1 per layer."""
    if not 1 <= depth <= 8:
        raise UsageError("mlp_probe depth must be 1..8")
    in_range("epochs", epochs, 1, 100000)
    train, y_train, test, y_test = _check_probe_inputs(train, y_train, test, y_test)
    device = as_device(device)
    C = int(max(y_train.max(), y_test.max())) + 1
    out = {}
    for k in train:
        tr, te = (v.to(device) for v in standardize(train[k], test[k]))
        g = torch.Generator().manual_seed(seed)
        d = tr.shape[1]
        h = hidden or d
        layers, width = [], d
        for _ in range(depth - 1):
            layers += [_seeded_linear(width, h, g), nn.BatchNorm1d(h), nn.ReLU()]
            width = h
        head = nn.Sequential(*layers, _seeded_linear(width, C, g)).to(device)
        opt = AdamW(head.parameters(), weight_decay)
        n = len(tr)
        spe = math.ceil(n / batch_size)
        head.train()
        for step in range(epochs * spe):
            if step % spe == 0:
                perm = torch.randperm(n, generator=g)
            idx = perm[(step % spe) * batch_size:][:batch_size]
            if len(idx) < 2 and depth > 1:
                continue
            with torch.enable_grad():
                F.cross_entropy(head(tr[idx]), y_train[idx].to(device)).backward()
            opt.step(cosine_lr(step, epochs * spe, 0, lr))
        head.eval()
        with torch.no_grad():
            logits = head(te).cpu()
            out[k] = _with_intervals(topk_accuracy(logits, y_test), None, len(y_test), logits.argmax(1) == y_test)
    return out


def _seeded_linear(inp: int, out: int, g: torch.Generator) -> nn.Linear:
    """nn.Linear with PyTorch's default initialisation (U(±1/√inp) for weight and bias), drawn from `g` (the global
    generator left as it was; not nn.utils.skip_init, whose meta-device path imports sympy: half a second)."""
    with torch.random.fork_rng(devices=[]):
        lin = nn.Linear(inp, out)
    bound = 1 / math.sqrt(inp)
    with torch.no_grad():
        lin.weight.uniform_(-bound, bound, generator=g)
        lin.bias.uniform_(-bound, bound, generator=g)
    return lin


def concat_features(feats: dict, final: str | None = None) -> dict[str, torch.Tensor]:
    """The 'marginal features' inputs: the final layer concatenated with each other layer, and with all layers."""
    feats = _layers(feats)
    final = final or list(feats)[-1]
    out = {final: feats[final]}
    for k, v in feats.items():
        if k != final:
            out[f"{final}+{k}"] = torch.cat([feats[final], v], 1)
    out["all"] = torch.cat(list(feats.values()), 1)
    return out


def knn_accuracy(train, y_train, test, y_test, k: int = 20, temperature: float = 0.07,
                 num_classes: int | None = None, chunk: int = 512, device=None) -> dict:
    """Weighted k-NN of DINO (Caron et al. 2021, eval_knn.py) per layer: L2-normalised features, cosine
    similarity, the k nearest training samples vote for their class with weight exp(sim / T)."""
    in_range("temperature", temperature, 0, 100, "(]")
    train, y_train, test, y_test = _check_probe_inputs(train, y_train, test, y_test)
    if not 1 <= k <= len(y_train):
        raise UsageError(f"k-NN: k={k} must be between 1 and the {len(y_train)} training samples")
    device = as_device(device)
    C = max(num_classes or 0, int(max(y_train.max(), y_test.max())) + 1)
    out = {}
    for name in train:
        bank = F.normalize(train[name].float(), dim=1).to(device)
        labels = y_train.to(device)
        hits1 = hits5 = 0
        right = []
        for s in range(0, len(y_test), chunk):
            q = F.normalize(test[name][s:s + chunk].float(), dim=1).to(device)
            sim, idx = (q @ bank.T).topk(k, dim=1)
            votes = torch.zeros(len(q), C, device=device)
            votes.scatter_add_(1, labels[idx], (sim / temperature).exp())
            pred = votes.topk(min(5, k, C), dim=1).indices.cpu()   # DINO: top-5 among the min(5, k) best
            yt = y_test[s:s + chunk]
            hits1 += int((pred[:, 0] == yt).sum())
            hits5 += int((pred == yt[:, None]).any(1).sum())
            right.append(pred[:, 0] == yt)
        out[name] = _with_intervals(hits1 / len(y_test), hits5 / len(y_test) if C >= 5 else None, len(y_test),
                                    torch.cat(right))
    return out


def _probe_tokens(model: ViT, tokens: str | None) -> str:
    return tokens or ("cls" if model.cfg.cls_token else "mean")


# ======================================================================================================================
# 8. Fine-tuning: layer-wise lr decay, warmup + cosine, augmentation in torch ops, checkpoint and exact resume
# ======================================================================================================================

NO_WEIGHT_DECAY = {"pos_embed", "cls_token", "dist_token", "register_tokens"}   # relative tables decay, as in BEiT


def layer_id(name: str, depth: int) -> int:
    """MAE util/lr_decay.py: 0 for the embeddings, i+1 for blocks.i, depth+1 for the final norms and the head;
    BEiT's shared relative position bias at depth+1, as BEiT's optim_factory assigns it (get_num_layer_for_vit)."""
    if name.split(".")[0] in ("cls_token", "dist_token", "pos_embed", "register_tokens", "patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def cnn_layer_id(name: str, depths, grouped: bool = False) -> int:
    """ConvNeXt-V2's optim_factory, for any CNN here: 'single' — block j of stage i is Σ depths[:i] + j + 1, the stem
    and each stage's downsampling share the id of the stage's first block, the final norm and head Σ depths + 1;
    'group' (its base recipe; 12 groups of a 3-3-27-3 ConvNeXt) — downsampling 0/2/3/12, stages 0 and 1 at 1 and 2,
    stage 2's blocks in threes from 3, stage 3 at 12, the rest 13."""
    m = re.match(r"(?:layer(\d+)\.(\d+)|stages\.(\d+)\.(\d+)|downsample_layers\.(\d+))\.", name)
    stem = re.match(r"(conv1|bn1)\.", name)
    stage = None if m is None else int(m.group(1)) - 1 if m.group(1) else int(m.group(3) or m.group(5))
    block = None if m is None or m.group(5) else int(m.group(2) or m.group(4))
    if grouped:
        if m is None:
            return 13
        if block is None:
            return (0, 2, 3, 12)[min(stage, 3)]
        return (1, 2, 3 + block // 3, 12)[min(stage, 3)]
    if stem:
        return 1
    return sum(depths) + 1 if m is None else sum(depths[:stage]) + (block or 0) + 1


def param_groups_lrd(model: nn.Module, weight_decay: float = 0.05, layer_decay: float = 0.75,
                     grouped: bool = False) -> list[dict]:
    """AdamW groups with lr_scale = layer_decay^(depth+1 − layer_id); no weight decay on 1-D parameters,
    pos_embed, cls / dist tokens and registers (MAE's lr_decay.py; BEiT's optim_factory, whose relative-position
    tables decay). A CNN's ids: cnn_layer_id (`grouped`: ConvNeXt's 12 groups, depth 12)."""
    cnn = isinstance(model, ConvNet)
    depth = 12 if cnn and grouped else len(model.blocks)
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid = cnn_layer_id(name, model.cfg.depths, grouped) if cnn else layer_id(name, depth)
        wd = 0.0 if p.ndim == 1 or name in NO_WEIGHT_DECAY else weight_decay
        g = groups.setdefault((lid, wd), dict(params=[], names=[], weight_decay=wd, layer_id=lid,
                                              lr_scale=layer_decay ** (depth + 1 - lid)))
        g["params"].append(p)
        g["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def random_resized_crop(img: torch.Tensor, size: int, g: torch.Generator, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3), interp: str = "bicubic", flip: bool = True) -> torch.Tensor:
    """Inception-style crop (area fraction in `scale`, log-uniform aspect in `ratio`), resized to size×size,
    flipped horizontally with p = 0.5. img: (3, H, W) float in [0, 1]."""
    H, W = img.shape[-2:]
    for _ in range(10):
        area = H * W * (scale[0] + (scale[1] - scale[0]) * float(torch.rand(1, generator=g)))
        r = math.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * float(torch.rand(1, generator=g)))
        w, h = round(math.sqrt(area * r)), round(math.sqrt(area / r))
        if 0 < w <= W and 0 < h <= H:
            top = int(torch.randint(0, H - h + 1, (1,), generator=g))
            left = int(torch.randint(0, W - w + 1, (1,), generator=g))
            break
    else:
        h = w = min(H, W)
        top, left = (H - h) // 2, (W - w) // 2
    crop = img[None, :, top:top + h, left:left + w]
    out = F.interpolate(crop, size=(size, size), mode=interp, align_corners=False, antialias=True)[0]
    return out.flip(-1) if flip and float(torch.rand(1, generator=g)) < 0.5 else out


# --- RandAugment (Cubuk et al. 2020) as timm's rand-mM-mstdS-incI, and RandomErasing (Zhong et al. 2020) -------
# Ops act on batches of 8-bit images held as float (B, 3, H, W) in [0, 255], one argument per image, and return
# 8-bit values as PIL would (blends in single precision, truncated; lookups exact); geometric ops sample bicubically
# (PIL's a = −1 kernel, as the recipes ask timm for) or bilinearly at pixel centres, filling with the mean colour.

def _per_image(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's Image.blend: degenerate + factor·(x − degenerate) in single precision, truncated to 8 bits."""
    d, f = degenerate.float(), _per_image(factor.float())
    return (d + f * (x.float() - d)).trunc().clamp(0, 255).to(x.dtype)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """PIL's "L": (19595 R + 38470 G + 7471 B + 2¹⁵) >> 16 (ITU-R 601-2)."""
    return torch.floor((x[:, :1] * 19595 + x[:, 1:2] * 38470 + x[:, 2:] * 7471 + 32768) / 65536)


def aug_auto_contrast(x, _):
    """Each channel stretched to [0, 255] as PIL's lookup table: ⌊v·s − lo·s⌋, s = 255 / (hi − lo); a constant
    channel is left alone."""
    dtype, x = x.dtype, x.double()   # PIL builds its table in Python floats
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    scale = torch.full_like(lo, 255.0) / (hi - lo).clamp_min(1)   # a true division (255 / t multiplies by 1 / t)
    return torch.where(hi > lo, (x * scale + (-lo * scale)).trunc().clamp(0, 255), x).to(dtype)


def aug_equalize(x, _):
    """PIL's ImageOps.equalize per channel: step = (N − count of the last used level) // 255,
    lut[v] = (step // 2 + #pixels below v) // step; a channel with one level (or step 0) is left alone."""
    B, C, H, W = x.shape
    v = x.long().view(B * C, H * W)
    hist = torch.zeros(B * C, 256, dtype=torch.long).scatter_add_(1, v, torch.ones_like(v))
    last = hist.gather(1, (255 - hist.flip(1).ne(0).long().argmax(1, keepdim=True)))   # count of the top level
    step = (H * W - last) // 255
    below = hist.cumsum(1) - hist
    lut = ((step // 2 + below) // step.clamp_min(1)).clamp(0, 255)
    out = lut.gather(1, v).view(B, C, H, W).to(x.dtype)
    return torch.where(step.view(B, C, 1, 1) > 0, out, x)


def aug_invert(x, _):
    return 255 - x


def _affine(x: torch.Tensor, m: torch.Tensor, fill, modes) -> torch.Tensor:
    """Sample x at m·(output pixel centre) (m (B, 2, 3) maps output to input pixel coordinates, PIL's AFFINE
    convention), edge pixels repeated for the interpolation; where the point falls outside the image, the fill
    colour (as PIL); in double precision, truncated to 8 bits."""
    dtype, x = x.dtype, x.double()
    H, W = x.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(H, dtype=x.dtype) + 0.5, torch.arange(W, dtype=x.dtype) + 0.5, indexing="ij")
    src = torch.einsum("bij,hwj->bhwi", m.to(x.dtype), torch.stack([xs, ys, torch.ones_like(xs)], -1))
    grid = torch.stack([src[..., 0] / W * 2 - 1, src[..., 1] / H * 2 - 1], -1)
    inside = ((src[..., 0] >= 0) & (src[..., 0] < W) & (src[..., 1] >= 0) & (src[..., 1] < H)).to(x.dtype)[:, None]
    out = torch.empty_like(x)
    for mode in set(modes):
        i = torch.tensor([k for k, md in enumerate(modes) if md == mode])
        out[i] = F.grid_sample(x[i], grid[i], mode="bilinear", padding_mode="border", align_corners=False) \
            if mode == "bilinear" else _bicubic_pil(x[i], src[i])
    out = out * inside + torch.tensor(fill, dtype=x.dtype).view(1, 3, 1, 1) * (1 - inside)
    return out.clamp(0, 255).trunc().to(dtype)   # PIL truncates its 8-bit results


def _cubic(t: torch.Tensor, a: float = -1.0) -> torch.Tensor:
    """Keys' cubic convolution kernel with a = −1, as PIL's geometric transforms use (torch's bicubic: −0.75)."""
    t = t.abs()
    return torch.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                       torch.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, torch.zeros_like(t)))


def _bicubic_pil(x: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W) sampled bicubically (PIL's kernel, edge pixels repeated) at src (B, h, w, 2) pixel
    coordinates whose pixel centres are at i + 0.5."""
    B, C, H, W = x.shape
    u, v = src[..., 0] - 0.5, src[..., 1] - 0.5
    x0, y0 = u.floor(), v.floor()
    out = torch.zeros(B, C, *src.shape[1:3], dtype=x.dtype)
    flat = x.reshape(B, C, H * W)
    for dy in range(-1, 3):
        wy = _cubic(v - (y0 + dy))
        yi = (y0 + dy).clamp(0, H - 1).long()
        for dx in range(-1, 3):
            xi = (x0 + dx).clamp(0, W - 1).long()
            idx = (yi * W + xi).view(B, 1, -1).expand(-1, C, -1)
            out += (wy * _cubic(u - (x0 + dx)))[:, None] * flat.gather(2, idx).view(out.shape)
    return out


def _matrices(B, a=1.0, b=0.0, c=0.0, d=0.0, e=1.0, f=0.0) -> torch.Tensor:
    """(B, 2, 3) affine matrices [[a, b, c], [d, e, f]], each entry a number or one per image."""
    entries = [torch.as_tensor(t, dtype=torch.float64).expand(B) for t in (a, b, c, d, e, f)]
    return torch.stack(entries, -1).view(B, 2, 3)


def aug_rotate(x, degrees, fill=(0, 0, 0), modes=None):
    """PIL's rotate: counter-clockwise by `degrees` about the image centre."""
    B, _, H, W = x.shape
    t = torch.as_tensor(degrees, dtype=torch.float64) * math.pi / 180
    cx, cy = W / 2, H / 2
    cos, sin = t.cos(), t.sin()
    m = _matrices(B, cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy)
    return _affine(x, m, fill, modes or ["bilinear"] * B)


def aug_shear_x(x, factor, fill=(0, 0, 0), modes=None):
    return _affine(x, _matrices(len(x), b=factor), fill, modes or ["bilinear"] * len(x))


def aug_shear_y(x, factor, fill=(0, 0, 0), modes=None):
    return _affine(x, _matrices(len(x), d=factor), fill, modes or ["bilinear"] * len(x))


def aug_translate_x(x, pct, fill=(0, 0, 0), modes=None):
    return _affine(x, _matrices(len(x), c=torch.as_tensor(pct) * x.shape[-1]), fill, modes or ["bilinear"] * len(x))


def aug_translate_y(x, pct, fill=(0, 0, 0), modes=None):
    return _affine(x, _matrices(len(x), f=torch.as_tensor(pct) * x.shape[-2]), fill, modes or ["bilinear"] * len(x))


def aug_posterize(x, bits):
    """Keep the top `bits` bits of every value."""
    q = _per_image(2.0 ** (8 - torch.as_tensor(bits, dtype=x.dtype).clamp(0, 8)))
    return (x / q).floor() * q


def aug_solarize(x, threshold):
    return torch.where(x < _per_image(torch.as_tensor(threshold, dtype=x.dtype)), x, 255 - x)


def aug_solarize_add(x, add, threshold=128):
    return torch.where(x < threshold, (x + _per_image(torch.as_tensor(add, dtype=x.dtype))).clamp(max=255), x)


def aug_color(x, factor):
    return _blend(_luma(x).expand_as(x), x, torch.as_tensor(factor, dtype=x.dtype))


def aug_contrast(x, factor):
    """Blend with the grey image at the rounded mean of the luma histogram."""
    mean = torch.floor(_luma(x).mean((1, 2, 3), keepdim=True) + 0.5)
    return _blend(mean.expand_as(x), x, torch.as_tensor(factor, dtype=x.dtype))


def aug_brightness(x, factor):
    return _blend(torch.zeros_like(x), x, torch.as_tensor(factor, dtype=x.dtype))


def aug_sharpness(x, factor):
    """Blend with PIL's SMOOTH filter (⌊Σ [[1,1,1],[1,5,1],[1,1,1]]·v / 13 + ½⌋) inside, the border unchanged."""
    k = torch.tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=torch.float64).expand(3, 1, 3, 3)
    smooth = x.clone()
    total = F.conv2d(x.double(), k, groups=3)                                    # an exact integer
    smooth[..., 1:-1, 1:-1] = torch.div(2 * total + 13, 26, rounding_mode="floor").clamp(0, 255).to(x.dtype)
    return _blend(smooth, x, torch.as_tensor(factor, dtype=x.dtype))


def _signed(v):
    return lambda m, sign: sign * v(m)


# timm's _RAND_INCREASING_TRANSFORMS: name -> (op, argument of magnitude m ∈ [0, 10] and a random sign, geometric)
RAND_AUGMENT_OPS = {
    "AutoContrast": (aug_auto_contrast, None, False), "Equalize": (aug_equalize, None, False),
    "Invert": (aug_invert, None, False),
    "Rotate": (aug_rotate, _signed(lambda m: m / 10 * 30), True),
    "PosterizeIncreasing": (aug_posterize, lambda m, s: 4 - int(m / 10 * 4), False),
    "SolarizeIncreasing": (aug_solarize, lambda m, s: 256 - int(m / 10 * 256), False),
    "SolarizeAdd": (aug_solarize_add, lambda m, s: int(m / 10 * 110), False),
    "ColorIncreasing": (aug_color, lambda m, s: 1 + s * m / 10 * 0.9, False),
    "ContrastIncreasing": (aug_contrast, lambda m, s: 1 + s * m / 10 * 0.9, False),
    "BrightnessIncreasing": (aug_brightness, lambda m, s: 1 + s * m / 10 * 0.9, False),
    "SharpnessIncreasing": (aug_sharpness, lambda m, s: 1 + s * m / 10 * 0.9, False),
    "ShearX": (aug_shear_x, _signed(lambda m: m / 10 * 0.3), True),
    "ShearY": (aug_shear_y, _signed(lambda m: m / 10 * 0.3), True),
    "TranslateXRel": (aug_translate_x, _signed(lambda m: m / 10 * 0.45), True),
    "TranslateYRel": (aug_translate_y, _signed(lambda m: m / 10 * 0.45), True),
}


def parse_rand_augment(spec: str) -> dict:
    """timm's config string rand-m9-mstd0.5-inc1 (also n2, p0.5, mmax10) → its settings; "" or "none" → {}."""
    if spec in ("", "none", None):
        return {}
    parts = spec.split("-")
    if parts[0] != "rand":
        raise UsageError(f"{_opt('rand_augment')} {spec!r}: expected timm's rand-m<M>[-mstd<S>][-n<N>][-inc1] form")
    cfg = dict(magnitude=10.0, std=0.0, num_ops=2, prob=0.5, magnitude_max=10.0, increasing=False,
               interpolation="bicubic")   # MAE, BEiT and DeiT pass interpolation="bicubic" to timm
    keys = {"mstd": "std", "mmax": "magnitude_max", "m": "magnitude", "n": "num_ops", "p": "prob", "inc": "increasing"}
    for part in parts[1:]:
        key = next((k for k in keys if part.startswith(k) and part[len(k):].replace(".", "", 1).isdigit()), None)
        if key is None:
            raise UsageError(f"{_opt('rand_augment')} {spec!r}: unknown part {part!r}")
        cfg[keys[key]] = float(part[len(key):])
    if not cfg["increasing"]:
        raise UsageError(f"{_opt('rand_augment')} {spec!r}: only the increasing ops (inc1), as MAE, BEiT and DeiT "
                         "use them")
    if not 0 <= cfg["magnitude"] <= cfg["magnitude_max"] <= 10:
        raise UsageError(f"{_opt('rand_augment')} {spec!r}: magnitudes lie in [0, 10] (mmax ≤ 10)")
    cfg["num_ops"] = int(cfg["num_ops"])
    return cfg


def rand_augment_draws(n: int, cfg: dict, g: torch.Generator) -> dict[str, torch.Tensor]:
    """One layer of RandAugment's random choices for n images: the op (uniform, with replacement across layers),
    whether it applies (probability prob), its magnitude m + N(0, std) clipped to [0, magnitude_max], its sign
    (±1 with probability 1/2), as timm draws them."""
    return dict(op=torch.randint(0, len(RAND_AUGMENT_OPS), (n,), generator=g),
                apply=torch.rand(n, generator=g) < cfg["prob"],
                magnitude=(cfg["magnitude"] * torch.rand(n, generator=g) if cfg["std"] > 100 else   # timm: uniform
                           cfg["magnitude"] + cfg["std"] * torch.randn(n, generator=g)).clamp(0, cfg["magnitude_max"]),
                sign=torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0))


def rand_augment(x: torch.Tensor, cfg: dict, g: torch.Generator, fill=(124, 116, 104)) -> torch.Tensor:
    """timm's RandAugment (cfg from parse_rand_augment): num_ops layers of rand_augment_draws, each image through
    its drawn op. x: (B, 3, H, W) 8-bit values as float; fill: the mean colour, 0–255."""
    if not cfg:
        return x
    names, x = list(RAND_AUGMENT_OPS), x.clone()
    for _ in range(cfg["num_ops"]):
        d = rand_augment_draws(len(x), cfg, g)
        for k, name in enumerate(names):
            idx = torch.nonzero(d["apply"] & (d["op"] == k)).flatten()
            if not len(idx):
                continue
            op, arg, geometric = RAND_AUGMENT_OPS[name]
            args = torch.tensor([arg(float(d["magnitude"][i]), float(d["sign"][i])) for i in idx]) if arg else None
            kw = dict(fill=fill, modes=[cfg["interpolation"]] * len(idx)) if geometric else {}
            x[idx] = op(x[idx], args, **kw)
    return x


def random_erasing(x: torch.Tensor, g: torch.Generator, prob: float = 0.25, area=(0.02, 1 / 3),
                   aspect=(0.3, 1 / 0.3), attempts: int = 10) -> torch.Tensor:
    """timm's RandomErasing in pixel mode, per image of a normalised batch: with probability prob, one rectangle of
    area fraction U(area) and log-uniform aspect (h/w) in `aspect` (10 tries to fit) is replaced by N(0, 1) noise."""
    if prob <= 0:
        return x
    x = x.clone()
    _, C, H, W = x.shape
    for i in range(len(x)):
        if float(torch.rand(1, generator=g)) >= prob:
            continue
        for _ in range(attempts):
            target = H * W * (area[0] + (area[1] - area[0]) * float(torch.rand(1, generator=g)))
            u = float(torch.rand(1, generator=g))
            r = math.exp(math.log(aspect[0]) + (math.log(aspect[1]) - math.log(aspect[0])) * u)
            h, w = round(math.sqrt(target * r)), round(math.sqrt(target / r))
            if w < W and h < H:
                top = int(torch.randint(0, H - h + 1, (1,), generator=g))
                left = int(torch.randint(0, W - w + 1, (1,), generator=g))
                x[i, :, top:top + h, left:left + w] = torch.randn((C, h, w), generator=g, dtype=x.dtype)
                break
    return x


def train_batches(model: ViT, images: ImageSet, batch_size: int, g: torch.Generator, shard=(0, 1),
                  augment: bool = True, rand_augment: str = "", reprob: float = 0.0, aug: torch.Generator | None = None):
    """Shuffled training batches as timm's ImageNet training transform: random-resized crop + flip (else resized
    and centre-cropped), RandAugment on the 8-bit crops (`rand_augment`, timm's config string), the model's
    normalisation, RandomErasing (`reprob`). With shard=(rank, world) each process takes every world-th batch of
    one shared permutation (g), so world processes of batch b see the images one process of batch world·b sees;
    the augmentations draw from `aug` (default g), each process its own."""
    aug = aug or g
    pp, size = model.preprocess, model.input_size
    mean, std = torch.tensor(pp["mean"]).view(3, 1, 1), torch.tensor(pp["std"]).view(3, 1, 1)
    ra, fill = parse_rand_augment(rand_augment), tuple(round(255 * m) for m in pp["mean"])
    perm = torch.randperm(len(images), generator=g)
    rank, world = shard
    for b in range(rank, len(perm) // (batch_size * world) * world, world):  # whole groups of world batches
        xs, ys = [], []
        for i in perm[b * batch_size:(b + 1) * batch_size].tolist():
            im = images.image(i)
            if im is None:
                continue
            ys.append(int(images.labels[i]))
            if not augment:
                xs.append(resize_crop_normalize(im, size, pp.get("crop_pct", 0.875), pp.get("interp", "bicubic"),
                                                pp["mean"], pp["std"], pp.get("crop_mode", "center")))
                continue
            im = im.float() / 255 if not im.is_floating_point() else im.float()
            xs.append(random_resized_crop(im, size, aug, interp=pp.get("interp", "bicubic")).clamp(0, 1))
        if not xs:
            continue
        x = torch.stack(xs)
        if augment:
            x = rand_augment_batch(x, ra, aug, fill) if ra else x
            x = random_erasing((x - mean) / std, aug, reprob)
        yield x, torch.tensor(ys)


def rand_augment_batch(x: torch.Tensor, ra: dict, g: torch.Generator, fill) -> torch.Tensor:
    """RandAugment on [0, 1] crops, through 8-bit values as timm applies it to PIL images."""
    return rand_augment((x * 255).round(), ra, g, fill) / 255


def mix_batch(x, y, num_classes, g, mixup=0.0, cutmix=0.0, smoothing=0.0):
    """Soft targets with label smoothing; mixup (Zhang et al. 2018) or cutmix (Yun et al. 2019), chosen with equal
    probability when both are on, mixing each sample with the batch reversed."""
    t = F.one_hot(y, num_classes).float() * (1 - smoothing) + smoothing / num_classes
    modes = [m for m, a in (("mixup", mixup), ("cutmix", cutmix)) if a > 0]
    if not modes:
        return x, t
    mode = modes[int(torch.randint(0, len(modes), (1,), generator=g))]
    alpha = mixup if mode == "mixup" else cutmix
    lam = float(np.random.default_rng(int(torch.randint(0, 2 ** 62, (1,), generator=g))).beta(alpha, alpha))
    if mode == "mixup":
        x = lam * x + (1 - lam) * x.flip(0)
    else:
        H, W = x.shape[-2:]
        ch, cw = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
        cy, cx = int(torch.randint(0, H, (1,), generator=g)), int(torch.randint(0, W, (1,), generator=g))
        y0, y1, x0, x1 = max(cy - ch // 2, 0), min(cy + ch // 2, H), max(cx - cw // 2, 0), min(cx + cw // 2, W)
        x = x.clone()
        x[..., y0:y1, x0:x1] = x.flip(0)[..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)
    return x, lam * t + (1 - lam) * t.flip(0)


class Classifier(nn.Module):
    """head(pool(ViT(x))) as one module, so DistributedDataParallel sees the whole forward."""

    def __init__(self, vit: ViT):
        super().__init__()
        self.vit = vit

    def forward(self, x):
        return self.vit.head(self.vit(x))


def predictions(model: ViT, images: ImageSet, batch_size: int = 64, device=None, dtype=None) -> tuple:
    """(logits (n, C) float32, labels (n,)) of the model's classification head on preprocessed (centre-crop) images."""
    device = as_device(device)
    logits, labels = [], []
    with _placed(model, device), torch.no_grad(), _autocast(device, _parse_dtype(dtype)):
        for x, y in model_batches(model, images, batch_size):
            logits.append(model.logits(x.to(device)).float().cpu())
            labels.append(y)
    if not logits:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(logits), torch.cat(labels)


def predictions_correct(model: ViT, images: ImageSet, batch_size: int = 64, device=None, dtype=None) -> torch.Tensor:
    """Per image, whether the model's classification head predicts its label (top-1), on preprocessed
    (centre-crop) images."""
    logits, y = predictions(model, images, batch_size, device, dtype)
    return logits.argmax(-1) == y if len(y) else torch.zeros(0, dtype=torch.bool)


def topk_kendall(logits_a: torch.Tensor, logits_b: torch.Tensor, k: int = 5) -> torch.Tensor:
    """Per image, Kendall's τ-b between two heads' scores over the union of their top-k classes: how alike they rank
    the classes either puts first (the author code's comparison of top-k lists, as a rank correlation of scores over
    the union, not of the sequences of class ids). NaN where an image's union has no untied pair."""
    k = min(k, logits_a.shape[1])
    idx = torch.cat([logits_a.topk(k, 1).indices, logits_b.topk(k, 1).indices], 1)          # (n, 2k), repeats
    first = torch.ones_like(idx, dtype=torch.bool)
    first[:, 1:] = ~(idx[:, 1:, None] == idx[:, None, :-1]).tril().any(-1)                 # each class counted once
    va, vb = logits_a.double().gather(1, idx), logits_b.double().gather(1, idx)
    pair = (first[:, :, None] & first[:, None, :]).triu(1)
    sa, sb = (torch.sign(v[:, :, None] - v[:, None, :]) for v in (va, vb))
    m = first.sum(1).double()
    n0 = m * (m - 1) / 2
    ties_a = ((sa == 0) & pair).sum((1, 2)).double()
    ties_b = ((sb == 0) & pair).sum((1, 2)).double()
    denom = ((n0 - ties_a) * (n0 - ties_b)).sqrt()
    return torch.where(denom > 0, (sa * sb * pair).sum((1, 2)) / denom.clamp_min(1e-300), float("nan"))


def evaluate(model: ViT, images: ImageSet, batch_size: int = 64, device=None, dtype=None) -> float:
    """Top-1 accuracy of the model's head (see predictions_correct)."""
    correct = predictions_correct(model, images, batch_size, device, dtype)
    return float(correct.float().mean()) if len(correct) else 0.0


@dataclass
class FinetuneConfig:
    """finetune()'s hyperparameters (MAE's recipe, He et al. 2022; the defaults are a quick CPU-sized run)."""
    epochs: int = _field(3, "training epochs", range=(1, None))
    batch_size: int = _field(16, "images per step and process", range=(1, 65536))
    blr: float = _field(1e-3, "base learning rate: lr = blr × effective batch / 256", range=(0, None, "(]"))
    layer_decay: float = _field(0.75, "layer-wise lr decay: block i gets layer_decay^(depth + 1 − (i + 1))", range=(0, 1, "(]"))
    weight_decay: float = _field(0.05, "AdamW weight decay (none on norms, biases, position and cls tokens)", range=(0, 10))
    warmup_epochs: float = _field(1.0, "linear warmup, then half-cycle cosine", range=(0, None))
    min_lr: float = _field(1e-6, "lr at the end of the cosine", range=(0, 10))
    drop_path: float = _field(0.1, "stochastic depth of the last block (linear in depth)", range=(0, 1, "[)"))
    label_smoothing: float = _field(0.1, "label smoothing", range=(0, 1, "[)"))
    mixup: float = _field(0.0, "mixup alpha (0 = off)", range=(0, 100))
    cutmix: float = _field(0.0, "cutmix alpha (0 = off)", range=(0, 100))
    accum_steps: int = _field(1, "gradient accumulation steps", range=(1, 100000))
    effective_batch: int = _field(0, "batch × accum × processes to reach (sets accum_steps; 0 = as given)", range=(0, None))
    augment: bool = _field(True, "random-resized crop + flip (off: resize + centre crop, and no RandAugment or "
                                 "erasing)")
    rand_augment: str = _field("", "RandAugment, timm's config string (MAE, BEiT, DeiT: rand-m9-mstd0.5-inc1; '' = "
                                   "off)")
    reprob: float = _field(0.0, "RandomErasing probability, pixel mode (MAE, BEiT, DeiT: 0.25)", range=(0, 1))
    global_pool: bool = _field(False, "classify fc_norm(mean patch token) (MAE's global pool) instead of the cls token")
    untie_rel_pos: bool = _field(False, "copy a shared relative-position bias into every block, as BEiT's fine-tuning "
                                        "does (else it trains shared, at the top layer's rate)")
    layer_decay_type: str = _field("single", "a CNN's layer ids for the decay: single (one per block) or group "
                                             "(ConvNeXt's 12 groups, its base recipe)", choices=("single", "group"))
    seed: int = _field(0, "seed of the head, the data order and every augmentation", range=SEED_RANGE)
    recipe: str = "quick"          # the preset these values started from (recorded in log.json)

    def with_options(self, **options) -> FinetuneConfig:
        """A copy with these fields changed, checked."""
        unknown = set(options) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise UsageError(f"finetune: unknown option(s) {', '.join(sorted(unknown))}")
        cfg = check_ranges(dataclasses.replace(self, **options))
        if cfg.accum_steps < 1 or cfg.batch_size < 1 or cfg.epochs < 1 or cfg.effective_batch < 0:
            raise UsageError("epochs, batch size and accum steps must be ≥ 1 (effective batch ≥ 0)")
        if not 0 <= cfg.reprob <= 1:
            raise UsageError(f"{_opt('reprob')} must lie in [0, 1], got {cfg.reprob}")
        parse_rand_augment(cfg.rand_augment)
        return cfg


# Published fine-tuning recipes, as FinetuneConfig values (lr = blr × effective batch / 256 throughout).
_TIMM_AUG = dict(rand_augment="rand-m9-mstd0.5-inc1", reprob=0.25, mixup=0.8, cutmix=1.0, label_smoothing=0.1)
RECIPES: dict[str, dict] = {
    "quick": {},   # FinetuneConfig's defaults: a CPU-sized run, no RandAugment (colour stays learnable)
    # MAE FINETUNE.md (ViT-B / L / H rows; batch 32 per GPU × 32 GPUs) and main_finetune.py defaults
    "mae": dict(_TIMM_AUG, batch_size=32, effective_batch=1024, weight_decay=0.05, warmup_epochs=5, min_lr=1e-6,
                global_pool=True, by_width={768: dict(epochs=100, blr=5e-4, layer_decay=0.65, drop_path=0.1),
                                            1024: dict(epochs=50, blr=1e-3, layer_decay=0.75, drop_path=0.2),
                                            1280: dict(epochs=50, blr=1e-3, layer_decay=0.75, drop_path=0.3)}),
    # BEiT README, fine-tuning BEiT-base on ImageNet-1k: lr 4e-3 at batch 1024 (not rescaled), i.e. blr 1e-3
    "beit": dict(_TIMM_AUG, batch_size=128, effective_batch=1024, epochs=100, blr=1e-3, layer_decay=0.65,
                 weight_decay=0.05, drop_path=0.1, warmup_epochs=20, min_lr=1e-6, global_pool=True,
                 untie_rel_pos=True),
    # DeiT main.py defaults for DeiT-B (lr 5e-4 per 512 images = blr 2.5e-4; no layer decay)
    "deit": dict(_TIMM_AUG, batch_size=64, effective_batch=1024, epochs=300, blr=2.5e-4, layer_decay=1.0,
                 weight_decay=0.05, drop_path=0.1, warmup_epochs=5, min_lr=1e-5),
    # ConvNeXt-V2 TRAINING.md, fine-tuning FCMAE on ImageNet-1k (atto / tiny / base rows by final width; 32 per GPU
    # × 32 GPUs) and main_finetune.py defaults; its EMA copy of the weights is not kept here
    "convnextv2": dict(rand_augment="rand-m9-mstd0.5-inc1", reprob=0.25, label_smoothing=0.1, batch_size=32,
                       effective_batch=1024, min_lr=1e-6, default_width=1024,
                       by_width={320: dict(epochs=600, blr=2e-4, layer_decay=0.9, weight_decay=0.3, drop_path=0.1,
                                           warmup_epochs=0, label_smoothing=0.2),
                                 768: dict(epochs=300, blr=8e-4, layer_decay=0.9, weight_decay=0.05, drop_path=0.2,
                                           warmup_epochs=40, mixup=0.8, cutmix=1.0),
                                 1024: dict(epochs=100, blr=6.25e-4, layer_decay=0.6, layer_decay_type="group",
                                            weight_decay=0.05, drop_path=0.1, warmup_epochs=20, mixup=0.8,
                                            cutmix=1.0)}),
}


def finetune_recipe(name: str, model: ViT | None = None) -> FinetuneConfig:
    """The FinetuneConfig of a published recipe (RECIPES), its rows chosen by the model's width (ViT-B otherwise)."""
    if name not in RECIPES:
        raise UsageError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    values = dict(RECIPES[name])
    rows, default = values.pop("by_width", {}), values.pop("default_width", 768)
    if rows:
        width = model.cfg.embed_dim if model is not None else default
        if width not in rows:
            log.info(f"recipe {name}: no row for width {width}; using the width-{default} row")
        values.update(rows.get(width, rows[default]))
        if values.get("layer_decay_type") == "group" and model is not None and not isinstance(model, ConvNeXt):
            values["layer_decay_type"] = "single"   # the grouping is a ConvNeXt's: other models decay per block
            log.warning(f"notice: recipe {name}: ConvNeXt's grouped layer decay does not apply to this model; its "
                        f"decay {values.get('layer_decay')} is applied per block instead (set "
                        f"{_opt('layer_decay')} for it)")
    return FinetuneConfig(recipe=name, **values)


def finetune(model: ViT, train: ImageSet, config: FinetuneConfig | None = None, *, val: ImageSet | None = None,
             num_classes: int | None = None, out=None, resume: bool = False, overwrite: bool = False, device=None,
             dtype=None, progress: bool = False, stop_after_steps: int | None = None, **hyper) -> dict:
    """Fine-tune end to end with MAE's recipe: AdamW with layer-wise lr decay, lr = blr·(effective batch)/256,
    linear warmup then half-cycle cosine per iteration, drop path, label smoothing, optional mixup/cutmix;
    random-resized crop + flip, RandAugment and RandomErasing in torch ops; bf16 autocast on CUDA. Hyperparameters:
    `config` (finetune_recipe(name, model) for a published one), or its fields as keywords. After every epoch `out`
    receives checkpoint.safetensors (reloadable by load_model, head and pooling included), train_state.pt
    (optimizer, epoch, the run's identity) and log.json ({"history": [{epoch, train_loss, val_acc, lr}], "config":
    every resolved value and the recipe}); resume=True continues exactly from there, and an `out` that already
    holds a run is refused unless resume or overwrite. Every random draw comes from generators seeded by
    config.seed. Under torchrun each process takes its share of every batch and gradients are averaged (DDP)."""
    cfg = _checked_run(config or FinetuneConfig(), hyper, train, out, resume, overwrite)
    model = copy.deepcopy(model)   # the caller's model stays the pretrained one; the fine-tuned one is returned
    num_classes = num_classes or len(train.classes) or int(train.labels.max()) + 1
    device = as_device(device)
    dtype = _parse_dtype(dtype) or (torch.bfloat16 if device.type == "cuda" else None)
    rank, world = _rank_world()
    out = Path(out) if out else None
    identity = dict(dataclasses.asdict(cfg), model_sha256=_state_sha256(model), data_sha256=images_fingerprint(train),
                    num_classes=num_classes, world_size=world)   # what a resume must continue with
    _prepare_for_finetuning(model, cfg, num_classes)
    with _placed(model, device, train=True):
        if cfg.layer_decay_type == "group" and not isinstance(model, ConvNeXt):
            raise UsageError(f"{_opt('layer_decay_type')} group is ConvNeXt's grouping of its layers: use single")
        groups = param_groups_lrd(model, cfg.weight_decay, cfg.layer_decay, cfg.layer_decay_type == "group")
        opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=0.0,
                                betas=(0.9, 0.999))
        if resume and not (out / "train_state.pt").is_file():
            log.info(f"{_opt('resume')}: {out} holds no finished epoch yet: starting the run")
        history = _resume(model, opt, out, identity) if resume and (out / "train_state.pt").is_file() else []
        net = Classifier(model)
        if world > 1:
            net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
        steps_per_epoch = max(1, (len(train) // (cfg.batch_size * world)) // cfg.accum_steps)
        sched = dict(total=cfg.epochs * steps_per_epoch, warmup=int(cfg.warmup_epochs * steps_per_epoch),
                     base=cfg.blr * cfg.batch_size * cfg.accum_steps * world / 256, min_lr=cfg.min_lr)
        for epoch in range(len(history), cfg.epochs):
            loss = _train_epoch(net, model, opt, train, cfg, epoch, steps_per_epoch, sched, num_classes, device,
                                dtype, progress and rank == 0, stop_after_steps)
            val_acc = evaluate(model, val, device=device, dtype=dtype) if val is not None and val.labels is not None \
                else None
            history.append(dict(epoch=epoch + 1, train_loss=loss, val_acc=val_acc, lr=opt.param_groups[-1]["lr"]))
            if rank == 0:
                log.info(f"epoch {epoch + 1}/{cfg.epochs}: train loss {loss:.4f}"
                         + (f", val acc {val_acc:.3f}" if val_acc is not None else ""))
                if out:
                    _save_epoch(out, model, opt, history, dict(identity, lr=sched["base"], family=model.family))
            _barrier()
    for blk in model.blocks:
        blk.rng = None
    return dict(history=history, checkpoint=str(out / "checkpoint.safetensors") if out else None, model=model)


FINETUNE_FILES = ("checkpoint.safetensors", "train_state.pt", "log.json")   # what finetune() writes into `out`


def _checked_run(cfg: FinetuneConfig, hyper: dict, train: ImageSet, out, resume: bool, overwrite: bool):
    """The run's config (keywords applied; accum_steps from effective_batch unless given), once the data and `out`
    allow it; an overwritten run's files are removed first."""
    if "accum_steps" in hyper and "effective_batch" not in hyper:
        hyper = dict(hyper, effective_batch=0)   # an explicit accumulation replaces the recipe's effective batch
    cfg = cfg.with_options(**hyper)
    if resume and not out:
        raise UsageError(f"{_opt('resume')} needs the {_opt('out')} of the run to continue")
    if out and not resume and any((Path(out) / f).exists() for f in FINETUNE_FILES):
        if not overwrite:
            raise UsageError(f"{out} already holds a fine-tuning run: {_opt('resume')} to continue it, "
                             f"{_opt('overwrite')} to replace it, or another {_opt('out')}")
        for f in FINETUNE_FILES:
            _unlink(Path(out) / f)
    if train.labels is None:
        raise UsageError("fine-tuning needs labelled data (class sub-folders, or labels in the tensor file)")
    world = _rank_world()[1]
    if cfg.effective_batch:
        cfg = dataclasses.replace(cfg, accum_steps=max(1, round(cfg.effective_batch / (cfg.batch_size * world))))
    if len(train) < cfg.batch_size * world * cfg.accum_steps:
        raise UsageError(f"{len(train)} training images are fewer than one optimizer step's "
                         f"{cfg.batch_size * world * cfg.accum_steps} (batch × accum × processes; lower "
                         f"{_opt('effective_batch')} or {_opt('batch_size')})")
    return cfg


def _use_global_pool(model: ViT):
    """MAE's global pooling (models_vit.py): the final norm removed, a fresh fc_norm (weight 1, bias 0) over the
    mean patch token feeds the head; the checkpoint then loads as MAE's released fine-tuned files do."""
    if model.fc_norm is not None:
        return
    if model.attn_pool is not None:
        raise UsageError("global pooling would bypass this model's attention-pool head: "
                         f"{_opt('global_pool', '--no-global-pool') + ('=False' if not _AS_FLAGS.get() else '')}")
    d, dev = model.cfg.embed_dim, model.patch_embed.proj.weight.device
    model.norm, model.fc_norm = nn.Identity(), nn.LayerNorm(d, eps=model.cfg.norm_eps).to(dev)
    model.cfg = dataclasses.replace(model.cfg, final_norm=False, fc_norm=True, pool="")


def _prepare_for_finetuning(model: ViT, cfg: FinetuneConfig, num_classes: int):
    """The recipe's pooling and relative bias, a head, stochastic depth linear in depth (a CNN pools globally; a
    ConvNeXt without a final norm, FCMAE's encoder, gets a fresh one, weight 1 and bias 0, as ConvNeXt-V2's
    fine-tuning builds it)."""
    if isinstance(model, ConvNeXt) and model.norm is None:
        model.norm = nn.LayerNorm(model.cfg.embed_dim, eps=model.cfg.final_eps).to(next(model.parameters()).device)
        model.cfg = dataclasses.replace(model.cfg, final_norm=True)
    if isinstance(model, ConvNet) and (cfg.global_pool or cfg.untie_rel_pos):
        log.warning("notice: global_pool and untie_rel_pos are a ViT's: a CNN pools its last map globally and has "
                    "no relative-position bias")
    if cfg.global_pool and not isinstance(model, ConvNet):
        _use_global_pool(model)
    if cfg.untie_rel_pos and not isinstance(model, ConvNet):
        _untie_relative_bias(model)
    _attach_head(model, num_classes, torch.Generator().manual_seed(cfg.seed))
    for i, blk in enumerate(model.blocks):
        blk.drop_path = cfg.drop_path * i / max(len(model.blocks) - 1, 1)


def _untie_relative_bias(model: ViT):
    """BEiT's fine-tuning (rel_pos_bias without the shared one): the shared table copied into every block, each then
    trained at its block's rate."""
    if model.rel_pos_bias is None:
        return
    table = model.rel_pos_bias.relative_position_bias_table.detach()
    for blk in model.blocks:
        blk.attn.relative_position_bias_table = nn.Parameter(table.clone())
    model.rel_pos_bias = None
    model.cfg = dataclasses.replace(model.cfg, rel_pos="per_block")


def _attach_head(model: ViT, num_classes: int, g: torch.Generator):
    """A new linear head (trunc-normal σ = 2e-5, zero bias, as MAE) unless the model has one of that size."""
    if model.head is None or model.head.out_features != num_classes:
        head = nn.utils.skip_init(nn.Linear, model.cfg.embed_dim, num_classes)
        with torch.no_grad():
            nn.init.trunc_normal_(head.weight, std=2e-5, generator=g)
            head.bias.zero_()
        model.head = head.to(next(model.parameters()).device)
    model.cfg = dataclasses.replace(model.cfg, num_classes=num_classes)


def _resume(model: ViT, opt, out: Path, identity: dict) -> list[dict]:
    """Weights and optimizer state of the last finished epoch in `out`, and the history so far — only for the run
    that wrote them (the same starting weights, data and every hyperparameter) and only from intact files."""
    try:
        state = torch.load(out / "train_state.pt", map_location="cpu", weights_only=True)
        recorded, epoch, history = state["identity"], state["epoch"], state["history"]
    except Exception as e:  # noqa: BLE001 - unreadable, truncated or from another version: not resumable
        raise UsageError(f"{out}/train_state.pt is damaged or not ours ({_one_line(e)[:120]}): remove it to start "
                         "over") from None
    changed = [k for k in identity if recorded.get(k) != identity[k]]
    if changed:
        raise UsageError(f"{_opt('resume')}: {out} holds a run with another {', '.join(changed)}: resume with the "
                         f"same model, data and settings, or fine-tune into another {_opt('out')}")
    if file_sha256(out / "checkpoint.safetensors") != state.get("checkpoint_sha256"):
        raise UsageError(f"{out}/checkpoint.safetensors is not the file train_state.pt recorded (damaged, replaced or "
                         "from an interrupted save): remove the folder to start over")
    sd, meta = read_checkpoint(out / "checkpoint.safetensors")
    if json.loads(meta.get("epoch", "-1")) != epoch + 1:
        raise UsageError(f"{out}: checkpoint.safetensors and train_state.pt are from different epochs (an "
                         "interrupted save); remove train_state.pt to start over")
    if any(v.is_floating_point() and not torch.isfinite(v).all() for v in sd.values()):
        raise UsageError(f"{out}/checkpoint.safetensors has NaN or Inf weights: remove the folder to start over")
    try:
        model.load_state_dict(sd)
        opt.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise UsageError(f"{out}: the saved state does not fit this model ({_one_line(e)[:120]})") from None
    log.info(f"resuming from {out} after epoch {epoch + 1}")
    return history


def _train_epoch(net, model, opt, train, cfg, epoch, steps_per_epoch, sched, num_classes, device, dtype, progress,
                 stop_after_steps) -> float:
    """One epoch of optimizer steps; its randomness (order, crops, mixing, drop path) is seeded by (seed, epoch),
    so a resumed run repeats it exactly. Returns the mean training loss over all processes."""
    rank, world = _rank_world()
    order = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)          # the data order all processes share
    g = torch.Generator().manual_seed(cfg.seed * 100003 + epoch + 1_000_003 * (rank + 1))   # this process's draws
    drop = torch.Generator(device).manual_seed(cfg.seed * 100003 + epoch + 7 + 1_000_003 * rank)
    for blk in model.blocks:
        blk.rng = drop
    net.train()
    step, losses, micro = epoch * steps_per_epoch, [], 0
    bar = Progress(steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}", enabled=progress, unit="step")
    for x, y in train_batches(model, train, cfg.batch_size, order, (rank, world), cfg.augment, cfg.rand_augment,
                              cfg.reprob, g):
        if micro == 0:
            lr = cosine_lr(step, sched["total"], sched["warmup"], sched["base"], sched["min_lr"])
            for grp in opt.param_groups:
                grp["lr"] = lr * grp["lr_scale"]
        x, t = mix_batch(x, y, num_classes, g, cfg.mixup, cfg.cutmix, cfg.label_smoothing)
        with _autocast(device, dtype):
            loss = torch.sum(-t.to(device) * F.log_softmax(net(x.to(device)).float(), -1), -1).mean()
        if not torch.isfinite(loss.detach()):
            raise UsageError(f"training diverged: the loss is {float(loss.detach())} at step {step + 1} of epoch "
                             f"{epoch + 1} (lower {_opt('blr')})")
        (loss / cfg.accum_steps).backward()
        losses.append(float(loss.detach()))
        micro += 1
        if micro == cfg.accum_steps:
            opt.step()
            opt.zero_grad(set_to_none=True)
            micro, step = 0, step + 1
            bar.update()
            if stop_after_steps is not None and step >= stop_after_steps:
                raise KeyboardInterrupt("stop_after_steps")  # simulated interruption (tests)
            if step >= (epoch + 1) * steps_per_epoch:
                break
    bar.close()
    opt.zero_grad(set_to_none=True)
    total, count = _all_reduce_sums([sum(losses), len(losses)])
    return total / count if count else float("nan")


def _save_epoch(out: Path, model: ViT, opt, history: list, record: dict):
    """checkpoint.safetensors, train_state.pt (optimizer, epoch, and the run's identity a resume must match) and
    log.json (history and every setting)."""
    save_checkpoint(model, out / "checkpoint.safetensors", extra=dict(epoch=len(history), fine_tuned=True))
    buf = io.BytesIO()
    torch.save(dict(optimizer=opt.state_dict(), epoch=len(history) - 1, history=history, identity=record,
                    checkpoint_sha256=file_sha256(out / "checkpoint.safetensors")), buf)
    atomic_write(out / "train_state.pt", buf.getvalue())
    write_json(out / "log.json", dict(history=history, config=record))


# ======================================================================================================================
# 9. Analyses: where the gap opens, information distribution, invariance, attention, spatial probes, fine-tuning
# ======================================================================================================================

def layernorm_without_affine(feats: dict, model: ViT) -> dict:
    """LayerNorm outputs with their affine part undone, (y − β) / γ, for every norm point in feats (any token
    reduction: the affine map is per channel, so it commutes with token means and slices)."""
    modules = dict(model.named_modules())
    out = {}
    for k, v in feats.items():
        mod = modules.get(k)
        if isinstance(mod, nn.LayerNorm):
            w, b = mod.weight.detach().float().cpu(), mod.bias.detach().float().cpu()
            shape = v.shape
            c = w.numel()
            out[f"{k}.noaffine"] = ((v.reshape(*shape[:-1], -1, c) if v.shape[-1] != c else v) - b).div(w)\
                .reshape(shape)
    return out


def _spectrum(x) -> torch.Tensor:
    """Singular values of the mean-centred features (float64)."""
    x = _flat64(x)
    return torch.linalg.svdvals(x - x.mean(0))


def _effective_rank(s: torch.Tensor) -> float:
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def _participation_ratio(s: torch.Tensor) -> float:
    lam = s ** 2
    return float(lam.sum() ** 2 / (lam ** 2).sum())


def effective_rank(x) -> float:
    """exp(H(p)), p_i = σ_i / Σσ over singular values of the mean-centred features (Roy & Vetterli 2007)."""
    return _effective_rank(_spectrum(x))


def participation_ratio(x) -> float:
    """(Σλ)² / Σλ², λ the eigenvalues of the feature covariance."""
    return _participation_ratio(_spectrum(x))


def anisotropy(x) -> float:
    """ρ² = ‖μ‖² / E‖x − μ‖²: how much a shared mean direction dominates the features."""
    x = _flat64(x)
    mu = x.mean(0)
    return float(mu.square().sum() / (x - mu).square().sum(1).mean())


def spectrum_stats(feats: dict) -> dict[str, dict]:
    """Effective rank, participation ratio, anisotropy and top-PC variance share per layer (one SVD each)."""
    out = {}
    for k, v in _layers(feats).items():
        s = _spectrum(v)
        lam = s ** 2
        out[k] = dict(effective_rank=_effective_rank(s), participation_ratio=_participation_ratio(s),
                      anisotropy=anisotropy(v), top_pc_share=float(lam[0] / lam.sum()) if lam.sum() > 0 else 0.0)
    return out


def pca_probe(train, y_train, test, y_test, ks=(1, 2, 4, 8, 16, 32, 64), seed: int = 0, **probe_opts) -> dict:
    """Linear probes on the top-k principal components of each layer (fit on train) versus k random orthonormal
    directions: class information concentrated in few dominant directions is found by the first, not the second.
    Returns {layer: {"pc": {k: top-1}, "random": {k: top-1}}}."""
    train, y_train, test, y_test = _check_probe_inputs(train, y_train, test, y_test)
    g = torch.Generator().manual_seed(seed)
    tr, te = {}, {}
    for name, x in train.items():
        mu = x.double().mean(0)
        _, _, vt = torch.linalg.svd(x.double() - mu, full_matrices=False)
        d = x.shape[1]
        rand, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        for k in ks:
            if k > min(d, len(x)):
                continue
            for tag, basis in (("pc", vt[:k].T), ("random", rand[:, :k])):
                tr[f"{name}/{tag}{k}"] = ((x.double() - mu) @ basis).float()
                te[f"{name}/{tag}{k}"] = ((test[name].double() - mu) @ basis).float()
    res = linear_probe(tr, y_train, te, y_test, seed=seed, **probe_opts)
    out = {name: {"pc": {}, "random": {}, "correct": {}} for name in train}
    for key, r in res.items():
        name, tag = key.rsplit("/", 1)
        kind = "pc" if tag.startswith("pc") else "random"
        out[name][kind][int(tag[len(kind):])] = r["top1"]
        if "correct" in r:
            out[name]["correct"][tag] = r["correct"]
    return out


def gaussian_blur(x: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    """Separable Gaussian blur of (n, c, h, w) images (σ px, radius 3σ, reflected edges): along each axis the
    weighted sum of shifted copies (a grouped conv2d is several times slower on a CPU)."""
    r = max(1, int(3 * sigma))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float64) ** 2 / (2 * sigma ** 2))
    for dim, pad in ((-1, (r, r, 0, 0)), (-2, (0, 0, r, r))):
        p, size = F.pad(x, pad, mode="reflect"), x.shape[dim]
        x = p.narrow(dim, 0, size) * float(k[0] / k.sum())
        for i in range(1, 2 * r + 1):
            x.add_(p.narrow(dim, i, size), alpha=float(k[i] / k.sum()))
    return x


def augment_batch(x: torch.Tensor, kind: str, g: torch.Generator) -> torch.Tensor:
    """One augmentation of images in [0, 1]: hflip, crop (random 50-100% area, resized back), color (brightness,
    contrast, saturation ±40%), grayscale, blur (σ = 1.5 px)."""
    if kind == "hflip":
        return x.flip(-1)
    if kind == "grayscale":
        return (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:]).expand_as(x)
    if kind == "blur":
        return gaussian_blur(x)
    if kind == "crop":
        return torch.stack([random_resized_crop(im, x.shape[-1], g, scale=(0.5, 1.0), ratio=(1, 1), flip=False)
                            for im in x])
    if kind == "color":
        f = lambda: 0.6 + 0.8 * torch.rand(len(x), 1, 1, 1, generator=g)
        gray = (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:])
        x = x * f()
        x = (x - gray.mean((2, 3), keepdim=True)) * f() + gray.mean((2, 3), keepdim=True)
        return (gray + (x - gray) * f()).clamp(0, 1)
    raise UsageError(f"unknown augmentation {kind!r}: hflip, crop, color, grayscale, blur")


AUGMENTATIONS = ("hflip", "crop", "color", "grayscale", "blur")


def invariance_scores(a: torch.Tensor, b: torch.Tensor, seed: int = 0) -> dict:
    """Mean cosine between features of each image (a) and of its augmented version (b), raw and mean-centred, and
    normalised by a shuffled-pair baseline: (s − s_shuffled) / (1 − s_shuffled); `*_normalised_ci` is the 95%
    normal interval of s over images (baseline held fixed), mapped the same way."""
    a, b = _flat64(a), _flat64(b)
    perm = torch.randperm(len(a), generator=torch.Generator().manual_seed(seed))
    if len(a) > 1:
        perm = torch.where(perm == torch.arange(len(a)), perm.roll(1), perm)
    out = {}
    for tag, (u, v) in (("raw", (a, b)), ("centred", (a - torch.cat([a, b]).mean(0), b - torch.cat([a, b]).mean(0)))):
        cos = F.cosine_similarity(u, v, dim=1)
        s, sh = float(cos.mean()), float(F.cosine_similarity(u, v[perm], dim=1).mean())
        se = float(cos.std() / math.sqrt(len(cos))) if len(cos) > 1 else float("nan")
        scale = 1 / (1 - sh) if abs(1 - sh) > 1e-12 else float("nan")
        out[tag] = s
        out[f"{tag}_shuffled"] = sh
        out[f"{tag}_normalised"] = (s - sh) * scale
        out[f"{tag}_normalised_ci"] = [(lo - sh) * scale for lo in normal_interval(s, se)]
    return out


AUGMENT_KEEP_BYTES = 1 << 30   # invariance keeps the images in [0, 1] and one augmentation of them up to this


def invariance(model: ViT, images: ImageSet, augmentations=AUGMENTATIONS, points=None, tokens=None,
               batch_size: int = 32, seed: int = 0, device=None, dtype=None) -> dict:
    """Per layer and augmentation, invariance_scores of the model's features (cls, or mean without cls)."""
    return invariance_many([model], images, augmentations, points, tokens, batch_size, seed, device, dtype)[0]


def invariance_many(models, images: ImageSet, augmentations=AUGMENTATIONS, points=None, tokens=None,
                    batch_size: int = 32, seed: int = 0, device=None, dtype=None) -> list[dict]:
    """invariance() of each model. Each augmentation acts in [0, 1] pixel space on the images as the model's
    resize and crop give them (before its mean and std), its draws from `seed` alone, over every batch in one stream
    (the same draws at any torch.distributed world size); models resized and cropped alike share that work, and a
    model's scores are those it gets alone."""
    base = [extract(m, images, resolve_points(m, points), _probe_tokens(m, tokens), batch_size, device, dtype)
            for m in models]
    out = [{} for _ in models]
    groups: dict[str, list[int]] = {}
    for k, m in enumerate(models):   # the [0, 1] images: the model's preprocessing with mean 0 and std 1
        groups.setdefault(repr(_unit_kw(preprocess_kw(m))), []).append(k)
    for members in groups.values():
        kw = _unit_kw(preprocess_kw(models[members[0]]))
        every = lambda kw=kw: (x[0][0] for _, x in preprocessed_batches([kw], images, batch_size, group=UNSHARDED))
        held = len(images) * 6 * kw["size"] ** 2 * 4 <= AUGMENT_KEEP_BYTES   # the images and one augmentation
        kept = [x.clamp_(0, 1) for x in every()] if held else None
        for kind in augmentations:
            views = list(_augmented(kept, kind, seed)) if held else None
            for k in members:
                m = models[k]
                stream = views if held else _augmented((x.clamp_(0, 1) for x in every()), kind, seed)
                feats = extract(m, _normalised(stream, m), list(base[k]), _probe_tokens(m, tokens), batch_size,
                                device, dtype)
                out[k][kind] = {p: invariance_scores(base[k][p], feats[p], seed) for p in base[k]}
    return out


def _unit_kw(kw: dict) -> dict:
    return dict(kw, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def _augmented(batches, kind: str, seed: int):
    """Each batch of [0, 1] images with augmentation `kind`, the draws of one generator seeded by `seed`."""
    g = torch.Generator().manual_seed(seed)
    for x in batches:
        yield augment_batch(x, kind, g)


def _normalised(batches, model):
    """The batches in [0, 1] normalised by the model's mean and std."""
    kw = preprocess_kw(model)
    m, s = torch.tensor(kw["mean"]).view(1, 3, 1, 1), torch.tensor(kw["std"]).view(1, 3, 1, 1)
    for x in batches:
        yield torch.sub(x, m).div_(s)


def attention_statistics(model: ViT, images, batch_size: int = 16, mask_ratio: float = 0.0, seed: int = 0,
                         device=None, max_images: int | None = None) -> dict:
    """Per block and head, on patch-to-patch attention renormalised without cls and registers (Park et al. 2023;
    see attention_map_stats): mean attention distance in pixels (Dosovitskiy et al. 2021 / Raghu et al. 2021),
    attention entropy (nats, mean over queries), and the normalised mutual information between queries (uniform)
    and keys, I(q; k) / √(H(q) H(k)). mask_ratio > 0 keeps a random sorted subset of patches
    per image, as MAE's pre-training forward does (positions of kept patches are used for distances). max_images of
    an ImageSet are a random subset drawn from `seed` (batch_order), never a class-sorted folder's first classes."""
    in_range("mask_ratio", mask_ratio, 0, 1, "[)")
    if isinstance(images, ImageSet) and max_images and max_images < len(images):
        images = images.subset(batch_order(len(images), seed)[:max_images])
    patches = (model.input_size // model.cfg.patch_size) ** 2
    if mask_ratio and round(patches * (1 - mask_ratio)) < 2:
        raise UsageError(f"mask_ratio {mask_ratio} keeps {round(patches * (1 - mask_ratio))} of {patches} patches: "
                         "attention statistics need at least 2")
    device = as_device(device)
    depth, H = len(model.blocks), model.cfg.num_heads
    sums = {k: torch.zeros(depth, H, dtype=torch.float64) for k in ("distance", "entropy", "nmi")}
    squares = {k: torch.zeros(depth, dtype=torch.float64) for k in sums}   # of each image's mean over heads
    count = 0
    g = torch.Generator().manual_seed(seed)
    batches = model_batches(model, images, batch_size) if isinstance(images, ImageSet) else \
        ((x, None) for x in (images.split(batch_size) if isinstance(images, torch.Tensor) else images))
    npre, p = model.cfg.num_prefix, model.cfg.patch_size
    with _placed(model, device):
        for x, _ in batches:
            x = x.to(device)
            gh, gw = x.shape[-2] // p, x.shape[-1] // p
            keep = None
            if mask_ratio > 0:
                n_keep = max(1, round(gh * gw * (1 - mask_ratio)))
                keep = torch.rand(len(x), gh * gw, generator=g).argsort(1)[:, :n_keep].sort(1).values.to(device)
            idx = keep if keep is not None else torch.arange(gh * gw, device=device).expand(len(x), -1)
            pos = torch.stack([idx // gw, idx % gw], -1).double() * p          # (B, P, 2) pixels
            dist = torch.cdist(pos, pos).float()                                 # (B, P, P)
            for li, a in enumerate(attention_maps(model, x, keep)):   # float32 maps (sums over images: float64)
                for k, v in attention_map_stats(a.float(), dist, npre).items():
                    sums[k][li] += v.sum(0).cpu()
                    squares[k][li] += v.mean(1).square().sum().cpu()
            count += len(x)
            if max_images and count >= max_images:
                break
    if count == 0:
        raise UsageError("no images for attention statistics")
    out = {k: (v / count) for k, v in sums.items()}
    for k in sums:   # standard error over images of the per-block mean over heads
        var = (squares[k] / count - out[k].mean(1).square()).clamp_min(0) * count / max(count - 1, 1)
        out[f"{k}_se"] = (var / count).sqrt()
    return out


def attention_map_stats(a: torch.Tensor, dist: torch.Tensor, num_prefix: int) -> dict[str, torch.Tensor]:
    """(B, H) statistics of attention maps a (B, H, T, T) on patch-to-patch attention as Park et al. 2023 define it:
    the P patch queries' attention over the P patch keys, cls and register rows and columns dropped, rows
    renormalised (A). distance = Σ_k A_qk ‖pos_q − pos_k‖ (pixels, mean over queries; dist (B, P, P)); entropy =
    mean over queries of −Σ_k A_qk log A_qk; NMI = I(q; k) / √(H(q) H(k)) with uniform queries, p(k) = mean_q A_qk,
    H(q) = log P, I = H(k) − mean_q H(k | q)."""
    pp = a[:, :, num_prefix:, num_prefix:]
    pp = pp / pp.sum(-1, keepdim=True).clamp_min(1e-12)
    ent = torch.special.entr(pp).sum(-1)                            # (B, H, P); entr(p) = −p log p, 0 at 0
    pk = pp.mean(-2)                                                 # p(k) with uniform queries
    hk = torch.special.entr(pk).sum(-1)
    mi = hk - ent.mean(-1)
    return dict(distance=(pp * dist[:, None]).sum(-1).mean(-1), entropy=ent.mean(-1),
                nmi=mi / (math.log(pp.shape[-2]) * hk).clamp_min(1e-12).sqrt())


def patch_labels(model: ViT, images: ImageSet) -> torch.Tensor:
    """Per-patch labels (majority of the pixel mask under each patch, after the model's resize and crop):
    0 = background, 1 + class where the object is. Needs images with masks (the synthetic set)."""
    if images.masks is None:
        raise UsageError("per-patch labels need masks (the synthetic data set has them)")
    pp, size = model.preprocess, model.input_size
    masks = images.masks.long()
    top = masks.flatten(1).amax(1)
    if bool(((masks == top[:, None, None]) | (masks == 0)).all()):   # one object class per image (the synthetic set):
        planes = torch.stack([masks == 0, masks > 0], 1).float()     # background and object, the same majority
    else:
        planes, top = F.one_hot(masks, int(top.max()) + 1).permute(0, 3, 1, 2).float(), None   # a plane per class
    n, c, h, w = planes.shape
    k = -(-c // 3)   # planes three at a time as one image's "RGB" (the resize treats channels apart): one call
    rgb = F.pad(planes, (0, 0, 0, 0, 0, 3 * k - c)).reshape(n * k, 3, h, w)
    crop = resize_crop_normalize(rgb, size, pp["crop_pct"], "bilinear", (0, 0, 0), (1, 1, 1),
                                 pp.get("crop_mode", "center")).reshape(n, 3 * k, size, size)[:, :c]
    if isinstance(model, ConvNet):   # its last stage's grid (a ResNet's strided convolutions round up)
        g = math.isqrt(cnn_point_shapes(model)[model.block_names[-1]][0])
        win = F.adaptive_avg_pool2d(crop, (g, g)).argmax(1).flatten(1)
    else:
        win = F.avg_pool2d(crop, model.cfg.patch_size).argmax(1).flatten(1)   # (n, P)
    return win if top is None else torch.where(win == 1, top[:, None], 0)


def spatial_probes(model: ViT, images: ImageSet, points=None, batch_size: int = 32, max_patches: int = 20000,
                   seed: int = 0, device=None, dtype=None, labels_memo: dict | None = None) -> dict:
    """Linear probes (ridge classifiers, closed form) on frozen patch tokens of every block, and of every block
    concatenated with the last: the patch's grid position (P classes) and, where the data has masks, the object
    class under the patch (0 = background). Train/test split by image. A CNN's default points are its last stage's
    blocks, whose positions are the stride-32 grid the masks are read on. labels_memo: a dict one caller passes
    for every model on these images, where models resized, cropped and gridded alike share their patch labels."""
    last_stage = [b for b in getattr(model, "block_names", []) if b.startswith(model.stage_names[-1] + ".")]
    names = resolve_points(model, points if points is not None or not last_stage else last_stage)
    feats = extract(model, images, names, "patch", batch_size, device, dtype)
    n, P = next(iter(feats.values())).shape[:2]
    if n < 4:
        raise UsageError("spatial probes need at least 4 images")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    tr_img, te_img = perm[: n * 3 // 4], perm[n * 3 // 4:]
    targets = {"position": torch.arange(P).expand(n, -1)}
    if images.masks is not None:
        memo = {} if labels_memo is None else labels_memo
        key = (repr(_unit_kw(preprocess_kw(model))), None if isinstance(model, ConvNet) else model.cfg.patch_size, P)
        targets["mask"] = memo[key] if key in memo else memo.setdefault(key, patch_labels(model, images))
    out = {}
    for tname, lab in targets.items():
        def take(imgs):
            rows = torch.cartesian_prod(imgs, torch.arange(P))
            if len(rows) > max_patches:
                rows = rows[torch.randperm(len(rows), generator=g)[:max_patches]]
            return rows
        rtr, rte = take(tr_img), take(te_img)
        tr = {k: v[rtr[:, 0], rtr[:, 1]] for k, v in feats.items()}
        te = {k: v[rte[:, 0], rte[:, 1]] for k, v in feats.items()}
        if len(names) > 1:  # and each block concatenated with the last one (the paper's block-i + block-11 runs)
            tr, te = ({k: v for k, v in concat_features(f, names[-1]).items() if k != "all"} for f in (tr, te))
        res = ridge_classifier(tr, lab[rtr[:, 0], rtr[:, 1]], te, lab[rte[:, 0], rte[:, 1]])
        out[tname] = {k: _image_clustered(r, rte[:, 0]) for k, r in res.items()}
    return out


def _image_clustered(r: dict, image_of: torch.Tensor, level: float = 0.95) -> dict:
    """A per-patch accuracy's interval over test images, not patches (the patches of one image are not independent
    trials): the mean of the per-image accuracies ∓ t·sd/√m over the m test images (a cluster-robust interval)."""
    right = torch.tensor([c == "1" for c in r["correct"]], dtype=torch.float64)
    ids, inverse = torch.unique(image_of, return_inverse=True)
    per_image = torch.zeros(len(ids), dtype=torch.float64).index_add_(0, inverse, right) / \
        torch.bincount(inverse, minlength=len(ids)).double()
    m = len(per_image)
    se = float(per_image.std() / math.sqrt(m)) if m > 1 else float("nan")
    lo, hi = normal_interval(float(per_image.mean()), se, level, m - 1 if m > 1 else None)
    out = {k: v for k, v in r.items() if k not in ("top5", "top5_ci")}
    if m < 2:                                  # one test image: nothing to estimate the spread from, said
        return dict(out, top1_ci=[float("nan")] * 2, n_images=m, interval="no interval (a single test image)")
    out.update(top1_ci=[max(0.0, min(lo, r["top1"])), min(1.0, max(hi, r["top1"]))], n_images=m,
               interval=f"t over the {m} test images (patches clustered by image)")
    return out


def weight_distance(model_a: nn.Module, model_b: nn.Module) -> dict[str, float]:
    """‖θ_a − θ_b‖₂ per module (parameters grouped by their module name, BatchNorm's running statistics not being
    parameters), plus 'blocks' and 'total'."""
    sa, sb = ({k: v.detach() for k, v in m.named_parameters()} for m in (model_a, model_b))
    common = [k for k in sa if k in sb and sa[k].shape == sb[k].shape and not k.startswith("head.")]
    if not common:
        raise UsageError("the two models share no parameters of equal shape")
    sq: dict[str, float] = {}
    for k in common:
        mod = k.rsplit(".", 1)[0] if "." in k else k
        d = float((sa[k].double() - sb[k].double()).square().sum())
        sq[mod] = sq.get(mod, 0.0) + d
        if k.startswith("blocks."):
            sq["blocks"] = sq.get("blocks", 0.0) + d
        sq["total"] = sq.get("total", 0.0) + d
    return {k: math.sqrt(v) for k, v in sq.items()}


def prediction_agreement(correct_a, correct_b) -> dict:
    """Joint correctness table [[both, a only], [b only, neither]], Hamming distance of the correctness vectors,
    and Cohen's κ = (p_o − p_e) / (1 − p_e) on them (error consistency, Geirhos et al. 2020)."""
    a, b = torch.as_tensor(correct_a).bool().flatten(), torch.as_tensor(correct_b).bool().flatten()
    if a.shape != b.shape or len(a) == 0:
        raise UsageError("prediction_agreement needs two correctness vectors of the same non-zero length")
    n = len(a)
    both, a_only, b_only = int((a & b).sum()), int((a & ~b).sum()), int((~a & b).sum())
    neither = n - both - a_only - b_only
    po = (both + neither) / n
    pa, pb = float(a.float().mean()), float(b.float().mean())
    pe = pa * pb + (1 - pa) * (1 - pb)
    kappa = (po - pe) / (1 - pe) if pe < 1 else float("nan")   # undefined when both are always right or wrong
    return dict(table=[[both, a_only], [b_only, neither]], hamming=1 - po, kappa=kappa, acc_a=pa, acc_b=pb)


# --- the battery: each analysis returns (results, figures as data, plain-language readings); `report` runs all -

@dataclass
class AnalysisOptions:
    """Settings of the analyses; each uses the fields its ANALYSES row lists."""
    tokens: str = _field("flat", "token reduction for CKA: flat (all tokens × channels, the paper's), cls, mean "
                                 "(patch tokens), all, patch", choices=tuple(t for t in TOKENS if t != "official"))
    estimator: str = _field("auto", "CKA estimator: auto = an unbiased one (debiased when the features fit in 2 "
                                    "GiB, else minibatch); biased = Kornblith et al.'s HSIC (inflated at small n "
                                    "for wide features; `full` is its former name); debiased = the U-statistic "
                                    "(Song et al.); minibatch = Nguyen et al. (memory independent of n)",
                            choices=("auto", "biased", "full", "debiased", "minibatch"))
    ci: float = _field(0.95, "level of the intervals on every CKA number (0 = none): bootstrap over batches for "
                             "minibatch, the delete-a-group jackknife over images otherwise", range=(0, 1, "[)"))
    ci_resamples: int = _field(1000, "bootstrap resamples of the minibatch intervals", range=(10, 1000000))
    epochs: int = _field(50, "epochs of the MLP probes", range=(1, 100000))
    mae_mask_ratio: float = _field(0.0, "attention statistics with MAE's random masking (the paper's author code "
                                        "ran pretrained MAE at 0.75)", range=(0, 1, "[)"))
    attention_images: int = _field(256, "images for attention statistics", range=(1, None))
    measures: str = _field("", "similarity measures beside CKA in the overview (a comma list of "
                               f"{', '.join(MEASURES)}, or all): does the finding survive the measure?")
    permutations: int = _field(200, "permutations behind each measure's p-value and calibrated score (0 = none)",
                               range=(0, 100000))
    null: str = _field("moments", "CKA's null against no relation: moments = the permutation distribution's exact "
                                  "mean, variance and skewness (a Pearson III; debiased CKA), exact = --permutations "
                                  "permutations", choices=NULLS)
    batch_size: int = 32
    device: str | None = None
    dtype: str | None = None
    cache_dir: str | None = None     # feature cache folder
    seed: int = 0
    progress: bool = False

    def __post_init__(self):
        check_ranges(self)
        in_range("batch_size", self.batch_size, 1, 65536)


def _spec(m: ViT) -> str:
    return m.source["spec"] if hasattr(m, "source") else m.family


def _short(spec: str) -> str:
    """A model's name in a table: a registered name as it is, a file by its stem, a folder by its name."""
    p = Path(spec)
    if len(p.parts) == 1 and not p.suffix:
        return spec
    return Path(p.stem).stem if p.name.endswith(".tar") else p.stem if p.suffix else p.name


def _label(m: ViT) -> str:
    """A model's name in figures and tables: its label (report --labels), else _short of its spec."""
    return getattr(m, "source", {}).get("label") or _short(_spec(m))


def curve_figure(curves: dict, title: str, ylabel: str, bands: dict | None = None, ylim=None) -> dict:
    """What a per-layer figure draws: {line label: {layer: value}}, its interval band per line {label: ({layer:
    low}, {layer: high})}, a title that says what and on which data, the y label with its unit, and fixed y limits
    for a bounded score (None: the data's own)."""
    return dict(curves=curves, bands=bands or {}, title=title, ylabel=ylabel, ylim=ylim)


def _ci_band(results: dict, key: str = "top1_ci") -> tuple[dict, dict]:
    """({layer: low}, {layer: high}) of a per-layer result {layer: {key: [low, high]}}."""
    return ({k: v[key][0] for k, v in results.items()}, {k: v[key][1] for k, v in results.items()})


def _vits(models, what: str, least: int = 1) -> tuple[list, list[str]]:
    """The ViTs among the models, and a reading naming the CNNs left out of an analysis of ViT parts; fewer than
    `least` ViTs: a UsageError saying why."""
    vits = [m for m in models if isinstance(m, ViT)]
    cnns = [_label(m) for m in models if not isinstance(m, ViT)]
    if len(vits) < least:
        raise UsageError(f"{what} is defined for ViTs only ({least} needed; {', '.join(cnns)} "
                         f"{'is a CNN' if len(cnns) == 1 else 'are CNNs'})")
    return vits, [f"{', '.join(cnns)} left out: {what} is defined for ViTs only."] if cnns else []


def gap_analysis(models, images, opts: AnalysisOptions) -> tuple[dict, dict, list[str]]:
    """Where the gap opens: CKA by sub-layer type, matched-layer diagonal, CKA vs distance, LN with/without affine
    (ViTs: a CNN's sub-layers are other types; the across-architectures comparison is the overview's)."""
    models, left_out = _vits(models, "CKA by sub-layer type (attention, MLP, LayerNorm)", 2)
    run = dict(batch_size=opts.batch_size, device=opts.device, dtype=opts.dtype, cache_dir=opts.cache_dir)
    res = compare_models(models, images, points="all", tokens=opts.tokens, estimator=opts.estimator,
                         progress=opts.progress, ci=opts.ci, ci_resamples=opts.ci_resamples, seed=opts.seed,
                         permutations=opts.permutations, null=opts.null, **run)
    readings, figures = left_out, {}
    norm_pts = [[p for p in resolve_points(m, "sublayers") if p.endswith(("norm1", "norm2"))] for m in models]
    feats = [cached_extract(m, images, pts, "mean", **run) for m, pts in zip(models, norm_pts, strict=True)]
    raw = [layernorm_without_affine(f, m) for f, m in zip(feats, models, strict=True)]
    for pair in res["pairs"]:
        i, j = pair["index"]
        by_type = slice_by_type(pair["cka"], pair["layers_a"], pair["layers_b"])
        pair["by_type"] = {t: dict(diagonal=matched_diagonal(v["cka"]), diagonal_mean=v["diagonal_mean"])
                           for t, v in by_type.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            unbiased = res["estimator"] != "biased"
            pair["layernorm_mean_tokens"] = dict(
                estimator="debiased" if unbiased else "biased",
                with_affine=diagonal_mean(cka_matrix(feats[i], feats[j], debiased=unbiased)),
                without_affine=diagonal_mean(cka_matrix(raw[i], raw[j], debiased=unbiased)))
        figures[f"gap-{i}-{j}.png"] = ("heatmaps", [dict(a=pair["a"], b=f"{pair['b']} [{t}]", layers_a=v["layers_a"],
                                                         layers_b=v["layers_b"], cka=v["cka"])
                                                    for t, v in by_type.items()])
        readings.append(_read_gap(pair, opts.ci))
    return res, figures, readings


def _ci(value: float, ci) -> str:
    """0.87 [0.84, 0.90]"""
    return f"{value:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def _read_gap(pair, level: float) -> str:
    """Where the pair's gap opens, each claim a paired test with its correction for what was searched."""
    nan2 = [float("nan")] * 2
    txt = f"{pair['a']} vs {pair['b']}: matched-layer mean CKA " \
          f"{_ci(pair['diagonal_mean'], pair.get('diagonal_mean_ci', nan2))}"
    if "cka_high" not in pair:
        return txt + " (no intervals: nothing is called a difference)."
    if "lowest_block" in pair:
        b = pair["lowest_block"]
        fall = b["block"] > 0 and b["diff"] > 0 and b["p"] < 1 - level
        txt += ("; the residual streams agree least at block 0 (no fall from the first block)" if b["block"] == 0 else
                f"; the residual streams agree least at block {b['block']} ({b['lowest']:.2f}, against "
                f"{b['first']:.2f} at block 0: " + ("a fall" if fall else "no fall shown")
                + f" of {b['diff']:+.3f} [{b['low']:+.3f}, {b['high']:+.3f}], p = {b['p']:.2g}, paired, Bonferroni "
                  f"over the {b['searched']} later block{'s' * (b['searched'] > 1)} searched)")
    if "least_agreeing_type" in pair:
        w = pair["least_agreeing_type"]
        parts = ", ".join(f"{t} {_ci(v[0], v[1:])}" for t, v in pair["by_type_first_quarter"].items()
                          if t != "residual")
        txt += (f"; in the first quarter of the blocks ({parts}) the {w['type']} outputs agree least "
                f"(p = {w['p']:.2g}: paired against every other type, {w['correction']})"
                if w["p"] < 1 - level else
                f"; in the first quarter of the blocks ({parts}) no sub-layer type agrees least at the "
                f"{1 - level:.0%} level (the lowest, {w['type']}: p = {w['p']:.2g}, {w['correction']})")
    return txt + "."


def info_analysis(models, images, opts: AnalysisOptions) -> tuple[dict, dict, list[str]]:
    """Information distribution: per-block linear probes and k-NN, the published representation, marginal-feature
    probes, MLP probes of depth 1-4 on the last block, top-k PCs vs random directions, spectrum statistics per
    block. Accuracies carry Wilson 95% intervals; n_val and chance are stated."""
    if images.labels is None:
        raise UsageError("info needs labelled data (class sub-folders, labels in the tensor file, or synthetic)")
    train, val = split_train_val(images, 0.25, opts.seed)
    out, readings, curves, bands = {}, [], {}, {}
    run = dict(cache_dir=opts.cache_dir, batch_size=opts.batch_size, device=opts.device, dtype=opts.dtype)
    t0 = time.monotonic()
    for i, m in enumerate(models):
        with step(f"info: model {i + 1}/{len(models)} ({_label(m)})" + (
                f", about {(time.monotonic() - t0) / i * (len(models) - i):.0f} s to go at the pace so far" if i else "")):
            out[_spec(m)] = _info_of(m, train, val, opts, run)
        last = list(out[_spec(m)]["knn"])[-1]
        lin, knn = out[_spec(m)]["linear"], out[_spec(m)]["knn"]
        blocks = {k: v for k, v in lin.items() if k != "official"}
        curves[f"{_label(m)} linear"], bands[f"{_label(m)} linear"] = top1(blocks), _ci_band(blocks)
        curves[f"{_label(m)} k-NN"], bands[f"{_label(m)} k-NN"] = top1(knn), _ci_band(knn)
        readings += _read_info(_spec(m), out[_spec(m)], last)
    n_val = len(val.readable_labels())
    return out, {"info.png": ("curves", curve_figure(
        curves, f"Linear probe and k-NN top-1 per block ({n_val} validation images, Wilson 95% bands)",
        "top-1 accuracy (fraction of validation images)", bands, (0.0, 1.0)))}, readings


def _info_of(m, train: ImageSet, val: ImageSet, opts: AnalysisOptions, run: dict) -> dict:
    """One model's information-distribution results (info_analysis), each stage a labelled step."""
    tok = _probe_tokens(m, None)
    ftr, fva = (cached_extract(m, s, "blocks", tok, **run) for s in (train, val))
    otr, ova = (cached_extract(m, s, None, "official", **run)["official"] for s in (train, val))
    last = list(ftr)[-1]
    ytr, yva = train.readable_labels(), val.readable_labels()   # unreadable images have no feature rows
    with step(f"  linear probes and k-NN of {len(ftr)} blocks ({len(ytr)} train, {len(yva)} validation images)"):
        lin = linear_probe({**ftr, "official": otr}, ytr, {**fva, "official": ova}, yva, seed=opts.seed)
        k = min(20, len(ytr))
        knn = knn_accuracy(ftr, ytr, fva, yva, k=k)
        pairs = [{k: v for k, v in concat_features(f, last).items() if k != last} for f in (ftr, fva)]
        marg = {last: lin[last], **linear_probe(pairs[0], ytr, pairs[1], yva, seed=opts.seed)}   # last: the probe's
    with step(f"  MLP probes of depth 1-4 on {last} ({opts.epochs} epochs each)"):
        mlp = {f"depth{d}": mlp_probe({last: ftr[last]}, ytr, {last: fva[last]}, yva, depth=d,
                                      epochs=opts.epochs, seed=opts.seed)[last] for d in (1, 2, 3, 4)}
    with step(f"  principal-component probes on {last}"):
        pcs = pca_probe({last: ftr[last]}, ytr, {last: fva[last]}, yva, seed=opts.seed)[last]
    return dict(linear=lin, knn=knn, knn_k=k, marginal=marg, mlp=mlp, pca=pcs, spectrum=spectrum_stats(ftr), tokens=tok,
                official=eval_representation(m), n_train=len(ytr), n_val=len(yva), chance=chance_level(yva))


def _paired_accuracy(a: dict, b: dict, searched: int = 1, level: float = 0.95) -> tuple[bool, str]:
    """Whether accuracy a differs from b on the same validation images (McNemar, × searched when a was picked among
    that many after looking: Bonferroni), and the clause that says so."""
    if "correct" not in a or "correct" not in b:
        return False, "no paired test (per-image results not kept)"
    t = mcnemar(a["correct"], b["correct"])
    p = min(1.0, t["p"] * searched)
    how = f"McNemar p = {p:.2g}" + (f", Bonferroni over the {searched} searched" if searched > 1 else "")
    return p < 1 - level, f"{a['top1'] - b['top1']:+.3f} ({how})"


def _read_info(spec: str, r: dict, last: str) -> list[str]:
    lin, knn, n = r["linear"], r["knn"], r["n_val"]
    blocks = {k: v for k, v in lin.items() if k != "official"}
    best = max(blocks, key=lambda k: blocks[k]["top1"])
    acc = {k: _ci(v["top1"], v["top1_ci"]) for k, v in lin.items()}
    head = f"{spec} (n_val {n}, chance {r['chance']:.2f}; {r['tokens']} tokens): "
    clear, said = _paired_accuracy(lin[best], lin[last], len(blocks) - 1)
    lines = [head + (f"linear accuracy peaks at {best} ({acc[best]}), above the last block ({acc[last]}): {said}"
                     if best != last and clear else
                     f"no difference shown between the best block ({best}, {acc[best]}) and the last ({acc[last]})"
                     + (f": {said}" if best != last else ""))
             + f"; the published representation ({r['official']}) reaches {acc['official']}."]
    kbest = max(knn, key=lambda k: knn[k]["top1"])
    lines.append(f"{spec}: k-NN (k = {r['knn_k']}) {_ci(knn[last]['top1'], knn[last]['top1_ci'])} at the last "
                 f"block, best {kbest} {_ci(knn[kbest]['top1'], knn[kbest]['top1_ci'])}.")
    marg, full = r["marginal"]["all"], r["marginal"][last]
    clear, said = _paired_accuracy(marg, full)
    lines.append(f"{spec}: all blocks concatenated with the last {_ci(marg['top1'], marg['top1_ci'])} vs the last "
                 f"alone {_ci(full['top1'], full['top1_ci'])}: " + ("a change" if clear else "no difference shown")
                 + f", {said}.")
    deep = max((d for d in r["mlp"] if d != "depth1"), key=lambda d: r["mlp"][d]["top1"])
    clear, said = _paired_accuracy(r["mlp"][deep], r["mlp"]["depth1"], len(r["mlp"]) - 1)
    lines.append(f"{spec}: the best deeper MLP probe ({deep}) {_ci(r['mlp'][deep]['top1'], r['mlp'][deep]['top1_ci'])}"
                 f" vs linear {_ci(r['mlp']['depth1']['top1'], r['mlp']['depth1']['top1_ci'])}: "
                 + ("a difference" if clear else "no difference shown") + f", {said}.")
    ks = sorted(set(r["pca"]["pc"]) & set(r["pca"]["random"]))
    if ks:
        k = max(x for x in ks if x <= 16) if min(ks) <= 16 else ks[0]
        pc, rnd = r["pca"]["pc"][k], r["pca"]["random"][k]
        pci, rci = wilson_interval(round(pc * n), n), wilson_interval(round(rnd * n), n)
        right = r["pca"].get("correct", {})
        clear, said = _paired_accuracy(dict(top1=pc, **({"correct": right[f"pc{k}"]} if right else {})),
                                       dict(top1=rnd, **({"correct": right[f"random{k}"]} if right else {})))
        lines.append(f"{spec}: the top {k} principal components of the last block {_ci(pc, pci)} vs {k} random "
                     f"directions {_ci(rnd, rci)}: " + ("class information sits in the dominant directions"
                                                         if pc > rnd and clear else "no difference shown")
                     + f", {said}.")
    s = r["spectrum"][last]
    lines.append(f"{spec}: last-block effective rank {s['effective_rank']:.1f}, participation ratio "
                 f"{s['participation_ratio']:.1f}, top-PC variance share {s['top_pc_share']:.2f} (sample statistics of "
                 f"the {r['n_train']} training images).")
    return lines


def invariance_analysis(models, images, opts: AnalysisOptions) -> tuple[dict, dict, list[str]]:
    """Per-layer invariance to flip, crop, colour, grayscale and blur, against a shuffled-pair baseline."""
    out, curves, readings, bands = {}, {}, [], {}
    every = invariance_many(models, images, batch_size=opts.batch_size, seed=opts.seed, device=opts.device,
                            dtype=opts.dtype)
    for m, inv in zip(models, every, strict=True):
        out[_spec(m)] = inv
        for kind, per in inv.items():
            curves[f"{_label(m)} {kind}"] = {k: v["centred_normalised"] for k, v in per.items()}
            bands[f"{_label(m)} {kind}"] = _ci_band(per, "centred_normalised_ci")
        last = {kind: list(per.values())[-1] for kind, per in inv.items()}
        flip = last.get("hflip")
        raw = (f" The paper's measure, the raw cosine of the {_probe_tokens(m, None)} features to the flipped image's, "
               f"reads {flip['raw']:.4f} (unrelated images: {flip['raw_shuffled']:.4f}): raw cosines share the "
               "features' mean and sit near 1 for every model, so this report reads the centred, baseline-normalised "
               "score.") if flip else ""
        readings.append(f"{_spec(m)} at its last block (centred, baseline-normalised; 1 = invariant, 0 = like an "
                        f"unrelated image; n = {len(images)}): "
                        + ", ".join(f"{k} {_ci(v['centred_normalised'], v['centred_normalised_ci'])}"
                                    for k, v in last.items()) + "." + raw)
    return out, {"invariance.png": ("curves", curve_figure(
        curves, f"Invariance per block to each augmentation ({len(images)} images, 95% bands over images)",
        "invariance (centred, baseline-normalised: 1 = invariant, 0 = like an unrelated image)", bands))}, readings


def attention_analysis(models, images, opts: AnalysisOptions) -> tuple[dict, dict, list[str]]:
    """Mean attention distance, entropy and NMI per head and block, on patch-to-patch attention (Park et al.)."""
    models, readings = _vits(models, "attention")
    out, curves, bands = {}, {}, {}
    for m in models:
        st = attention_statistics(m, images, batch_size=opts.batch_size, mask_ratio=opts.mae_mask_ratio,
                                  seed=opts.seed, device=opts.device, max_images=opts.attention_images)
        out[_spec(m)] = st
        dist = {f"blocks.{i}": float(v) for i, v in enumerate(st["distance"].mean(1))}
        curves[_label(m)] = dist
        bands[_label(m)] = tuple({k: v + sign * 1.96 * float(se) for (k, v), se in zip(dist.items(), st["distance_se"],
                                                                                        strict=True)}
                                 for sign in (-1, 1))
        d, nmi = st["distance"].mean(1), st["nmi"].mean(1)
        ci = {k: [normal_interval(float(st[k].mean(1)[i]), float(st[f"{k}_se"][i])) for i in (0, -1)]
              for k in ("distance", "nmi")}
        readings.append(f"{_spec(m)}: mean attention distance {_ci(float(d[0]), ci['distance'][0])} px in block 0, "
                        f"{_ci(float(d[-1]), ci['distance'][1])} px in the last block; NMI in the last block "
                        f"{float(nmi[-1]):.3f} [{ci['nmi'][1][0]:.3f}, {ci['nmi'][1][1]:.3f}] (high = query-specific "
                        "attention, low = all queries attend alike; patch-to-patch attention, mean over heads).")
    return out, {"attention.png": ("curves", curve_figure(
        curves, "Mean attention distance per block (patch-to-patch attention, mean over heads; 95% bands)",
        "mean attention distance (pixels)", bands))}, readings


def spatial_analysis(models, images, opts: AnalysisOptions) -> tuple[dict, dict, list[str]]:
    """Per-patch probes of grid position and object class on frozen patch tokens (object class only where the data
    has per-pixel masks: the built-in synthetic set; said otherwise)."""
    out, curves, readings, bands = {}, {}, [], {}
    if images.masks is None:
        log.warning("notice: spatial: no per-pixel object masks in this data (only the synthetic set has them): the "
                    "object-class probe is left out, the position probe runs")
        readings.append("No object-class probe: the data has no per-pixel masks (only the built-in synthetic set "
                        "does); the patch-position probe alone was run.")
    t0, memo = time.monotonic(), {}
    for i, m in enumerate(models):
        with step(f"spatial: model {i + 1}/{len(models)} ({_label(m)}), position" + (" and object" if images.masks
                  is not None else "") + " probes on every block's patches" + (
                  f", about {(time.monotonic() - t0) / i * (len(models) - i):.0f} s to go at the pace so far" if i else "")):
            sp = spatial_probes(m, images, batch_size=opts.batch_size, seed=opts.seed, device=opts.device,
                                dtype=opts.dtype, labels_memo=memo)
        out[_spec(m)] = sp
        for t, per in sp.items():
            curves[f"{_label(m)} {t}"], bands[f"{_label(m)} {t}"] = top1(per), _ci_band(per)
        final = {t: per[[k for k in per if "+" not in k][-1]] for t, per in sp.items()}   # the last block alone
        readings.append(f"{_spec(m)}: at its last block, patch-position probe "
                        f"{_ci(final['position']['top1'], final['position']['top1_ci'])}"
                        + (f", per-patch object probe {_ci(final['mask']['top1'], final['mask']['top1_ci'])}"
                           if "mask" in final else "") + f" ({final['position']['interval']}).")
    return out, {"spatial.png": ("curves", curve_figure(
        curves, "Per-patch probes per block (position; object class where masks exist), bands over test images",
        "top-1 accuracy per patch (fraction)", bands, (0.0, 1.0)))}, readings


def _pretrained_and_fine_tuned(a: ViT, b: ViT) -> bool:
    """Whether one of the two is a fine-tuned version of the other's kind: the same objective, once with +FT (a
    released fine-tuned file such as MAE's, or one finetune() wrote)."""
    oa, ob = (objective(m.family, m.source.get("fine_tuned", False)) for m in (a, b))
    return oa != ob and oa.removesuffix("+FT") == ob.removesuffix("+FT") and "?" not in oa + ob


def weights_analysis(models, images, opts: AnalysisOptions) -> tuple[dict, dict, list[str]]:
    """Per-module weight distance between every pair of models of the same architecture (e.g. PT vs FT). Exact: no
    sampling, so no interval. Models of different architectures cannot be compared."""
    out, readings = {}, []
    for i, a in enumerate(models):
        for b in models[i + 1:]:
            sa, sb = a.state_dict(), b.state_dict()
            blocks = lambda s: {k: tuple(v.shape) for k, v in s.items() if k.startswith(("blocks.", "layer", "stages."))}
            if type(a) is not type(b) or not blocks(sa) or blocks(sa) != blocks(sb):   # one architecture, both ways
                continue
            wd = weight_distance(a, b)
            out[f"{_spec(a)} vs {_spec(b)}"] = wd
            qkv = {k: v for k, v in wd.items() if k.endswith("attn.qkv")}
            top = max(qkv, key=qkv.get) if qkv else None
            fine_tuned = _pretrained_and_fine_tuned(a, b)
            readings.append(f"{_spec(a)} → {_spec(b)}: total weight distance {wd['total']:.3g}"
                            + (f"; the qkv projection that {'moved' if fine_tuned else 'differs'} most is {top} "
                               f"({qkv[top]:.3g})" if top else "")
                            + ("." if fine_tuned else " (caveat: not a pretrained → fine-tuned pair, so this measures "
                                                      "two independent trainings, not what fine-tuning moved)."))
    if not out:
        raise UsageError("weights compares models of one architecture: no two of these share their blocks' shapes")
    return out, {}, readings


def agreement_analysis(models, images, opts: AnalysisOptions) -> tuple[dict, dict, list[str]]:
    """Prediction agreement between every two models whose heads classify the data's labels (fine-tuned or
    linear-probed checkpoints): joint correctness table, Hamming distance, Cohen's κ, McNemar's test, and the author
    code's Kendall τ of the top-5 / top-10 class rankings."""
    classes = (len(images.classes) or int(images.labels.max()) + 1) if images.labels is not None else 0
    heads = [m for m in models if m.head is not None and m.head.out_features == classes]
    for m in models:   # a 1000-class head scored on 8 classes is not an agreement between classifiers of these labels
        if m.head is not None and m not in heads:
            log.warning(f"notice: agreement leaves out {_spec(m)}: its head has {m.head.out_features} classes, the "
                        f"data {classes}")
    if len(heads) < 2:
        raise UsageError("agreement needs two models with classification heads for these labels (fine-tune them, "
                         "or load fine-tuned checkpoints with their heads)")
    preds = {_spec(m): predictions(m, images, opts.batch_size, opts.device, opts.dtype) for m in heads}
    out, readings = {}, []
    names = list(preds)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            (la, y), (lb, _) = preds[a], preds[b]
            r = prediction_agreement(la.argmax(1) == y, lb.argmax(1) == y)
            r.update(_kendall_summary(la, lb, y))
            out[f"{a} vs {b}"] = r
            n = sum(map(sum, r["table"]))
            kappa = f"Cohen's κ {r['kappa']:.2f}" if math.isfinite(r["kappa"]) else \
                "Cohen's κ undefined (each head is always right, or always wrong)"
            tau = "; ".join(f"Kendall τ of the top-{k} rankings {r[f'kendall_top{k}']['all']:.3f} (n = "
                            f"{r[f'kendall_top{k}_n']['all']}; both right {r[f'kendall_top{k}']['both_correct']:.3f}, "
                            f"n = {r[f'kendall_top{k}_n']['both_correct']}; both wrong "
                            f"{r[f'kendall_top{k}']['both_incorrect']:.3f}, n = "
                            f"{r[f'kendall_top{k}_n']['both_incorrect']})" for k in (5, 10) if f"kendall_top{k}" in r)
            readings.append(f"{a} ({_ci(r['acc_a'], wilson_interval(round(r['acc_a'] * n), n))}) vs {b} "
                            f"({_ci(r['acc_b'], wilson_interval(round(r['acc_b'] * n), n))}) on {n} images: Hamming "
                            f"distance of correctness {r['hamming']:.3f}, {kappa}" + (f"; {tau}" if tau else "")
                            + ", McNemar p = " + f"{mcnemar(la.argmax(1) == y, lb.argmax(1) == y)['p']:.2g}.")
    return out, {}, readings


def _kendall_summary(la, lb, y) -> dict:
    """The author code's rank agreement of two heads (Kendall τ of top-5 and top-10 rankings, topk_kendall), averaged
    over all images, those both get right and those both get wrong (over each subset's own size, not all images)."""
    ra, rb = la.argmax(1) == y, lb.argmax(1) == y
    out = {}
    for k in (5, 10):
        if la.shape[1] < k:
            continue
        tau = topk_kendall(la, lb, k)
        subsets = (("all", torch.ones_like(ra)), ("both_correct", ra & rb), ("both_incorrect", ~ra & ~rb))
        out[f"kendall_top{k}"] = {name: float(tau[keep].nanmean()) if keep.any() else float("nan")
                                  for name, keep in subsets}
        out[f"kendall_top{k}_n"] = {name: int((keep & ~tau.isnan()).sum()) for name, keep in subsets}  # images read
    return out


def overview_analysis(models, images, opts: AnalysisOptions) -> tuple[dict, dict, list[str]]:
    """CKA between the models' block outputs: every pair's map and the model×model matrix at the last block, with
    intervals; with reconstruction and joint-embedding models both present, the paper's headline: mean CKA within
    each objective and across them."""
    res = compare_models(models, images, points="blocks", tokens=opts.tokens, estimator=opts.estimator,
                         batch_size=opts.batch_size, device=opts.device, dtype=opts.dtype, cache_dir=opts.cache_dir,
                         progress=opts.progress, ci=opts.ci, ci_resamples=opts.ci_resamples, seed=opts.seed,
                         measures=opts.measures or None, permutations=opts.permutations, null=opts.null)
    mm = res["model_matrix"]
    readings = [f"Estimator {res['estimator']} (n = {res['n']} images"
                + (f" in batches of {res['batch_size']}" if res["batch_size"] else "") + f"), {opts.tokens} tokens"
                + (f"; [{res['ci']:.0%} interval: {res['interval']}]." if res["ci"] else
                   f"; no intervals ({_opt('ci')} 0).")]
    for p in res["pairs"]:
        ci = p.get("diagonal_mean_ci", [float("nan")] * 2)
        readings.append(f"{p['a']} vs {p['b']}: matched-block mean CKA {_ci(p['diagonal_mean'], ci)}.")
    readings += _objective_headline(models, mm, opts.ci or 0.95)
    mm["architectures"] = _architecture_of(models)
    res["across_architectures"] = across_architectures(models, mm, opts.ci or 0.95)
    readings += _across_readings(res["across_architectures"], mm)
    res["pt_ft"] = pt_ft_tests(models, mm, opts.ci or 0.95)
    readings += _pt_ft_readings(res["pt_ft"], opts.ci or 0.95)
    readings += _measure_robustness(models, mm, opts.ci)
    figures = {"overview.png": ("heatmaps", res["pairs"])}
    if len(models) > 2:
        figures["model-matrix.png"] = ("heatmaps", [dict(a="models", b="models", layers_a=mm["models"],
                                                         layers_b=mm["models"], cka=mm["cka"])])
    return res, figures, readings


OBJECTIVE_ORDER = ("REC", "JE", "HYB", "LANG", "SUP")   # how reports name objective pairs ("across REC and JE")


def _objective_pairs(models) -> tuple[list, list]:
    """The model pairs within REC or within JE, and those across REC and JE (fine-tuned models apart)."""
    kind = _objective_of(models)
    pairs = [(i, j) for i in range(len(models)) for j in range(i + 1, len(models))]
    return ([(i, j) for i, j in pairs if kind[i] == kind[j] and kind[i] in ("REC", "JE")],
            [(i, j) for i, j in pairs if {kind[i], kind[j]} == {"REC", "JE"}])


def _cka_replicates(mm: dict) -> dict | None:
    """A model matrix's CKA with its jackknife replicates, as paired_contrast reads a measure's entry; None when the
    estimator keeps none (minibatch)."""
    return dict(matrix=mm["cka"], jackknife=mm["jackknife"]) if "jackknife" in mm else None


def paired_contrast(e: dict, within, across, level: float) -> dict:
    """Mean similarity over the `within` pairs, over the `across` pairs, and their difference with its `level`
    interval and two-sided p (t with G − 1 degrees of freedom) from the delete-a-group jackknife replicates of the
    model matrix `e` (the same images left out for every pair: the difference's replicates are paired)."""
    avg = lambda ps, v: torch.stack([v[i, j] for i, j in ps]).mean(0)   # over pairs, per replicate
    w, a = float(avg(within, e["matrix"])), float(avg(across, e["matrix"]))
    if "jackknife" not in e:
        return dict(within=w, across=a, diff=w - a, low=float("nan"), high=float("nan"), p=float("nan"), dof=None)
    spread = Spread("jackknife", avg(within, e["jackknife"]) - avg(across, e["jackknife"]),
                    units=e["jackknife"].shape[-1], range=(-math.inf, math.inf))
    return dict(paired_test(spread, w - a, level), within=w, across=a, dof=spread.dof)


def _objective_groups(models, mm) -> str:
    """Mean model-matrix CKA within each objective and across each pair of objectives (fine-tuned models apart), in
    OBJECTIVE_ORDER, each with the mean of its pairs' interval half-widths (descriptive: no claim rests on them)."""
    kind = _objective_of(models)
    rank = {k: (OBJECTIVE_ORDER.index(k) if k in OBJECTIVE_ORDER else len(OBJECTIVE_ORDER), k) for k in kind}
    groups: dict[str, list] = {}
    for i in range(len(models)):
        for j in range(i + 1, len(models)):
            a, b = sorted((kind[i], kind[j]), key=rank.get)
            half = float(mm["cka"][i, j] - mm["cka_low"][i, j]) if "cka_low" in mm else float("nan")
            groups.setdefault(f"within {a}" if a == b else f"across {a} and {b}", []).append(
                (float(mm["cka"][i, j]), half))
    if len(set(kind)) < 2:
        return ""
    return "; ".join(f"{k} ({len(g)} pair{'s' * (len(g) > 1)}) " + _ci(m, [m - h, m + h])
                     for k, g in groups.items() for m, h in [np.mean(g, axis=0)])


def _objective_headline(models, mm, level: float) -> list[str]:
    """Each objective group's mean CKA (_objective_groups), then the paper's headline as a paired test: mean
    model-matrix CKA within REC or JE minus across REC and JE, its interval and p from the jackknife over images
    (paired_contrast); never a comparison of two intervals."""
    groups = _objective_groups(models, mm)
    head = [f"Objectives (model × model CKA at the last block): {groups}."] if groups else []
    within, across = _objective_pairs(models)
    e = _cka_replicates(mm)
    if not within or not across:
        return head
    if e is None:
        return [*head, ("REC vs JE: no paired test (no jackknife replicates: the minibatch estimator keeps none, "
                        "nor a map whose Grams exceed the memory budget), so no claim is made.")]
    c = paired_contrast(e, within, across, level)
    said = (f"within REC or JE {c['within']:.3f} ({len(within)} pair{'s' * (len(within) > 1)}), across REC and JE "
            f"{c['across']:.3f} ({len(across)} pair{'s' * (len(across) > 1)}): within − across {c['diff']:+.3f}")
    if not math.isfinite(c["p"]):
        return [*head, (f"REC vs JE (debiased CKA at the last block): {said}; too few images for a paired test, so "
                        "no claim is made.")]
    test = (f"[{c['low']:+.3f}, {c['high']:+.3f}], p = {c['p']:.2g} (paired over images: delete-a-group jackknife, "
            f"t with {c['dof']} degrees of freedom)")
    verdict = ("Reconstruction and joint-embedding models are less similar to each other than to their own kind."
               if c["diff"] > 0 and c["p"] < 1 - level else
               "No evidence that reconstruction and joint-embedding models differ more from each other than from "
               f"their own kind at the {1 - level:.0%} level.")
    return [*head, f"REC vs JE (debiased CKA at the last block): {said} {test}. {verdict}"]


def pt_ft_tests(models, mm, level: float) -> list[dict]:
    """The seed paper's PT → FT claim as paired tests: for each pretrained model and its fine-tuned version (same
    objective, once +FT) and every joint-embedding model c, CKA(FT, c) − CKA(PT, c) on the same images, its interval
    and p from the difference's jackknife replicates; p adjusted by Holm over the comparisons made (`p_holm`)."""
    e, kind = _cka_replicates(mm), _objective_of(models)
    if e is None or "jackknife" not in e:
        return []
    tests = []
    for pt, ft in itertools.permutations(range(len(models)), 2):
        if kind[ft] != kind[pt] + "+FT":
            continue
        for c in (c for c in range(len(models)) if kind[c] == "JE" and c not in (pt, ft)):
            spread = Spread("jackknife", e["jackknife"][ft, c] - e["jackknife"][pt, c], units=e["jackknife"].shape[-1],
                            range=(-1.0, 1.0))
            t = paired_test(spread, float(e["matrix"][ft, c] - e["matrix"][pt, c]), level)
            tests.append(dict(t, pt=_spec(models[pt]), ft=_spec(models[ft]), c=_spec(models[c])))
    running = 0.0
    for rank, t in enumerate(sorted(tests, key=lambda x: 2.0 if math.isnan(x["p"]) else x["p"])):
        running = t["p_holm"] = t["p"] if math.isnan(t["p"]) else max(running, min(1.0, (len(tests) - rank) * t["p"]))
    return tests


def _pt_ft_readings(tests: list[dict], level: float) -> list[str]:
    m = len(tests)
    out = []
    for t in sorted(tests, key=lambda x: 2.0 if math.isnan(x["p_holm"]) else x["p_holm"]):
        moved = "closer to" if t["diff"] > 0 else "further from"
        verdict = f"the fine-tuned model lies {moved}" if t["p_holm"] < 1 - level else "no move shown towards or away from"
        out.append(f"PT → FT: CKA({t['ft']}, {t['c']}) − CKA({t['pt']}, {t['c']}) = {t['diff']:+.3f} [{t['low']:+.3f}, "
                   f"{t['high']:+.3f}] (unadjusted), p = {t['p_holm']:.2g} (paired over images, Holm over {m} "
                   f"comparison{'s' * (m > 1)}): {verdict} {t['c']}.")
    return out


def _objective_of(models) -> list[str]:
    return [objective(m.family, m.source.get("fine_tuned", False)) for m in models]


def _architecture_of(models) -> list[str]:
    return [m.cfg.arch if isinstance(m, ConvNet) else "vit" for m in models]


def across_architectures(models, mm, level: float) -> dict | None:
    """"Similar objectives learn similar features even across architectures" as one paired test on the model
    matrix: mean CKA of the pairs with one objective (REC or JE) in different architectures minus that of the REC–JE
    pairs within one architecture, with its interval and p from the jackknife over images (paired_contrast); None
    where the models hold no pair of either kind."""
    within, across = _objective_pairs(models)
    arch = _architecture_of(models)
    same_objective = [(i, j) for i, j in within if arch[i] != arch[j]]
    same_architecture = [(i, j) for i, j in across if arch[i] == arch[j]]
    if not same_objective or not same_architecture:
        return None
    c = paired_contrast(_cka_replicates(mm) or dict(matrix=mm["cka"]), same_objective, same_architecture, level)
    return dict(c, same_objective=same_objective, same_architecture=same_architecture)


def _across_readings(t: dict | None, mm) -> list[str]:
    """The across-architectures section: every pair it compares with its CKA, then the paired test."""
    if t is None:
        return []
    specs, arch = mm["models"], mm["architectures"]
    rows = [f"| {specs[i]} × {specs[j]} | {what} | {arch[i]} × {arch[j]} | "
            + (_ci(float(mm["cka"][i, j]), [float(mm["cka_low"][i, j]), float(mm["cka_high"][i, j])])
               if "cka_low" in mm else f"{float(mm['cka'][i, j]):.3f}") + " |"
            for key, what in (("same_objective", "one objective, two architectures"),
                              ("same_architecture", "REC vs JE, one architecture")) for i, j in t[key]]
    test = (f"one objective across architectures {t['within']:.3f} − REC vs JE within an architecture "
            f"{t['across']:.3f} = {t['diff']:+.3f}")
    test += (f" [{t['low']:+.3f}, {t['high']:+.3f}], paired jackknife over images p = {t['p']:.3g}"
             if math.isfinite(t["p"]) else " (no paired test: no jackknife replicates)")
    return ["### Across architectures\n\nModel × model CKA at each model's last block.\n\n| pair | compares | "
            "architectures | CKA |\n|---|---|---|---|\n" + "\n".join(rows) + f"\n\n{test}."]


def _measure_robustness(models, mm, level: float) -> list[str]:
    """Does the headline survive the measure? Per measure, the mean model-matrix similarity within REC or JE and
    across them, and the paired difference (mean within − mean across) with its interval and p (paired_contrast)."""
    within, across = _objective_pairs(models)
    if not mm.get("measures") or not within or not across:
        return []
    rows, support = [], 0
    for name, e in mm["measures"].items():
        c = paired_contrast(e, within, across, level)
        if not math.isfinite(c["p"]):
            rows.append(f"| {name} | {c['within']:.3f} | {c['across']:.3f} | {c['diff']:+.3f} (no interval: too few "
                        "images) | – |")
            continue
        support += c["diff"] > 0 and c["p"] < 1 - level
        rows.append(f"| {name} | {c['within']:.3f} | {c['across']:.3f} | {c['diff']:+.3f} [{c['low']:+.3f}, "
                    f"{c['high']:+.3f}] | {c['p']:.3g} |")
    head = ("Does it survive the measure?\n\n| measure | within REC or JE | across REC–JE | within − across "
            f"[{level:.0%} jackknife interval] | p (paired, t) |\n|---|---|---|---|---|")
    tail = (f"{support} of {len(mm['measures'])} measures find models of one objective more alike than models across "
            f"REC and JE (p < {1 - level:.2g}, paired over images; {len(within)} within and {len(across)} across pairs "
            "at the last block).")
    return ["\n".join([head, *rows, "", tail])]


@dataclass(frozen=True)
class Analysis:
    """One analysis of the battery: its function, report title, one-line help, the AnalysisOptions it reads,
    and how many models it needs."""
    fn: Callable
    title: str
    help: str
    options: tuple[str, ...] = ("batch_size", "device", "dtype", "seed")
    min_models: int = 1
    needs_heads: bool = False
    command: bool = True          # also a subcommand of its own (the overview is report-only: `cka` does it)
    cost: float = 0.1             # seconds in one thread on the bench's stand-ins: forked processes start the heaviest first


ANALYSES: dict[str, Analysis] = {
    "overview": Analysis(overview_analysis, "CKA between the models",
                         "CKA maps of every pair at the block outputs and the model × model matrix, by objective",
                         ("tokens", "estimator", "ci", "ci_resamples", "measures", "permutations", "null", "batch_size",
                          "device", "dtype", "cache_dir", "seed"), min_models=2, command=False, cost=2),
    "gap": Analysis(gap_analysis, "Where the gap opens (CKA by sub-layer type)",
                    "where two models' representations diverge: CKA by sub-layer type, diagonal, distance",
                    ("tokens", "estimator", "ci", "ci_resamples", "permutations", "null", "batch_size", "device", "dtype",
                     "cache_dir", "seed"), min_models=2, cost=6),
    "info": Analysis(info_analysis, "Information distribution",
                     "information distribution: per-block probes, k-NN, marginal features, MLP/PC probes, spectra",
                     ("epochs", "batch_size", "device", "dtype", "seed", "cache_dir"), cost=9),
    "invariance": Analysis(invariance_analysis, "Invariance to augmentations",
                           "per-layer invariance to flip, crop, colour, grayscale, blur", cost=11),
    "attention": Analysis(attention_analysis, "Attention distance and NMI",
                          "mean attention distance, entropy and NMI per head and layer",
                          ("mae_mask_ratio", "attention_images", "batch_size", "device", "seed"), cost=5),
    "spatial": Analysis(spatial_analysis, "Spatial specificity (per-patch probes)",
                        "per-patch probes of position and object class on frozen patch tokens", cost=5),
    "weights": Analysis(weights_analysis, "Weight distance",
                        "per-module weight distance between models of one architecture (e.g. pretrained vs "
                        "fine-tuned)", (), min_models=2),
    "agreement": Analysis(agreement_analysis, "Prediction agreement of classification heads",
                          "prediction agreement of models' classification heads: joint correctness, Hamming "
                          "distance, Cohen's kappa", ("batch_size", "device", "dtype"), min_models=2,
                          needs_heads=True),
}


def _forward_seconds(model, k: int = 4) -> float:
    """Seconds per image of the model's forward pass here, timed on k random images at its input size (in eval
    mode; the mode it had is restored)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            t0 = time.perf_counter()
            model(torch.rand(k, 3, model.input_size, model.input_size))
            return (time.perf_counter() - t0) / k
    finally:
        model.train(was)


def _forward_estimate(models, images, names, opts: AnalysisOptions) -> float:
    """Seconds of forward passes ahead of the analyses: one over the images for every model (the feature session
    serves the rest), plus invariance's augmented passes and attention's images, at each model's timed pace."""
    return sum(_forward_seconds(m) for m in models) * len(images) * _passes(images, names, opts)


def _passes(images, names, opts: AnalysisOptions) -> float:
    """Forward passes over the images ahead, per model (_forward_estimate)."""
    n = len(images)
    return 1 + len(AUGMENTATIONS) * ("invariance" in names) + ("attention" in names) * min(opts.attention_images, n) / n


def _estimate_text(seconds: float, models, images, names, opts: AnalysisOptions) -> str:
    """The line said before the analyses run: the forward passes ahead; the probes' fits come on top."""
    return (f"estimate: about {seconds:.0f} s of forward passes ahead ({_passes(images, names, opts):.1f} passes over "
            f"{len(images)} images for each of {len(models)} models, at the pace of 4 timed images each); the probes' "
            "fits and statistics add to it")


def run_analyses(models, images, names, opts: AnalysisOptions, jobs: int | None = 1) -> list[tuple]:
    """(name, results, figures, readings) of each named analysis, in order. With several names (a report), one that
    cannot run on these models or data is skipped with a reading that says why; alone, that is a UsageError. jobs:
    analyses run at once in forked processes (analysis_jobs; None = auto); the numbers do not depend on it."""
    return [r[:4] for r in _analysed(models, images, names, opts, jobs)]


def analysis_jobs(jobs: int | None, names, opts: AnalysisOptions, forward_seconds: float = 0.0) -> int:
    """How many processes run the analyses: one where fork is not the Linux one, on a GPU (CUDA does not survive a
    fork) or under torchrun; else `jobs` (at most one per analysis), or for None (auto) one per CPU where the forward
    passes ahead are estimated under FORK_BELOW_FORWARD_S (the analyses' own solvers, single-threaded by nature,
    then dominate) and no feature cache is given, one otherwise (forward passes of large models use a process's
    threads better; a warm cache spares them in one process, where jobs > 1 extracts every model's features once
    before forking, whatever the cache holds). A forked process computes with one thread: GNU OpenMP cannot run
    parallel regions in a child forked after the parent ran one."""
    if len(names) < 2 or jobs == 1:
        return 1
    if not sys.platform.startswith("linux") or _dist_active() or as_device(opts.device).type != "cpu":
        if jobs is not None:
            log.warning(f"notice: {_opt('jobs')} {jobs} ignored: analyses run in forked processes on a CPU, on Linux, "
                        "outside torchrun")
        return 1
    if jobs is None:   # with a feature cache, reading it (one process) spares the forward passes
        jobs = USABLE_CPUS if forward_seconds < FORK_BELOW_FORWARD_S and not opts.cache_dir else 1
    return max(1, min(jobs, len(names)))


FORK_BELOW_FORWARD_S = 60.0   # auto --jobs: analyses in parallel processes when the forward passes are this short


def _analysed(models, images, names, opts: AnalysisOptions, jobs: int | None = 1, out: Path | None = None) -> list:
    """run_analyses' work; with `out`, each analysis's figures are drawn there as soon as it is done (their file
    names a fifth element). With jobs > 1 the models' features are extracted here first (the feature session's one
    pass) and the analyses then run in forked processes that read them, the heaviest first."""
    seconds = 0.0
    if len(names) > 1:
        log.info(f"{len(names)} analyses of {len(models)} models on {len(images) if images else 0} images: "
                 f"{', '.join(names)}")
        if images is not None and len(images) and as_device(opts.device).type == "cpu":
            seconds = _forward_estimate(models, images, names, opts)
            log.info(_estimate_text(seconds, models, images, names, opts))
        elif images is not None and len(images):
            log.info(f"no estimate of the forward passes ahead on {as_device(opts.device)}: a first batch there times "
                     "its warm-up")
    auto, jobs = jobs is None, analysis_jobs(jobs, names, opts, seconds if seconds else float("inf"))
    if auto and len(names) > 1:   # what the default chose, and why
        side = "under" if seconds < FORK_BELOW_FORWARD_S else "over"
        log.info(f"{_opt('jobs')} auto: {jobs} process{'es' * (jobs > 1)}, " + (
            f"a {_opt('cache_dir', '--cache')} is given (read in one process)" if opts.cache_dir else
            f"the forward passes ahead estimated at {seconds:.0f} s, {side} {FORK_BELOW_FORWARD_S:.0f} s" if seconds
            else "forked processes run on a CPU, on Linux, outside torchrun"))
    if jobs == 1:
        return [_one_analysis(k, names, models, images, opts, out) for k in range(len(names))]
    if images is not None and len(images):   # an error here (NaN features) is each analysis's to meet and be
        with step(f"extracting each model's features once, for the {jobs} processes that run the analyses"), \
                contextlib.suppress(UsageError):   # skipped for, as in one process
            extract_many(models, images, [None] * len(models), "all", opts.batch_size, opts.device, opts.dtype)
    return _forked_analyses(models, images, names, opts, jobs, out)


def _one_analysis(k: int, names, models, images, opts: AnalysisOptions, out: Path | None) -> tuple:
    name, a = names[k], ANALYSES[names[k]]
    try:
        if len(models) < a.min_models:
            raise UsageError(f"{name} needs at least {a.min_models} models")
        t0 = time.monotonic()
        with step(f"analysis {k + 1}/{len(names)}: {name}"):
            res, figures, readings = a.fn(models, images, opts)
        log.info(f"analysis {k + 1}/{len(names)}: {name} done in {time.monotonic() - t0:.1f} s")
    except UsageError as e:
        if len(names) == 1:
            raise
        res, figures, readings = {}, {}, [f"skipped: {_one_line(e)}"]
    return name, res, figures, readings, _render_figures(figures, out) if out is not None else []


_FORKED: dict = {}   # what run_analyses' forked processes read (inherited at the fork, never pickled)


def _forked_analyses(models, images, names, opts: AnalysisOptions, jobs: int, out: Path | None) -> list:
    """_one_analysis of every name in `jobs` processes forked from this one (each inherits the models, images and
    feature session), the heaviest analyses (ANALYSES' cost) started first, each one's figures then drawn as tasks
    of their own; results in the order of `names`. What the processes write on stderr comes back through a pipe and
    is written here, line by line."""
    import concurrent.futures
    import multiprocessing
    read, write = os.pipe()
    relay = threading.Thread(target=_relay_lines, args=(read,), daemon=True, name="ssl_repsim-relay")
    _FORKED.update(args=(names, models, images, opts))
    for stream in (sys.stdout, sys.stderr):   # a child flushes what it inherited: nothing may be pending
        with contextlib.suppress(Exception):   # None or closed where the caller closed it
            stream.flush()
    if out is not None:   # imported once here, not in every process
        with contextlib.suppress(ImportError):
            import matplotlib.backends.backend_agg
            import matplotlib.figure  # noqa: F401
    pool = concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork"),
                                                  initializer=_forked_start, initargs=(write, read, os.getpid()))
    done = False
    try:
        with _HEARTBEAT_LOCK:   # no heartbeat line half-written as the processes fork (all at the first submit)
            futures = {pool.submit(_forked_analysis, k): k for k in sorted(range(len(names)),
                                                                         key=lambda k: -ANALYSES[names[k]].cost)}
        os.close(write)   # the processes hold the pipe now: it ends when the last exits
        write = None
        relay.start()
        results = _gathered(pool, futures, len(names), out)
        done = True
        return results
    except concurrent.futures.process.BrokenProcessPool:
        raise UsageError("a forked analysis process was killed (out of memory?): rerun with --jobs 1, or with "
                         "fewer images or models") from None
    finally:
        if not done:   # Ctrl-C, SIGTERM, an error or a killed process: the rest are stopped first
            _stop(pool)
        pool.shutdown(wait=True, cancel_futures=True)
        _FORKED.clear()
        if write is not None:
            os.close(write)
        if relay.ident is None:   # never started: the read end is still ours to close
            os.close(read)
        relay.join(timeout=5)


def _stop(pool):
    """Every process of the pool ended: SIGTERM, then SIGKILL to any still alive a second later."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    for p in procs:
        p.terminate()
    for p in procs:
        p.join(timeout=1)
        if p.is_alive():
            p.kill()


def _gathered(pool, futures: dict, count: int, out: Path | None) -> list:
    """Each analysis's result as it completes, its figures then submitted to the pool one file a task (drawn
    after the analyses already queued); every result with the figure files drawn, in the order of the names.
    Results and figure data travel as plain pickles of our own objects (tensors copied: torch's own reduction
    would hold a file descriptor per tensor here)."""
    import concurrent.futures
    results, drawing = [None] * count, {}
    for done in concurrent.futures.as_completed(futures):
        k = futures[done]
        results[k] = pickle.loads(done.result())   # written by our own forked process just now
        if out is not None:
            drawing[k] = [pool.submit(_forked_figure, pickle.dumps({f: kp}), out) for f, kp in results[k][2].items()]
    return [(*r[:4], [f for task in drawing.get(k, []) for f in task.result()]) for k, r in enumerate(results)]


def _relay_lines(fd: int):
    """Copy whole lines from `fd` onto this process's stderr until the pipe ends (then close it); where stderr
    cannot be written (its reader left), keep draining the pipe so that no writer blocks."""
    with os.fdopen(fd, "rb") as pipe:
        for line in pipe:
            with _HEARTBEAT_LOCK, contextlib.suppress(Exception):
                sys.stderr.write(line.decode("utf-8", "replace"))
                sys.stderr.flush()


class _LineStream:
    """A forked process's stderr: text written through in whole lines to the relay's pipe, never a terminal."""

    def __init__(self, fd: int):
        self.fd, self.pending = fd, ""

    def write(self, s: str) -> int:
        self.pending += s
        if "\n" in self.pending:
            done, _, self.pending = self.pending.rpartition("\n")
            self._send(done + "\n")
        return len(s)

    def flush(self):
        if self.pending:
            self._send(self.pending)
            self.pending = ""

    def _send(self, text: str):
        with contextlib.suppress(OSError):   # the parent stopped reading: the line is dropped, the work goes on
            os.write(self.fd, text.encode("utf-8", "replace"))

    def isatty(self) -> bool:
        return False


def _forked_start(write: int, read: int, parent: int):
    """A forked analysis process: one torch thread (see analysis_jobs); stderr through the relay's pipe (whose read
    end is the parent's alone, so a write fails when the parent stops reading); SIGTERM ends it at once and Ctrl-C
    is the parent's to handle; it dies with the parent (prctl PR_SET_PDEATHSIG) and holds none of its locks."""
    import signal
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(Exception):
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:   # the parent died before prctl took effect
        os._exit(1)
    os.close(read)
    for fd in list(_LOCK_FDS):   # the stage folder's flock stays the parent's
        with contextlib.suppress(OSError):
            os.close(fd)
    globals()["_HEARTBEAT_LOCK"] = threading.Lock()   # forked while the parent held it
    torch.set_num_threads(1)
    sys.stderr = _LineStream(write)


def _forked_analysis(k: int) -> bytes:
    names, models, images, opts = _FORKED["args"]
    images.workers = 0   # this process is one of the CPUs' workers already
    return pickle.dumps(_one_analysis(k, names, models, images, opts, None))


def _forked_figure(figure: bytes, out: Path) -> list[str]:
    return _render_figures(pickle.loads(figure), out)   # pickled by the parent of this process


def model_labels(specs, given: str | None = None) -> list[str]:
    """Short, unique names for the models: `given` (a comma list, one per model), else _short of each spec, with
    the parent folder (then a number) added where two would read alike."""
    if given is not None:
        labels = [t.strip() for t in given.split(",")]
        if len(labels) != len(specs) or len(set(labels)) != len(labels) or not all(labels):
            raise UsageError(f"{_opt('labels')} {given!r}: give {len(specs)} distinct non-empty names, one per model")
        return labels
    base = [_short(s) for s in specs]
    labels = [f"{Path(s).parent.name}/{b}" if base.count(b) > 1 and len(Path(s).parts) > 1 else b
              for s, b in zip(specs, base, strict=True)]
    return [lab if labels[:k].count(lab) == 0 else f"{lab}-{labels[:k].count(lab) + 1}" for k, lab in enumerate(labels)]


def _relabel(text: str, names: dict) -> str:
    """text with every model spec replaced by its label, in one pass (a label is never replaced again), and only
    where the spec stands alone (not inside a longer name or a word); the longest specs first."""
    if not names:
        return text
    pattern = "|".join(re.escape(s) for s in sorted(names, key=len, reverse=True))
    return re.sub(rf"(?<![\w./-])(?:{pattern})(?![\w/-])", lambda m: names[m.group(0)], text)


def _verdict_rec_je(res: dict, kind: dict, level: float) -> tuple:
    """(models compared, numbers, test, p, outcome) of 'reconstruction and joint-embedding objectives learn
    different features' from the overview's paired contrast."""
    mm = res.get("model_matrix", {})
    specs = mm.get("models", [])
    e = _cka_replicates(mm)
    ks = [kind.get(s) for s in specs]
    within = [(i, j) for i, j in itertools.combinations(range(len(specs)), 2) if ks[i] == ks[j] in ("REC", "JE")]
    across = [(i, j) for i, j in itertools.combinations(range(len(specs)), 2) if {ks[i], ks[j]} == {"REC", "JE"}]
    if not within or not across or e is None or "jackknife" not in e:
        need = "two models of one objective and one of the other (e.g. mae, beit, dino)" if not within or not across \
            else "the debiased estimator (per-image replicates)"
        return "", "", "", float("nan"), f"not testable: needs {need}"
    c = paired_contrast(e, within, across, level)
    outcome = "supported" if c["diff"] > 0 and c["p"] < 1 - level else "not supported"
    return (f"{len(within)} within, {len(across)} across pairs",
            f"within {c['within']:.3f} − across {c['across']:.3f} = {c['diff']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]",
            f"paired jackknife over images, t{c['dof']}", c["p"], outcome)


def _verdict_across(res: dict, kind: dict, level: float) -> tuple:
    """'Similar objectives learn similar features even across architectures': the overview's paired test
    (across_architectures); supported when one objective across architectures is the more similar at the level."""
    t = res.get("across_architectures")
    if not t:
        return "", "", "", float("nan"), ("not testable: needs one objective in two architectures and REC and JE in "
                                          "one (e.g. mae, dino, dino_r50, convnextv2_base_fcmae)")
    if not math.isfinite(t["p"]):
        return "", "", "", float("nan"), "not testable: needs the debiased estimator (per-image replicates)"
    outcome = "supported" if t["diff"] > 0 and t["p"] < 1 - level else "not supported"
    return (f"{len(t['same_objective'])} same-objective, {len(t['same_architecture'])} same-architecture pairs",
            (f"one objective across architectures {t['within']:.3f} − REC vs JE within one {t['across']:.3f} = "
             f"{t['diff']:+.3f} [{t['low']:+.3f}, {t['high']:+.3f}]"), f"paired jackknife over images, t{t['dof']}",
            t["p"], outcome)


def _verdict_gap(res: dict, kind: dict, level: float) -> tuple:
    """'The gap opens early, in attention and normalisation': for each REC–JE pair, the sub-layer type that agrees
    least in the first quarter (its paired test, Bonferroni over the types); supported when every pair names
    attention or normalisation at the level."""
    pairs = [p for p in res.get("pairs", []) if {kind.get(p["a"]), kind.get(p["b"])} == {"REC", "JE"}
             and "least_agreeing_type" in p]
    if not pairs:
        return "", "", "", float("nan"), "not testable: needs a REC and a JE model with sub-layer points (gap)"
    hits = [p["least_agreeing_type"]["type"] in ("attention", "normalization")
            and p["least_agreeing_type"]["p"] < 1 - level for p in pairs]
    worst = max(p["least_agreeing_type"]["p"] for p in pairs)
    said = "; ".join(f"{p['least_agreeing_type']['type']} (p {p['least_agreeing_type']['p']:.2g})" for p in pairs)
    outcome = "supported" if all(hits) else "not supported" if not any(hits) else f"mixed ({sum(hits)} of {len(pairs)})"
    return f"{len(pairs)} REC–JE pair(s)", f"least agreeing type: {said}", \
        "paired against every other type, Bonferroni over the types", worst, outcome


def _verdict_probes(res: dict, kind: dict, level: float) -> tuple:
    """'Joint-embedding features probe better': each (REC, JE) pair's linear probe on its published representation,
    compared by McNemar on the same validation images, Holm over the pairs; supported when JE is better in every
    pair at the level."""
    rec = [s for s, r in res.items() if kind.get(s) == "REC" and "official" in r.get("linear", {})]
    je = [s for s, r in res.items() if kind.get(s) == "JE" and "official" in r.get("linear", {})]
    if not rec or not je:
        return "", "", "", float("nan"), "not testable: needs a REC and a JE model with probes (info)"
    tests = sorted(((r, j, mcnemar(res[j]["linear"]["official"]["correct"], res[r]["linear"]["official"]["correct"]))
                    for r in rec for j in je), key=lambda x: x[2]["p"])
    running, ok = 0.0, []
    for rank, (_, _, t) in enumerate(tests):
        running = max(running, min(1.0, (len(tests) - rank) * t["p"]))
        ok.append(t["diff"] > 0 and running < 1 - level)
    said = "; ".join(f"{j} − {r} {t['diff']:+.3f}" for r, j, t in tests)
    outcome = "supported" if all(ok) else "not supported" if not any(ok) else f"mixed ({sum(ok)} of {len(ok)})"
    return f"{len(rec)} REC × {len(je)} JE", f"top-1 differences: {said}", "McNemar, Holm over the pairs", \
        running, outcome


def _verdict_pt_ft(res: dict, kind: dict, level: float) -> tuple:
    tests = res.get("pt_ft", [])
    if not tests:
        return "", "", "", float("nan"), "not testable: needs a pretrained model, its fine-tuned version and a JE model"
    ok = [t["diff"] > 0 and t["p_holm"] < 1 - level for t in tests]
    said = "; ".join(f"CKA({t['ft']}, {t['c']}) − CKA({t['pt']}, {t['c']}) {t['diff']:+.3f}" for t in tests)
    outcome = "supported" if all(ok) else "not supported" if not any(ok) else f"mixed ({sum(ok)} of {len(ok)})"
    return f"{len(tests)} comparison(s)", said, "paired jackknife over images, Holm", \
        max(t["p_holm"] for t in tests), outcome


CLAIMS = (   # the seed paper's claims a report can test: (claim, the analysis whose results decide it, its verdict)
    ("reconstruction and joint-embedding objectives learn different features", "overview", _verdict_rec_je),
    ("similar objectives learn similar features across architectures", "overview", _verdict_across),
    ("the gap opens early, in attention and normalisation layers", "gap", _verdict_gap),
    ("joint-embedding features probe better", "info", _verdict_probes),
    ("fine-tuning moves MAE towards joint-embedding models", "overview", _verdict_pt_ft),
)


def verdict_table(results: dict, meta: dict, level: float = 0.95) -> list[str]:
    """report.md's opening table: one row per claim of CLAIMS with the numbers compared, the paired test, its p and a
    one-word outcome (supported / not supported / mixed / not testable, with what is missing)."""
    kind = {m["spec"]: m["objective"] for m in meta["models"]}
    rows = ["| claim | compared | numbers | test | p | outcome |", "|---|---|---|---|---|---|"]
    for claim, name, fn in CLAIMS:
        if name not in results or not results[name].get("results"):
            row = ("", "", "", float("nan"), f"not testable: the {name} analysis did not run")
        else:
            row = fn(results[name]["results"], kind, level)
        p = "–" if math.isnan(row[3]) else f"{row[3]:.2g}"
        rows.append(f"| {claim} | {row[0]} | {row[1]} | {row[2]} | {p} | **{row[4]}** |")
    return rows


def render_report(sections, meta, results: dict | None = None) -> str:
    """report.md: the verdicts, settings, caveats, then per analysis its figures and plain-language readings (every
    number with its interval), models by their labels; the command, paths and digests in one provenance table."""
    cka, probes, data = meta["cka"] or {}, meta.get("probes"), meta["data"]
    names = {m["spec"]: m.get("label") or _short(m["spec"]) for m in meta["models"]}
    lines = ["# ssl_repsim report", ""]
    if results is not None:
        lines += ["## Verdicts", "", *verdict_table(results, meta, cka.get("ci") or 0.95), ""]
    lines += [f"Data: {_short(str(data['name']))} ({data['n']} images, seed {data['seed']})."
              + (f" CKA: {cka['estimator']} estimator, n = {cka['n']}, {cka['tokens']} tokens, "
                 + (f"{cka['ci']:.0%} intervals by the {cka['interval']}." if cka.get("ci") else "no intervals.")
                 if cka else " No CKA (fewer than two models).")
              + (f" Probes: {probes['split']} (seed {probes['seed']}), n_val = {probes['n_val']}, chance "
                 f"{probes['chance']:.2f}, {probes['intervals']} intervals." if probes else "")
              + f" MAE mask ratio {meta['mae_mask_ratio']}; {meta['elapsed_s']:.0f} s.",
              "", (f"Numbers are followed by their {cka.get('ci') or 0.95:.0%} interval in brackets (probes: Wilson "
                   "95%); a difference is called one only by a paired test on the same images (its p-value is "
                   "given, corrected where the compared quantity was picked after looking), never by comparing two "
                   "intervals."), ""]
    for c in _caveats(sections, meta):
        lines += [f"> **Caveat:** {c}", ""]
    for name, figs, readings in sections:
        lines += ["", f"## {ANALYSES[name].title}", ""]
        lines += [f"- {r}" if "\n" not in r else f"\n{r}\n" for r in readings] or ["- (nothing to compare)"]
        lines += [""] + [f"![{name}]({f})" for f in figs]
    lines = [_relabel(ln, names) for ln in lines]
    lines += ["", "## Provenance", "", f"Command: `{meta['command']}`", "",
              (f"Data: {data.get('source') or data['name']}; ssl_repsim {meta['versions']['ssl_repsim']}, torch "
               f"{meta['versions']['torch']}."), "",
              "| label | model | family | objective | depth × width / patch | input | preprocessing | sha256 |",
              "|---|---|---|---|---|---|---|---|"]
    for m in meta["models"]:
        pp = m["preprocess"]
        lines.append(f"| {names[m['spec']]} | {m['spec']} | {m['family']} | {m['objective']} | {m['depth']} × "
                     f"{m['width']} / {m['patch']} | {m['input_size']} | mean {tuple(round(v, 3) for v in pp['mean'])}, "
                     f"{pp['interp']}, crop {pp['crop_pct']} | {(m['sha256'] or '-')[:16]} |")
    lines += ["", "Every number is in report.json."]
    return "\n".join(lines) + "\n"


def _caveats(sections, meta) -> list[str]:
    out = []
    if meta["data"].get("synthetic"):
        out.append("the data is ssl_repsim's built-in synthetic set (procedural shapes and textures), not natural "
                   "images: run with --data on your images before drawing conclusions about them.")
    if meta.get("probes") and meta["probes"]["n_val"] < 100:
        out.append(f"probes and k-NN are scored on {meta['probes']['n_val']} validation images (< 100): their "
                   "intervals are wide.")
    if any("not a pretrained → fine-tuned pair" in r for name, _, rs in sections if name == "weights" for r in rs):
        out.append("the weight distances compare independently trained models, not a model with its fine-tuned "
                   "version.")
    return out


# ======================================================================================================================
# 10. CLI
# ======================================================================================================================

# --- figures (matplotlib's object API: no global backend, no pyplot state) and console tables -----------------

def _new_figure(**kw):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("notice: matplotlib is not installed, no PNG written (pip install matplotlib)")
        return None
    return Figure(layout="constrained", **kw)


def _save_figure(fig, path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return atomic_write(path, buf.getvalue())


MAX_HEATMAPS = 12   # pairs drawn in one figure; every pair's map is in the JSON and CSV


def _plot_heatmaps(maps: list[dict], path, title="CKA", vrange=(0.0, 1.0)):
    """One labelled heatmap per entry {a, b, layers_a, layers_b, cka}: the first MAX_HEATMAPS pairs (said)."""
    if len(maps) > MAX_HEATMAPS:
        log.warning(f"notice: {path.name} draws the first {MAX_HEATMAPS} of {len(maps)} pairs; every map is in the "
                    "JSON and CSV")
        maps = maps[:MAX_HEATMAPS]
    cols = min(3, len(maps))
    fig = _new_figure(figsize=(5.2 * cols, 4.6 * math.ceil(len(maps) / max(cols, 1)))) if maps else None
    if fig is None:
        return None
    axes = fig.subplots(math.ceil(len(maps) / cols), cols, squeeze=False)
    for ax, m in zip(axes.flat, maps, strict=False):
        im = ax.imshow(np.asarray(_jsonable(m["cka"]), dtype=float), origin="lower", vmin=vrange[0], vmax=vrange[1],
                       cmap="magma", aspect="auto")
        a, b = Path(m["a"]).name, Path(m["b"]).name   # a checkpoint's file name, or a registered name
        ax.set_xlabel(m.get("xlabel", f"{b} layer"))
        ax.set_ylabel(m.get("ylabel", f"{a} layer"))
        ax.set_title(m.get("title", f"{title}: {a} vs {b}"), fontsize=9)
        for setter, labels in ((ax.set_yticks, m["layers_a"]), (ax.set_xticks, m["layers_b"])):
            ticks = list(range(0, len(labels), max(1, len(labels) // 12)))
            setter(ticks, [labels[t] for t in ticks], fontsize=6)
        ax.tick_params(axis="x", rotation=90)
        fig.colorbar(im, ax=ax, fraction=0.046)
    for ax in list(axes.flat)[len(maps):]:
        ax.axis("off")
    return _save_figure(fig, path)


def _plot_layer_curves(figure: dict, path, ylabel: str = "score"):
    """A score versus layer, one line per entry of a curve_figure (or a bare {label: {layer: score}}): its band,
    title, y label with unit and y limits; colours and line styles that stay apart for 12 lines, the legend outside
    the data."""
    fig = _new_figure(figsize=(8.5, 4.2))
    if fig is None:
        return None
    figure = figure if "curves" in figure else curve_figure(figure, "", ylabel)
    ax = fig.subplots()
    for k, (label, res) in enumerate(figure["curves"].items()):
        style = dict(color=f"C{k % 10}", linestyle=("-", "--", ":", "-.")[k // 10 % 4], marker="o", markersize=3)
        val = lambda v: float("nan") if v is None else v   # NaN is null in the JSON replot reads
        ax.plot(range(len(res)), [val(v) for v in res.values()], label=label, **style)
        if label in figure["bands"]:
            lo, hi = figure["bands"][label]
            ax.fill_between(range(len(res)), [val(lo[x]) for x in res], [val(hi[x]) for x in res],
                            color=style["color"], alpha=0.15, linewidth=0)
        ax.set_xticks(range(len(res)), list(res), rotation=90, fontsize=7)
    ax.set_title(figure["title"], fontsize=9)
    ax.set_ylabel(figure["ylabel"], fontsize=8)
    ax.set_xlabel("layer")
    if figure["ylim"]:
        ax.set_ylim(*figure["ylim"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return _save_figure(fig, path)


def _format_map(m: torch.Tensor, la, lb, max_cols=14) -> str:
    """A text table of a map: rows with their full point names, columns numbered with a legend (subsampled
    beyond max_cols)."""
    ia = list(range(len(la)))[:: max(1, math.ceil(len(la) / max_cols))]
    ib = list(range(len(lb)))[:: max(1, math.ceil(len(lb) / max_cols))]
    w = max(len(la[i]) for i in ia)
    lines = [" " * w + " " + " ".join(f"{f'[{j}]':>6}" for j in ib)]
    lines += [f"{la[i]:>{w}} " + " ".join(f"{float(m[i, j]):6.2f}" for j in ib) for i in ia]
    lines.append("columns: " + ", ".join(f"[{j}] {lb[j]}" for j in ib))
    return "\n".join(lines)


# --- what every output records ------------------------------------------------------------------------------------

def _versions() -> dict:
    import platform
    return dict(ssl_repsim=__version__, torch=torch.__version__, numpy=np.__version__, python=platform.python_version())


def describe(m: ViT | ConvNet) -> str:
    """A model's architecture in a few words."""
    c = m.cfg
    if isinstance(m, ConvNet):
        extra = (" V2 (GRN)" if c.grn else " V1") if c.arch == "convnext" else f" stem {c.stem_width}"
        return f"{CNN_ARCHS[c.arch].__name__}{extra} depths {'-'.join(map(str, c.depths))} widths " \
               f"{'-'.join(map(str, c.widths))}"
    return f"ViT d={c.embed_dim} depth={c.depth} patch={c.patch_size} heads={c.num_heads}"


def _model_meta(model: ViT) -> dict:
    """What a result needs to say about a model: where it came from, its family and objective, the layout it was
    read in, its architecture, input size and preprocessing."""
    src = dict(getattr(model, "source", {}))
    path = src.get("path")
    src["sha256"] = file_sha256(path) if path and Path(path).is_file() else None
    src.update(objective=objective(model.family, src.get("fine_tuned", False)), layout=model.family,
               architecture=_architecture_of([model])[0], described=describe(model),
               depth=model.cfg.depth, width=model.cfg.embed_dim, heads=model.cfg.num_heads, patch=model.cfg.patch_size,
               registers=model.cfg.num_registers, input_size=model.input_size, preprocess=dict(model.preprocess),
               eval_repr=eval_representation(model),
               teacher=FAMILIES[model.family].teacher or None if model.family in FAMILIES else None)
    return src


def _out_dir(args, kind: str) -> Path:
    if args.out:   # a fine-tuning run folder is resumed or overwritten by finetune's own rules (_checked_run)
        _check_replaceable(Path(args.out), results=kind != "finetune")
        return Path(args.out)
    tag = "-".join(re.sub(r"[^A-Za-z0-9_.-]", "_", Path(str(m)).stem)[:24] for m in args.models)
    return Path("results") / f"{kind}-{tag}-{time.strftime('%Y%m%d-%H%M%S')}"


def _load_models(args, head: bool = False) -> list[ViT]:
    models = []
    for k, spec in enumerate(args.models):
        try:
            models.append(load_model(spec, args.family, weights_dir=args.weights_dir, offline=args.offline,
                                     num_heads=args.num_heads, img_size=args.img_size, act=args.act,
                                     progress=not args.quiet, head=head))
        except DownloadUnavailable as e:
            rest = [f"{REGISTRY[n]['url']} ({approximate_size(n).split(';')[0]}) at {registry_path(n, args.weights_dir)}"
                    for n in (ALIASES.get(s, s) for s in args.models[k + 1:])
                    if n in REGISTRY and not REGISTRY[n]["url"].startswith("hf:")
                    and not registry_path(n, args.weights_dir).exists()]
            raise DownloadUnavailable(str(e) + (f" (the same for {'; '.join(rest)})" if rest else "")) from None
    for spec, m in zip(args.models, models, strict=True):
        log.info(f"model {spec}: {m.family} {describe(m)}, input {m.input_size}px")
    return models


def _train_val(args) -> tuple[ImageSet, ImageSet]:
    train = load_images(args.data, args.n, args.seed, args.strict, workers=args.workers)
    if train.labels is None:
        raise UsageError(f"{args.data}: no labels (use class sub-folders, or a tensor file with 'labels')")
    if args.val:
        val = load_images(args.val, None, args.seed, args.strict, workers=args.workers)
        if val.labels is None:
            raise UsageError(f"{args.val}: no labels")
        if train.classes and val.classes and train.classes != val.classes:
            raise UsageError(f"train classes {train.classes[:5]} differ from val classes {val.classes[:5]}")
        return train, val
    return split_train_val(train, args.val_fraction, args.seed)


# --- one function per subcommand ----------------------------------------------------------------------------------

def _cmd_cka(args):
    if len(args.models) < 2:
        raise UsageError("cka needs at least two models")
    t0 = time.time()
    final = _out_dir(args, "cka")            # every option and the data checked before any model is read
    measures = dict(measures=_checked_measures(args.measures, args.permutations), permutations=args.permutations,
                    null=args.null)
    files = [is_feature_file(spec) for spec in args.models]
    res, models_meta, data_meta = (_cka_of_feature_files if any(files) else _cka_of_models)(args, files, measures)
    n_models = len(args.models)
    with _staged_results(final) as out:
        meta = dict(models=models_meta, data=data_meta, points=args.points,
                    tokens=args.tokens, estimator=res["estimator"], n=res["n"], batch_size=args.batch_size,
                    batch_order=res.get("batch_order"), ci=res["ci"], interval=res["interval"], kernel=args.kernel,
                    rbf_threshold=args.rbf_threshold if args.kernel == "rbf" else None,
                    device=str(args.device or default_device()), dtype=args.dtype or "float32", versions=_versions(),
                    elapsed_s=round(time.time() - t0, 2), command=args.command)
        doc = dict(res, meta=meta)
        if n_models == 2:
            doc.update({k: res["pairs"][0][k] for k in ("layers_a", "layers_b", "cka", "cka_low", "cka_high")
                        if k in res["pairs"][0]})
        write_json(out / "cka.json", doc)
        bounds = ["cka_low", "cka_high"] if res["ci"] else []
        write_csv(out / "cka.csv", ["model_a", "model_b", "layer_a", "layer_b", "cka", *bounds],
                  [[p["a"], p["b"], la, lb, *(float(p[k][i, j]) for k in ("cka", *bounds))] for p in res["pairs"]
                   for i, la in enumerate(p["layers_a"]) for j, lb in enumerate(p["layers_b"])])
        _plot_heatmaps(res["pairs"], out / "cka.png", title=f"CKA ({_estimator_words(res)}, {args.tokens})")
        _write_measures(out, res, f"n = {res['n']}, {args.tokens} tokens")
    print(f"CKA estimator: {_estimator_words(res)}; tokens {args.tokens}"
          + (f"; {res['ci']:.0%} intervals by the {res['interval']}" if res["ci"] else "; no intervals (--ci 0)"))
    specs = list(dict.fromkeys(s for p in res["pairs"] for s in (p["a"], p["b"])))
    short = dict(zip(specs, model_labels(specs), strict=True))   # the console names models as figures do
    for p in res["pairs"]:
        print(f"\n{short[p['a']]} (rows) vs {short[p['b']]} (columns): matched-layer mean CKA {p['diagonal_mean']:.3f}"
              + (" [{:.3f}, {:.3f}]".format(*p["diagonal_mean_ci"]) if "diagonal_mean_ci" in p else "")
              + (f", permutation p {_p_text(p['diagonal_mean_p'])}, calibrated {p['diagonal_mean_calibrated']:.3f}; "
                 f"the map's largest entry p {_p_text(p['max_p'])} (family-wise over the map)"
                 if "diagonal_mean_p" in p else ", no permutation null"))
        print(_format_map(p["cka"], p["layers_a"], p["layers_b"]))
    if n_models > 2:
        print(f"\nmodel × model CKA at {res['model_matrix']['point'][0]}:")
        print(_format_map(res["model_matrix"]["cka"], res["model_matrix"]["models"], res["model_matrix"]["models"]))
    _print_measures(res)
    print(f"\nwrote {final}/cka.json, cka.csv{', cka.png' if (final / 'cka.png').exists() else ''} "
          f"({meta['elapsed_s']:.1f} s)")


def _write_measures(out: Path, res: dict, what: str):
    """measures.csv (one row per measure and layer pair) and a heat-map figure per measure, when there are any."""
    if "measures" not in res:
        return
    keys = ("map", "low", "high", "p", "calibrated", "reverse")
    rows = [[p["a"], p["b"], name, la, lb, *(float(e[k][i, j]) if k in e else "" for k in keys)]
            for p in res["pairs"] for name, e in p["measures"].items()
            for i, la in enumerate(p["layers_a"]) for j, lb in enumerate(p["layers_b"])]
    write_csv(out / "measures.csv", ["model_a", "model_b", "measure", "layer_a", "layer_b", "value", "low", "high",
                                      "p", "calibrated", "reverse"], rows)
    for name in res["measures"]:
        lo, hi = MEASURES[name].range
        _plot_heatmaps([dict(p, cka=p["measures"][name]["map"]) for p in res["pairs"]], out / f"measure-{name}.png",
                       title=f"{name} ({what})", vrange=(max(lo, -1.0), hi))
        mm = res["model_matrix"]
        if len(mm["models"]) >= 3:   # the model × model matrix at each model's point, one figure per measure
            labels = [Path(s).name for s in mm["models"]]
            _plot_heatmaps([dict(a="", b="", layers_a=labels, layers_b=labels, cka=mm["measures"][name]["matrix"],
                                 xlabel="model", ylabel="model",
                                 title=f"{name} between models at {', '.join(sorted(set(mm['point'])))} ({what})")],
                           out / f"measure-{name}-models.png", vrange=(max(lo, -1.0), hi))


def _print_measures(res: dict):
    for name, info in res.get("measures", {}).items():
        chance = MEASURES[name].chance
        print(f"\n{name} ({info['id']}; {info['cite']}; range {info['range']}"
              + (f"; chance {chance(res['n']):.3f}" if chance else "") + f"; n = {res['n']}"
              + (f"; intervals: {info['interval'].split(',')[0]}" if info["interval"] else "")
              + (f"; p from {'the analytic null' if info['null'] == NULL_MOMENTS_SAID else info['null'].split(' of ')[0]}"
                 if info["null"] else "") + ")")
        for p in res["pairs"]:
            e = p["measures"][name]
            ci = " [{:.3f}, {:.3f}]".format(*e["diagonal_mean_ci"]) if "diagonal_mean_ci" in e else ""
            test = (f", p {_p_text(e['diagonal_mean_p'])}, calibrated {e['diagonal_mean_calibrated']:.3f}"
                    if "diagonal_mean_p" in e else "")
            print(f"  {p['a']} vs {p['b']}: matched-layer mean {e['diagonal_mean']:.3f}{ci}{test}")


def _cka_of_models(args, files: list[bool], measures: dict) -> tuple[dict, list, dict]:
    """cka of models: the data and every option checked, the models read, then compared (compare_models)."""
    images = load_images(args.data, args.n, args.seed, args.strict, workers=args.workers)
    check_cka_options({"full": "biased"}.get(args.estimator, args.estimator), args.kernel, len(images),
                      args.batch_size, measures["measures"], args.ci, args.rbf_threshold)   # before any model
    if len(args.models) > 8:
        log.warning(f"notice: {len(args.models)} models make {len(args.models) * (len(args.models) - 1) // 2} pairs, "
                    "each a full map (and its intervals): about that many times one pair's time")
    models = _load_models(args)
    res = compare_models(models, images, points=args.points, tokens=args.tokens, estimator=args.estimator,
                         kernel=args.kernel, rbf_threshold=args.rbf_threshold, batch_size=args.batch_size,
                         device=args.device, dtype=args.dtype, cache_dir=args.cache_dir, progress=not args.quiet,
                         model_point=args.model_point, ci=args.ci, ci_resamples=args.ci_resamples, seed=args.seed,
                         **measures)
    if images.skipped:
        log.warning(f"notice: {images.skipped} unreadable image(s) skipped (--strict makes this an error)")
    return res, [_model_meta(m) for m in models], dict(source=str(args.data), name=images.name,
                                                        n=len(images) - images.skipped, skipped=images.skipped,
                                                        seed=args.seed)


def _cka_of_feature_files(args, files: list[bool], measures: dict) -> tuple[dict, list, dict]:
    """cka where some arguments are feature files (files[i]; see `extract`): the models among them are extracted on
    --data in one pass, every input is checked to hold the same samples in the same order (or aligned by id,
    --align), then compared."""
    specs = args.models
    models = _load_models(argparse.Namespace(**{**vars(args), "models": [
        s for s, f in zip(specs, files, strict=True) if not f]})) if not all(files) else []
    data = load_images(args.data, args.n, args.seed, args.strict, workers=args.workers) if models else None
    extracted = iter(extract_many(models, data, [args.points] * len(models), args.tokens, args.batch_size,
                                  args.device, args.dtype, progress=not args.quiet) if models else [])
    models_left = iter(models)
    sets, metas = [], []
    for spec, is_file in zip(specs, files, strict=True):
        if is_file:
            feats, ids, meta = read_features(spec)
            metas.append(dict(meta.get("model", {}), spec=str(spec), features=str(spec), tokens=meta.get("tokens"),
                              points=meta.get("points")))
        else:
            feats, ids = next(extracted), sample_ids(data)
            metas.append(dict(_model_meta(next(models_left)), tokens=args.tokens, points=args.points))
        sets.append((str(spec), feats, ids))
    settings = {(m.get("tokens", args.tokens), str(m.get("points", args.points))) for m in metas}
    if len(settings) > 1:
        log.warning(f"notice: the inputs hold features of different settings (tokens, points): {sorted(settings)}")
    feats, ids = aligned_features(sets, args.align)
    res = compare_features(feats, [str(s) for s in args.models], estimator=args.estimator, kernel=args.kernel,
                           rbf_threshold=args.rbf_threshold, model_point=args.model_point, ci=args.ci, seed=args.seed,
                           **measures)
    return res, metas, dict(source="feature files" if data is None else str(args.data), n=len(ids), aligned=args.align)


def _cmd_extract(args):
    out = Path(args.out or f"features-{_safe_name(args.model)}.safetensors")
    if out.suffix != ".safetensors":
        raise UsageError(f"--out {out}: extract writes a .safetensors feature file")
    if out.exists() and (not is_feature_file(out) or out.resolve() == Path(split_family(str(args.model))[1]).resolve()):
        raise UsageError(f"--out {out} exists and is not a feature file (a checkpoint?): give another file name")
    args.models = [args.model]
    model = _load_models(args)[0]
    images = load_images(args.data, args.n, args.seed, args.strict, workers=args.workers)
    feats = extract(model, images, args.points, args.tokens, args.batch_size, args.device, args.dtype,
                    progress=not args.quiet)
    if images.skipped:
        log.warning(f"notice: {images.skipped} unreadable image(s) skipped and left out (--strict makes this an error)")
    meta = dict(model=_model_meta(model), data=dict(source=str(args.data), name=images.name,
                n=len(images) - images.skipped, skipped=images.skipped, seed=args.seed), points=args.points,
                tokens=args.tokens, dtype=args.dtype or "float32", versions=_versions(), command=args.command)
    ids = sample_ids(images)
    save_features(out, feats, ids, images.readable_labels(), meta)
    print(f"wrote {out}: {len(feats)} point(s) × {len(ids)} samples ({args.tokens} tokens)")


def _safe_name(spec: str) -> str:
    return re.sub(r"[^\w.-]+", "_", Path(str(spec)).name)[:60]


def _estimator_words(res: dict) -> str:
    """e.g. "debiased, n=256" or "minibatch, n=1024 in batches of 32"."""
    batches = f" in batches of {min(res['batch_size'], res['n'])}" if res["estimator"] == "minibatch" else ""
    return f"{res['estimator']}, n={res['n']}{batches}"


def replot(folder) -> list[str]:
    """Every figure of an analysis or report run redrawn from its JSON alone (the figure data each analysis stored
    beside its results): the PNGs are written again in `folder`; returns their names."""
    folder = Path(folder)
    docs = [p for p in sorted(folder.glob("*.json")) if p.name != "bench.json"]
    if not docs:
        raise UsageError(f"{folder}: no result JSON to replot (a report or analysis --out folder)")
    written = []
    for p in docs:
        doc = parse_json(p.read_text(), p)
        for entry in (v for v in (doc.values() if isinstance(doc, dict) else ()) if isinstance(v, dict)
                      and "figures" in v):
            written += _render_figures({f: tuple(kp) for f, kp in entry["figures"].items()}, folder)
    if not written:
        raise UsageError(f"{folder}: its JSON holds no figure data (written before ssl_repsim stored it?)")
    return written


def _cmd_replot(args):
    names = replot(args.folder)
    print(f"redrew {len(names)} figure(s) in {args.folder}: {', '.join(names)}")


def _cmd_list(args):
    wdir = Path(args.weights_dir or default_weights_dir())
    w = max(map(len, REGISTRY)) + 1
    print(f"{'name':<{w}} {'family':<12} {'obj':<7} {'heads':>5} {'norm':<9} {'resize':<8} {'eval repr':<15} "
          f"{'present':<8} aliases")
    for name, r in REGISTRY.items():
        if r["url"].startswith("hf:"):
            repo = hub_spec(r["url"])
            present = "cache" if _cached_snapshot(hub_repo_dir(repo[0]), repo[1]) else "hub"
        else:
            present = "yes" if registry_path(name, wdir).exists() else \
                "manual" if FAMILIES[r["family"]].manual_download else "-"
        norm = {HALF_MEAN: "0.5/0.5", OPENAI_MEAN: "openai"}.get(r["mean"], "imagenet")
        print(f"{name:<{w}} {r['family']:<12} {objective(r['family']):<7} {r['num_heads']:>5} {norm:<9} "
              f"{r['interp']:<8} {r['eval_repr']:<15} {present:<8} {','.join(r['aliases'])}")
    others = sorted(p.name for p in wdir.glob("*") if p.is_file() and p.name not in ("README.md", "SHA256SUMS")
                    and not any(p == registry_path(n, wdir) for n in REGISTRY))
    print(f"\nweights dir: {wdir}" + (f"; other files: {', '.join(others)}" if others else "")
          + f"\nHugging Face cache: {hub_cache_dir()} (hub ids and timm names: present = cache | hub)")


def _cmd_download(args):
    for name in args.names:
        path = download(name, args.weights_dir, progress=not args.quiet)
        print(f"{resolve_name(name)}: {path}")


def _cmd_probe(args, kind="probe"):
    t0 = time.time()
    final = _out_dir(args, kind)             # every option and the data checked before any model is read
    train, val = _train_val(args)
    if kind == "knn" and args.k is not None and args.k > len(train):
        raise UsageError(f"--k {args.k} exceeds the {len(train)} training images")
    k = 20 if getattr(args, "k", None) is None else args.k
    models = _load_models(args)
    results = {}
    for m in models:
        tok = _probe_tokens(m, args.tokens)
        kw = dict(cache_dir=args.cache_dir, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                  progress=not args.quiet)
        ftr, fva = cached_extract(m, train, args.points, tok, **kw), cached_extract(m, val, args.points, tok, **kw)
        if tok != "official":   # the published representation beside the per-block curves
            rep = f"official:{eval_representation(m)}"
            ftr[rep] = cached_extract(m, train, None, "official", **kw)["official"]
            fva[rep] = cached_extract(m, val, None, "official", **kw)["official"]
        ytr, yva = train.readable_labels(), val.readable_labels()   # unreadable images have no feature rows
        if kind == "knn":
            if k > len(ytr):
                log.warning(f"notice: k = {k} lowered to the {len(ytr)} training images read")
            res = knn_accuracy(ftr, ytr, fva, yva, k=min(k, len(ytr)), temperature=args.temperature,
                               device=args.device)
        elif args.method == "mlp":
            res = mlp_probe(ftr, ytr, fva, yva, depth=args.depth, epochs=args.epochs, seed=args.seed,
                            device=args.device)
        else:
            opts = dict(epochs=args.epochs) if args.method == "mae" else {}
            res = linear_probe(ftr, ytr, fva, yva, method=args.method, seed=args.seed, device=args.device, **opts)
        results[m.source["spec"]] = res
    meta = dict(models=[_model_meta(m) for m in models], data=str(args.data), val=args.val or
                f"{args.val_fraction:.0%} of data (seed {args.seed})", n_train=len(train) - train.skipped,
                n_val=len(val) - val.skipped, skipped=train.skipped + val.skipped,
                chance=chance_level(val.readable_labels()), intervals="Wilson 95%", points=args.points,
                tokens={m.source["spec"]: _probe_tokens(m, args.tokens) for m in models},
                official={m.source["spec"]: eval_representation(m) for m in models}, seed=args.seed,
                versions=_versions(), elapsed_s=round(time.time() - t0, 2), command=args.command)
    meta.update(dict(k=min(k, len(train) - train.skipped), temperature=args.temperature) if kind == "knn" else
                dict(method=args.method))
    with _staged_results(final) as out:
        _write_layer_results(out, kind, results, meta)
    print(f"\nwrote {final}/{kind}.json, {kind}.csv" + (f", {kind}.png" if (final / f"{kind}.png").exists() else ""))


def _write_layer_results(out: Path, kind: str, results: dict, meta: dict):
    write_json(out / f"{kind}.json", dict(results=results, meta=meta))
    write_csv(out / f"{kind}.csv", ["model", "layer", "metric", "value", "ci_low", "ci_high"],
              [[m, layer, metric, v, *per.get(f"{metric}_ci", ["", ""])] for m, r in results.items()
               for layer, per in r.items() for metric, v in per.items()
               if not metric.endswith("_ci") and metric != "correct"])     # which images were right: in the JSON
    _plot_layer_curves(curve_figure({_short(m): top1(r) for m, r in results.items()},
                                    f"{kind} top-1 per layer ({meta['n_val']} validation images, Wilson 95% bands)",
                                    "top-1 accuracy (fraction of validation images)",
                                    {_short(m): _ci_band(r) for m, r in results.items()}, (0.0, 1.0)),
                       out / f"{kind}.png")
    print(f"{kind}: {meta['n_train']} training and {meta['n_val']} validation images; chance (majority class) "
          f"{meta['chance']:.3f}; [Wilson 95% interval]")
    short = dict(zip(results, model_labels(list(results)), strict=True))
    for m, r in results.items():
        print(f"\n{short[m]}: {kind} accuracy per layer")
        w = max(len(layer) for layer in r)
        for layer, per in r.items():
            print(f"  {layer:>{w}}  top-1 {_with_ci(per, 'top1')}" + (f"  top-5 {_with_ci(per, 'top5')}"
                                                                     if "top5" in per else ""))


def _with_ci(per: dict, metric: str) -> str:
    return f"{per[metric]:.3f} [{per[metric + '_ci'][0]:.3f}, {per[metric + '_ci'][1]:.3f}]"


def _cmd_knn(args):
    _cmd_probe(args, kind="knn")


def _cmd_finetune(args):
    args.models = [args.model]
    model = _load_models(args)[0]
    explicit = {f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneConfig)
                if getattr(args, f.name, None) is not None}
    config = finetune_recipe(args.recipe, model).with_options(**explicit)
    args.seed = config.seed
    train, val = _train_val(args)
    out = _out_dir(args, "finetune")
    log.info(f"recipe {args.recipe}" + (f" with {', '.join(f'{k}={v}' for k, v in explicit.items())}" if explicit
                                        else ""))
    res = finetune(model, train, config, val=val, out=out, resume=args.resume, overwrite=args.overwrite,
                   device=args.device, dtype=args.dtype, progress=not args.quiet)
    last = res["history"][-1] if res["history"] else {}
    print(f"fine-tuned {args.model} with recipe {args.recipe} for {len(res['history'])} epoch(s): val acc "
          f"{last.get('val_acc')}; wrote {out}/checkpoint.safetensors, train_state.pt, log.json")


def _cmd_analysis(args):
    t0 = time.time()
    skip = [s for s in (getattr(args, "skip", None) or "").split(",") if s]
    if set(skip) - set(ANALYSES):
        unknown = ",".join(sorted(set(skip) - set(ANALYSES)))
        raise UsageError(f"--skip {unknown}: not an analysis ({', '.join(ANALYSES)})")
    names = [n for n in ANALYSES if n not in skip] if args.cmd == "report" else [args.cmd]
    if args.cmd != "report" and len(args.models) < ANALYSES[args.cmd].min_models:
        raise UsageError(f"{args.cmd} needs at least {ANALYSES[args.cmd].min_models} models")
    final = _out_dir(args, args.cmd)         # every option and the data checked before any model is read
    opts = AnalysisOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(AnalysisOptions)
                              if hasattr(args, f.name)}, progress=not args.quiet)
    labels = model_labels(args.models, getattr(args, "labels", None))   # checked before any work
    images = load_images(args.data, args.n, args.seed, args.strict, workers=args.workers) if hasattr(args, "data") else None
    models = _load_models(args, head=any(ANALYSES[n].needs_heads for n in names))
    for m, label in zip(models, labels if getattr(args, "labels", None) else model_labels([_spec(m) for m in models]),
                        strict=True):
        m.source["label"] = label
    _plan_points(models, len(images) if images else 0)
    with _staged_results(final) as out:
        results, sections = {}, []
        analysed = _analysed(models, images, names, opts, getattr(args, "jobs", 1), out)   # figures drawn as it goes
        with step(f"writing {args.cmd}.json" + (", report.md" if args.cmd == "report" else "")):
            for name, res, figures, readings, drawn in analysed:
                results[name] = dict(results=res, readings=readings, figures=figures)   # what `replot` redraws
                sections.append((name, drawn, readings))
                for r in readings:   # models by their short labels, as in report.md
                    print(f"[{name}] {_relabel(r, {_spec(m): _label(m) for m in models})}")
        meta = dict(models=[_model_meta(m) for m in models], data=dict(source=str(getattr(args, "data", None)),
                    name=images.name if images else None, n=len(images) if images else 0, seed=opts.seed,
                    synthetic=getattr(args, "data", None) == "synthetic"), **_analysis_settings(results, opts),
                    versions=_versions(), elapsed_s=round(time.time() - t0, 2), command=args.command)
        write_json(out / f"{args.cmd}.json", dict(results, meta=meta))
        if args.cmd == "report":
            atomic_write(out / "report.md", render_report(sections, meta, results))
    print(f"wrote {final}/{args.cmd}.json" + (", report.md" if args.cmd == "report" else "")
          + f" ({meta['elapsed_s']:.1f} s)")


def _plan_points(models, n: int):
    """The points each model's first extraction takes beside its request (FeatureSession.plan): every point where
    all models' fit the session's memory, else the blocks; the analyses then read them instead of running the model
    again."""
    session = _SESSION.get()
    if session is None or not n:
        return
    share = session.budget // max(len(models), 1)
    for m in models:
        every = resolve_points(m, "all")
        session.plan(m, every if feature_bytes(m, every, "all", n) <= share else "blocks")


def _analysis_settings(results: dict, opts: AnalysisOptions) -> dict:
    """The settings the analyses actually used: CKA estimator (as resolved), tokens, n and interval; the probes'
    split, n_val and chance; the attention mask ratio."""
    cka = next((results[k]["results"] for k in ("overview", "gap") if results.get(k, {}).get("results")), {})
    info = next(iter(results.get("info", {}).get("results", {}).values()), None)
    return dict(cka=dict(tokens=opts.tokens, estimator=cka["estimator"], n=cka["n"], batch_size=cka["batch_size"],
                         ci=cka["ci"], interval=cka["interval"]) if cka else None,
                probes=dict(split="75% train / 25% validation", seed=opts.seed, n_train=info["n_train"],
                            n_val=info["n_val"], chance=info["chance"], intervals="Wilson 95%") if info else None,
                mae_mask_ratio=opts.mae_mask_ratio)


@contextlib.contextmanager
def _staged_results(final: Path):
    """The folder a command writes its results into: a temp folder beside `final`, renamed to it once the command
    succeeds (an earlier result there replaced whole, never mixed with the new files), removed if it fails: a result
    folder is complete or absent. Under torchrun only rank 0 writes, so the others get `final` itself (they write
    nothing)."""
    final = Path(final)
    _check_replaceable(final)
    if _rank_world()[0] != 0:
        yield final
        return
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        _sweep_stages(final)
        stage = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
        os.chmod(stage, 0o777 & ~_umask())
        held = _try_lock(stage)   # held while this process writes: a sweeper knows the stage is alive
    except (FileExistsError, NotADirectoryError):
        raise UsageError(f"cannot write {final}: a file stands where its folder {final.parent} should be") from None
    except OSError as e:
        raise UsageError(f"cannot write {final}: {_one_line(e)}") from None
    try:
        yield stage
        (stage / RESULTS_MARK).write_text(f"ssl_repsim {__version__}\n")
        _check_replaceable(final)
        old = None
        if final.exists():   # the earlier result steps aside, the new one takes its name, then the old is removed
            old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".old"))
            os.replace(final, old / final.name)
        os.replace(stage, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:   # a full disk (ENOSPC), a read-only or forbidden folder: a line naming the path
        raise UsageError(f"cannot write {final}: {e.strerror or _one_line(e)}"
                         + (f" ({e.filename})" if e.filename else "")) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if held is not None:
            _unlock(held)


def _try_lock(folder: Path) -> int | None:
    """An open descriptor holding an exclusive flock on the folder, or None when another process holds it (or
    locks are not available here). Listed in _LOCK_FDS until _unlock closes it (forked processes close theirs)."""
    try:
        import fcntl
        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _LOCK_FDS.add(fd)
        return fd
    except OSError:
        os.close(fd)
        return None


def _unlock(fd: int):
    _LOCK_FDS.discard(fd)
    os.close(fd)


def _sweep_stages(final: Path):
    """Stage folders (.NAME.*.tmp, .NAME.*.old) that killed runs left beside `final`: removed when no live process
    holds them."""
    for stale in final.parent.glob(f".{glob.escape(final.name)}.*"):
        if stale.is_dir() and stale.suffix in (".tmp", ".old") and (fd := _try_lock(stale)) is not None:
            shutil.rmtree(stale, ignore_errors=True)
            _unlock(fd)


RESULTS_MARK = ".ssl_repsim-results"   # in every result folder: what a later run into the same --out may replace


def _is_result(folder: Path) -> bool:
    """A folder a command of ours wrote: marked, or (written before the mark existed) holding a JSON result whose meta
    records an ssl_repsim command line."""
    if (folder / RESULTS_MARK).is_file():
        return True
    for f in folder.glob("*.json"):
        with contextlib.suppress(OSError, UsageError, AttributeError, TypeError):
            if f.stat().st_size < JSON_LIMIT and str(_read_json(f).get("meta", {}).get("command", "")).startswith(
                    "ssl_repsim.py "):
                return True
    return False


def _check_replaceable(final: Path, results: bool = True):
    """A result folder may be written where nothing is, into an empty folder, or over an earlier result (marked):
    never over a folder of other files (`--out .` would delete them), the root, or a folder holding the working
    directory. results=False: only the last two."""
    if final.exists() and not final.is_dir():
        raise UsageError(f"cannot write {final}: it is a file, not a folder")
    here = Path.cwd().resolve()
    if final.resolve() == Path(final.resolve().anchor) or here.is_relative_to(final.resolve()):
        raise UsageError(f"--out {final} is the file system's root or holds the working directory: give a folder of "
                         "its own")
    if final.is_dir() and results and any((final / f).exists() for f in ("train_state.pt", "checkpoint.safetensors")):
        raise UsageError(f"--out {final} holds a fine-tuning run: give another folder for this result")
    if final.is_dir() and not results and (final / RESULTS_MARK).is_file():
        raise UsageError(f"--out {final} holds a result of another command: fine-tune into a folder of its own")
    if results and final.is_dir() and not _is_result(final) and any(final.iterdir()):
        raise UsageError(f"--out {final} holds files that are not an ssl_repsim result: give a new or empty folder "
                         "(an earlier result there is replaced whole)")


def _render_figures(figures: dict, out: Path) -> list[str]:
    written = []
    for fname, (kind, payload) in figures.items():
        plot = _plot_layer_curves(payload, out / fname) if kind == "curves" else \
            _plot_heatmaps(payload, out / fname, "CKA")
        if plot:
            written.append(fname)
    return written


# --- bench: speed on this machine, against the FLOP floor ---------------------------------------------------------

def _timeit(fn, reps=1, sync=None):
    best = float("inf")
    for _ in range(reps):
        if sync:
            sync()
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        best = min(best, time.perf_counter() - t)
    return best


def cka_flops(n: int, la: int, lb: int, d: int, estimator: str, batch: int = 256) -> tuple[float, str]:
    """FLOP floor of an all-pairs map as cka_matrix computes it: the cheaper of the Gram and feature forms for
    linear CKA (biased or debiased), the Gram form per batch for minibatch."""
    gram, feat = cka_form_flops(n, [d] * la, [d] * lb)
    if estimator in ("biased", "debiased"):
        return (gram, "gram") if gram <= feat else (feat, "feature")
    return n // batch * cka_form_flops(batch, [d] * la, [d] * lb)[0], "minibatch"


def bench(full: bool = False, device=None) -> dict:
    """Extraction img/s (ViT-B/16, all block outputs hooked vs a plain forward), the matmul rate, and all-pairs
    12×12 CKA (d = 768) at several n for each estimator, as a multiple of its FLOP floor and with its error
    against a float64 computation of the same formula."""
    device = as_device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    out = dict(device=str(device), threads=torch.get_num_threads(), versions=_versions(),
               gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    rate = _bench_matmul(4096 if device.type == "cuda" or full else 2048, device, sync)
    out["matmul_gflops"] = rate / 1e9
    out["extraction"] = _bench_extraction(64 if device.type == "cuda" else (32 if full else 8), device, sync)
    out["extraction_resnet50"] = _bench_cnn_extraction(64 if device.type == "cuda" else (32 if full else 8), device,
                                                       sync)
    out["cka"] = [row for n in ((1000, 5000, 10000) if full else (1000,)) for row in _bench_cka(n, rate, device, sync)]
    return out


class _PlainDecode(torch.utils.data.Dataset):
    """The baseline bench_data measures against: open, convert to RGB and resize the shorter side in Pillow."""

    def __init__(self, paths, target):
        self.paths, self.target = paths, target

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image
        try:
            with Image.open(self.paths[i]) as im:
                im = im.convert("RGB")
                w, h = im.size
                t = self.target
                size = (max(t, int(w * t / h)), t) if h <= w else (t, max(t, int(h * t / w)))
                return torch.from_numpy(np.array(im.resize(size, Image.BICUBIC)))
        except Exception:  # noqa: BLE001 - an unreadable image costs the baseline nothing
            return None


def bench_data(images: ImageSet, models=None, batch_size: int = 32, device=None) -> dict:
    """Where the time of a CKA run on real images goes, on this machine: a plain DataLoader that decodes and
    resizes each image once with Pillow (`images.workers` workers, the floor of any decoding pipeline), our decoding,
    each model's forward pass on decoded batches, and the whole `cka` (compare_models) run, as seconds and img/s."""
    if isinstance(images.items, torch.Tensor):
        raise UsageError("bench --data needs an image folder (decoding is what it measures)")
    device = as_device(device)
    models = models or [ViT(ViTConfig(embed_dim=32, depth=1, num_heads=1, mlp_hidden=64, family="tiny"))
                        for _ in range(2)]
    kws = [preprocess_kw(m) for m in models]
    target = max(_decode_target(kw)[0] for kw in kws)
    n, out = len(images), dict(n=len(images), workers=images.workers, device=str(device), target_side=target)
    t0 = time.perf_counter()
    with step(f"bench: a plain DataLoader decodes {n} images ({images.workers} workers)"):
        for _ in torch.utils.data.DataLoader(_PlainDecode(images.items, target), batch_size=batch_size,
                                             num_workers=images.workers, collate_fn=list):
            pass
    out["baseline_decode_s"] = time.perf_counter() - t0
    keys, _, targets = _distinct_preprocessing(kws)   # one target per distinct preprocessing, as cka decodes
    t0 = time.perf_counter()
    kept = []
    with step(f"bench: ssl_repsim decodes {n} images"):
        for _, per_target in images.decoded(batch_size, targets=targets):
            if len(kept) < 8:   # a few batches for the forward passes; memory stays bounded
                kept.append(per_target)
    out["decode_s"] = time.perf_counter() - t0
    out["models"] = []
    for m, kw in zip(models, kws, strict=True):
        with _placed(m, device), torch.no_grad():
            t0 = time.perf_counter()
            done = 0
            for per_target in kept:
                x = _preprocessed(per_target[keys.index(repr(kw))], kw, fitted=True).to(device)
                m.forward_features(x)
                done += len(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        out["models"].append(dict(spec=m.source.get("spec"), forward_img_s=done / (time.perf_counter() - t0)))
    t0 = time.perf_counter()
    with step(f"bench: cka of {len(models)} models end to end"):
        compare_models(models if len(models) > 1 else models * 2, images, batch_size=batch_size,
                       device=device)   # as `cka` runs: intervals included (one model: against itself)
    out["cka_s"] = time.perf_counter() - t0
    out.update(baseline_img_s=n / out["baseline_decode_s"], decode_img_s=n / out["decode_s"],
               cka_img_s=n / out["cka_s"], cka_over_baseline=out["cka_s"] / out["baseline_decode_s"])
    return out


def _bench_matmul(m: int, device, sync) -> float:
    """The achievable float32 matmul rate (FLOP/s, best of 5)."""
    a, b = torch.randn(m, m, device=device), torch.randn(m, m, device=device)
    rate = 2 * m ** 3 / _timeit(lambda: a @ b, 5, sync)
    log.info(f"matmul fp32 {m}³: {rate / 1e9:.0f} GFLOP/s")
    return rate


def _bench_extraction(nimg: int, device, sync) -> dict:
    vit = ViT(ViTConfig()).to(device)
    x = torch.randn(nimg, 3, 224, 224, device=device)
    t_plain = t_hook = float("inf")
    with torch.no_grad():
        vit.forward_features(x[:2])
        for _ in range(3):  # alternate, best of 3 each: fair under a fluctuating load
            t_plain = min(t_plain, _timeit(lambda: vit.forward_features(x), 1, sync))
            t_hook = min(t_hook, _timeit(lambda: list(iter_features(vit, [x], "blocks", "all", device)), 1, sync))
    out = dict(images=nimg, plain_img_s=nimg / t_plain, hooked_img_s=nimg / t_hook, hook_overhead=t_hook / t_plain - 1)
    log.info(f"ViT-B/16 forward: {nimg / t_plain:.1f} img/s plain, {nimg / t_hook:.1f} img/s with 12 block outputs "
             f"hooked ({100 * (t_hook / t_plain - 1):+.1f}%)")
    if device.type == "cuda":
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            out["bf16_img_s"] = nimg / _timeit(lambda: vit.forward_features(x), 2, sync)
    return out


def _bench_cnn_extraction(nimg: int, device, sync, reps: int = 3) -> dict:
    """ResNet-50 img/s with every block's output hooked (16 maps read as tokens) against a plain forward of the same
    weights: torchvision's resnet50 where torchvision is installed, else this file's ResNet unhooked; runs
    interleaved, the best of `reps` each."""
    model = ResNet(CNNConfig()).to(device)
    plain, against = model, "ssl_repsim's ResNet, unhooked (torchvision is not installed)"
    with contextlib.suppress(ImportError):
        import torchvision
        plain = torchvision.models.resnet50().eval().to(device)
        plain.load_state_dict({k: v for k, v in model.state_dict().items()}, strict=False)   # its fc stays random
        against = f"torchvision {torchvision.__version__} resnet50"
    x = torch.randn(nimg, 3, 224, 224, device=device)
    t_plain = t_hook = float("inf")
    with torch.no_grad():
        plain(x[:2])
        for _ in range(reps):
            t_plain = min(t_plain, _timeit(lambda: plain(x), 1, sync))
            t_hook = min(t_hook, _timeit(lambda: list(iter_features(model, [x], "blocks", "all", device)), 1, sync))
    log.info(f"ResNet-50 forward: {nimg / t_plain:.1f} img/s plain ({against}), {nimg / t_hook:.1f} img/s with 16 "
             f"block outputs hooked ({t_plain / t_hook:.2f}× the plain rate)")
    return dict(images=nimg, against=against, plain_img_s=nimg / t_plain, hooked_img_s=nimg / t_hook,
                hooked_over_plain=t_plain / t_hook)


def _bench_cka(n: int, rate: float, device, sync) -> list[dict]:
    """Each estimator's 12×12 d=768 map at n: seconds, multiple of the FLOP floor, error of the biased map
    against a float64 computation (n ≤ 5000)."""
    xs, ys = _bench_features(n, device)
    ref = None
    if n <= 5000:  # float64 feature form of the same biased estimator, as the reference
        xc = [v.double() - v.double().mean(0) for v in xs]
        yc = [v.double() - v.double().mean(0) for v in ys]
        ref = torch.tensor([[float((yb.T @ xa).square().sum() / ((xa.T @ xa).norm() * (yb.T @ yb).norm()))
                             for yb in yc] for xa in xc])
        del xc, yc

    def minibatch():
        acc = MinibatchCKA(12, 12, device=device)
        for s in range(0, n - 255, 256):
            acc.update([v[s:s + 256] for v in xs], [v[s:s + 256] for v in ys])
        return acc.compute()
    runs = dict(biased=lambda: cka_matrix(xs, ys), debiased=lambda: cka_matrix(xs, ys, debiased=True),
                minibatch=minibatch)
    rows = []
    for est, run in runs.items():
        res = {}
        t = _timeit(lambda run=run, res=res: res.setdefault("m", run()), 1, sync)
        flops, form = cka_flops(n, 12, 12, 768, est)
        err = float((res["m"] - ref).abs().max()) if ref is not None and est == "biased" else None
        rows.append(dict(n=n, estimator=est, form=form, seconds=t, floor_seconds=flops / rate,
                         x_floor=t * rate / flops, max_err_vs_float64=err))
        log.info(f"CKA 12×12 d=768 n={n} {est:<9} ({form}): {t:.2f} s, {t * rate / flops:.2f}× the floor"
                 + (f", max error vs float64 {err:.1e}" if err is not None else ""))
    return rows


def _bench_features(n: int, device=None, seed: int = 0) -> tuple[list, list]:
    """The bench's 12 + 12 layers of d = 768 features for n samples: correlated, with a shared offset."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 768, generator=g)
    xs = [(base + 0.5 * torch.randn(n, 768, generator=g) + 3.0).to(device) for _ in range(12)]
    ys = [(base @ torch.randn(768, 768, generator=g) / 28 + torch.randn(n, 768, generator=g)).to(device)
          for _ in range(12)]
    return xs, ys


_PEER_RUN = """
import sys, time, torch
sys.path.insert(0, {here!r})
import ssl_repsim as sr
xs, ys = sr._bench_features({n}, {device!r})
base = sr._peak_rss()
t = time.perf_counter()
if {which!r} == "ssl_repsim":
    m = sr.cka_matrix(xs, ys, debiased=True)
else:
    from cka.cka import cka_from_features
    m = cka_from_features(xs, ys)
dt = time.perf_counter() - t
torch.save(dict(seconds=dt, extra=max(0.0, sr._peak_rss() - base), cka=m.double().cpu()), {out!r})
"""


def _bench_peer(ns=(1000, 2000, 4000, 10000), device=None) -> list[dict]:
    """Side by side with pytorch-cka (pip install pytorch-cka; its `cka_from_features`, the same unbiased HSIC
    estimator) on identical 12×12 d=768 features: time and peak extra memory of each, each in a fresh process,
    and for n ≤ 4000 each one's largest error against a float64 computation."""
    import importlib.util
    import subprocess
    if importlib.util.find_spec("cka") is None:
        raise UsageError("bench --peer needs pytorch-cka: pip install pytorch-cka")
    device = str(as_device(device))
    here = str(Path(__file__).resolve().parent)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in ns:
            row = dict(n=n)
            for which in ("ssl_repsim", "pytorch-cka"):
                out = str(Path(tmp) / f"{which}-{n}.pt")
                code = _PEER_RUN.format(here=here, n=n, device=device, which=which, out=out)
                proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
                if proc.returncode != 0:
                    raise UsageError(f"bench --peer: {which} at n={n} failed: {_one_line(proc.stderr)[-300:]}")
                r = torch.load(out, weights_only=True)
                row[f"{which}_s"], row[f"{which}_extra_gb"], row[which] = r["seconds"], r["extra"] / 2 ** 30, r["cka"]
            if n <= 4000:
                xs, ys = _bench_features(n, device)
                ref = cka_matrix([x.double() for x in xs], [y.double() for y in ys], debiased=True)
                for which in ("ssl_repsim", "pytorch-cka"):
                    row[f"{which}_err"] = float((row[which] - ref).abs().max())
            row["max_diff"] = float((row.pop("ssl_repsim") - row.pop("pytorch-cka")).abs().max())
            log.info(f"n={n}: ssl_repsim {row['ssl_repsim_s']:.2f} s, pytorch-cka {row['pytorch-cka_s']:.2f} s")
            rows.append(row)
    return rows


def _peak_rss() -> float:
    """Peak resident memory of this process in bytes (Linux reports kB, macOS bytes)."""
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(r if sys.platform == "darwin" else r * 1024)


def bench_measures(n: int = 2000, dim: int = 768, layers: int = 12, names=None, seed: int = 0) -> list[dict]:
    """Seconds for each measure's layers × layers map between two models of random correlated features (n, dim) per
    layer (no intervals, no null: the map alone), with the reference implementation to time beside it."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, dim, generator=g)
    fa = {f"a{i}": torch.tanh(base @ torch.randn(dim, dim, generator=g) / dim ** 0.5) for i in range(layers)}
    fb = {f"b{i}": torch.tanh(base @ torch.randn(dim, dim, generator=g) / dim ** 0.5) for i in range(layers)}
    rows = []
    for name in _checked_measures(names or list(MEASURES), 0):
        t0 = time.perf_counter()
        measure_maps(fa, fb, name, permutations=0, groups=0)
        rows.append(dict(measure=name, n=n, dim=dim, layers=layers, seconds=time.perf_counter() - t0,
                         reference=MEASURE_REFERENCES.get(name, "")))
    return rows


def bench_inference(n: int = 2000, dim: int = 768, layers: int = 12, permutations: int = 20, seed: int = 0) -> dict:
    """Seconds for a layers × layers debiased CKA map between two models of random correlated features: bare, with
    the jackknife intervals, with the defaults (intervals and the analytic null), and with intervals and the exact
    null of `permutations` permutations; each null against its floor (the analytic one: forming every layer's n × n
    float32 Gram and reading it once; one permutation: copying the second model's states once and the map's product,
    at this machine's rates), and 1,000 exact permutations extrapolated from the measured ones."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, dim, generator=g)
    fa, fb = ({f"{t}{i}": torch.tanh(base @ torch.randn(dim, dim, generator=g) / dim ** 0.5) for i in range(layers)}
              for t in "ab")
    out = dict(n=n, dim=dim, layers=layers, permutations=permutations)
    for key, kw in (("bare_s", dict(ci=0, permutations=0)), ("intervals_s", dict(ci=0.95, permutations=0)),
                    ("defaults_s", dict(ci=0.95)), ("exact_s", dict(ci=0.95, permutations=permutations, null="exact"))):
        t0 = time.perf_counter()
        res = compare_features([fa, fb], ["a", "b"], **kw)
        out[key] = time.perf_counter() - t0
    out["permutations_run"] = int(res["null"].split()[0]) if (res.get("null") or "x")[0].isdigit() else 0
    out["null_per_permutation_s"] = (out["exact_s"] - out["intervals_s"]) / max(out["permutations_run"], 1)
    states = torch.randn(2 * layers, n * n)
    t0 = time.perf_counter()
    states.clone()
    copy = time.perf_counter() - t0
    t0 = time.perf_counter()
    _ = states[:layers] @ states[layers:].T
    product = time.perf_counter() - t0
    x = fa[next(iter(fa))]
    t0 = time.perf_counter()
    _ = x @ x.T                        # one layer's float32 Gram: the analytic null forms 2·layers of them
    gram = time.perf_counter() - t0
    out.update(analytic_null_s=out["defaults_s"] - out["intervals_s"], analytic_floor_s=copy + 2 * layers * gram,
               floor_per_permutation_s=copy / 2 + product, permutations_1000_s=1000 * out["null_per_permutation_s"],
               defaults_over_bare=out["defaults_s"] / out["bare_s"])
    return out


def _bench_inference_cmd(args):
    rows = [bench_inference(args.n or 2000, layers=12)] + ([bench_inference(500, layers=108)] if args.full else [])
    for r in rows:
        print(f"{r['layers']}×{r['layers']} debiased CKA map, n = {r['n']}, d = {r['dim']}: bare {r['bare_s']:.2f} s, "
              f"with intervals {r['intervals_s']:.2f} s, defaults (intervals and the analytic null) "
              f"{r['defaults_s']:.2f} s ({r['defaults_over_bare']:.1f}× bare; the null {r['analytic_null_s']:.2f} s "
              f"against a floor of {r['analytic_floor_s']:.2f} s); exact null: one permutation "
              f"{r['null_per_permutation_s']:.3f} s against a floor of {r['floor_per_permutation_s']:.3f} s "
              f"({r['permutations_run']} run), 1,000 permutations {r['permutations_1000_s']:.0f} s")
    if args.out:
        write_json(Path(args.out) / "bench_inference.json", rows)


MEASURE_REFERENCES = {"cka": "platonic-rep metrics.unbiased_cka", "mknn": "platonic-rep metrics.mutual_knn",
                      "jaccard": "ReSi nearest_neighbor.jaccard_similarity",
                      "cknna": "platonic-rep metrics.cknna", "procrustes": "netrep LinearMetric(alpha=1)",
                      "svcca": "ReSi cca.svcca", "pwcca": "ReSi cca.pwcca", "rsa": "rsatoolbox calc_rdm + compare",
                      "ridge": "similarity-repository ridge-…-r2-cv=5folds"}


def _bench_measures_cmd(args):
    rows = bench_measures(args.n or 2000, names=args.measures or None)
    print(f"{'measure':<11} {'12×12 map s':>11}  reference to time beside it")
    for r in rows:
        print(f"{r['measure']:<11} {r['seconds']:>11.2f}  {r['reference']}")
    if args.out:
        write_json(Path(args.out) / "bench_measures.json", rows)


STAND_IN_LAYOUTS = {"mae": lambda sd: {"model": sd},                       # the official releases' containers
                    "dino": lambda sd: {"teacher": {f"backbone.{k}": v for k, v in sd.items()}},
                    "mocov3": lambda sd: {"state_dict": {f"module.base_encoder.{k}": v for k, v in sd.items()}}}


def stand_in_checkpoints(folder, size: int = 224, dim: int = 64, depth: int = 4, seed: int = 0) -> list[Path]:
    """Three tiny random ViTs (patch 16, 2 heads) written as mae.pth, dino.pth and mocov3.pth in their official
    layouts, every LayerNorm perturbed so that no two models agree: what `bench --report` runs `report` on."""
    g, paths = torch.Generator().manual_seed(seed), []
    for name, wrap in STAND_IN_LAYOUTS.items():
        with torch.random.fork_rng(devices=[]):       # the initialisation's draws leave the global RNG as it was
            torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=g)))
            m = ViT(ViTConfig(img_size=size, embed_dim=dim, depth=depth, num_heads=2, mlp_hidden=4 * dim))
        sd = {k: v + 0.3 * torch.randn(v.shape, generator=g) if ".norm" in f".{k}" else v
              for k, v in m.state_dict().items()}
        paths.append(Path(folder) / f"{name}.pth")
        torch.save(wrap(sd), paths[-1])
    return paths


def bench_report(old: str | None = None, n: int = 256, size: int = 224, rounds: int = 1) -> dict:
    """Seconds of `report` on stand_in_checkpoints at n images (the synthetic set), by this file and, given an older
    ssl_repsim.py, by it on the same files: fresh processes, alternating, `rounds` times each; speedup = the old
    file's best time / this file's best."""
    import subprocess
    scripts = {"this": str(Path(__file__).resolve()), **({"old": str(Path(old).resolve())} if old else {})}
    times = {k: [] for k in scripts}
    with tempfile.TemporaryDirectory() as tmp:
        files = [str(p) for p in stand_in_checkpoints(tmp, size)]
        for r in range(rounds):
            for label, script in scripts.items():
                with step(f"bench --report: round {r + 1}/{rounds}, report by {label} ({Path(script).name})"):
                    t0 = time.perf_counter()
                    proc = subprocess.run([sys.executable, script, "report", *files, "--num-heads", "2", "--n",
                                           str(n), "--out", str(Path(tmp) / f"{label}{r}"), "--quiet"],
                                          capture_output=True, text=True, check=False)
                    times[label].append(time.perf_counter() - t0)
                if proc.returncode:
                    raise UsageError(f"bench --report: {script} exited {proc.returncode}: "
                                     f"{(proc.stderr.strip().splitlines() or [''])[-1]}")
    out = dict(n=n, size=size, rounds=rounds, this_s=times["this"], old=scripts.get("old"), old_s=times.get("old"))
    if old:
        out["speedup"] = min(times["old"]) / min(times["this"])
    return out


def _bench_report_cmd(args):
    r = bench_report(args.report or None, args.n or 256, rounds=args.rounds)
    print(f"report on 3 stand-ins (224 px, d = 64, depth 4) at n = {r['n']}: this file "
          + ", ".join(f"{t:.1f}" for t in r["this_s"]) + " s"
          + (f"; {r['old']} " + ", ".join(f"{t:.1f}" for t in r["old_s"]) + f" s: {r['speedup']:.2f}× faster "
             "(best against best)" if r["old"] else ""))
    if args.out:
        write_json(Path(args.out) / "bench_report.json", r)


def _cmd_bench(args):
    if args.rounds != 1 and args.report is None:
        raise UsageError("--rounds goes with --report")
    if args.report is not None:
        return _bench_report_cmd(args)
    if args.inference or args.measures is not None:
        return _bench_inference_cmd(args) if args.inference else _bench_measures_cmd(args)
    if args.data is not None:
        images = load_images(args.data, args.n, 0, False, workers=args.workers)
        models = _load_models(args) if args.models else None
        r = bench_data(images, models, args.batch_size, args.device)
        print(f"bench --data {args.data}: {r['n']} images, {r['workers']} decoding worker(s), shorter side "
              f"{r['target_side']} px, {r['device']}")
        print(f"  a plain DataLoader (decode + Pillow resize once): {r['baseline_decode_s']:.2f} s, "
              f"{r['baseline_img_s']:.0f} img/s")
        print(f"  ssl_repsim decoding:                              {r['decode_s']:.2f} s, {r['decode_img_s']:.0f} img/s")
        for m in r["models"]:
            print(f"  forward {m['spec']}: {m['forward_img_s']:.0f} img/s (decoded images in memory)")
        print(f"  cka of the {len(r['models'])} models end to end: {r['cka_s']:.2f} s, {r['cka_img_s']:.0f} img/s = "
              f"{r['cka_over_baseline']:.2f}× the plain DataLoader's decode time")
        if args.out:
            write_json(Path(args.out) / "bench_data.json", r)
        return
    if args.peer:
        rows = _bench_peer(device=args.device)
        print(f"{'n':>6} {'ssl_repsim s':>12} {'pytorch-cka s':>13} {'ratio':>6} {'extra GB ours/peer':>19} "
              f"{'err ours':>9} {'err peer':>9}")
        for r in rows:
            ours, peer = (f"{r[k]:.1e}" if k in r else "-" for k in ("ssl_repsim_err", "pytorch-cka_err"))
            print(f"{r['n']:>6} {r['ssl_repsim_s']:>12.2f} {r['pytorch-cka_s']:>13.2f} "
                  f"{r['ssl_repsim_s'] / r['pytorch-cka_s']:>6.2f} "
                  f"{r['ssl_repsim_extra_gb']:>9.2f}/{r['pytorch-cka_extra_gb']:<9.2f} {ours:>9} {peer:>9}")
        if args.out:
            write_json(Path(args.out) / "bench_peer.json", rows)
        return
    res = bench(args.full, args.device)
    print(f"\nssl_repsim bench on {res['gpu'] or 'CPU'} ({res['threads']} threads), torch {res['versions']['torch']}")
    print(f"matmul fp32: {res['matmul_gflops']:.0f} GFLOP/s")
    e = res["extraction"]
    print(f"ViT-B/16 extraction: {e['plain_img_s']:.1f} img/s plain, {e['hooked_img_s']:.1f} img/s with every block "
          f"output hooked (overhead {100 * e['hook_overhead']:+.1f}%)" +
          (f"; bf16 autocast {e['bf16_img_s']:.0f} img/s" if "bf16_img_s" in e else ""))
    r50 = res["extraction_resnet50"]
    print(f"ResNet-50 extraction: {r50['plain_img_s']:.1f} img/s plain ({r50['against']}), {r50['hooked_img_s']:.1f} "
          f"img/s with every block output hooked ({r50['hooked_over_plain']:.2f}× the plain rate)")
    print(f"{'n':>6} {'estimator':<10} {'form':<9} {'seconds':>8} {'floor s':>8} {'× floor':>8} {'err vs f64':>10}")
    for r in res["cka"]:
        err = f"{r['max_err_vs_float64']:.1e}" if r["max_err_vs_float64"] is not None else "-"
        print(f"{r['n']:>6} {r['estimator']:<10} {r['form']:<9} {r['seconds']:>8.2f} {r['floor_seconds']:>8.2f} "
              f"{r['x_floor']:>8.2f} {err:>10}")
    if args.out:
        write_json(Path(args.out) / "bench.json", res)


# --- the parser: each subcommand declares its own options, shows their defaults and ends with examples ---------

class ArgParser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _device_arg(text: str) -> str:
    """--device, checked before any work (as_device's rules)."""
    try:
        as_device(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _jobs_arg(text: str) -> int | None:
    """--jobs: auto (None) or a whole number of processes, 1 – 256."""
    return None if text == "auto" else _ranged(int, 1, 256)(text)


def _ranged(kind, lo=None, hi=None, bounds: str = "[]"):
    """An argparse type: a `kind` number within the range, else a one-line error before any work."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") \
                from None
        try:
            return in_range("value", value, lo, hi, bounds)
        except UsageError:
            raise argparse.ArgumentTypeError(f"must lie in {_range_text(lo, hi, bounds)}, got {text}") from None
    parse.__name__ = kind.__name__
    return parse


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each option's default after its help (where it has one worth showing); descriptions and examples as written."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = action.default not in (None, False, argparse.SUPPRESS)
        if action.option_strings and shown and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


# flag name → (option strings, argparse keywords): the options a subcommand can declare
FLAGS: dict[str, tuple[tuple[str, ...], dict]] = {
    "weights_dir": (("--weights-dir",), dict(help="checkpoint folder (default: weights/ beside ssl_repsim.py, or "
                                                  "$SSL_REPSIM_WEIGHTS)")),
    "offline": (("--offline",), dict(action="store_true", help="never download: registered names must be in the "
                                                             "weights dir, hub ids in the Hugging Face cache (as "
                                                             "HF_HUB_OFFLINE=1)")),
    "family": (("--family",), dict(help="override layout detection: " + ", ".join(
        f for f in FAMILIES if f not in ("unknown", "ssl_repsim")))),
    "num_heads": (("--num-heads",), dict(type=_ranged(int, 1, 1024), help="attention heads, where neither the file's config nor the "
                                                        "registry says")),
    "act": (("--act",), dict(choices=list(ACTIVATIONS), help="MLP activation, where the file's config does not say "
                                                             "(open_clip state dicts: gelu, or quick_gelu for OpenAI "
                                                             "weights)")),
    "img_size": (("--img-size",), dict(type=_ranged(int, 1, 4096), help="input size, 1–4096 (default: the "
                                                                          "model's own, e.g. 224)")),
    "data": (("--data",), dict(default="synthetic", help="image folder (class sub-folders = labels), tensor file "
                                                         "(.pt/.npy/.npz/.safetensors with images [N,3,H,W] and "
                                                         "labels) or 'synthetic'")),
    "n": (("--n", "--num-images"), dict(dest="n", type=_ranged(int, 1), help="number of images (a fixed subset by --seed; "
                                        "synthetic: default 256). Under torchrun write --num-images: torchrun takes "
                                        "--n for its own --nnodes")),
    "strict": (("--strict",), dict(action="store_true", help="unreadable images are an error instead of skipped")),
    "workers": (("--workers",), dict(type=_ranged(int, 0, USABLE_CPUS), default=min(8, USABLE_CPUS),
                                     help=f"image-decoding processes, with prefetch (0 = in this process; at most the "
                                          f"{USABLE_CPUS} CPUs this process may use)")),
    "val": (("--val",), dict(help="validation data (default: --val-fraction of --data)")),
    "val_fraction": (("--val-fraction",), dict(type=_ranged(float, 0, 1, "()"), default=0.2, help="share of --data held out when no "
                                                                             "--val is given")),
    "batch_size": (("--batch-size",), dict(type=_ranged(int, 1, 65536), default=32, help="images per forward pass")),
    "seed": (("--seed",), dict(type=_ranged(int, *SEED_RANGE), default=0, help="seed of every random choice (subsets, "
                                                                               "splits, inits), 0 – 2⁶³−1")),
    "device": (("--device",), dict(type=_device_arg, help="cpu, cuda, cuda:1 ... (default: cuda when available)")),
    "dtype": (("--dtype",), dict(choices=["float32", "bfloat16", "float16"], help="autocast dtype for the forward "
                                                                                 "pass (default: float32)")),
    "cache_dir": (("--cache",), dict(dest="cache_dir", nargs="?", const=".cache/ssl_repsim", metavar="DIR",
                                     help="feature cache folder (.cache/ssl_repsim when given without DIR): a second "
                                          "run on the same models, data, points and tokens costs no forward pass")),
    "out": (("--out",), dict(help="output folder (default: results/<command>-<models>-<time>/)")),
    "points": (("--points",), dict(default="blocks", help="blocks (residual stream after each block) | sublayers "
                                                          "(the paper's 9 per block) | all | a comma list such as "
                                                          "blocks.0.attn,blocks.0.norm1; a CNN's by module path "
                                                          "(layer3.4, stages.2.11), also stages | stem")),
    "quiet": (("--quiet",), dict(action="store_true", help="no progress or notices on stderr")),
    "debug": (("--debug",), dict(action="store_true", help="full tracebacks")),
}
MODEL_FLAGS = ("weights_dir", "offline", "family", "num_heads", "act", "img_size")
DATA_FLAGS = ("data", "n", "strict", "workers")
ALWAYS = ("quiet", "debug")


def _add_flags(p, *names, **overrides):
    """Add the named FLAGS to parser p (overrides: {name: {argparse keyword: value}})."""
    if set(overrides) - set(names):
        raise ValueError(f"overrides for flags not added: {sorted(set(overrides) - set(names))}")
    for name in names:
        strings, kw = FLAGS[name]
        p.add_argument(*strings, **{**kw, **overrides.get(name, {})})


def _add_dataclass_flags(p, cls, names=None, presets: dict | None = None):
    """One flag per field of a dataclass whose metadata holds its help (and choices): --field-name. With
    `presets` ({name: {field: value}}), flags default to None (unset: the chosen preset's value) and their help
    lists each preset's value."""
    for f in dataclasses.fields(cls):
        if (names is not None and f.name not in names) or "help" not in f.metadata:
            continue
        flag, text = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if presets is not None:
            values = {k: v.get(f.name, f.default) for k, v in presets.items()}
            if len(set(map(repr, values.values()))) > 1:
                text += " [" + "; ".join(f"{k}: {v!r}" for k, v in values.items()) + "]"
            kind = type(f.default)
            if isinstance(f.default, bool):
                p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
            else:
                kind = _ranged(kind, *f.metadata["range"]) if "range" in f.metadata else kind
                p.add_argument(flag, type=kind, default=None, help=text + " (default: the recipe's)")
        elif isinstance(f.default, bool):
            p.add_argument(("--no-" + f.name.replace("_", "-")) if f.default else flag, dest=f.name,
                           action="store_false" if f.default else "store_true", help=text)
        else:
            kind = type(f.default) if f.default is not None else str
            kind = _ranged(kind, *f.metadata["range"]) if "range" in f.metadata else kind
            p.add_argument(flag, type=kind, default=f.default, help=text,
                           **({"choices": f.metadata["choices"]} if "choices" in f.metadata else {}))


def _examples(*lines) -> str:
    return "examples:\n" + "\n".join(f"  python ssl_repsim.py {ln}" for ln in lines)


def _subcommand(sub, name, fn, summary, description, examples):
    p = sub.add_parser(name, help=summary, description=textwrap.fill(description, 100),
                       epilog=_examples(*examples), formatter_class=_HelpFormatter)
    p.set_defaults(fn=fn)
    return p


def _add_cka_command(sub):
    p = _subcommand(sub, "cka", _cmd_cka, "CKA maps between every layer of two or more models",
                    "CKA (Kornblith et al. 2019) between every layer pair of two or more models, and the model×model "
                    "matrix at --model-point. Writes cka.json, cka.csv, cka.png; with --measures, every measure's "
                    "maps with intervals, permutation p-values and calibrated scores in cka.json, measures.csv and "
                    "measure-<name>.png.",
                    ["cka mae dino", "cka mae.pth moco.pth.tar --data ~/imagenet/val --n 1024 --points sublayers",
                     "cka mae dino dinov2 --estimator minibatch --model-point blocks.5",
                     "cka mae dino --tokens cls --n 512 --measures cka,mknn,cknna,procrustes,svcca,pwcca,rsa,ridge"])
    p.add_argument("models", nargs="+", help="two or more models: registered names, checkpoint files or HF folders")
    _add_flags(p, "points")
    _add_dataclass_flags(p, AnalysisOptions, ("tokens", "estimator", "ci", "ci_resamples"))
    p.add_argument("--kernel", default="linear", choices=["linear", "rbf"], help="linear or RBF kernel")
    p.add_argument("--rbf-threshold", type=_ranged(float, 0, 100, "(]"), default=1.0, help="RBF bandwidth as a fraction of the median "
                   "distance (0.2 .. 1.0 in the paper)")
    p.add_argument("--model-point", help="point of the model×model matrix (3+ models): last (default), first, or a "
                   "name such as blocks.5")
    p.add_argument("--align", action="store_true", help="feature files: match their rows by sample id (default: "
                                                         "they must hold the same ids in the same order)")
    p.add_argument("--measures", help=f"similarity measures beside the CKA map, a comma list of {', '.join(MEASURES)} "
                                      "or all: each with intervals over images, permutation p-values and calibrated "
                                      "scores")
    p.add_argument("--permutations", type=_ranged(int, 0, 100000), default=200,
                   help="permutations of the null behind each measure's p-value and calibrated score (0 = none)")
    p.add_argument("--null", choices=NULLS, default="moments",
                   help="CKA's null against no relation: moments = the permutation distribution's exact mean, variance "
                        "and skewness (a Pearson III; debiased CKA; default), exact = --permutations permutations")
    _add_flags(p, *MODEL_FLAGS, *DATA_FLAGS, "batch_size", "seed", "device", "dtype", "cache_dir", "out", *ALWAYS)
    p = _subcommand(sub, "extract", _cmd_extract, "features of one model at named points, to a file",
                    "Extract one model's features at --points (with --tokens) on --data into a safetensors feature "
                    "file: {point: (n, d)} (with --tokens all or patch (n, T, d): a CNN's feature map as its H·W positions), the labels, the sample ids (the path in the folder and the file's "
                    "sha256 prefix, or row indices) and the metadata cka records. cka takes feature files in place of models (ours, or "
                    "any .safetensors / .npz / .pt holding {point: (n, d)} and sample_ids).",
                    ["extract mae --data ~/imagenet/val --n 1024 --points sublayers --out mae.safetensors",
                     ("extract dino --data val/ --tokens cls --out dino.safetensors && "
                      "python ssl_repsim.py cka mae.safetensors dino.safetensors")])
    p.add_argument("model", help="a registered name, checkpoint file, model folder or hub id")
    _add_flags(p, "points")
    _add_dataclass_flags(p, AnalysisOptions, ("tokens",))
    _add_flags(p, *MODEL_FLAGS, *DATA_FLAGS, "batch_size", "seed", "device", "dtype", *ALWAYS)
    p.add_argument("--out", help="the feature file to write (.safetensors; default features-<model>.safetensors)")


def _add_registry_commands(sub):
    p = _subcommand(sub, "list", _cmd_list, "registered checkpoints and which are present",
                    "Every registered checkpoint: family, objective, heads, normalisation, resize, the published "
                    "linear-eval representation, whether it is in the weights folder, aliases.",
                    ["list", "list --weights-dir /data/checkpoints"])
    _add_flags(p, "weights_dir", *ALWAYS)
    p = _subcommand(sub, "download", _cmd_download, "fetch registered checkpoints into the weights dir",
                    "Download registered checkpoints (verified against the published digest where there is one).",
                    ["download mae dino", "download dinov2-vitb14-reg --weights-dir /data/checkpoints"])
    p.add_argument("names", nargs="+", help="registered names or aliases (see `list`)")
    _add_flags(p, "weights_dir", *ALWAYS)
    p = _subcommand(sub, "replot", _cmd_replot, "redraw a run's figures from its JSON alone",
                    "Redraws every figure of a report or analysis --out folder from the figure data its JSON holds "
                    "(no model, no data, no recomputation).", ["replot results/report-mae-dino-20261206-120000",
                                                                "replot results/invariance-dino-20261206-120000"])
    p.add_argument("folder", help="a report or analysis --out folder")
    _add_flags(p, *ALWAYS)
    p = _subcommand(sub, "bench", _cmd_bench, "extraction and CKA speed on this machine, against the FLOP floor",
                    "Measures the matmul rate, ViT-B/16 extraction with and without hooks, and 12×12 all-pairs CKA "
                    "(d=768) for each estimator. Quick by default (n=1k).",
                    ["bench", "bench --full --out results/bench", "bench --data ~/imagenet/val --n 2000 --models mae dino",
                     "bench --peer", "bench --measures --n 2000", "bench --inference --n 2000",
                     "bench --report old/ssl_repsim.py --rounds 2"])
    p.add_argument("--full", action="store_true", help="n = 1k, 5k, 10k and larger batches")
    p.add_argument("--measures", nargs="?", const="", help="time each measure's 12 × 12 map (d = 768, n = --n, "
                   "default 2000) beside the reference implementation it was checked against; a comma list to time "
                   "some")
    p.add_argument("--inference", action="store_true", help="a 12×12 debiased CKA map (d = 768, n = --n, default "
                   "2000) bare, with intervals, with the defaults (and the analytic null) and with the exact null, "
                   "each null against its floor (with --full also 108×108 at n = 500)")
    p.add_argument("--data", help="an image folder: time decoding against a plain DataLoader, each model's forward "
                                  "pass and the whole cka run")
    p.add_argument("--report", nargs="?", const="", metavar="OLD_FILE",
                   help="time `report` on three tiny stand-ins (224 px, d = 64, depth 4; n = --n, default 256), and "
                        "given an older ssl_repsim.py the same with it, alternating in fresh processes")
    p.add_argument("--rounds", type=_ranged(int, 1, 100), default=1, help="with --report: runs of each file")
    p.add_argument("--models", nargs="*", default=[], help="with --data: the models to run (default: two tiny "
                                                          "random ViTs, so that decoding dominates)")
    _add_flags(p, "n", "workers", "batch_size", "weights_dir", "offline", "family", "num_heads", "act", "img_size")
    p.add_argument("--peer", action="store_true", help="debiased 12×12 maps side by side with pytorch-cka "
                   "(pip install pytorch-cka) at n = 1k, 2k, 4k, 10k: time, memory, error vs float64")
    _add_flags(p, "device", "out", *ALWAYS, out={"help": "also write bench.json here"})


def _add_probe_commands(sub):
    for name, fn, summary, examples in (
            ("probe", _cmd_probe, "per-layer linear (or MLP) probes",
             ["probe dino --data train/ --val val/", "probe mae --data imagenet.npz --method mae --epochs 90",
              "probe dinov2 --data train/ --method mlp --depth 3"]),
            ("knn", _cmd_knn, "per-layer weighted k-NN (DINO protocol)",
             ["knn dino --data train/ --val val/", "knn mae dino --data train/ --k 10 --tokens mean"])):
        p = _subcommand(sub, name, fn, summary, summary[0].upper() + summary[1:] + ". Labels come from class "
                        "sub-folders or the tensor file's 'labels'; --val gives a validation set, else a "
                        "deterministic split.", examples)
        p.add_argument("models", nargs="+", help="registered names, checkpoint files or HF folders")
        _add_flags(p, "points")
        p.add_argument("--tokens", choices=("flat", "cls", "mean", "official"), help="token reduction of the per-block "
                       "curves (default: cls; mean for models without cls); the model's published representation "
                       "(official) is probed beside them")
        if name == "probe":
            p.add_argument("--method", default="lbfgs", choices=["lbfgs", "mae", "mlp"],
                           help="lbfgs: logistic regression, weight decay chosen on held-out train data; mae: BN + "
                                "LARS + cosine (MAE protocol); mlp: MLP head (--depth)")
            p.add_argument("--depth", type=_ranged(int, 1, 16), default=2, help="MLP probe depth (the paper: 1-4)")
            p.add_argument("--epochs", type=_ranged(int, 1, 100000), default=90, help="epochs for --method mae/mlp")
        else:
            p.add_argument("--k", type=_ranged(int, 1), help="neighbours: at most the training images (default: 20, "
                                                              "or all training images when fewer, said)")
            p.add_argument("--temperature", type=_ranged(float, 0, 100, "(]"), default=0.07,
                           help="vote weight exp(similarity / T), T in (0, 100]")
        _add_flags(p, *MODEL_FLAGS, *DATA_FLAGS, "val", "val_fraction", "batch_size", "seed", "device", "dtype",
                   "cache_dir", "out", *ALWAYS)


def _add_finetune_command(sub):
    presets = {name: {**finetune_recipe(name).__dict__} for name in RECIPES}
    p = _subcommand(sub, "finetune", _cmd_finetune, "fine-tune one model end to end (published recipes)",
                    "Fine-tune one model end to end (MAE's loop: layer-wise lr decay, warmup + half-cycle cosine, "
                    "drop path, label smoothing, mixup/cutmix, RandAugment, RandomErasing) with a published recipe: "
                    "--recipe mae (MAE FINETUNE.md; ViT-B/L/H rows by width), beit (BEiT-base, ImageNet-1k), deit "
                    "(DeiT-B), or quick (a CPU-sized run, the default). Flags override the recipe's values; "
                    "log.json records the recipe and every resolved value. Writes into --out after every epoch: "
                    "checkpoint.safetensors (weights, head, pooling; loadable by every command), train_state.pt "
                    "(optimizer and the run's identity, for --resume) and log.json (history and settings). An --out "
                    "holding a run is refused unless --resume or --overwrite.",
                    ["finetune mae --recipe mae --data train/ --val val/ --out runs/mae-ft",
                     "finetune mae --recipe mae --data train/ --val val/ --out runs/mae-ft --resume",
                     "finetune dino --data train/ --epochs 10 --mixup 0.8 --cutmix 1.0"])
    p.add_argument("model", help="a registered name, checkpoint file, model folder or hub id")
    p.add_argument("--recipe", choices=list(RECIPES), default="quick", help="published hyperparameters to start from")
    _add_dataclass_flags(p, FinetuneConfig, presets=presets)
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    _add_flags(p, *MODEL_FLAGS, *DATA_FLAGS, "val", "val_fraction", "device", "dtype", "out", *ALWAYS)


_ANALYSIS_EXAMPLES = {
    "gap": ["gap mae dino", "gap mae.pth dino.pth --data ~/imagenet/val --n 512 --estimator minibatch"],
    "info": ["info mae dino", "info mae dino --data train/ --epochs 100"],
    "invariance": ["invariance mae dino", "invariance dinov2 --data ~/imagenet/val --n 512"],
    "attention": ["attention mae dino", "attention mae --mae-mask-ratio 0.75"],
    "spatial": ["spatial mae dino", "spatial ibot --n 128"],
    "weights": ["weights mae mae-ft", "weights dino runs/dino-ft/checkpoint.safetensors"],
    "agreement": ["agreement mae-ft runs/dino-ft/checkpoint.safetensors --data val/",
                  "agreement deit runs/mae-ft/checkpoint.safetensors --data val/"],
}


def _add_analysis_commands(sub):
    for name, a in ((n, a) for n, a in ANALYSES.items() if a.command):
        p = _subcommand(sub, name, _cmd_analysis, a.help, a.help[0].upper() + a.help[1:] + ".",
                        _ANALYSIS_EXAMPLES[name])
        p.add_argument("models", nargs="+", help=f"{a.min_models} or more models" if a.min_models > 1 else "models")
        _add_analysis_flags(p, a.options, data=name != "weights")
    p = _subcommand(sub, "report", _cmd_analysis, "run every analysis and write report.md + report.json",
                    "Run every analysis (" + ", ".join(ANALYSES) + ") and write report.md with figures and "
                    "readings, and report.json with every number.",
                    ["report mae dino", "report mae dino dinov2 --data ~/imagenet/val --n 1024 --cache",
                     "report mae mae-ft dino --skip attention,spatial"])
    p.add_argument("models", nargs="+", help="models (overview, gap, weights and agreement need at least two)")
    _add_analysis_flags(p, sorted({o for a in ANALYSES.values() for o in a.options}), data=True)
    p.add_argument("--skip", help="comma list of analyses to leave out: " + ",".join(ANALYSES))
    p.add_argument("--labels", help="comma list of short names, one per model, for report.md's tables and readings "
                                    "(default: a registered name as it is, a file's stem, made unique)")
    p.add_argument("--jobs", type=_jobs_arg, default=None, metavar="N|auto",
                   help="analyses run at once, in forked processes of one thread each (default auto: one per CPU where "
                        f"the forward passes ahead are estimated under {FORK_BELOW_FORWARD_S:.0f} s, timed here, and "
                        "no --cache is given, else 1; always 1 on a GPU, under torchrun or off Linux). The numbers do "
                        "not depend on it")


def _add_analysis_flags(p, options, data: bool):
    own = [o for o in options if o in {f.name for f in dataclasses.fields(AnalysisOptions)} and o not in FLAGS]
    _add_dataclass_flags(p, AnalysisOptions, own)
    shared = [o for o in ("batch_size", "seed", "device", "dtype", "cache_dir") if o in options
              or (o == "seed" and data)]   # data subsets are drawn by --seed
    _add_flags(p, *MODEL_FLAGS, *(DATA_FLAGS if data else ()), *shared, "out", *ALWAYS)


def build_parser() -> argparse.ArgumentParser:
    ap = ArgParser(prog="ssl_repsim.py", description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
                   formatter_class=argparse.RawDescriptionHelpFormatter,
                   epilog="Models: a registered name (see `list`), a checkpoint file in its official layout, or a "
                          "Hugging Face directory. `python ssl_repsim.py COMMAND --help` shows each command's "
                          "options and examples.\n\n" + _examples("cka mae dino", "probe dino --data train/ --val val/",
                                                                 "report mae dino"))
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=ArgParser)
    sub.required = True
    _add_cka_command(sub)
    _add_probe_commands(sub)
    _add_finetune_command(sub)
    _add_analysis_commands(sub)
    _add_registry_commands(sub)
    return ap


def init_distributed(args) -> bool:
    """Under torchrun (WORLD_SIZE > 1): join the process group (nccl on CUDA, gloo on CPU), pin this rank's GPU,
    and keep stdout/stderr for rank 0."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch.distributed as dist
    cuda = torch.cuda.is_available() and not str(getattr(args, "device", "") or "").startswith("cpu")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if hasattr(args, "device"):
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    dist.init_process_group("nccl" if cuda else "gloo")
    if dist.get_rank() != 0:
        args.quiet = True
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - stays open for the life of this rank
    return True


HEARTBEAT_SECONDS = 2.0   # the longest a command stays silent on stderr while it works


class _TimedStream:
    """A text stream that remembers when it was last written to (the heartbeat's clock). On a terminal the heartbeat
    line is rewritten in place and erased before the next text."""

    def __init__(self, stream):
        self.stream, self.last, self.pending = stream, time.monotonic(), False
        self.tty = bool(getattr(stream, "isatty", lambda: False)())

    def write(self, s):
        self.last = time.monotonic()
        if self.pending:
            self.stream.write("\r\x1b[K")
            self.pending = False
        return self.stream.write(s)

    def beat(self, text: str):
        self.write(f"\r\x1b[K{text}" if self.tty else text + "\n")
        self.pending = self.tty
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextlib.contextmanager
def _heartbeat(enabled: bool):
    """While a command runs, a line on stderr whenever it has been silent for HEARTBEAT_SECONDS: the step in progress
    (the innermost `step`) and how long it has run, so no stretch of work is silent for longer."""
    if not enabled:
        yield
        return
    stream, stop, t0, every = _TimedStream(sys.stderr), threading.Event(), time.monotonic(), HEARTBEAT_SECONDS
    sys.stderr = stream

    def beat():
        while not stop.wait(every / 8):
            if time.monotonic() - stream.last >= every:
                label, start = _STEPS[-1] if _STEPS else ("working", t0)
                with _HEARTBEAT_LOCK:
                    stream.beat(f"… {label.strip()} ({time.monotonic() - start:.0f} s)")
    thread = threading.Thread(target=beat, daemon=True, name="ssl_repsim-heartbeat")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        sys.stderr = stream.stream


class _StderrHandler(logging.Handler):
    """Each record as one line on whatever sys.stderr is when it is emitted."""

    def emit(self, record):   # one write per line: lines of forked processes never interleave mid-line
        sys.stderr.write(self.format(record) + "\n")
        sys.stderr.flush()


@contextlib.contextmanager
def _cli_logging(quiet: bool):
    """The `ssl_repsim` logger prints on stderr for the duration of a command: notices and announcements, or with
    --quiet nothing below an error."""
    handler, level, propagate = _StderrHandler(), log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.ERROR if quiet else logging.INFO)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM (a job scheduler's kill) unwinds like Ctrl-C, so partial downloads and temp files are removed."""
    import signal
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv=None) -> int:
    """The command line: `python ssl_repsim.py COMMAND ...` (argv without the program name); returns the exit code."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser().parse_args(argv)
    args.command = " ".join(["ssl_repsim.py", *argv])
    points = getattr(args, "points", None)
    if isinstance(points, str) and "," in points and len(set(points.split(","))) < len(points.split(",")):
        build_parser().error(f"--points {points}: a point named more than once")
    distributed, as_flags = False, _AS_FLAGS.set(True)   # messages name --flags, not parameters
    try:
        distributed = init_distributed(args)
        with _cli_logging(args.quiet), _terminate_as_interrupt(), _heartbeat(not args.quiet):
            t0 = time.perf_counter()
            with feature_session():   # one forward per model and image set, where the features fit in memory
                args.fn(args)
            log.info(f"{argv[0]}: done in {time.perf_counter() - t0:.1f} s")   # every command ends with its time
        return 0
    except UsageError as e:
        if getattr(args, "debug", False):
            raise
        print(f"ssl_repsim: error: {_one_line(e)}", file=sys.stderr)   # _one_line redacts tokens
        return 2
    except BrokenPipeError:  # output piped into head & co.
        with contextlib.suppress(Exception):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the process is about to exit
        return 0
    except KeyboardInterrupt:
        print("ssl_repsim: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if getattr(args, "debug", False):
            raise
        print(f"ssl_repsim: internal error: {type(e).__name__}: {_one_line(e)[:300]} (rerun with --debug for the "
              "traceback; please report it)", file=sys.stderr)
        return 1
    finally:
        _AS_FLAGS.reset(as_flags)
        if distributed:
            import torch.distributed as dist
            dist.destroy_process_group()


def _exit_now(code: int):
    """End the process with `code` once stdout and stderr are flushed, skipping the interpreter's teardown (about a
    second with torch's modules loaded): every result is written and closed, and child processes joined, by then."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except BrokenPipeError:   # output piped into head & co.: what was read is all that was wanted
            pass
        except (OSError, ValueError):   # output lost (a full disk): Python's own exit would say 120
            code = code or 120
    os._exit(code)


if __name__ == "__main__":
    _exit_now(main())
