"""Contrastive fine-tuning with sentence-transformers' trainer (imported only when an adaptation trains)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import structlog
import torch
from datasets import Dataset
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
from sentence_transformers.base.sampler import DefaultBatchSampler
from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss, MarginMSELoss
from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments
from transformers import TrainerCallback, set_seed

from ingest.pairs import Pair, order_for_in_batch_negatives
from rag.settings import Settings

log = structlog.get_logger("ingest.training")


class InOrderBatchSampler(DefaultBatchSampler):
    """Batches in dataset order: the pairs were already arranged so that no batch repeats a document."""

    def __iter__(self):
        n = len(self.sampler)
        for start in range(0, n, self.batch_size):
            batch = list(range(start, min(start + self.batch_size, n)))
            if len(batch) == self.batch_size or not self.drop_last:
                yield batch


def train_encoder(pairs: Sequence[Pair], base_model: str, out_dir: Path, work_dir: Path, settings: Settings, *,
                  epochs: int, max_seq_length: int, seed: int, progress: Callable[[str, float], None],
                  teacher: str = "", save_steps: int | None = None) -> dict[str, Any]:
    """Fine-tune ``base_model`` on the pairs; resumes from the newest checkpoint under ``work_dir``."""
    set_seed(seed)
    torch.manual_seed(seed)
    model = SentenceTransformer(base_model, device=settings.encoder_device)
    model.to(torch.float32)  # weights saved in half precision would train in it, and diverge
    model.max_seq_length = max_seq_length
    batch = settings.adapt_batch_size
    with_neg = all(p.negative for p in pairs)
    rows: list[Pair] = []
    for epoch in range(epochs):  # each epoch its own arrangement, all in one pass of the trainer
        rows += order_for_in_batch_negatives(pairs, batch, seed + epoch)
    if teacher:
        data, loss = _distillation_data(model, rows, teacher, settings, progress)
    else:
        data, loss = _contrastive_data(model, rows, settings, with_neg=with_neg)
    steps_total = max(1, -(-len(data) // batch))
    save_steps = save_steps or max(10, steps_total // 10)  # checkpoints to resume from after a crash
    args = SentenceTransformerTrainingArguments(
        output_dir=str(work_dir / "checkpoints"), num_train_epochs=1, per_device_train_batch_size=batch,
        learning_rate=settings.adapt_learning_rate, warmup_steps=max(1, steps_total // 10), seed=seed, data_seed=seed,
        save_strategy="steps", save_steps=save_steps, save_total_limit=2, logging_steps=max(1, steps_total // 20),
        report_to="none", batch_sampler=InOrderBatchSampler, disable_tqdm=True, dataloader_drop_last=False,
        use_cpu=settings.encoder_device == "cpu",
    )
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=loss,
                                         callbacks=[_ReportProgress(progress)])
    resumed = _newest_checkpoint(work_dir / "checkpoints")
    if resumed:
        log.info("adapt_resume", checkpoint=resumed)
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resumed)
    seconds = time.perf_counter() - t0
    _save_replacing(model, out_dir)
    return {"loss": type(loss).__name__, "rows": len(data), "steps": steps_total, "train_seconds": round(seconds, 1),
            "final_loss": round(float(result.training_loss), 4), "resumed_from": resumed,
            "batch_size": batch, "mini_batch_size": settings.adapt_mini_batch_size, "epochs": epochs,
            "max_seq_length": max_seq_length, "learning_rate": settings.adapt_learning_rate,
            "hard_negatives": with_neg, "teacher": teacher or None, "seed": seed}


def _distillation_data(model: SentenceTransformer, rows: list[Pair], teacher: str, settings: Settings,
                       progress: Callable[[str, float], None]) -> tuple[Dataset, MarginMSELoss]:
    """Triplets labelled with the cross-encoder teacher's margin (positive minus negative score)."""
    from sentence_transformers.cross_encoder import CrossEncoder

    progress("scoring pairs with the teacher", 0.0)
    ce = CrossEncoder(teacher, device=settings.encoder_device)
    usable = [p for p in rows if p.negative]
    pos = ce.predict([(p.query, p.positive) for p in usable], batch_size=64, show_progress_bar=False)
    neg = ce.predict([(p.query, p.negative) for p in usable], batch_size=64, show_progress_bar=False)
    data = Dataset.from_dict({"query": [p.query for p in usable], "positive": [p.positive for p in usable],
                              "negative": [p.negative for p in usable],
                              "label": [float(a - b) for a, b in zip(pos, neg)]})
    return data, MarginMSELoss(model)


def _contrastive_data(model: SentenceTransformer, rows: list[Pair], settings: Settings, *,
                      with_neg: bool) -> tuple[Dataset, CachedMultipleNegativesRankingLoss]:
    """(anchor, positive[, negative]) rows for in-batch negatives, plus the mined negative when every pair has one."""
    cols = {"anchor": [p.query for p in rows], "positive": [p.positive for p in rows]}
    if with_neg:
        cols["negative"] = [p.negative for p in rows]
    data = Dataset.from_dict(cols)
    return data, CachedMultipleNegativesRankingLoss(model, mini_batch_size=settings.adapt_mini_batch_size)


class _ReportProgress(TrainerCallback):
    """Logs the loss and reports the share of steps done to the job's progress callback."""

    def __init__(self, progress: Callable[[str, float], None]) -> None:
        self.progress = progress

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            log.info("adapt_train_loss", step=state.global_step, steps=state.max_steps, loss=round(logs["loss"], 4))

    def on_step_end(self, args, state, control, **kw):
        self.progress("training", state.global_step / max(state.max_steps, 1))


def _newest_checkpoint(checkpoints: Path) -> str | None:
    ckpts = sorted(checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return str(ckpts[-1]) if ckpts else None


def _save_replacing(model: SentenceTransformer, out_dir: Path) -> None:
    """Save to a sibling and swap it in, so a crash mid-save never leaves half a model at ``out_dir``."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(str(tmp))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
