"""`load_teacher`: a distillation teacher from a run folder, a checkpoint or an exported model.

Training (a layer below) reads run folders and checkpoints itself but cannot read exports,
which need this layer's inference engine; ``bitvit train`` and ``bitvit sweep`` hand this loader
to `bitvit.train` (``teacher_loader``), as may any caller.
"""

from __future__ import annotations

from pathlib import Path

from bitvit.deploy.export import is_export, load
from bitvit.training.distill import Teacher, load_checkpoint_teacher, quantization_of


def load_teacher(path: str | Path) -> Teacher:
    """An exported ``.safetensors`` model (on the integer engine, as ``bitvit eval`` runs it),
    or a run folder (its ``last/``), checkpoint folder or checkpoint file, as a teacher.
    Bad files raise the one-line `ExportError` or `CheckpointError` naming them."""
    if not is_export(path):
        return load_checkpoint_teacher(path)
    model = load(path)
    p = model.preprocessing
    return Teacher(model, Path(path), list(model.classes), p.image_size, p.channels, p.mean,
                   p.std, quantization_of(model.config), "export")
