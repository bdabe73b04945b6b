"""Held-out scoring of a trained model: accuracy/F1/Matthews for classification, loss and perplexity for causal LM."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from safefreeze.training.data import TaskData, iterate_batches
from safefreeze.training.metrics import classification_metrics, language_model_metrics


@torch.no_grad()
def evaluate(
    model, task: TaskData, examples, collate, batch_size: int, device, progress: bool = False
) -> dict[str, float]:
    """Metrics on the held-out split, the primary metric first."""
    model.eval()
    predictions, targets = [], []
    total_loss, total_tokens = 0.0, 0
    for batch in tqdm(
        iterate_batches(examples, batch_size, collate, list(range(len(examples)))),
        desc="eval",
        total=math.ceil(len(examples) / batch_size),
        disable=not progress,
        leave=False,
    ):
        batch = {k: v.to(device) for k, v in batch.items()}
        output = model(**batch)
        if task.kind == "classification":
            predictions.append(output.logits.argmax(-1).cpu())
            targets.append(batch["labels"].cpu())
        else:
            tokens = int((batch["labels"][:, 1:] != -100).sum())
            total_loss += float(output.loss) * tokens
            total_tokens += tokens
    model.train()
    if task.kind == "classification":
        return classification_metrics(torch.cat(predictions), torch.cat(targets), len(task.labels))
    return language_model_metrics(total_loss, total_tokens)
