"""`hooks.pre=[prune]` with feature distillation: the projection of a width-pruned student starts as the
channel selection of the pruning plan (student channel i -> the teacher channel it was sliced from)."""

from __future__ import annotations

import torch
from transformers import AutoConfig

from sapling.distill.features import FeatureDistiller
from sapling.prune.importance import ImportanceScores
from sapling.prune.select import plan_from_scores


def test_width_pruned_student_projection_starts_as_the_kept_channels(sapling_main, tmp_path, teacher_dir, text_files,
                                                                     monkeypatch):
    starts = []
    from_config = FeatureDistiller.from_config.__func__

    def recording(cls, *args, **kwargs):
        fd = from_config(cls, *args, **kwargs)
        starts.append(fd.proj.detach().clone())
        return fd

    monkeypatch.setattr(FeatureDistiller, "from_config", classmethod(recording))
    out = tmp_path / "kd"
    code, err = sapling_main(
        "distill", f"teacher.path={teacher_dir}", f"data.files=[{','.join(str(p) for p in text_files)}]",
        "data.seq_len=32", "hooks.pre=[prune]", "prune.target.hidden_size=48", "prune.calibration.samples=8",
        "distill.features.weight=0.5", "trainer.max_steps=1", "trainer.micro_batch_size=2", "trainer.eval_batches=1",
        "logger=none", f"hydra.run.dir={out}")
    assert code == 0, err[-3000:]
    teacher_cfg = AutoConfig.from_pretrained(teacher_dir)
    shape = {k: getattr(teacher_cfg, k) for k in ("num_hidden_layers", "intermediate_size", "num_attention_heads",
                                                  "num_key_value_heads")}
    plan = plan_from_scores(ImportanceScores.load(out / "prune_scores.pt"), teacher_cfg, {**shape, "hidden_size": 48})
    want = torch.zeros(teacher_cfg.hidden_size, 48)
    want[plan.hidden, torch.arange(48)] = 1.0
    assert len(starts) == 1 and torch.equal(starts[0], want)
