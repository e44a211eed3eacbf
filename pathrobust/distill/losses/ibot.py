"""iBOT loss on patch tokens at masked positions (DINOv2 ``ibot_patch_loss.forward_masked``).

In distillation the student sees the unmasked crop; the mask only selects where the loss
is taken. Each image's loss is the mean over its masked positions; images are then
averaged over *all* global-crop images, those without a mask contributing zero."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ibot_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, masks: torch.Tensor,
              student_temp: float = 0.1) -> torch.Tensor:
    """Masked-token cross-entropy.

    Args:
        student_logits: ``(M, K)`` student logits at the masked positions, in the order of
            ``masks.flatten()`` (row-major over images then positions).
        teacher_probs: ``(M, K)`` centred teacher targets at the same positions.
        masks: ``(I, N)`` bool, I global-crop images x N patch positions; ``M = masks.sum()``.
        student_temp: student softmax temperature.

    Returns:
        Scalar: ``(1/I) * sum_i mean_{p in mask_i} CE(teacher_ip, student_ip)``.
    """
    n_images = masks.shape[0]
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    ce = -(teacher_probs * F.log_softmax(student_logits.float() / student_temp, dim=-1)).sum(-1)  # (M,)
    per_image_count = masks.sum(-1).clamp(min=1).float()  # (I,)
    weights = (1.0 / per_image_count)[:, None].expand_as(masks)[masks]  # (M,)
    return (ce * weights).sum() / n_images
