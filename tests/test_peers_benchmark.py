"""benchmarks/peers/ without the peers' virtualenv: the naive loop and the optimizer the TRL worker builds
match Sapling's loss, parameter groups and schedule step for step (so the curves are comparable), and the
drivers' memory window and export-config comparison."""

from __future__ import annotations

import argparse

import pytest
import torch


@pytest.fixture(scope="module")
def worker(load_benchmark):
    return load_benchmark("peers/trl_worker")


@pytest.fixture(scope="module")
def quant_driver(load_benchmark):
    return load_benchmark("peers/quant")


def _tiny(path, layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def test_schedule_matches_saplings(worker):
    from sapling.train.optim import lr_factor

    for warmup, steps, ratio in [(0, 10, 0.1), (3, 10, 0.0), (2, 2, 0.5), (5, 40, 0.1)]:
        for s in range(steps + 2):
            assert worker.lr_factor(s, warmup, steps, ratio) == pytest.approx(
                lr_factor(s, warmup_steps=warmup, max_steps=steps, min_lr_ratio=ratio), abs=1e-12)


def test_naive_loop_follows_saplings_step_exactly(worker, tmp_path):
    """Three steps of the worker's naive loop vs Sapling's loss_on_batch + its AdamW groups, schedule and
    clipping on the same student, teacher and blocks: the same loss at every step."""
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM

    from sapling.config import DistillConfig
    from sapling.distill.step import loss_on_batch
    from sapling.train.optim import build_optimizer, build_scheduler, param_groups

    teacher, student = _tiny(tmp_path / "t", 2, 0), _tiny(tmp_path / "s", 1, 1)
    steps, batch, seq = 3, 2, 16
    blocks = torch.randint(0, 96, (steps * batch, seq), generator=torch.Generator().manual_seed(0))
    torch.save(blocks, tmp_path / "blocks.pt")
    a = argparse.Namespace(teacher=str(teacher), student=str(student), blocks=str(tmp_path / "blocks.pt"),
                           batch=batch, steps=steps, lr=1e-2, warmup=1, min_lr_ratio=0.1, weight_decay=0.1,
                           beta1=0.9, beta2=0.95, grad_clip=0.5, device="cpu")
    record = {"steps": []}
    worker.run_naive(a, record)
    theirs = [s["loss"] for s in record["steps"]]

    tcfg = OmegaConf.create({"lr": a.lr, "beta1": a.beta1, "beta2": a.beta2, "weight_decay": a.weight_decay,
                             "warmup_steps": a.warmup, "max_steps": steps, "min_lr_ratio": a.min_lr_ratio})
    t = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval().requires_grad_(False)
    s = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).train()
    opt = build_optimizer(param_groups(s, tcfg), tcfg)
    sched = build_scheduler(opt, tcfg)
    dcfg = DistillConfig(divergence="forward_kl", temperature=1.0, kd_weight=1.0, ce_weight=0.0)
    ours = []
    for i in range(steps):
        ids = blocks[i * batch : (i + 1) * batch]
        loss, _ = loss_on_batch(s, t, {"input_ids": ids, "labels": ids.clone()}, dcfg,
                                num_valid_tokens=batch * (seq - 1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(s.parameters(), a.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ours.append(float(loss))
    assert theirs == pytest.approx(ours, rel=1e-5)
    assert theirs[0] != pytest.approx(theirs[-1], rel=1e-3)  # the student did move


def test_worker_groups_match_saplings(worker, tmp_path):
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM

    from sapling.train.optim import param_groups

    m = AutoModelForCausalLM.from_pretrained(_tiny(tmp_path / "m", 1, 0))
    a = argparse.Namespace(lr=1e-3, beta1=0.9, beta2=0.95, weight_decay=0.1, warmup=0, steps=5, min_lr_ratio=0.1)
    opt, _ = worker.optimizer_and_schedule(m, a)
    ours = param_groups(m, OmegaConf.create({"weight_decay": 0.1}))
    assert [sorted(id(p) for p in g["params"]) for g in opt.param_groups] == \
        [sorted(id(p) for p in g["params"]) for g in ours]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert opt.defaults["eps"] == 1e-8 and opt.defaults["betas"] == (0.9, 0.95)


def test_train_peak_window(load_benchmark):
    common = load_benchmark("peers/peer_common")
    samples = [(0.0, 100), (1.0, 500), (2.0, 400), (3.0, 900), (4.0, 450)]
    assert common.train_peak(samples, 1.5) == {"rss_at_start": 500, "peak_rss": 900, "train_peak": 400}
    assert common.train_peak(samples, 10.0)["train_peak"] == 0  # nothing after the start: nothing held


def test_config_differences_name_every_field(quant_driver):
    a = {"format": "pack-quantized", "config_groups": {"g": {"weights": {"num_bits": 4, "actorder": None}}},
         "version": "0.20.0"}
    b = {"format": "pack-quantized", "config_groups": {"g": {"weights": {"num_bits": 4, "observer": "minmax"}}},
         "version": "0.19.0"}
    diffs = quant_driver.config_differences(a, b)
    assert len(diffs) == 3
    assert any("config_groups.g.weights.observer" in d and "(absent)" in d for d in diffs)
    assert any(d.startswith("`version`") for d in diffs)
    assert quant_driver.config_differences(a, a) == []


def test_phase_profile_heads_agree_and_every_phase_is_timed(load_benchmark, tmp_path):
    """The profile's two heads compute the same loss and gradients (so their times compare the same work), and
    a profiled step on tiny models times every phase and renders the table."""
    phases = load_benchmark("peers/phases")
    g = torch.Generator().manual_seed(3)
    n, hidden, vocab = 12, 16, 40
    w_s = torch.randn(vocab, hidden, generator=g, requires_grad=True)
    w_t = torch.randn(vocab, hidden, generator=g)
    h_t = torch.randn(n, hidden, generator=g)
    h0 = torch.randn(n, hidden, generator=g)
    heads = phases.make_heads(w_s, w_t, torch.randint(0, vocab, (n,), generator=g))
    out = {}
    for name, head in heads.items():
        h = h0.clone().requires_grad_()
        loss = head(h, h_t)
        loss.backward()
        out[name] = (loss.detach(), h.grad, w_s.grad.clone())
        w_s.grad = None
    for a, b in zip(out["fused"], out["full"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert out["full"][0] > 0

    teacher, student = _tiny(tmp_path / "t", 2, 0), _tiny(tmp_path / "s", 1, 1)
    ids = torch.randint(0, 96, (2, 16), generator=g)
    from importlib.resources import files

    from hydra import compose, initialize_config_dir

    from sapling.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(files("sapling.conf")), version_base=None):
        cfg = compose(config_name="config", overrides=[
            "command=distill", f"teacher.path={teacher}", f"student.path={student}", "student.init=pretrained",
            "distill.kd_weight=1.0", "distill.ce_weight=0.0", "trainer.warmup_steps=1"])
    prof = phases.phase_times(teacher, student, ids, repeats=1, trainer_cfg=cfg)
    for head in phases.HEADS:
        assert set(prof[head]["phases"]) == set(phases.PHASES)
        assert all(t > 0 for t in prof[head]["phases"].values())
    assert set(prof["trainer"]["phases"]) == set(phases.TRAINER_PHASES)
    assert all(t > 0 for t in prof["trainer"]["phases"].values())
    table = "\n".join(phases.render_phases("16x2", prof, 96))
    # the phase table (header, one row per phase, the whole step) and the trainer's (header, 3 parts, the whole)
    assert table.count("\n| ") == len(phases.PHASES) + 2 + len(phases.TRAINER_PHASES) + 2
    assert "beyond the fused phases" in table
    del prof["trainer"]  # results measured before the trainer step existed still render
    assert "beyond the fused phases" not in "\n".join(phases.render_phases("16x2", prof, 96))


def test_quant_spread_section(quant_driver):
    assert quant_driver.batch_sizes("1,4") == [1, 4]
    for bad in ("0", "x", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            quant_driver.batch_sizes(bad)
    results = {"teacher": {"spread": {"sapling": {"8": 2.417, "1": 2.427}, "llmc": {"1": 2.413, "8": 2.421}}},
               "student": {"rows": {}}}
    lines = quant_driver.spread_lines(results)
    rows = [x for x in lines if x.startswith("| teacher")]
    assert rows == ["| teacher | Sapling GPTQ | 2.4270 | 2.4170 | 0.0100 |",
                    "| teacher | llm-compressor GPTQ | 2.4130 | 2.4210 | 0.0080 |"]
    summary = next(x for x in lines if x.startswith("- teacher"))
    assert "2.4130-2.4270" in summary and "Sapling 2.4220 vs llm-compressor 2.4170 (+0.0050)" in summary
    assert summary.endswith("0.0100")
    assert quant_driver.spread_lines({"teacher": {"rows": {}}}) == []
    spread = results["teacher"]["spread"]
    assert "inside one tool's run-to-run spread (0.0100" in quant_driver.spread_note(spread, 0.004)
    assert "outside" in quant_driver.spread_note(spread, -0.02)


def test_quant_mse_rows_pair_with_the_peers_mse_rows(quant_driver):
    def row(loss: float, seconds: float, observer: str) -> dict:
        return {"eval": {"loss": loss}, "cross": {"loss": loss}, "bytes": 2**20, "quantize_s": seconds,
                "quantization_config": {"observer": observer}}

    rows = {"sapling_w4": row(2.40, 10.0, "minmax"), "llmc_w4": row(2.30, 20.0, "minmax"),
            "sapling_w4_mse": row(2.25, 30.0, "mse"), "llmc_w4_mse": row(2.35, 15.0, "mse"),
            "sapling_guided_w4_mse": row(2.20, 40.0, "mse")}
    args = argparse.Namespace(student="s", kd_steps=0, samples=4, val_tokens=2048)
    text = quant_driver.render(args, {"student": {"16bit": {"loss": 2.0}, "rows": rows}}, {})
    mse_row = next(x for x in text.splitlines() if x.startswith("| student | Sapling GPTQ w4, mse scales |"))
    cells = [c.strip() for c in mse_row.split("|")[1:-1]]
    # its increase and time against llm-compressor's mse row, not its min-max one
    assert cells[5] == f"{(2.718281828**0.25 - 1) / (2.718281828**0.35 - 1):.2f}x" and cells[8] == "2.00x"
    assert "- student w4, mse scales: Sapling's perplexity 9.488 vs llm-compressor's 10.486 (goal <=: met) at " \
           "2.00x its time (goal <= 1.0x: missed)" in text
    assert "- student w4: Sapling's perplexity 11.023 vs llm-compressor's 9.974 (goal <=: missed)" in text
    assert "guided GPTQ w4, mse scales loss 2.2000 vs the better plain GPTQ 2.2500 (goal: below both: met)" in text
    assert "- student w4, mse scales:\n  - none" in text and "- student w4:\n  - none" in text


def test_distill_rounds_combine(load_benchmark):
    distill = load_benchmark("peers/distill")

    def run(med: float, peak: int) -> dict:
        return {"median_step_s": med, "tokens_per_s": 1024 / med, "train_peak": peak, "hwm": peak, "wall_s": 10.0,
                "losses": [2.0, 1.5], "step_s": [med, med]}

    sap = distill.combine_rounds([run(6.0, 5), {"error": "exit 1"}, run(5.0, 7), run(5.5, 6)])
    assert sap["median_step_s"] == 5.5 and sap["tokens_per_s"] == 1024 / 5.5
    assert sap["rounds"] == [6.0, None, 5.0, 5.5] and sap["train_peak"] == 7 and sap["wall_s"] == 30.0
    note = distill.rounds_note([6.0, None, 5.0], [8.0, 7.0, 7.5])
    assert note.startswith("within each round Sapling's step is 0.75x, 0.67x TRL's (median 0.71x)")
    args = argparse.Namespace(systems=["sapling", "trl"])
    lines = distill.rounds_lines(args, {"256x4": {"sapling": sap, "trl": run(8.0, 9), "phases": {}}})
    assert "| 256x4 | Sapling `sapling distill` | 6.00 | failed | 5.00 | 5.50 | 5.50 |" in lines
    assert distill.rounds_lines(args, {"256x4": {"trl": run(8.0, 9)}}) == []
