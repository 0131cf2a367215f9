"""RankFeat (Song, Sebe & Wang, "RankFeat: Rank-1 Feature Removal for Out-of-distribution Detection", NeurIPS 2022):
the spec ``rankfeat[@<iterations>=0]``, which removes the top singular component of a ResNet's last two stages'
feature maps before pooling, scored with ``energy``.

Checked against OpenOOD v1.5 (Jingkang50/OpenOOD ``openood/postprocessors/rankfeat_postprocessor.py``,
``RankFeatPostprocessor.postprocess`` and ``power_iteration``, with ``configs/postprocessors/rankfeat.yml``:
``accelerate: False``, ``temperature: 1``), which is the authors' KingJamesSong/RankFeat ``test_ood_resnetv2.py``
(``iterate_data_rankfeat``) on OpenOOD's ResNets:

* block 4: the last stage's output X (B, C, H, W), viewed per sample as a C × HW matrix, becomes X − s₁u₁v₁ᵀ (its
  top singular value and vectors, ``torch.linalg.svd``); average-pooled and classified: logits₁;
* block 3: the last stage's input (the output of the stage before) loses its top singular component likewise and
  runs through the last stage: logits₂;
* the score is T · logsumexp(((logits₁ + logits₂) / 2) / T) with temperature T = 1: ``rankfeat`` with the score
  ``energy`` (``energy@<T>`` for another temperature); the prediction is the argmax of the mean logits.
* ``accelerate: True`` replaces the SVD by 20 steps of power iteration (``power_iteration(A, iter=20)``) started from
  normal vectors drawn from torch's global generator on the CPU: ``rankfeat@20`` here (``rankfeat@<iterations>``,
  drawn the same way: its result varies with the seed, ``seed_everything``, and between DDP processes);
  ``rankfeat`` (= ``rankfeat@0``) is the config's default, the exact SVD.

Blocks: OpenOOD's ``intermediate_forward(x, layer_index=4)`` is the output of ``layer4``, its ResNets' last stage, and
``layer_index=3`` that of ``layer3``, which is ``layer4``'s input. Here block 4 is the last stage, the direct child
``layer<N>`` with the largest N (``ash_lightning.shaping.hooks.last_stage``), and block 3 its input, the output of
``layer<N-1>``: ``layer3``/``layer4`` in timm's and torchvision's ResNets and ``openood_resnet18_32x32``/``_224x224``;
``layer2``/``layer3`` in the CIFAR ResNets ``cifar_resnet20``..``56``, which have three stages.

Attached (``StageShaper``), the last stage's output becomes the mean of the two branches' maps: average pooling and
the linear classifier are affine, so its logits are OpenOOD's mean logits (to rounding) and its penultimate features,
which feature detectors read, the mean of the two branches' pooled features. A backbone without ResNet stages, with a
global pooling that is not an average or a classifier that is not an ``nn.Linear`` is refused before any pass, a
feature map that is not 4-D at the first batch. The maps are decomposed in float32 (or wider) and cast back.

In a sweep (``ash_lightning.shaping.sweep``, split point ``"stage"``) the backbone runs once per batch up to the last
stage's input, which every setting shares; the last stage runs once for all other settings and once more per
``rankfeat`` setting (its block-3 branch). The feature cache, which stores the classifier's input, is refused with
``rankfeat`` (``ash_lightning.module``). It needs no ID data, so no fit pass and no calibration cache.

Code and paper: the fusion of blocks 3 and 4 is what OpenOOD and the authors' script run (the paper also studies
single blocks). The authors' script, on BiT's pre-activation ResNetv2, applies that network's head (a norm and ReLU,
then pooling) to each branch; OpenOOD's post-activation ResNets, like the backbones here, only pool, as done here.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import Tensor

from ash_lightning._registry import SpecParam, parse_params
from ash_lightning.shaping.functional import accumulation_dtype
from ash_lightning.shaping.hooks import StageShaper
from ash_lightning.shaping.specs import register_shaping

__all__ = ["power_iteration_top", "rank1_removed", "svd_top"]

EPS = 1e-10  # added to the norms in power iteration, as OpenOOD's _l2normalize


@contextlib.contextmanager
def _one_thread_on_cpu(a: Tensor) -> Iterator[None]:
    """torch's intra-op threads set to 1 while a CPU tensor ``a`` is decomposed, then restored. A batched CPU
    ``torch.linalg.svd`` splits the batch over the threads and each LAPACK call threads again: on 2 cores a batch of
    500 64×64 maps took 4.5 s with 2 threads and 0.17 s with 1; 64 2048×49 maps 0.90 s against 0.10 s."""
    threads = torch.get_num_threads()
    if a.device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def svd_top(a: Tensor) -> Tensor:
    """s₁u₁v₁ᵀ per matrix of ``a`` (B, M, N): its top singular component, from ``torch.linalg.svd`` (on one thread
    on the CPU: ``_one_thread_on_cpu``)."""
    with _one_thread_on_cpu(a):
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return s[:, :1, None] * (u[:, :, :1] @ vh[:, :1, :])


def _unit_rows(x: Tensor) -> Tensor:
    """``x`` (B, 1, L) divided by its norm along the last axis plus ``EPS``."""
    return x / (x.norm(dim=2, keepdim=True) + EPS)


def power_iteration_top(a: Tensor, iterations: int) -> Tensor:
    """σuvᵀ per matrix of ``a`` (B, M, N) after ``iterations`` steps of power iteration (v ← normalised uᵀA,
    u ← normalised Av, σ = uᵀAv), from u (M,) then v (N,) drawn normal on the CPU by torch's global generator and
    shared by the B matrices."""
    b, m, n = a.shape
    u = torch.empty(1, m).normal_(0, 1).view(1, 1, m).expand(b, 1, m).to(a)
    v = torch.empty(n, 1).normal_(0, 1).view(1, n, 1).expand(b, n, 1).to(a)
    for _ in range(iterations):
        v = _unit_rows(u @ a).transpose(1, 2)
        u = _unit_rows((a @ v).transpose(1, 2))
    sigma = u @ a @ v
    return sigma * (u.transpose(1, 2) @ v.transpose(1, 2))


def rank1_removed(x: Tensor, iterations: int = 0) -> Tensor:
    """RankFeat on one feature map ``x`` (B, C, H, W): each sample's C × HW matrix minus its top singular component,
    from the SVD (``iterations=0``) or that many power-iteration steps; computed in float32 or wider."""
    b, c, h, w = x.shape
    a = x.reshape(b, c, h * w).to(accumulation_dtype(x.dtype))
    top = svd_top(a) if iterations == 0 else power_iteration_top(a, iterations)
    return (a - top).view(b, c, h, w).to(x.dtype)


@register_shaping("rankfeat", "rankfeat[@<iterations>=0]")
def _rankfeat_factory(*args: str) -> StageShaper:
    """RankFeat (Song, Sebe & Wang, "RankFeat: Rank-1 Feature Removal for Out-of-distribution Detection", NeurIPS
    2022): X − s₁u₁v₁ᵀ per sample on the last stage's output and on its input
    (then run through the last stage), logits of the two averaged; SVD, or power iteration with <iterations> steps
    (OpenOOD openood/postprocessors/rankfeat_postprocessor.py)."""
    values = parse_params("rankfeat", args, [SpecParam("iterations", int, optional=True)])
    iterations = int(values[0]) if values else 0
    if iterations < 0:
        raise ValueError(
            f"<iterations>={iterations} is not a step count; pass 0 for the SVD (rankfeat) or a positive number of "
            "power-iteration steps, e.g. rankfeat@20"
        )
    spec = "rankfeat" if iterations == 0 else f"rankfeat@{iterations}"
    return StageShaper(functools.partial(rank1_removed, iterations=iterations), spec, (float(iterations),))
