"""Posterior diagnostics on constructed models whose answers are known: active units (Burda et
al.'s covariance criterion), the KL per latent dimension in closed form, the collapse warning,
exact sums across processes; and the pictures' shapes and geometry."""

import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributions import Independent, Normal

from vaelab.diagnostics import (
    PosteriorStats,
    collapse_message,
    expected_latent,
    most_active_dims,
    update_posterior_stats,
)
from vaelab.likelihoods import Gaussian
from vaelab.pictures import (
    interpolations,
    kl_bars,
    latent_scatter,
    project_2d,
    rate_distortion,
    traversals,
)
from vaelab.priors import StandardNormal

Z = 6
SHAPE = (1, 2, 2)
# q(z|x) = N(μ(x), diag σ²): dims 0..2 follow x; dim 3 moves with x but below the threshold
# (variance 0.005 < 0.01); dims 4, 5 are constant. σ is fixed per dimension.
SIGMA = torch.tensor([0.3, 0.5, 0.8, 1.0, 1.0, 0.2])
CONST = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.5])


class ConstructedVAE(nn.Module):
    """Only what the diagnostics use: encode, prior_distribution, decode, latent_dim."""

    latent_dim = Z

    def __init__(self):
        super().__init__()
        self.prior = StandardNormal(Z)
        self.likelihood = Gaussian(sigma=0.1)
        self.decoder = nn.Linear(Z, math.prod(SHAPE))

    def means(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        mu = CONST.expand(len(x), Z).clone()
        mu[:, 0:3] = flat[:, 0:3] * torch.tensor([1.0, 2.0, 0.5])
        mu[:, 3] = 0.07071 * flat[:, 3]  # Var = 0.07071² · Var(x_3) = 0.005 for Var(x_3) = 1
        return mu

    def encode(self, x: torch.Tensor):
        mu = self.means(x)
        return Independent(Normal(mu, SIGMA.expand_as(mu)), 1)

    def prior_distribution(self):
        return self.prior()

    def decode(self, z: torch.Tensor):
        return self.likelihood(self.decoder(z).reshape(*z.shape[:-1], *SHAPE))


def standardized(n: int) -> torch.Tensor:
    """x whose pixels have mean 0 and (population) variance 1 exactly."""
    x = torch.randn(n, math.prod(SHAPE), dtype=torch.float64)
    x = (x - x.mean(0)) / x.std(0, unbiased=False)
    return x.float().reshape(n, *SHAPE)


def closed_form_kl(mu: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, 1)) = ½ (σ² + μ² − 1 − log σ²) per dimension, averaged over x."""
    return (0.5 * (SIGMA**2 + mu.double() ** 2 - 1 - torch.log(SIGMA**2))).mean(0)


def test_exactly_three_active_units_and_per_dimension_kl_in_closed_form():
    vae = ConstructedVAE()
    x = standardized(400)
    stats = PosteriorStats(Z)
    for batch in x.split(64):  # batches of unequal size: the sums must not care
        update_posterior_stats(stats, vae, batch)
    diag = stats.compute()
    assert diag["num_examples"] == 400
    assert diag["active_units"] == 3
    assert diag["active"] == [True, True, True, False, False, False]
    mu = vae.means(x)
    expected_var = mu.double().var(0, unbiased=False)
    torch.testing.assert_close(torch.tensor(diag["variance_of_means"], dtype=torch.float64), expected_var,
                               atol=1e-5, rtol=1e-5)
    assert diag["variance_of_means"][0] == pytest.approx(1.0, abs=1e-5)
    assert diag["variance_of_means"][1] == pytest.approx(4.0, abs=1e-4)
    assert diag["variance_of_means"][2] == pytest.approx(0.25, abs=1e-5)
    assert diag["variance_of_means"][3] == pytest.approx(0.005, abs=1e-4)  # moves, but inactive
    assert diag["variance_of_means"][4] == pytest.approx(0.0, abs=1e-9)
    torch.testing.assert_close(torch.tensor(diag["kl_per_dim"], dtype=torch.float64), closed_form_kl(mu),
                               atol=1e-5, rtol=1e-5)
    # dim 5: a constant mean 1.5 and σ = 0.2 cost KL = ½(0.04 + 2.25 − 1 − log 0.04) nats for every x
    assert diag["kl_per_dim"][5] == pytest.approx(0.5 * (0.04 + 2.25 - 1 - math.log(0.04)), abs=1e-5)
    assert most_active_dims(diag, 3) == [1, 0, 2]


def test_sums_merge_exactly_across_processes():
    """What DDP does to the states (a sum over processes) gives the single-process answer."""
    vae = ConstructedVAE()
    x = standardized(300)
    whole, left, right = PosteriorStats(Z), PosteriorStats(Z), PosteriorStats(Z)
    update_posterior_stats(whole, vae, x)
    update_posterior_stats(left, vae, x[:170])
    update_posterior_stats(right, vae, x[170:])
    left.merge_state(right)
    a, b = whole.compute(), left.compute()
    assert a["num_examples"] == b["num_examples"] == 300 and a["active_units"] == b["active_units"] == 3
    for key in ("variance_of_means", "kl_per_dim", "mean_of_means"):
        torch.testing.assert_close(torch.tensor(a[key]), torch.tensor(b[key]), atol=1e-9, rtol=1e-9)
    # one half alone is another answer: the sum over processes is what makes it exact
    update_posterior_stats(alone := PosteriorStats(Z), vae, x[170:])
    assert alone.compute()["num_examples"] == 130


def test_active_units_of_a_posterior_without_an_exact_mean_use_e_q_z_with_its_noise_taken_out():
    """A posterior whose ``mean`` is not E_q[z] (an IAF's is g(E[z0])): z = exp(z0), z0 ~ N(μ, σ²),
    so E_q[z] = exp(μ + σ²/2) in closed form. Dim 0: μ = 0 for all x but σ moves with x, so
    E_q[z] moves (active, variance known) while g(E[z0]) = 1 does not. Dim 1: nothing moves
    (inactive), but Var_q[z] = (e − 1)e ≈ 4.67, so a 256-sample mean left with its noise would
    read ≈ 0.018 > 0.01: active. Dim 2: μ moves, σ small (active under both)."""
    from torch.distributions import ExpTransform, TransformedDistribution

    torch.manual_seed(0)
    n = 3000
    mu = torch.zeros(n, 3, dtype=torch.float64)
    sigma = torch.ones(n, 3, dtype=torch.float64)
    sigma[:, 0] = torch.linspace(0.2, 1.0, n, dtype=torch.float64)
    mu[:, 2] = torch.linspace(-1.0, 1.0, n, dtype=torch.float64)
    sigma[:, 2] = 0.1
    exact = torch.exp(mu + sigma**2 / 2)  # E_q[z]
    stats = PosteriorStats(3)
    for rows in torch.arange(n).split(500):  # in batches, as the test loop gives them
        q = Independent(TransformedDistribution(Normal(mu[rows], sigma[rows]), [ExpTransform()]), 1)
        q.exact_mean = False
        mean, noise = expected_latent(q)
        assert noise is not None and mean.shape == noise.shape == (len(rows), 3)
        stats.update(mean, None, noise)
    diag = stats.compute()
    truth = exact.var(0, unbiased=False)
    assert diag["active"] == [True, False, True] and diag["active_units"] == 2
    assert diag["variance_of_means"][0] == pytest.approx(truth[0].item(), abs=0.004)
    assert diag["variance_of_means"][1] == pytest.approx(0.0, abs=0.004)
    assert diag["variance_of_means"][2] == pytest.approx(truth[2].item(), rel=0.02)
    # a posterior whose mean is exact: that mean, and no noise
    q = Independent(Normal(mu[:4], sigma[:4]), 1)
    mean, noise = expected_latent(q)
    assert noise is None and torch.equal(mean, mu[:4])


def test_an_iaf_posterior_reports_e_q_z_not_the_image_of_its_base_mean():
    """posterior=iaf: its ``mean`` (what the pictures decode) is g(E[z0]); the diagnostics take
    E_q[z], here checked against a 40000-sample average."""
    from vaelab.posteriors import IAF

    torch.manual_seed(1)
    iaf = IAF(latent_dim=4, num_transforms=2, context_features=3, hidden_features=(16,))
    for p in iaf.parameters():  # a flow far from the identity, so that g(E[z0]) ≠ E_q[z]
        p.data.normal_(0, 0.4)
    params = torch.randn(5, iaf.num_params(4))
    with torch.no_grad():
        q = iaf(params)
        assert q.exact_mean is False
        mean, noise = expected_latent(q)
        reference = q.sample((40000,)).mean(0)
        centre = q.mean
    assert noise is not None
    sd = noise.sqrt()  # of the 256-sample mean (the reference's is 13x smaller)
    # χ² over the 20 entries (20 degrees of freedom: above 45 one time in a thousand)
    assert (((mean - reference) / sd) ** 2).sum() < 45
    assert (((centre - reference) / sd) ** 2).sum() > 150  # g(E[z0]) is off E_q[z]


def test_the_test_loops_diagnostics_take_e_q_z_of_an_iaf_posterior():
    """update_posterior_stats (what the test loop calls) on an IAF posterior: the variance over x
    of E_q[z], as a 20000-sample average per example gives it; not that of g(E[z0])."""
    from vaelab.posteriors import IAF

    torch.manual_seed(3)
    iaf = IAF(latent_dim=3, num_transforms=2, context_features=2, hidden_features=(16,))
    for p in iaf.parameters():  # a flow far from affine: E_q[z] and g(E[z0]) vary differently over x
        p.data.normal_(0, 0.6)
    params = torch.randn(400, iaf.num_params(3))

    class IAFEncoded:
        latent_dim = 3

        def encode(self, x):
            return iaf(params[x.long()])

        def prior_distribution(self):
            return StandardNormal(3)()

    stats = PosteriorStats(3)
    with torch.no_grad():
        update_posterior_stats(stats, IAFEncoded(), torch.arange(400.0))
        q = iaf(params)
        exact = q.sample((20000,)).mean(0).double().var(0, unbiased=False)
        centre = q.mean.double().var(0, unbiased=False)
    got = torch.tensor(stats.compute()["variance_of_means"], dtype=torch.float64)
    torch.testing.assert_close(got, exact, rtol=0.05, atol=0.0)
    assert ((got - centre).abs() > 0.15 * exact).any(), (got, centre)  # g(E[z0]) would be another answer


def test_per_dimension_kl_is_none_where_the_kl_does_not_split():
    from vaelab.priors import MixtureOfGaussians

    vae = ConstructedVAE()
    vae.prior = MixtureOfGaussians(Z, num_components=3)
    stats = PosteriorStats(Z)
    update_posterior_stats(stats, vae, standardized(50))
    diag = stats.compute()
    assert diag["kl_per_dim"] is None and diag["active_units"] == 3


def test_collapse_warning():
    """A KL of almost nothing is a collapse (q ≈ p); no active unit with a KL that is not small
    is said as it is (it was called q ≈ p with a KL of 21.9 nats: helpers 17 and 18)."""
    assert "posterior collapse" in collapse_message(2, 16, 0.01)
    assert "posterior collapse" in collapse_message(0, 16, 0.01)
    message = collapse_message(0, 16, 3.0)
    assert message.startswith("no active latent dimensions: 0 of 16") and "KL(q(z|x) ‖ p(z)) = 3.0000 nats" in message
    assert "q(z|x) ≈ p(z)" not in message and "objective.warmup" in message
    assert collapse_message(3, 16, 5.0) is None


def test_pictures_have_the_expected_sizes_and_geometry():
    vae = ConstructedVAE()
    x = standardized(10)
    mu = vae.means(x)
    images = traversals(vae, mu[0], [1, 0], torch.zeros(Z), torch.ones(Z), steps=5)
    assert images.shape == (2 * 5, *SHAPE)
    # the middle column is z0 with dim u at its centre (0): the decoded mean at that z
    z = mu[0].clone()
    z[1] = 0.0
    torch.testing.assert_close(images[2], vae.decode(z).mean)
    rows = interpolations(vae, x[:3], x[3:6], steps=4)
    assert rows.shape == (3 * 6, *SHAPE)
    torch.testing.assert_close(rows[0], x[0])  # x_a, then decode(μ_a) ... decode(μ_b), then x_b
    torch.testing.assert_close(rows[1], vae.decode(mu[0]).mean)
    torch.testing.assert_close(rows[4], vae.decode(mu[3]).mean)
    torch.testing.assert_close(rows[5], x[3])
    for image in (latent_scatter(mu, torch.arange(10) % 3), latent_scatter(mu, torch.full((10,), -1)),
                  kl_bars([0.1] * Z, [True] * 3 + [False] * 3), rate_distortion([0, 1, 2], [1, 2, 3], [9, 8, 7])):
        assert image.shape == (3, 480, 640) and 0 <= image.min() and image.max() <= 1


def test_latent_projection_is_the_means_in_2d_and_pca_otherwise():
    means = torch.randn(50, 2)
    points, xl, yl = project_2d(means)
    torch.testing.assert_close(torch.from_numpy(points).float(), means)
    assert (xl, yl) == ("z_0", "z_1")
    # 5-D data living on a 2-D plane: PCA keeps all of its variance
    plane = torch.randn(50, 2) @ torch.randn(2, 5)
    points, xl, _ = project_2d(plane)
    assert points.shape == (50, 2) and "PC 1" in xl
    assert points.var(0, ddof=1).sum() == pytest.approx(plane.double().var(0).sum().item(), rel=1e-6)


def test_the_pictured_examples_are_spread_over_a_split_stored_by_class():
    """Binarized MNIST's test file is stored by class: its first 16 examples are all zeros, and
    its first 5,000 half the classes. The pictures take a fixed subset drawn over the split."""
    from vaelab.callbacks import spread_examples

    labels = torch.arange(10).repeat_interleave(1000)  # sorted by class, as that file
    picked = spread_examples(len(labels), 16, seed=0)
    assert len(picked) == 16 and torch.equal(picked, picked.sort().values) and len(set(picked.tolist())) == 16
    assert len(set(labels[picked].tolist())) >= 6
    assert len(set(labels[spread_examples(len(labels), 5000, seed=0)].tolist())) == 10
    assert torch.equal(picked, spread_examples(len(labels), 16, seed=0))  # the same examples every epoch
    assert torch.equal(spread_examples(12, 16, seed=0), torch.arange(12))


# --- ImageLogger: what the pictures show, and that drawing them changes nothing else ----------
def _pictured_module(tmp_path, *overrides):
    from types import SimpleNamespace

    from test_likelihoods_more import _module

    _, dm, build = _module(tmp_path, "latent_dim=4", *overrides)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    return dm, build(), SimpleNamespace(datamodule=dm)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])  # dynamic binarization; dequantization
def test_drawing_the_pictures_leaves_the_training_random_streams_alone(tmp_path, likelihood):
    """The validation pictures' inputs go through the data's binarization or dequantization,
    which draw random numbers: drawn under the pictures' own seed, they are the same every
    epoch and the training's random streams are where they were (a run with pictures every
    epoch trains as one without)."""
    from vaelab.callbacks import ImageLogger

    dm, module, trainer = _pictured_module(tmp_path, f"likelihood={likelihood}")
    assert dm.binarize == "dynamic" if likelihood == "bernoulli" else dm.dequantize
    images = ImageLogger(save_dir=None, num_images=8, num_samples=4)
    torch.manual_seed(3)
    state = torch.get_rng_state()
    first = images.pictures(trainer, module)
    assert torch.equal(torch.get_rng_state(), state)
    second = images.pictures(trainer, module)
    assert set(first) == {"val/reconstructions", "val/samples"}
    for key, (grid, _) in first.items():
        assert torch.equal(grid, second[key][0]), key


def test_the_test_pictures_show_examples_from_the_whole_of_a_split_stored_by_class(tmp_path, monkeypatch):
    """test/reconstructions and test/interpolations take their images from the examples drawn
    over the whole split, not from the first ones of a split stored by class (binarized
    MNIST's test file: its first hundreds are all zeros)."""
    from vaelab import callbacks, pictures
    from vaelab.datamodules import InMemoryImages

    dm, module, trainer = _pictured_module(tmp_path, "likelihood=gaussian", "data.dequantize=false")
    levels = dm.num_levels - 1
    # 100 images of each class c, every pixel at level c, stored by class
    labels = torch.arange(10).repeat_interleave(100)
    dm.test_set = InMemoryImages((labels * levels // 9).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 8, 8).clone(),
                                 labels)

    def classes(x):
        return set((x[:, 0, 0, 0] * 9).round().long().tolist())

    shown, ends = [], []
    real = module.vae.reconstruct
    module.vae.reconstruct = lambda x: (shown.append(x), real(x))[1]
    real_interpolations = pictures.interpolations
    monkeypatch.setattr(pictures, "interpolations",
                        lambda vae, xa, xb, steps: (ends.append((xa, xb)), real_interpolations(vae, xa, xb, steps))[1])
    out = callbacks.ImageLogger(save_dir=None, num_images=16).test_pictures_of(trainer, module)
    assert {"test/reconstructions", "test/traversals", "test/interpolations"} <= set(out)
    (x,) = shown
    assert len(x) == 16 and len(classes(x)) >= 6, classes(x)
    (xa, xb), = ends
    assert len(xa) == len(xb) == 4 and len(classes(xa) | classes(xb)) >= 4
    assert not torch.equal(xa, xb)


def _fake_trainer(epoch, **kwargs):
    from types import SimpleNamespace

    defaults = dict(sanity_checking=False, current_epoch=epoch, max_epochs=3, max_steps=-1, global_step=20 * epoch + 20,
                    check_val_every_n_epoch=1, val_check_batch=20, num_training_batches=20, loggers=[],
                    fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=20 * epoch + 19)))
    return SimpleNamespace(**{**defaults, **kwargs})


def test_the_last_epoch_has_its_pictures_and_each_validation_its_own_file(tmp_path):
    """every_n_epochs=2 of 3 epochs: pictures after the second and the last; several
    validations an epoch (trainer.val_check_interval < 1): one file each, named by its step, the
    global step that a checkpoint saved then is named by (the loggers' step is one below)."""
    from types import SimpleNamespace

    from vaelab.callbacks import ImageLogger

    images = ImageLogger(save_dir=str(tmp_path), every_n_epochs=2)
    images.pictures = lambda trainer, module: {"val/samples": (torch.rand(3, 8, 8), "caption")}
    for epoch in range(3):
        images.on_validation_epoch_end(_fake_trainer(epoch), None)
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["epoch=0001.png", "epoch=0002.png"]
    mid = _fake_trainer(1, val_check_batch=10, global_step=30,
                        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=29)))
    images.on_validation_epoch_end(mid, None)
    assert (tmp_path / "samples" / "epoch=0001-step=30.png").is_file()
    # a validation every few seconds (trainer.val_check_interval a time: val_check_batch None)
    timed = _fake_trainer(1, val_check_batch=None)
    images.on_validation_epoch_end(timed, None)
    assert (tmp_path / "samples" / "epoch=0001-step=40.png").is_file()
    # the last validation that the limits allow: trainer.max_steps reached; the last validating
    # epoch of trainer.max_epochs (check_val_every_n_epoch=2 of 3 epochs: the second, and of 5
    # epochs not the second)
    images = ImageLogger(save_dir=str(tmp_path / "limits"), every_n_epochs=5)
    images.pictures = lambda trainer, module: {"val/samples": (torch.rand(3, 8, 8), "caption")}
    images.on_validation_epoch_end(_fake_trainer(0, max_steps=20, max_epochs=10), None)
    images.on_validation_epoch_end(_fake_trainer(1, max_epochs=3, check_val_every_n_epoch=2), None)
    images.on_validation_epoch_end(_fake_trainer(1, max_epochs=5, check_val_every_n_epoch=2), None)  # not yet
    images.on_validation_epoch_end(_fake_trainer(0, max_steps=40, max_epochs=10), None)  # not yet
    assert sorted(p.name for p in (tmp_path / "limits" / "samples").iterdir()) == ["epoch=0000.png", "epoch=0001.png"]


def test_a_picture_sent_to_wandb_without_a_file_has_the_files_pixels_at_the_scalars_step(tmp_path):
    """callbacks.images.save_dir=null: W&B gets the picture itself, with save_png's pixels (a
    float tensor in [0, 1] it would cast to uint8: black), at the step Lightning logs the
    validation's numbers at (the epoch's last step, one below global_step)."""
    import numpy as np
    from PIL import Image
    from test_loggers import FakeRun, _logger

    from vaelab.callbacks import ImageLogger
    from vaelab.pictures import save_png

    run = FakeRun()
    trainer = _fake_trainer(0, global_step=20, loggers=[_logger(tmp_path, run, background=False)])
    picture = torch.rand(3, 8, 8)
    ImageLogger(save_dir=None)._emit(trainer, "val/samples", picture, "caption", Path("unused.png"))
    ((_, logged),) = run.logged
    assert logged["trainer/global_step"] == 19
    (image,) = logged["val/samples"]
    save_png(picture, tmp_path / "file.png")
    assert np.array_equal(np.asarray(image.image), np.asarray(Image.open(tmp_path / "file.png")))
    assert np.asarray(image.image).max() > 200
