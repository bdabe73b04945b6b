import math

import pytest
import torch

from safefreeze.training.metrics import classification_metrics, language_model_metrics


def test_perfect_predictions():
    y = torch.tensor([0, 1, 2, 2, 1])
    assert classification_metrics(y, y, 3) == {"accuracy": 1.0, "macro_f1": 1.0, "mcc": 1.0}


def test_binary_values_by_hand():
    # targets 1 1 1 0 0, predictions 1 1 0 0 1: TP 2, FN 1, TN 1, FP 1.
    targets, predictions = torch.tensor([1, 1, 1, 0, 0]), torch.tensor([1, 1, 0, 0, 1])
    metrics = classification_metrics(predictions, targets, 2)
    assert metrics["accuracy"] == pytest.approx(0.6)
    f1_pos, f1_neg = 2 * 2 / (3 + 3), 2 * 1 / (2 + 2)
    assert metrics["macro_f1"] == pytest.approx((f1_pos + f1_neg) / 2)
    mcc = (2 * 1 - 1 * 1) / math.sqrt((2 + 1) * (2 + 1) * (1 + 1) * (1 + 1))
    assert metrics["mcc"] == pytest.approx(mcc)


def test_constant_predictions_have_zero_mcc():
    metrics = classification_metrics(torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 0, 1]), 2)
    assert metrics["mcc"] == 0.0 and metrics["accuracy"] == 0.5


def test_perplexity():
    metrics = language_model_metrics(total_loss=20.0, total_tokens=10)
    assert metrics == {"perplexity": pytest.approx(math.exp(2.0)), "loss": 2.0}
