"""The pure uncertainty library: SWAG sampling, ensembles, MC dropout and the statistics."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from flplatform.uncertainty import (
    Ensemble,
    IncompatibleMoments,
    Method,
    PredictionError,
    SamplingOptions,
    interpret,
    is_dropout,
    predict,
    sample_parameters,
    swag_variance,
)


class DropoutNet(nn.Module):
    def __init__(self, p: float = 0.5):
        super().__init__()
        self.fc1 = nn.Linear(4, 16)
        self.norm = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(p)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.norm(self.fc1(x)))))


def scripted(module: nn.Module) -> torch.jit.ScriptModule:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    return torch.jit.load(io.BytesIO(buffer.getvalue()))


def linear(weight: list[list[float]], bias: list[float]) -> nn.Linear:
    layer = nn.Linear(len(weight[0]), len(weight))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.copy_(torch.tensor(bias))
    return layer.eval()


# --------------------------------------------------------------------------- SWAG


def test_swag_samples_converge_to_the_stored_moments():
    torch.manual_seed(0)
    mean = torch.randn(50)
    variance = torch.rand(50) * 0.5 + 0.01
    second = variance + mean**2
    draws = torch.stack(
        list(sample_parameters(mean, second, 4000, generator=torch.Generator().manual_seed(1)))
    )
    assert draws.shape == (4000, 50)
    # Sample mean within 5 standard errors, sample variance within 10 %.
    assert torch.all((draws.mean(0) - mean).abs() < 5 * (variance / 4000).sqrt())
    assert torch.allclose(draws.var(0), variance, rtol=0.1)
    # Independent draws: no two samples are equal (the reference expanded one draw N times).
    assert torch.unique(draws, dim=0).shape[0] == 4000


def test_swag_variance_is_clamped_and_computed_in_double():
    mean = torch.tensor([1e4, 0.0])
    second = torch.tensor([1e8, -1.0])  # rounding (and a bogus value) give variance <= 0
    variance = swag_variance(mean, second, min_var=1e-6)
    assert variance.dtype == torch.float64
    assert torch.all(variance >= 1e-6)
    draws = list(sample_parameters(mean, second, 3, min_var=1e-6))
    assert all(torch.isfinite(d).all() for d in draws)


def test_swag_scale_and_seed():
    mean, second = torch.zeros(10), torch.ones(10)
    a = list(sample_parameters(mean, second, 2, generator=torch.Generator().manual_seed(3)))
    b = list(sample_parameters(mean, second, 2, generator=torch.Generator().manual_seed(3)))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    zero = list(sample_parameters(mean, second, 2, scale=0.0))
    assert all(torch.equal(z, mean) for z in zero)


def test_swag_prediction_samples_differ_and_average():
    torch.manual_seed(0)
    module = scripted(nn.Sequential(nn.Linear(3, 2)))
    first = torch.nn.utils.parameters_to_vector(module.parameters()).detach()
    second = first**2 + 0.05
    x = torch.randn(5, 3)
    options = SamplingOptions(samples=8, seed=7)
    result = predict(Method.SWAG, module, x, options, moments=(first, second))
    assert result.samples.shape == (8, 5, 2)
    assert not torch.equal(result.samples[0], result.samples[1])
    assert torch.allclose(result.mean, result.samples.mean(0))
    assert torch.all(result.uncertainty["variance"] > 0)
    again = predict(Method.SWAG, module, x, options, moments=(first, second))
    assert torch.equal(result.samples, again.samples)
    # The cached module is not modified by sampling.
    assert torch.equal(torch.nn.utils.parameters_to_vector(module.parameters()), first)


def test_swag_rejects_moments_that_do_not_fit():
    module = nn.Linear(3, 2)
    x = torch.randn(1, 3)
    with pytest.raises(IncompatibleMoments, match="8 parameters"):
        predict(Method.SWAG, module, x, SamplingOptions(), moments=(torch.zeros(5), torch.ones(5)))
    with pytest.raises(IncompatibleMoments, match="differ in length"):
        predict(Method.SWAG, module, x, SamplingOptions(), moments=(torch.zeros(8), torch.ones(7)))
    with pytest.raises(IncompatibleMoments, match="NaN"):
        predict(
            Method.SWAG, module, x, SamplingOptions(), moments=(torch.full((8,), math.nan), torch.ones(8))
        )


# --------------------------------------------------------------------------- ensembles


def test_ensemble_of_identical_members_has_zero_variance():
    member = linear([[1.0, 2.0], [0.5, -1.0]], [0.1, 0.2])
    result = predict(
        Method.ENSEMBLE, Ensemble([member, member, member]), torch.randn(4, 2), SamplingOptions()
    )
    assert result.samples.shape == (3, 4, 2)
    assert torch.count_nonzero(result.uncertainty["variance"]) == 0


def test_ensemble_of_different_members_reports_the_exact_variance():
    a = linear([[1.0, 0.0], [0.0, 1.0]], [0.0, 0.0])
    b = linear([[3.0, 0.0], [0.0, -1.0]], [1.0, 0.0])
    x = torch.tensor([[1.0, 2.0]])
    result = predict(Method.ENSEMBLE, Ensemble([a, b]), x, SamplingOptions())
    # a(x) = [1, 2], b(x) = [4, -2]: mean [2.5, 0], population variance [2.25, 4].
    assert torch.allclose(result.mean, torch.tensor([[2.5, 0.0]]))
    assert torch.allclose(result.uncertainty["variance"], torch.tensor([[2.25, 4.0]]))
    assert torch.allclose(result.uncertainty["std"], torch.tensor([[1.5, 2.0]]))
    # NONE on a mean model is one forward pass that averages the members.
    single = predict(Method.NONE, Ensemble([a, b]), x, SamplingOptions())
    assert torch.allclose(single.mean, torch.tensor([[2.5, 0.0]])) and single.uncertainty == {}
    assert single.prediction.tolist() == [0]


def test_ensemble_needs_a_mean_model():
    with pytest.raises(PredictionError, match="MEAN model"):
        predict(Method.ENSEMBLE, nn.Linear(2, 2), torch.randn(1, 2), SamplingOptions())


# --------------------------------------------------------------------------- MC dropout


@pytest.mark.parametrize("script", [False, True], ids=["eager", "torchscript"])
def test_mc_dropout_variance_with_and_without_dropout(script):
    torch.manual_seed(0)
    net = DropoutNet()
    net.train()
    net(torch.randn(64, 4))  # non-trivial BatchNorm running statistics
    net.eval()
    model = scripted(net) if script else net
    x = torch.randn(6, 4)
    result = predict(Method.MC_DROPOUT, model, x, SamplingOptions(samples=20, seed=1))
    assert result.dropout_layers == 1
    assert torch.all(result.uncertainty["variance"].sum(1) > 0)
    # Everything but dropout stays in eval mode (BatchNorm uses its running statistics), so a
    # dropout rate of 0 gives exactly the eval-mode output and zero variance.
    no_drop = DropoutNet(p=0.0)
    no_drop.load_state_dict(net.state_dict())
    no_drop.eval()
    model = scripted(no_drop) if script else no_drop
    result = predict(Method.MC_DROPOUT, model, x, SamplingOptions(samples=5))
    assert torch.count_nonzero(result.uncertainty["variance"]) == 0
    assert torch.allclose(result.mean, net(x).detach(), atol=1e-6)
    # The shared (cached) module is left in eval mode.
    assert not any(m.training for m in model.modules())


def test_mc_dropout_is_seedable_and_counts_layers():
    net = DropoutNet().eval()
    x = torch.randn(3, 4)
    a = predict(Method.MC_DROPOUT, net, x, SamplingOptions(samples=4, seed=5))
    b = predict(Method.MC_DROPOUT, net, x, SamplingOptions(samples=4, seed=5))
    assert torch.equal(a.samples, b.samples)
    plain = predict(Method.MC_DROPOUT, nn.Linear(4, 3).eval(), x, SamplingOptions(samples=3))
    assert plain.dropout_layers == 0 and torch.count_nonzero(plain.uncertainty["variance"]) == 0


def test_dropout_detection_by_torchscript_type():
    module = scripted(nn.Sequential(nn.Linear(2, 2), nn.AlphaDropout(0.2), nn.Dropout2d(0.1)))
    assert [is_dropout(m) for m in module.children()] == [False, True, True]


# --------------------------------------------------------------------------- statistics


def test_entropies_and_mutual_information_against_hand_computed_values():
    samples = torch.tensor([[[0.5, 0.5]], [[1.0, 0.0]]])  # S=2, B=1, C=2
    stats = interpret(samples, correction=0)
    predictive = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    expected = (math.log(2) + 0.0) / 2
    assert stats["predictive_entropy"].item() == pytest.approx(predictive, abs=1e-6)
    assert stats["expected_entropy"].item() == pytest.approx(expected, abs=1e-6)
    assert stats["mutual_info"].item() == pytest.approx(predictive - expected, abs=1e-6)
    assert torch.allclose(stats["variance"], torch.tensor([[0.0625, 0.0625]]))
    unbiased = interpret(samples, correction=1)
    assert torch.allclose(unbiased["variance"], torch.tensor([[0.125, 0.125]]))


def test_agreeing_members_have_zero_mutual_information():
    p = torch.tensor([0.2, 0.3, 0.5])
    stats = interpret(p.expand(4, 2, 3).clone())
    assert torch.allclose(stats["mutual_info"], torch.zeros(2))
    assert torch.allclose(stats["predictive_entropy"], stats["expected_entropy"])


def test_entropies_only_for_probabilities():
    assert set(interpret(torch.randn(3, 2, 4))) == {"variance", "std"}
    assert set(interpret(torch.full((3, 2, 4), 0.1))) == {"variance", "std"}  # in [0,1] but sums to 0.4
    softmaxed = predict(
        Method.MC_DROPOUT, DropoutNet().eval(), torch.randn(2, 4), SamplingOptions(samples=3, softmax=True)
    )
    assert {"predictive_entropy", "expected_entropy", "mutual_info"} <= set(softmaxed.uncertainty)
    assert softmaxed.uncertainty["mutual_info"].shape == (2,)


def test_bad_model_outputs_are_prediction_errors():
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    with pytest.raises(PredictionError, match="not a tensor"):
        predict(Method.NONE, Pair(), torch.randn(2, 2), SamplingOptions())
    with pytest.raises(PredictionError, match="failed on this input"):
        predict(Method.NONE, nn.Linear(3, 2), torch.randn(2, 5), SamplingOptions())

    class RowSum(nn.Module):
        def forward(self, x):
            return x.sum(1)

    with pytest.raises(PredictionError, match="class dimension"):
        predict(Method.NONE, RowSum(), torch.randn(2, 2), SamplingOptions(softmax=True))
    with pytest.raises(PredictionError, match="one prediction per input row"):
        predict(Method.NONE, nn.Flatten(0), torch.randn(2, 2), SamplingOptions())
