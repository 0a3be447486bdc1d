"""Feature distillation: layer maps, capture hooks, cosine / MSE losses vs float64 brute force, training."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from sapling.config import ConfigError, FeatureDistillConfig, check_features
from sapling.distill.features import (
    FeatureDistiller,
    StudentWithFeatures,
    capture_layer_outputs,
    default_layer_map,
    feature_positions,
    resolve_layer_map,
)
from sapling.models import decoder_layers, tiny_config

VOCAB = 64


@pytest.fixture(autouse=True)
def _one_thread():
    """Toy-sized models gain nothing from threads, and lose a lot on a shared, oversubscribed CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(name: str = "llama-tiny", layers: int = 2, hidden: int = 32, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    heads = {"num_attention_heads": 4, "num_key_value_heads": 2}
    cfg = tiny_config(name, vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, **heads, **kw)
    return AutoModelForCausalLM.from_config(cfg)


# ------------------------------------------------------------------------------------------------ layer maps


@pytest.mark.parametrize(("n_s", "n_t", "expected"), [
    (2, 4, [(0, 1), (1, 3)]),
    (4, 4, [(0, 0), (1, 1), (2, 2), (3, 3)]),
    (3, 4, [(0, 0), (1, 2), (2, 3)]),
    (1, 5, [(0, 4)]),
    (2, 3, [(0, 1), (1, 2)]),
    (4, 2, [(0, 0), (1, 0), (2, 1), (3, 1)]),
])
def test_default_layer_map(n_s, n_t, expected):
    assert default_layer_map(n_s, n_t) == expected


def test_default_layer_map_is_increasing_nearest_depth_and_ends_last_to_last():
    for n_s in range(1, 13):
        for n_t in range(n_s, 40):
            teacher = [t for _, t in default_layer_map(n_s, n_t)]
            assert teacher[-1] == n_t - 1 and teacher[0] >= 0
            assert all(a < b for a, b in zip(teacher, teacher[1:])), (n_s, n_t)
            for i, t in enumerate(teacher):  # no other teacher layer is strictly closer in relative depth
                gap = abs((t + 1) / n_t - (i + 1) / n_s)
                assert all(abs((j + 1) / n_t - (i + 1) / n_s) >= gap - 1e-12 for j in range(n_t)), (n_s, n_t, i)


def test_resolve_layer_map_explicit_negative_and_errors():
    assert resolve_layer_map(None, 2, 4) == [(0, 1), (1, 3)]
    assert resolve_layer_map([[0, 1], [-1, -1]], 2, 4) == [(0, 1), (1, 3)]
    cases = [([[2, 1]], r"student layer 2 out of range for a 2-layer student"),
             ([[0, 4]], r"teacher layer 4 out of range for a 4-layer teacher"),
             ([[0, -5]], r"teacher layer -5 out of range"),
             ([[0, 1], [-2, 1]], r"repeats the pair \(0, 1\)"),
             ([[0, 1, 2]], "not a .student_layer, teacher_layer. pair")]
    for layers, problem in cases:
        with pytest.raises(ConfigError, match=problem) as err:
            resolve_layer_map(layers, 2, 4)
        msg = str(err.value)
        assert msg.startswith("distill.features.layers[") and "fix:" in msg and "\n" not in msg


@pytest.mark.parametrize(("override", "key"), [
    ({"loss": "l1"}, "distill.features.loss"),
    ({"weight": -0.5}, "distill.features.weight"),
    ({"weight": math.inf}, "distill.features.weight"),
    ({"layers": []}, "distill.features.layers"),
    ({"layers": [[0, 1], [1]]}, "distill.features.layers[1]"),
])
def test_config_check_names_key_and_fix(override, key):
    cfg = OmegaConf.merge(OmegaConf.structured(FeatureDistillConfig), override)
    with pytest.raises(ConfigError) as err:
        check_features(cfg)
    msg = str(err.value)
    assert msg.startswith(f"{key}=") and "fix:" in msg and "\n" not in msg
    check_features(OmegaConf.structured(FeatureDistillConfig(weight=1.0, loss="mse", layers=[[0, 1]])))


def test_yaml_defaults_compose_with_overrides():
    from importlib.resources import files

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sapling.config import register_configs, validate

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(files("sapling.conf")), version_base=None):
        cfg = compose(config_name="config", overrides=["command=pipeline"])
        assert OmegaConf.to_container(cfg.distill.features) == {"weight": 0.0, "loss": "cosine", "layers": None,
                                                               "normalize": False}
        cfg = compose(config_name="config", overrides=["command=pipeline", "distill.features.weight=0.5",
                                                       "distill.features.loss=mse", "distill.features.layers=[[0,1],[1,3]]"])
        validate(cfg)
        assert cfg.distill.features.layers == [[0, 1], [1, 3]]
        with pytest.raises(ConfigError, match=r"^distill\.features\.loss="):
            validate(compose(config_name="config", overrides=["command=pipeline", "distill.features.loss=l2"]))
    GlobalHydra.instance().clear()


def test_from_config_uses_hf_configs_and_zero_weight_is_off():
    s_cfg, t_cfg = tiny_config("llama-tiny", num_hidden_layers=2, hidden_size=32), tiny_config("qwen3-tiny",
                                                                                               num_hidden_layers=4)
    cfg = OmegaConf.structured(FeatureDistillConfig(weight=0.25, loss="mse", normalize=True))
    fd = FeatureDistiller.from_config(cfg, s_cfg, t_cfg)
    assert fd.layer_map == [(0, 1), (1, 3)] and fd.student_layers == [0, 1] and fd.teacher_layers == [1, 3]
    assert fd.proj.shape == (64, 32) and fd.loss_name == "mse" and fd.normalize and fd.loss_weight == 0.25
    assert FeatureDistiller.from_config(OmegaConf.structured(FeatureDistillConfig()), s_cfg, t_cfg) is None
    with pytest.raises(ConfigError, match="teacher layer 7"):
        FeatureDistiller.from_config(OmegaConf.structured(FeatureDistillConfig(weight=1.0, layers=[[0, 7]])),
                                     s_cfg, t_cfg)


# ---------------------------------------------------------------------------------------- projection init


def test_projection_init_orthogonal_seeded_truncated_identity_or_none():
    a, b = FeatureDistiller(24, 40, [(0, 0)], seed=3), FeatureDistiller(24, 40, [(0, 0)], seed=3)
    assert torch.equal(a.proj, b.proj)  # same on every rank
    assert not torch.equal(a.proj, FeatureDistiller(24, 40, [(0, 0)], seed=4).proj)
    torch.testing.assert_close(a.proj.T @ a.proj, torch.eye(24), atol=1e-5, rtol=0)  # isometry
    index = torch.randperm(40, generator=torch.Generator().manual_seed(0))[:24]
    c = FeatureDistiller(24, 40, [(0, 0)], hidden_index=index)
    x = torch.randn(5, 24)
    expected = torch.zeros(5, 40)
    expected[:, index] = x  # a student channel lands on the teacher channel it was sliced from
    assert torch.equal(x @ c.proj.T, expected)
    same = FeatureDistiller(32, 32, [(0, 0)])
    assert same.proj is None and same.trainable_parameters() == [] and list(same.parameters()) == []
    assert FeatureDistiller(32, 32, [(0, 0)], hidden_index=torch.arange(32).flip(0)).proj is not None
    for bad in (torch.arange(23), torch.zeros(24, dtype=torch.long), torch.arange(24) + 17):
        with pytest.raises(ValueError, match="hidden_index"):
            FeatureDistiller(24, 40, [(0, 0)], hidden_index=bad)


# ---------------------------------------------------------------------------------------- losses vs float64


def _layer_norm64(x: torch.Tensor) -> torch.Tensor:
    mu = sum(x) / len(x)
    var = sum((v - mu) ** 2 for v in x) / len(x)
    return (x - mu) / torch.sqrt(var + 1e-6)


def _brute_force(student, teacher, valid, w, loss, normalize, num_valid=None) -> torch.Tensor:
    """Token by token, in float64, straight from the definition."""
    total = torch.zeros((), dtype=torch.float64)
    pairs = len(student)
    for s, t in zip(student, teacher):
        s, t = s.double().reshape(-1, s.shape[-1]), t.double().reshape(-1, t.shape[-1])
        for row in valid.reshape(-1).nonzero().flatten().tolist():
            p = w.double() @ s[row] if w is not None else s[row]
            q = t[row]
            if normalize:
                p, q = _layer_norm64(p), _layer_norm64(q)
            if loss == "cosine":
                total = total + 1 - (p @ q) / (torch.sqrt(p @ p) * torch.sqrt(q @ q))
            else:
                total = total + ((p - q) ** 2).sum() / len(q)
    count = int(valid.sum()) if num_valid is None else num_valid
    return total / (pairs * count)


def _features(batch=3, seq=7, hs=12, ht=20, pairs=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = [torch.randn(batch, seq, hs, generator=g) * (1 + k) for k in range(pairs)]
    t = [torch.randn(batch, seq, ht, generator=g) * 3 + 0.5 for _ in range(pairs)]
    labels = torch.randint(0, VOCAB, (batch, seq), generator=g)
    labels[torch.rand(batch, seq, generator=g) < 0.3] = -100
    return s, t, labels


@pytest.mark.parametrize("loss", ["cosine", "mse"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("widths", [(12, 20), (12, 12)])
def test_loss_matches_float64_brute_force(loss, normalize, widths):
    hs, ht = widths
    s, t, labels = _features(hs=hs, ht=ht)
    valid = feature_positions(labels)
    fd = FeatureDistiller(hs, ht, [(0, 1), (1, 3)], loss=loss, normalize=normalize, weight=0.7, seed=1)
    if fd.proj is not None:
        with torch.no_grad():
            fd.proj.add_(0.3 * torch.randn(fd.proj.shape, generator=torch.Generator().manual_seed(5)))
    w = fd.proj.detach() if fd.proj is not None else None

    # float32 module vs float64 definition
    got, parts = fd(s, t, valid)
    got = got.detach()
    ref = _brute_force(s, t, valid, w, loss, normalize)
    assert got.dtype == torch.float32
    assert abs(float(got) - 0.7 * float(ref)) <= 1e-5 * abs(float(ref)) + 1e-7
    assert abs(float(parts["feat"]) - float(ref)) <= 1e-5 * abs(float(ref)) + 1e-7
    # a global token count just changes the divisor
    got_global, _ = fd(s, t, valid, num_valid_tokens=50)
    torch.testing.assert_close(got_global.detach().double(), 0.7 * _brute_force(s, t, valid, w, loss, normalize, 50),
                               rtol=1e-5, atol=1e-7)

    # float64 module: gradients w.r.t. student features and the projection equal the brute force's
    fd64 = copy.deepcopy(fd).double()
    s64 = [x.double().requires_grad_() for x in s]
    out, _ = fd64(s64, [x.double() for x in t], valid)
    out.backward()
    s_ref = [x.double().requires_grad_() for x in s]
    w_ref = w.double().requires_grad_() if w is not None else None
    ref64 = 0.7 * _brute_force(s_ref, t, valid, w_ref, loss, normalize)
    ref64.backward()
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref64, rtol=1e-12, atol=1e-14)
    for a, b in zip(s64, s_ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)
    if w is not None:
        torch.testing.assert_close(fd64.proj.grad, w_ref.grad, rtol=1e-10, atol=1e-12)
        assert fd64.proj.grad.abs().sum() > 0


def test_ignored_positions_do_not_count_and_get_no_gradient():
    s, t, labels = _features(seed=2)
    valid = feature_positions(labels)
    assert not valid[:, -1].any()  # the last position predicts nothing
    assert torch.equal(valid[:, :-1], labels[:, 1:] != -100)
    fd = FeatureDistiller(12, 20, [(0, 0), (1, 1)], loss="mse")
    base, _ = fd(s, t, valid)
    s_bad = [x.clone() for x in s]
    for x in s_bad:
        x[~valid] = 1e3  # garbage where nothing is predicted
    s_bad = [x.requires_grad_() for x in s_bad]
    again, _ = fd(s_bad, t, valid)
    assert torch.equal(again, base)
    again.backward()
    for x in s_bad:
        assert torch.all(x.grad[~valid] == 0) and x.grad[valid].abs().sum() > 0


def test_split_batch_with_global_count_sums_to_the_whole():
    """Data parallel: each rank's loss over the global count adds up to the whole batch's loss."""
    s, t, labels = _features(batch=4, seed=3)
    fd = FeatureDistiller(12, 20, [(0, 2), (1, 3)])
    whole, _ = fd(s, t, feature_positions(labels))
    count = int(feature_positions(labels).sum())
    halves = [fd([x[i:i + 2] for x in s], [x[i:i + 2] for x in t], feature_positions(labels[i:i + 2]),
                 num_valid_tokens=count)[0] for i in (0, 2)]
    torch.testing.assert_close(halves[0] + halves[1], whole, rtol=1e-6, atol=1e-7)
    empty, _ = fd(s, t, torch.zeros_like(feature_positions(labels)))
    assert empty.item() == 0.0


def test_mismatched_inputs_raise():
    s, t, labels = _features()
    fd = FeatureDistiller(12, 20, [(0, 0), (1, 1)])
    with pytest.raises(ValueError, match="one per layer pair"):
        fd(s[:1], t, feature_positions(labels))
    with pytest.raises(ValueError, match="do not match"):
        fd(s, t, feature_positions(labels)[:, :-1])


# ---------------------------------------------------------------------------------------- capture on models


@pytest.mark.parametrize("name", ["llama-tiny", "qwen3-tiny"])
def test_capture_equals_hf_hidden_states(name):
    model = _model(name, layers=3).eval()
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        hf = model(input_ids=ids, output_hidden_states=True).hidden_states  # [embeddings, layer 0, ..., final norm]
        hooks = [len(layer._forward_hooks) for layer in decoder_layers(model)]
        with capture_layer_outputs(model, [1, 0, 1, 2]) as feats:
            model(input_ids=ids)
    assert torch.equal(feats[0], hf[2]) and torch.equal(feats[1], hf[1]) and feats[2] is feats[0]
    torch.testing.assert_close(model.model.norm(feats[3]), hf[3])  # HF's last entry is after the final norm
    assert [len(layer._forward_hooks) for layer in decoder_layers(model)] == hooks  # ours removed


def test_capture_errors_and_wrappers():
    model = _model(layers=2)
    with pytest.raises(IndexError, match="out of range"), capture_layer_outputs(model, [2]):
        pass
    with pytest.raises(RuntimeError, match=r"decoder layers \[1\] did not run"), capture_layer_outputs(model, [1]):
        pass
    wrapper = StudentWithFeatures(model, FeatureDistiller(32, 48, [(0, 0)]))
    assert decoder_layers(wrapper) is model.model.layers
    with pytest.raises(ValueError, match="no decoder layers"):
        decoder_layers(torch.nn.Linear(2, 2))


def test_gradient_checkpointing_is_captured_once_with_the_same_gradients():
    ids = torch.randint(0, VOCAB, (2, 8))
    valid = torch.ones(2, 8, dtype=torch.bool)
    teacher = _model(layers=2, hidden=48, seed=1).eval()
    with torch.no_grad(), capture_layer_outputs(teacher, [0, 1]) as t_feats:
        teacher(input_ids=ids)
    grads = []
    for checkpointing in (False, True):
        student = _model(layers=2, seed=2).train()
        if checkpointing:
            student.activation_checkpointing_enable({"use_reentrant": False})
        fd = FeatureDistiller(32, 48, [(0, 0), (1, 1)])
        calls: list[str] = []
        mlp = student.model.layers[0].mlp
        mlp.forward = lambda x, f=mlp.forward, c=calls: (c.append("mlp"), f(x))[1]  # counts recomputation too
        student.model.layers[0].register_forward_hook(lambda *_, c=calls: c.append("hook"))
        with capture_layer_outputs(student, [0, 1]) as s_feats:
            student.model(input_ids=ids)
        loss, _ = fd(s_feats, t_feats, valid)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None})
        # recomputed in backward when checkpointing, but layer hooks sit outside the checkpoint: captured once
        assert calls == (["mlp", "hook", "mlp"] if checkpointing else ["mlp", "hook"])
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 5
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7)


def test_gradients_reach_student_and_projection_not_teacher():
    teacher, student = _model(layers=4, hidden=48, seed=1), _model(layers=2, seed=2)
    wrapper = StudentWithFeatures(student, FeatureDistiller(32, 48, default_layer_map(2, 4), loss="cosine"))
    ids = torch.randint(0, VOCAB, (2, 8))
    with capture_layer_outputs(teacher, wrapper.features.teacher_layers) as t_feats:  # grad mode left on
        teacher(input_ids=ids)
    assert t_feats[0].requires_grad  # the distiller must detach it
    with capture_layer_outputs(wrapper, wrapper.features.student_layers) as s_feats:
        wrapper(input_ids=ids)
    loss, parts = wrapper.features(s_feats, t_feats, feature_positions(ids))
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert wrapper.features.proj.grad is not None and wrapper.features.proj.grad.abs().sum() > 0
    layer_grads = [student.model.layers[i].mlp.down_proj.weight.grad for i in (0, 1)]
    assert all(g is not None and g.abs().sum() > 0 for g in layer_grads)
    assert student.model.norm.weight.grad is None  # features are pre-final-norm: the norm is not on the path
    assert float(parts["feat"]) > 0 and not parts["feat"].requires_grad
    # the wrapper's state holds the projection, the exported student does not
    assert "features.proj" in wrapper.state_dict() and all(k.startswith(("model.", "features."))
                                                           for k in wrapper.state_dict())
    assert not any(k.split(".")[-1] == "proj" for k in student.state_dict())
    assert wrapper.features.trainable_parameters() == [wrapper.features.proj]


def test_teacher_features_from_inference_mode_are_usable():
    s, t, labels = _features(seed=4)
    with torch.inference_mode():
        t_inf = [x.clone() for x in t]
    s = [x.requires_grad_() for x in s]
    fd = FeatureDistiller(12, 20, [(0, 0), (1, 1)])
    loss, _ = fd(s, t_inf, feature_positions(labels))
    loss.backward()
    assert s[0].grad is not None and fd.proj.grad is not None
    torch.testing.assert_close(loss, fd(s, t, feature_positions(labels))[0])


@pytest.mark.parametrize("loss", ["cosine", "mse"])
def test_short_training_run_lowers_the_feature_loss(loss):
    """Teacher 4 x 64 -> student 2 x 32 on CPU, feature loss only, 30 AdamW steps on student + projection."""
    teacher = _model(layers=4, hidden=64, seed=1).eval().requires_grad_(False)
    student = _model(layers=2, hidden=32, seed=2).train()
    fd = FeatureDistiller(32, 64, default_layer_map(2, 4), loss=loss, normalize=loss == "mse")
    wrapper = StudentWithFeatures(student, fd)
    proj0 = fd.proj.detach().clone()
    opt = torch.optim.AdamW(wrapper.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, VOCAB, (4, 16), generator=g) for _ in range(4)]
    held_out = torch.randint(0, VOCAB, (4, 16), generator=g)

    def feature_loss(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), capture_layer_outputs(teacher, fd.teacher_layers) as t_feats:
            teacher.model(input_ids=ids)
        with capture_layer_outputs(wrapper, fd.student_layers) as s_feats:
            student.model(input_ids=ids)
        return fd(s_feats, t_feats, feature_positions(ids))[0]

    with torch.no_grad():
        before = feature_loss(held_out).item()
    train = []
    for step in range(30):
        opt.zero_grad()
        loss_value = feature_loss(batches[step % len(batches)])
        loss_value.backward()
        opt.step()
        train.append(loss_value.item())
    with torch.no_grad():
        after = feature_loss(held_out).item()
    assert sum(train[-4:]) < 0.5 * sum(train[:4]), train  # one pass over the 4 batches, first vs last
    assert after < 0.8 * before, (before, after)  # and it generalises to unseen tokens
    assert not torch.equal(fd.proj.detach(), proj0)
