"""sCT / sCD losses against float64 references built straight from the paper's equations."""

import subprocess
import sys

import pytest
import torch
from helpers import TinyNet

from scm_mm import DiffusionLoss, GaussianMixture, SCMLoss, TrigFlowPrecond, solve_pf_ode
from scm_mm.train import optimizer_step

D = 3


def make_student(dropout=0.0, num_classes=0, sigma_d=0.6, logvar=8):
    net = TinyNet(channels=D, num_classes=num_classes, dropout=dropout)
    return TrigFlowPrecond(net, sigma_d=sigma_d, logvar_channels=logvar).double()


def make_mixture(sigma_d=0.6):
    means = torch.tensor([[1.0, 0.0, -0.5], [-1.0, 0.5, 0.0], [0.0, -1.0, 1.0]], dtype=torch.float64)
    return GaussianMixture(means, 0.3, sigma_d=sigma_d)


def batch(gm, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = gm.sample(n, g)
    z = torch.randn(n, D, generator=g, dtype=torch.float64) * gm.sigma_d
    t = torch.linspace(0.1, 1.45, n, dtype=torch.float64)
    return x0, z, t


def test_consistency_function_boundary_condition():
    student = make_student()
    x = torch.randn(5, D, dtype=torch.float64)
    assert torch.equal(student.denoise(x, torch.zeros(5, dtype=torch.float64)), x)


def test_tangent_equals_derivative_along_exact_pf_ode():
    """sCD: g / cos(t) at r = 1 is d/dtau f(x(tau), tau) along the teacher's exact PF-ODE (Eq. 6)."""
    gm, student = make_mixture(), make_student()
    x0, z, t = batch(gm)
    x_t = torch.cos(t)[:, None] * x0 + torch.sin(t)[:, None] * z
    loss = SCMLoss(sigma_d=gm.sigma_d, loss_dtype=torch.float64)
    _, g = loss.tangent(student, x_t, t, gm.velocity(x_t, t), r=1.0)

    h = 1e-4
    with torch.no_grad():
        f_plus = student.denoise(solve_pf_ode(gm, x_t, t, t + h, steps=4), t + h)
        f_minus = student.denoise(solve_pf_ode(gm, x_t, t, t - h, steps=4), t - h)
    df_dt = (f_plus - f_minus) / (2 * h)
    torch.testing.assert_close(g / torch.cos(t)[:, None], df_dt, rtol=1e-6, atol=1e-7)


def test_sct_tangent_is_derivative_along_forward_process():
    """sCT: dxt_dt = cos t z - sin t x0, i.e. d/dtau f(cos tau x0 + sin tau z, tau)."""
    gm, student = make_mixture(), make_student()
    x0, z, t = batch(gm)

    def f(tau):
        return student.denoise(torch.cos(tau)[:, None] * x0 + torch.sin(tau)[:, None] * z, tau)

    x_t = torch.cos(t)[:, None] * x0 + torch.sin(t)[:, None] * z
    dxt_dt = torch.cos(t)[:, None] * z - torch.sin(t)[:, None] * x0
    _, g = SCMLoss(sigma_d=gm.sigma_d, loss_dtype=torch.float64).tangent(student, x_t, t, dxt_dt, r=1.0)
    h = 1e-5
    with torch.no_grad():
        df_dt = (f(t + h) - f(t - h)) / (2 * h)
    torch.testing.assert_close(g / torch.cos(t)[:, None], df_dt, rtol=1e-6, atol=1e-8)


def reference_loss(student, x0, z, t, dxt_dt, r, c=0.1, guidance=None, labels=None):
    """Algorithm 1 written out naively in float64: the plain tangent (dxt_dt, 1), the L2 norm of g."""
    sd = student.sigma_d
    x_t = torch.cos(t)[:, None] * x0 + torch.sin(t)[:, None] * z
    cond = {"labels": labels, "guidance": guidance}
    params = dict(student.named_parameters())
    frozen = {k: v.detach() for k, v in params.items()}

    def F_frozen(x, tt):
        return torch.func.functional_call(student, frozen, (x, tt), cond)

    F_minus, dF_dt = torch.func.jvp(F_frozen, (x_t, t), (dxt_dt, torch.ones_like(t)))
    cos, sin = torch.cos(t)[:, None], torch.sin(t)[:, None]
    g = -(cos**2) * (sd * F_minus - dxt_dt) - r * cos * sin * (x_t + sd * dF_dt)
    g = g / (g.norm(dim=1, keepdim=True) + c)
    F = student(x_t, t, **cond)
    w = student.logvar(t)
    return (torch.exp(w) / D * (F - F_minus - g).square().sum(1) - w).mean()


@pytest.mark.parametrize("method", ["sct", "scd"])
@pytest.mark.parametrize("r", [0.3, 1.0])
def test_loss_value_and_gradient_match_float64_reference(method, r):
    gm = make_mixture()
    student = make_student(num_classes=3)
    with torch.no_grad():  # a non-trivial adaptive weight
        student.logvar.linear.weight.normal_()
    x0, z, t = batch(gm)
    labels = torch.tensor([0, 1, 2, -1, 0, 1, 2, 0])
    guidance = torch.linspace(1.0, 2.0, 8, dtype=torch.float64)
    teacher = gm if method == "scd" else None
    if method == "scd":  # the teacher's CFG velocity, from the exact conditional and unconditional F
        x_t = torch.cos(t)[:, None] * x0 + torch.sin(t)[:, None] * z
        F_c, F_u = gm(x_t, t, labels), gm(x_t, t)
        dxt_dt = gm.sigma_d * (F_u + guidance[:, None] * (F_c - F_u))
    else:
        dxt_dt = torch.cos(t)[:, None] * z - torch.sin(t)[:, None] * x0

    loss_fn = SCMLoss(sigma_d=gm.sigma_d, tangent_norm="l2", warmup_iters=10, loss_dtype=torch.float64)
    step = round(r * 10)
    loss, _ = loss_fn(student, x0, labels, teacher=teacher, step=step, t=t, z=z, guidance=guidance)
    grads = torch.autograd.grad(loss, list(student.parameters()))
    ref = reference_loss(student, x0, z, t, dxt_dt, r, guidance=guidance, labels=labels)
    ref_grads = torch.autograd.grad(ref, list(student.parameters()))
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)

    # The fp32 path (model and loss in fp32) agrees with the float64 reference to fp32 accuracy.
    student32 = student.float()
    loss32, _ = SCMLoss(sigma_d=gm.sigma_d, tangent_norm="l2", warmup_iters=10)(
        student32, x0.float(), labels, teacher=teacher, step=step, t=t.float(), z=z.float(), guidance=guidance.float()
    )
    assert loss32.dtype == torch.float32
    assert loss32.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-5)


def test_a_compiled_student_gives_the_eager_loss_and_gradients():
    """A student wrapped in torch.compile (aot_eager: dynamo's capture without inductor's compile time)
    gives the eager student's loss and gradients. The result only: the tangent is taken on the module
    under the wrapper (scm_mm.jvp.unwrap), but with aot_eager the test also passes without that."""
    gm, student = make_mixture(), make_student(num_classes=3)
    x0, z, t = batch(gm)
    labels = torch.tensor([0, 1, 2, -1, 0, 1, 2, 0])
    loss_fn = SCMLoss(sigma_d=gm.sigma_d, loss_dtype=torch.float64)
    torch.manual_seed(0)  # the same label dropout and guidance draws for both
    eager, _ = loss_fn(student, x0, labels, teacher=gm, step=10**6, t=t, z=z)
    torch.manual_seed(0)
    compiled, _ = loss_fn(torch.compile(student, backend="aot_eager"), x0, labels, teacher=gm, step=10**6, t=t, z=z)
    torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=1e-14)
    for a, b in zip(*(torch.autograd.grad(loss, list(student.parameters())) for loss in (compiled, eager))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_rearranged_jvp_equals_finite_difference_switch():
    gm, student = make_mixture(), make_student()
    x0, z, t = batch(gm)
    kw = dict(sigma_d=gm.sigma_d, loss_dtype=torch.float64)
    exact = SCMLoss(**kw).terms(student, x0, teacher=gm, t=t, z=z)
    func = SCMLoss(tangent_method="func_jvp", **kw).terms(student, x0, teacher=gm, t=t, z=z)
    fd = SCMLoss(tangent_method="finite_difference", fd_step=1e-4, **kw).terms(student, x0, teacher=gm, t=t, z=z)
    torch.testing.assert_close(fd.g, exact.g, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(func.g, exact.g, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", ["jvp", "func_jvp", "finite_difference"])
def test_F_and_F_minus_share_dropout_masks(method):
    gm = make_mixture()
    student = make_student(dropout=0.5).train()
    x0, z, t = batch(gm, n=64)
    terms = SCMLoss(sigma_d=gm.sigma_d, tangent_method=method).terms(student, x0, t=t, z=z)
    torch.testing.assert_close(terms.F.detach(), terms.F_minus, rtol=0, atol=1e-12)
    # ...whereas two forwards without the replay differ, so the check above has teeth.
    x_t = torch.cos(t)[:, None] * x0 + torch.sin(t)[:, None] * z
    assert not torch.allclose(student(x_t, t), student(x_t, t))


def test_tangent_normalisations():
    loss = SCMLoss(tangent_norm="rms", tangent_c=0.1)
    g = torch.randn(4, 2, 8, 8) * 10
    rms = g.square().flatten(1).mean(1).sqrt()
    torch.testing.assert_close(loss.normalize(g), g / (rms[:, None, None, None] + 0.1))
    assert SCMLoss(tangent_norm="clip").normalize(g).abs().max() <= 1
    l2 = SCMLoss(tangent_norm="l2").normalize(g)
    assert (l2.flatten(1).norm(dim=1) < 1).all()
    assert SCMLoss(warmup_iters=100).warmup(25) == 0.25
    assert SCMLoss(warmup_iters=100).warmup(1000) == 1.0
    assert SCMLoss(warmup_iters=0).warmup(0) == 1.0


def test_diffusion_loss_matches_definition_and_exact_teacher_is_optimal():
    """Eq. 4: the exact mixture F* minimises E||sigma_d F - v_t||^2: a perturbed F does worse."""
    gm = make_mixture()
    g = torch.Generator().manual_seed(1)
    x0 = gm.sample(4096, g)
    loss_fn = DiffusionLoss(sigma_d=gm.sigma_d, loss_dtype=torch.float64)
    exact, _ = loss_fn(gm, x0, generator=torch.Generator().manual_seed(2))

    class Perturbed(torch.nn.Module):
        sigma_d = gm.sigma_d

        def forward(self, x_t, t, labels=None, guidance=None):
            return gm(x_t, t) + 0.05

    worse, _ = loss_fn(Perturbed(), x0, generator=torch.Generator().manual_seed(2))
    assert exact < worse

    t = torch.full((4,), 0.7, dtype=torch.float64)
    z = torch.randn(4, D, dtype=torch.float64)
    student = make_student(logvar=0)
    value, _ = loss_fn(student, x0[:4], t=t, z=z)
    x_t = torch.cos(t)[:, None] * x0[:4] + torch.sin(t)[:, None] * z
    v = torch.cos(t)[:, None] * z - torch.sin(t)[:, None] * x0[:4]
    ref = (gm.sigma_d * student(x_t, t) - v).square().sum(1).mean() / (D * gm.sigma_d**2)
    torch.testing.assert_close(value, ref)


def test_nonfinite_samples_are_dropped_and_counted():
    gm, student = make_mixture(), make_student()
    x0, _, _ = batch(gm)
    x0[2, 1] = float("nan")
    x0[5, 0] = float("inf")
    for loss_fn in (SCMLoss(sigma_d=gm.sigma_d), DiffusionLoss(sigma_d=gm.sigma_d)):
        loss, stats = loss_fn(student, x0)
        assert stats["nonfinite_samples"] == 2
        assert torch.isfinite(loss)
        grads = torch.autograd.grad(loss, list(student.parameters()), allow_unused=True)
        assert all(torch.isfinite(g).all() for g in grads if g is not None)
    with pytest.raises(ValueError, match="every one"):
        SCMLoss(sigma_d=gm.sigma_d)(student, torch.full((4, D), float("nan"), dtype=torch.float64))


def test_bad_shapes_and_times_are_refused():
    gm, student = make_mixture(), make_student()
    x0, _, _ = batch(gm)
    with pytest.raises(ValueError, match="labels"):
        SCMLoss(sigma_d=gm.sigma_d)(student, x0, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        SCMLoss(sigma_d=gm.sigma_d)(student, x0[0])
    with pytest.raises(ValueError, match=r"\[0, pi/2\]"):
        student(x0, torch.full((8,), 2.0, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\[0, pi/2\]"):
        student(x0, torch.full((8,), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        student(x0, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="tangent_norm"):
        SCMLoss(tangent_norm="max")


def test_a_sigma_d_that_differs_from_the_loss_is_refused():
    gm, student = make_mixture(), make_student(sigma_d=0.6)
    x0, _, _ = batch(gm)
    with pytest.raises(ValueError, match=r"loss \(0.5\) and the model 0.6"):
        DiffusionLoss(sigma_d=0.5)(student, x0)
    with pytest.raises(ValueError, match=r"loss \(0.5\) and the student 0.6"):
        SCMLoss(sigma_d=0.5)(student, x0)
    with pytest.raises(ValueError, match=r"loss \(0.6\) and the teacher 1.0$"):
        SCMLoss(sigma_d=0.6)(student, x0, teacher=make_mixture(sigma_d=1.0))
    SCMLoss(sigma_d=0.6)(student, x0, teacher=make_mixture(sigma_d=0.6))


def test_optimizer_step_skips_nonfinite_loss_and_counts_nothing_into_weights():
    student = make_student()
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    before = [p.detach().clone() for p in student.parameters()]
    x = torch.randn(4, D, dtype=torch.float64)
    bad = student(x, torch.full((4,), 0.5, dtype=torch.float64)).sum() * float("nan")
    assert optimizer_step(bad, opt, student.parameters()) is False
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters()))
    good = student(x, torch.full((4,), 0.5, dtype=torch.float64)).square().mean()
    assert optimizer_step(good, opt, student.parameters(), max_grad_norm=1.0) is True
    assert not all(torch.equal(a, b) for a, b in zip(before, student.parameters()))


def test_jvp_of_a_function_that_ignores_its_inputs_is_zero():
    from scm_mm.jvp import jvp

    const = torch.ones(3)
    for mode in ("dual", "func"):
        out, tangent = jvp(lambda x: const * 2, (torch.zeros(3),), (torch.ones(3),), mode=mode)
        assert torch.equal(out, const * 2) and torch.equal(tangent, torch.zeros(3))
    with pytest.raises(ValueError, match="'dual' or 'func'"):
        jvp(lambda x: x, (torch.zeros(3),), (torch.ones(3),), mode="forward")


def test_the_first_jvp_of_a_run_raises_no_torch_deprecation_warning():
    # A fresh interpreter: torch loads its forward-AD decompositions once per process.
    code = (
        "import torch\n"
        "from scm_mm.jvp import jvp\n"
        "net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.SiLU(), torch.nn.GroupNorm(2, 4))\n"
        "jvp(net, (torch.randn(2, 3),), (torch.randn(2, 3),))\n"
    )
    subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", code], check=True)
