"""Task metrics from predictions: accuracy, macro-F1, Matthews correlation; perplexity."""

from __future__ import annotations

import math

import torch


def confusion_matrix(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[true, predicted]`` counts."""
    flat = targets.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_metrics(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Accuracy, macro-F1 (mean over classes present in targets or predictions) and
    multi-class Matthews correlation (Gorodkin's R_K), all in [0, 1] except MCC in [−1, 1]."""
    cm = confusion_matrix(predictions, targets, num_classes).double()
    total = cm.sum()
    correct = cm.diag().sum()
    true_per_class, predicted_per_class = cm.sum(1), cm.sum(0)
    present = (true_per_class + predicted_per_class) > 0
    f1 = 2 * cm.diag() / (true_per_class + predicted_per_class).clamp(min=1)
    covariance = correct * total - (true_per_class * predicted_per_class).sum()
    denominator = math.sqrt(
        float(total**2 - (predicted_per_class**2).sum()) * float(total**2 - (true_per_class**2).sum())
    )
    return {
        "accuracy": float(correct / total),
        "macro_f1": float(f1[present].mean()),
        "mcc": float(covariance) / denominator if denominator > 0 else 0.0,
    }


def language_model_metrics(total_loss: float, total_tokens: int) -> dict[str, float]:
    """Token-mean cross-entropy and its perplexity."""
    loss = total_loss / total_tokens
    return {"perplexity": math.exp(loss), "loss": loss}
