"""Unit tests of the training loop in perception.training: rotations, splits, deterministic resumable
epochs, weight decay, and an epoch on CUDA. Only perception is imported: the GPU machine runs this file
without pydantic, Ray or MLflow (benchmarks.gpu_check)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from perception.models import build
from perception.rotations import random_rotations, rotations_about_z
from perception.training import (
    StepSettings,
    accuracy,
    augment_points,
    random_state,
    restore_random_state,
    stratified_split,
    train_one_epoch,
    warmup_cosine,
)

# --- rotations, splits --------------------------------------------------------------------------------------


def test_random_rotations_are_proper_rotations_and_cover_so3():
    rotations = random_rotations(2000, torch.Generator().manual_seed(0), torch.float64)
    eye = torch.eye(3, dtype=torch.float64).expand(2000, 3, 3)
    assert torch.allclose(rotations @ rotations.transpose(1, 2), eye, atol=1e-12)
    assert torch.allclose(torch.linalg.det(rotations), torch.ones(2000, dtype=torch.float64))
    # Haar measure: a rotated fixed axis is uniform on the sphere, so its mean is near 0 and E[z^2] = 1/3.
    z = rotations[:, :, 2]
    assert z.mean(0).abs().max() < 0.05 and abs(z[:, 2].square().mean() - 1 / 3) < 0.03


def test_z_rotations_keep_the_up_axis_and_so3_moves_it():
    points = torch.randn(64, 50, 3)
    gen = torch.Generator().manual_seed(1)
    about_z = augment_points(points, "z", gen)
    assert torch.allclose(about_z[..., 2], points[..., 2], atol=1e-6)
    assert torch.allclose(about_z.norm(dim=-1), points.norm(dim=-1), atol=1e-5)
    assert not torch.allclose(augment_points(points, "so3", gen)[..., 2], points[..., 2], atol=1e-2)
    assert augment_points(points, "none", gen) is points
    quarter = rotations_about_z(torch.tensor([torch.pi / 2]))
    assert torch.allclose(quarter[0] @ torch.tensor([1.0, 0, 0]), torch.tensor([0.0, 1, 0]), atol=1e-6)


def test_stratified_split_holds_out_every_class_and_is_seeded():
    labels = np.repeat(np.arange(4), [10, 5, 2, 1])
    train, held = stratified_split(labels, 0.2, seed=3)
    assert sorted(np.concatenate([train, held]).tolist()) == list(range(len(labels)))
    assert np.bincount(labels[held], minlength=4).tolist() == [2, 1, 1, 0]  # a class of one stays in train
    again = stratified_split(labels, 0.2, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip((train, held), again, strict=True))
    assert not np.array_equal(stratified_split(labels, 0.2, seed=4)[1], held)


# --- epochs: deterministic, and resumable to the same numbers -----------------------------------------------


def _fit(epochs: int, state: dict | None = None):
    torch.manual_seed(0)
    model = build("pointnet", num_classes=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(5)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        restore_random_state(generator, state["random"])
    data = torch.Generator().manual_seed(9)
    x, y = torch.randn(24, 64, 3, generator=data), torch.randint(0, 3, (24,), generator=data)
    settings = StepSettings(batch_size=8, augment="so3", points_per_cloud=32)
    losses = [
        train_one_epoch(model, optimizer, x, y, settings, generator, torch.device("cpu"))
        for _ in range(epochs)
    ]
    return model, optimizer, generator, losses, (x, y)


def test_warmup_then_cosine_and_without_warmup_the_plain_cosine():
    plain = torch.optim.lr_scheduler.CosineAnnealingLR(torch.optim.SGD([torch.zeros(1)], lr=1.0), T_max=8)
    expected = []
    for _ in range(8):
        expected.append(plain.get_last_lr()[0])
        plain.optimizer.step()
        plain.step()
    assert [warmup_cosine(8)(e) for e in range(8)] == pytest.approx(expected)
    ramp = warmup_cosine(10, 2)
    assert [ramp(e) for e in range(3)] == pytest.approx([1 / 3, 2 / 3, 1.0])  # up, then the full rate
    assert all(ramp(e) > ramp(e + 1) for e in range(2, 9)) and ramp(9) > 0


def test_gradient_clipping_bounds_the_step():
    x, y = torch.randn(16, 4, generator=torch.Generator().manual_seed(1)) * 100, torch.arange(16) % 3
    steps = {}
    for clip in (0.0, 0.5):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # one plain step: the step is the gradient
        settings = StepSettings(batch_size=16, grad_clip=clip)
        train_one_epoch(
            model, optimizer, x, y, settings, torch.Generator().manual_seed(0), torch.device("cpu")
        )
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        steps[clip] = (after - before).norm().item()
    assert steps[0.0] > 1.0  # unclipped: large inputs, a large gradient
    assert steps[0.5] == pytest.approx(0.5, rel=1e-4)  # clipped to the norm exactly


def test_training_is_deterministic_on_cpu():
    _, _, _, first, _ = _fit(2)
    _, _, _, second, _ = _fit(2)
    assert first == second


def test_resuming_from_a_checkpoint_gives_the_same_numbers_as_training_straight_through():
    model, _, _, straight, (x, y) = _fit(2)
    half, optimizer, generator, first_epoch, _ = _fit(1)
    buffer = io.BytesIO()
    torch.save(
        {"model": half.state_dict(), "optimizer": optimizer.state_dict(), "random": random_state(generator)},
        buffer,
    )
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed, _, _, second_epoch, _ = _fit(1, state)
    assert first_epoch + second_epoch == straight
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert accuracy(model, x, y, 8, torch.device("cpu")) == accuracy(resumed, x, y, 8, torch.device("cpu"))


ON_CUDA = pytest.param(
    "cuda",
    marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")],
)


@pytest.mark.parametrize("device", ["cpu", ON_CUDA])
@pytest.mark.parametrize("name", ["vit", "mamba_hybrid", "e3nn", "dgcnn"])
def test_an_epoch_with_bf16_autocast(name, device):
    device = torch.device(device)
    torch.manual_seed(0)
    model = build(name, num_classes=3).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    is_image = name in ("vit", "mamba_hybrid")
    x = torch.randn(8, 4, 32, 32) if is_image else torch.randn(8, 256, 3)
    y = torch.randint(0, 3, (8,))
    settings = StepSettings(batch_size=4, augment="none" if is_image else "so3", bf16=True)
    loss = train_one_epoch(model, optimizer, x, y, settings, torch.Generator().manual_seed(0), device)
    assert np.isfinite(loss)
    assert 0.0 <= accuracy(model, x, y, 4, device, bf16=True) <= 1.0


@pytest.mark.parametrize("device", ["cpu", ON_CUDA])
def test_fused_adamw_takes_the_per_tensor_loops_steps_and_resumes_from_its_state(device):
    # Both groups (decayed and not), a schedule and clipping, as a trial trains; then the fused optimizer
    # resumes from the loop's state, as a retried trial would after the kernel changed.
    from perception.training import adamw, adamw_ref, parameter_groups

    device = torch.device(device)
    x, y = torch.randn(32, 4, 32, 32), torch.randint(0, 3, (32,))
    settings = StepSettings(batch_size=8, grad_clip=1.0)
    models, optimizers = [], []
    for make in (adamw, adamw_ref):
        torch.manual_seed(0)
        model = build("mamba_hybrid", num_classes=3, in_channels=4, patch_size=4).to(device)
        models_at_start = [p.detach().clone() for p in model.parameters()]
        optimizer = make(parameter_groups(model, 0.05), 2e-3)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(3, 1))
        for _ in range(2):
            train_one_epoch(model, optimizer, x, y, settings, torch.Generator().manual_seed(0), device)
            schedule.step()
        models.append(model)
        optimizers.append(optimizer)
    (fused, loop), (fused_opt, loop_opt) = models, optimizers
    assert fused_opt.defaults["fused"] and not loop_opt.defaults["fused"]
    # Eight steps of at most lr = 2e-3 each: the two may part by rounding, a few hundredths of one step.
    for (name, a), b in zip(fused.named_parameters(), loop.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
    moved = max((a - b).abs().max() for a, b in zip(fused.parameters(), models_at_start, strict=True))
    assert moved > 1e-3  # the comparison is of parameters that did move
    resumed = adamw(parameter_groups(loop, 0.05), 2e-3)
    resumed.load_state_dict(loop_opt.state_dict())
    states = (resumed.state_dict()["state"].values(), loop_opt.state_dict()["state"].values())
    for a, b in zip(*states, strict=True):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


def test_mambas_time_scales_are_not_decayed():
    from perception.training import NO_WEIGHT_DECAY, parameter_groups

    model = build("mamba_hybrid", num_classes=3, in_channels=4, patch_size=4)
    decay, keep = parameter_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and keep["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    kept = {names[id(p)].rsplit(".", 1)[-1] for p in keep["params"]}
    assert kept == set(NO_WEIGHT_DECAY)
    assert len(decay["params"]) + len(keep["params"]) == len(list(model.parameters()))
    assert len(parameter_groups(build("vit", num_classes=3), 0.05)) == 1  # nothing to keep


def test_the_last_quarter_gain_of_a_validation_curve():
    from perception.training import last_quarter_gain

    assert last_quarter_gain([0.2, 0.4, 0.6, 0.8]) == pytest.approx(0.2)  # last 2 epochs: +0.2
    assert last_quarter_gain([0.1] * 4 + [0.5, 0.6, 0.7, 0.8]) == pytest.approx(0.1)  # 8 epochs: the last 2
    flat = [0.3, 0.6, 0.8, 0.85, 0.9, 0.9, 0.91, 0.9, 0.9]  # 9 epochs: the last 3, a line through them
    assert abs(last_quarter_gain(flat)) < 0.01
    noisy = [0.5] * 3 + [0.8] * 8 + [0.8, 0.84, 0.8, 0.8]  # one lucky epoch moves it less than its 4 points
    assert abs(last_quarter_gain(noisy)) < 0.02
    assert np.isnan(last_quarter_gain([0.5]))


@pytest.mark.parametrize("epochs", [2, 3, 4, 7, 12, 14, 20, 24])
def test_the_last_quarter_weights_give_the_least_squares_gain(epochs):
    # The weights are the fast, linear form of last_quarter_gain (np.polyfit, the reference).
    from perception.training import last_quarter_gain, last_quarter_weights

    curve = np.random.default_rng(epochs).uniform(0.3, 0.9, size=epochs)
    weights = last_quarter_weights(epochs)
    assert float(weights @ curve[-len(weights) :]) == pytest.approx(last_quarter_gain(curve), abs=1e-12)
    assert abs(weights.sum()) < 1e-12  # a constant curve gains nothing


def test_per_sample_correctness_packs_to_hex_and_back():
    from perception.training import pack_correct, unpack_correct

    for count in (1, 7, 8, 9, 169):
        correct = np.random.default_rng(count).random(count) < 0.6
        packed = pack_correct(torch.from_numpy(correct))
        assert len(packed) == 2 * -(-count // 8)
        assert np.array_equal(unpack_correct(packed, count), correct)
    with pytest.raises(ValueError, match="cannot hold 9 samples"):
        unpack_correct("ff", 9)


def _correctness(rng, accuracy_per_epoch, samples):
    """bool[E, N]: each epoch's samples right with that epoch's probability, a sample once learned kept."""
    learned = rng.random(samples)  # a sample is right from the epoch its accuracy passes this
    return np.stack([learned < acc for acc in accuracy_per_epoch])


def test_the_plateau_gain_is_the_mean_of_the_seeds_gains_with_an_interval():
    from perception.evaluation.intervals import BootstrapSettings
    from perception.evaluation.plateau import plateau_gain
    from perception.training import last_quarter_gain

    rng = np.random.default_rng(0)
    seeds = [_correctness(rng, np.linspace(0.4, 0.9, 12), 169) for _ in range(3)]
    gain = plateau_gain(seeds, BootstrapSettings(500, 0))
    per_seed = [last_quarter_gain(c.mean(axis=1)) for c in seeds]
    assert gain.value == pytest.approx(np.mean(per_seed), abs=1e-12)
    assert gain.lo < gain.value < gain.hi
    with pytest.raises(ValueError, match="all alike"):
        plateau_gain([seeds[0], seeds[1][:, :100]], BootstrapSettings(10, 0))


def test_the_plateau_call_moves_with_the_curve_and_with_what_the_split_can_resolve():
    from perception.evaluation.intervals import BootstrapSettings
    from perception.evaluation.plateau import plateau_call, plateau_gain

    settings = BootstrapSettings(1000, 0)
    rng = np.random.default_rng(1)

    def call(accuracies, samples):
        seeds = [_correctness(rng, accuracies, samples) for _ in range(3)]
        return plateau_call(plateau_gain(seeds, settings).scaled(100))

    rising = np.linspace(0.3, 0.9, 12)  # 5 points over the last quarter
    flat = np.r_[np.linspace(0.3, 0.85, 8), [0.85] * 4]
    assert call(rising, 2000) == "rising"
    assert call(flat, 2000) == "flat"
    # The same flat curve on a split of 40 samples with samples that flip between epochs: undecided.
    noisy = [rng.random((12, 40)) < 0.85 for _ in range(3)]
    assert plateau_call(plateau_gain(noisy, settings).scaled(100)) == "undecided"


@pytest.mark.parametrize(
    "value, lo, hi, call",
    [
        (0.5, -0.2, 0.9, "flat"),  # under a point, interval and all, though it may still creep up
        (0.5, 0.1, 1.2, "rising"),  # surely still gaining, and a point is not ruled out
        (2.0, 1.5, 2.5, "rising"),
        (0.5, -0.2, 1.2, "undecided"),  # neither gaining for sure nor under a point for sure
        (-2.0, -4.0, 1.0, "undecided"),  # the line is the threshold: "under" is strict
        (0.0, 0.0, 0.0, "flat"),
    ],
)
def test_the_plateau_call_reads_the_interval_against_zero_and_one_point(value, lo, hi, call):
    from perception.evaluation.intervals import Estimate
    from perception.evaluation.plateau import plateau_call

    assert plateau_call(Estimate(value, lo, hi)) == call
