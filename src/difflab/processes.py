"""Noise processes: ``x_t = alpha(t) * x0 + sigma(t) * eps`` for t in [0, 1].

Every process in difflab shares one convention:

* ``t = 0`` is clean data: ``alpha(0) = 1`` and ``sigma(0) = 0`` exactly, for every process.
* ``t = 1`` is the most noise the process has (``alpha(1) = 0`` for rectified flow and for
  zero-terminal-SNR VP processes).
* ``t_min`` is the smallest t the network is trained on and the last non-zero point of a sampling
  grid; every grid ends with a final step to ``t = 0``.
* ``model_time(t)`` is what the network is fed (a DDPM index, ``1000 t``, ``log(sigma) / 4``, ...).

All math is done in float64 and returned in the dtype of ``t`` (float32 or float64), so the same
code serves training (a batch of t) and samplers (a grid of t).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from difflab.batch import per_sample
from difflab.registry import Registry

Tensor = torch.Tensor

T_DISTRIBUTIONS = ("uniform", "discrete", "logit_normal", "log_normal", "log_uniform")


def _as_tensor(t: Tensor | float) -> Tensor:
    if isinstance(t, Tensor):
        if not t.is_floating_point():
            raise TypeError(f"t must be a floating-point tensor, got dtype {t.dtype}")
        return t
    return torch.tensor(float(t), dtype=torch.float64)


def _out(value: Tensor, like: Tensor) -> Tensor:
    return value.to(like.dtype)


class Process:
    """Base class: subclasses define ``_logsnr`` (float64) and its exact inverse ``_t_from_logsnr``.

    The default ``alpha``/``sigma`` are variance preserving (``alpha^2 + sigma^2 = 1``); VE and
    flow processes override them.
    """

    name: ClassVar[str] = "process"
    t_min: float = 1e-3
    t_max: float = 1.0
    default_t_distribution: str = "uniform"

    # --- what subclasses define -------------------------------------------------------------
    def _logsnr(self, t: Tensor) -> Tensor:  # float64 in, float64 out
        raise NotImplementedError

    def _t_from_logsnr(self, logsnr: Tensor) -> Tensor:
        raise NotImplementedError

    def _alpha(self, t: Tensor) -> Tensor:
        return torch.sigmoid(self._logsnr(t)).sqrt()

    def _sigma(self, t: Tensor) -> Tensor:
        return torch.sigmoid(-self._logsnr(t)).sqrt()

    def _model_time(self, t: Tensor) -> Tensor:
        return 1000.0 * t

    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    # --- public API (dtype-following) -------------------------------------------------------
    def alpha(self, t: Tensor | float) -> Tensor:
        """Signal scale ``alpha(t)``."""
        t = _as_tensor(t)
        return _out(self._alpha(t.double()), t)

    def sigma(self, t: Tensor | float) -> Tensor:
        """Noise scale ``sigma(t)``."""
        t = _as_tensor(t)
        return _out(self._sigma(t.double()), t)

    def logsnr(self, t: Tensor | float) -> Tensor:
        """``log(alpha^2 / sigma^2)``: +inf at t = 0, -inf where alpha = 0."""
        t = _as_tensor(t)
        return _out(self._logsnr(t.double()), t)

    def t_from_logsnr(self, logsnr: Tensor | float) -> Tensor:
        """Exact inverse of :meth:`logsnr`."""
        logsnr = _as_tensor(logsnr)
        return _out(self._t_from_logsnr(logsnr.double()), logsnr)

    def noise_level(self, t: Tensor | float) -> Tensor:
        """VE-form noise level ``sigma / alpha`` (the ``sigma`` of k-diffusion and EDM)."""
        t = _as_tensor(t)
        td = t.double()
        return _out(self._sigma(td) / self._alpha(td), t)

    def t_from_noise_level(self, level: Tensor | float) -> Tensor:
        """Exact inverse of :meth:`noise_level`."""
        level = _as_tensor(level)
        return _out(self._t_from_logsnr(-2.0 * level.double().log()), level)

    def model_time(self, t: Tensor | float) -> Tensor:
        """What the network is fed as its time input."""
        t = _as_tensor(t)
        return _out(self._model_time(t.double()), t)

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor | float) -> Tensor:
        """``x_t = alpha(t) x0 + sigma(t) eps``; ``t`` is a scalar or one value per sample."""
        t = _as_tensor(t).to(device=x0.device)
        a = per_sample(self.alpha(t).to(x0.dtype), x0)
        s = per_sample(self.sigma(t).to(x0.dtype), x0)
        return a * x0 + s * eps

    def sample_t(
        self,
        n: int,
        *,
        distribution: str | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        **params: float,
    ) -> Tensor:
        """Draw ``n`` training times in ``[t_min, t_max]``.

        distributions: ``uniform`` in t; ``discrete`` (uniform over the N training indices of a
        discrete process); ``logit_normal(mean=0, std=1)`` in t (Esser et al. 2024, SD3);
        ``log_normal(mean=-1.2, std=1.2)`` in the noise level (Karras et al. 2022, EDM);
        ``log_uniform`` in the noise level (Song et al. 2021, VE).
        """
        distribution = distribution or self.default_t_distribution
        if distribution not in T_DISTRIBUTIONS:
            raise ValueError(
                f"unknown t distribution {distribution!r}; choose one of {', '.join(T_DISTRIBUTIONS)}"
            )
        gen_device = generator.device if generator is not None else "cpu"
        lo, hi = self.t_min, self.t_max
        if distribution == "uniform":
            u = torch.rand(n, generator=generator, device=gen_device, dtype=torch.float64)
            t = lo + (hi - lo) * u
        elif distribution == "discrete":
            steps = getattr(self, "num_train_steps", None)
            if steps is None:
                raise ValueError(
                    f"the 'discrete' t distribution needs a discrete process; {self.name} is "
                    "continuous: use 'uniform' or 'logit_normal'"
                )
            idx = torch.randint(0, steps, (n,), generator=generator, device=gen_device)
            t = (idx.double() + 1.0) / steps
        elif distribution == "logit_normal":
            z = torch.randn(n, generator=generator, device=gen_device, dtype=torch.float64)
            z = z * params.get("std", 1.0) + params.get("mean", 0.0)
            t = torch.sigmoid(z).clamp(lo, hi)
        else:
            if distribution == "log_normal":
                z = torch.randn(n, generator=generator, device=gen_device, dtype=torch.float64)
                log_level = z * params.get("std", 1.2) + params.get("mean", -1.2)
            else:
                u = torch.rand(n, generator=generator, device=gen_device, dtype=torch.float64)
                lmin = math.log(float(self.noise_level(lo)))
                lmax = math.log(float(self.noise_level(hi)))
                if not math.isfinite(lmax):
                    raise ValueError(f"'log_uniform' needs a finite noise level at t_max; {self.name} has none")
                log_level = lmin + (lmax - lmin) * u
            t = self._t_from_logsnr(-2.0 * log_level).clamp(lo, hi)
        return t.to(device=device or gen_device, dtype=dtype)

    def to_config(self) -> dict[str, Any]:
        """JSON-serialisable description; :func:`from_config` rebuilds the process."""
        return {"kind": self.name, **self.config()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "alphas_cumprod")
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Process) and self.to_config() == other.to_config()

    def __hash__(self) -> int:
        return hash(repr(self))


# ------------------------------------------------------------------------------------------
# Discrete VP (DDPM / Stable Diffusion)
# ------------------------------------------------------------------------------------------
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def make_betas(
    schedule: str, num_train_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> Tensor:
    """Published DDPM beta tables (float64).

    ``linear``: Ho et al. 2020. ``scaled_linear``: linear in sqrt(beta) (Stable Diffusion,
    0.00085-0.012). ``squaredcos_cap_v2``: Nichol & Dhariwal 2021, cosine alpha-bar, betas capped
    at 0.999.
    """
    n = num_train_steps
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
    if schedule == "squaredcos_cap_v2":
        def abar(x: float) -> float:
            return math.cos((x + 0.008) / 1.008 * math.pi / 2) ** 2

        return torch.tensor(
            [min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)], dtype=torch.float64
        )
    raise ValueError(f"unknown beta schedule {schedule!r}; choose one of {', '.join(BETA_SCHEDULES)}")


def rescale_zero_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    """Shift and scale sqrt(alpha-bar) so the last step has alpha = 0 exactly and the first is kept.

    Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1.
    """
    a = alphas_cumprod.double().sqrt()
    a0, a_last = a[0].clone(), a[-1].clone()
    a = (a - a_last) * a0 / (a0 - a_last)
    return a**2


class DiscreteVP(Process):
    """DDPM-style variance-preserving process with N training steps (Ho et al. 2020).

    Training index ``i`` (0..N-1) sits at ``t = (i + 1) / N`` and ``t = 0`` is clean data, so
    ``model_time(t) = N t - 1`` is the fractional index. Between the N points the VE noise level
    ``sigma / alpha`` is interpolated linearly in log space (as k-diffusion and diffusers do for
    fractional timesteps); on the first segment (from clean data) and, with zero terminal SNR, on
    the last one, where the log noise level is infinite at one end, ``alpha^2`` is interpolated
    linearly instead. Both are exactly invertible.
    """

    name = "discrete_vp"
    default_t_distribution = "discrete"

    def __init__(self, alphas_cumprod: Tensor, *, beta_schedule: str | None = None, **meta: Any):
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if abar.numel() < 2:
            raise ValueError("a discrete process needs at least 2 training steps")
        if not bool((abar[1:] < abar[:-1]).all() & (abar[0] < 1) & (abar[-1] >= 0)):
            raise ValueError("alphas_cumprod must decrease strictly from below 1 to at least 0")
        self.num_train_steps = abar.numel()
        self.t_min = 1.0 / self.num_train_steps
        self._meta = {"beta_schedule": beta_schedule, **meta}
        ones = torch.ones(1, dtype=torch.float64)
        self._abar = torch.cat([ones, abar])  # knot k at t = k / N, k = 0 is clean data
        self._one_minus_abar = torch.cat([torch.zeros(1, dtype=torch.float64), 1 - abar])
        # log VE noise level per knot: -inf at k = 0, +inf at k = N if zero terminal SNR
        self._log_level = 0.5 * (self._one_minus_abar.log() - self._abar.log())
        self._tables: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}

    # constructors ----------------------------------------------------------------------------
    @classmethod
    def from_betas(
        cls, betas: Tensor, *, zero_terminal_snr: bool = False, beta_schedule: str | None = None, **meta: Any
    ) -> DiscreteVP:
        """From an explicit beta array (float64 cumulative product, computed in log space)."""
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must lie in (0, 1)")
        abar = torch.cumsum(torch.log1p(-betas), 0).exp()
        if zero_terminal_snr:
            abar = rescale_zero_terminal_snr(abar)
        return cls(abar, beta_schedule=beta_schedule, zero_terminal_snr=zero_terminal_snr, **meta)

    @classmethod
    def from_schedule(
        cls,
        schedule: str,
        num_train_steps: int = 1000,
        *,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        zero_terminal_snr: bool = False,
    ) -> DiscreteVP:
        betas = make_betas(schedule, num_train_steps, beta_start, beta_end)
        extra = {} if schedule == "squaredcos_cap_v2" else {"beta_start": beta_start, "beta_end": beta_end}
        return cls.from_betas(
            betas, zero_terminal_snr=zero_terminal_snr, beta_schedule=schedule,
            num_train_steps=num_train_steps, **extra,
        )

    @classmethod
    def linear(cls, num_train_steps: int = 1000, *, zero_terminal_snr: bool = False) -> DiscreteVP:
        """DDPM's linear betas 1e-4..0.02 (Ho et al. 2020)."""
        return cls.from_schedule("linear", num_train_steps, zero_terminal_snr=zero_terminal_snr)

    @classmethod
    def scaled_linear(cls, num_train_steps: int = 1000, *, zero_terminal_snr: bool = False) -> DiscreteVP:
        """Stable Diffusion's betas, linear in sqrt(beta) from 0.00085 to 0.012."""
        return cls.from_schedule(
            "scaled_linear", num_train_steps, beta_start=0.00085, beta_end=0.012,
            zero_terminal_snr=zero_terminal_snr,
        )

    @classmethod
    def cosine(cls, num_train_steps: int = 1000, *, zero_terminal_snr: bool = False) -> DiscreteVP:
        """Improved DDPM's ``squaredcos_cap_v2`` betas (Nichol & Dhariwal 2021)."""
        return cls.from_schedule("squaredcos_cap_v2", num_train_steps, zero_terminal_snr=zero_terminal_snr)

    @property
    def alphas_cumprod(self) -> Tensor:
        return self._abar[1:].clone()

    @property
    def betas(self) -> Tensor:
        abar = self._abar
        return 1 - abar[1:] / abar[:-1]

    def config(self) -> dict[str, Any]:
        meta = {k: v for k, v in self._meta.items() if v is not None}
        if meta.get("beta_schedule") in BETA_SCHEDULES:
            return meta
        return {**meta, "alphas_cumprod": self._abar[1:].tolist()}

    # interpolation ---------------------------------------------------------------------------
    def _table(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        if device not in self._tables:
            self._tables[device] = (
                self._abar.to(device), self._one_minus_abar.to(device), self._log_level.to(device)
            )
        return self._tables[device]

    def _segment(self, t: Tensor) -> tuple[Tensor, Tensor]:
        n = self.num_train_steps
        pos = t.clamp(0.0, 1.0) * n
        k = pos.floor().clamp(0, n - 1)
        return k.long(), pos - k

    def _interp(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(alpha^2, sigma^2, log level) at t, each exact at the knots."""
        abar, omab, loglev = self._table(t.device)
        k, f = self._segment(t)
        la, lb = loglev[k], loglev[k + 1]
        finite = torch.isfinite(la) & torch.isfinite(lb)
        lev = torch.where(finite, la + f * (lb - la), torch.zeros_like(f))
        a2_log = torch.sigmoid(-2 * lev)
        s2_log = torch.sigmoid(2 * lev)
        a2_lin = abar[k] + f * (abar[k + 1] - abar[k])
        s2_lin = omab[k] + f * (omab[k + 1] - omab[k])
        a2 = torch.where(finite, a2_log, a2_lin)
        s2 = torch.where(finite, s2_log, s2_lin)
        lev = torch.where(finite, lev, 0.5 * (s2.log() - a2.log()))
        return a2, s2, lev

    def _alpha(self, t: Tensor) -> Tensor:
        return self._interp(t)[0].sqrt()

    def _sigma(self, t: Tensor) -> Tensor:
        return self._interp(t)[1].sqrt()

    def _logsnr(self, t: Tensor) -> Tensor:
        return -2.0 * self._interp(t)[2]

    def _t_from_logsnr(self, logsnr: Tensor) -> Tensor:
        abar, _, loglev = self._table(logsnr.device)
        n = self.num_train_steps
        lev = -0.5 * logsnr
        # knots k with log level <= lev; segment index is the last such knot
        k = (torch.searchsorted(loglev, lev.contiguous(), right=True) - 1).clamp(0, n - 1)
        la, lb = loglev[k], loglev[k + 1]
        finite = torch.isfinite(la) & torch.isfinite(lb)
        f_log = (lev - la) / torch.where(finite, lb - la, torch.ones_like(la))
        a2 = torch.sigmoid(logsnr)
        f_lin = (abar[k] - a2) / (abar[k] - abar[k + 1])
        f = torch.where(finite, f_log, f_lin).clamp(0.0, 1.0)
        return (k.double() + f) / n

    def _model_time(self, t: Tensor) -> Tensor:
        return t * self.num_train_steps - 1.0


# ------------------------------------------------------------------------------------------
# Continuous VP
# ------------------------------------------------------------------------------------------
class ContinuousVP(Process):
    """Continuous-time variance-preserving process, defined by its log-SNR.

    ``linear``: the VP SDE of Song et al. 2021 (beta(t) linear from beta_min to beta_max).
    ``cosine``: alpha = cos(pi t / 2), sigma = sin(pi t / 2) (Nichol & Dhariwal 2021 without the
    offset; alpha(1) = 0 exactly). ``model_time = time_scale * t``.
    """

    name = "continuous_vp"
    SCHEDULES = ("linear", "cosine")

    def __init__(
        self,
        schedule: str = "linear",
        *,
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        t_min: float = 1e-3,
        time_scale: float = 1000.0,
    ):
        if schedule not in self.SCHEDULES:
            raise ValueError(f"unknown ContinuousVP schedule {schedule!r}; choose one of {', '.join(self.SCHEDULES)}")
        if schedule == "linear" and not 0 <= beta_min < beta_max:
            raise ValueError(f"need 0 <= beta_min < beta_max, got {beta_min}, {beta_max}")
        self.schedule, self.beta_min, self.beta_max = schedule, beta_min, beta_max
        self.t_min, self.time_scale = t_min, time_scale

    @classmethod
    def linear(cls, beta_min: float = 0.1, beta_max: float = 20.0, **kw: Any) -> ContinuousVP:
        return cls("linear", beta_min=beta_min, beta_max=beta_max, **kw)

    @classmethod
    def cosine(cls, **kw: Any) -> ContinuousVP:
        return cls("cosine", **kw)

    def config(self) -> dict[str, Any]:
        c: dict[str, Any] = {"schedule": self.schedule, "t_min": self.t_min, "time_scale": self.time_scale}
        if self.schedule == "linear":
            c.update(beta_min=self.beta_min, beta_max=self.beta_max)
        return c

    def _log_alpha2(self, t: Tensor) -> Tensor:  # linear only: log alpha-bar(t)
        return -0.5 * t**2 * (self.beta_max - self.beta_min) - t * self.beta_min

    def _logsnr(self, t: Tensor) -> Tensor:
        if self.schedule == "cosine":
            return -2.0 * torch.tan(math.pi / 2 * t).log()
        la2 = self._log_alpha2(t)
        return la2 - torch.log(-torch.expm1(la2))

    def _alpha(self, t: Tensor) -> Tensor:
        if self.schedule == "cosine":
            # exactly 0 at t = 1 (cos(pi / 2) is 6e-17 in floating point)
            return torch.cos(math.pi / 2 * t).masked_fill(t >= 1, 0.0).clamp_min(0.0)
        return (0.5 * self._log_alpha2(t)).exp()

    def _sigma(self, t: Tensor) -> Tensor:
        if self.schedule == "cosine":
            return torch.sin(math.pi / 2 * t)
        return (-torch.expm1(self._log_alpha2(t))).sqrt()

    def _t_from_logsnr(self, logsnr: Tensor) -> Tensor:
        if self.schedule == "cosine":
            return torch.atan((-0.5 * logsnr).exp()) * (2 / math.pi)
        m = torch.nn.functional.softplus(-logsnr)  # -log alpha-bar
        a, b = 0.5 * (self.beta_max - self.beta_min), self.beta_min
        return 2 * m / (b + (b * b + 4 * a * m).sqrt())

    def _model_time(self, t: Tensor) -> Tensor:
        return self.time_scale * t


# ------------------------------------------------------------------------------------------
# Variance exploding / EDM
# ------------------------------------------------------------------------------------------
class VE(Process):
    """Variance-exploding process: alpha = 1, sigma = sigma_max * t (Song et al. 2021).

    t is linear in sigma so that t = 0 is clean data; ``t_min = sigma_min / sigma_max``. Training
    draws sigma log-uniformly in [sigma_min, sigma_max], as the VE SDE does; the network is fed
    sigma itself.
    """

    name = "ve"
    default_t_distribution = "log_uniform"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.t_min = self.sigma_min / self.sigma_max

    def config(self) -> dict[str, Any]:
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max}

    def _alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def _sigma(self, t: Tensor) -> Tensor:
        return self.sigma_max * t

    def _logsnr(self, t: Tensor) -> Tensor:
        return -2.0 * (self.sigma_max * t).log()

    def _t_from_logsnr(self, logsnr: Tensor) -> Tensor:
        return (-0.5 * logsnr).exp() / self.sigma_max

    def _model_time(self, t: Tensor) -> Tensor:
        return self.sigma_max * t


class EDM(VE):
    """EDM process (Karras et al. 2022): VE with sigma in [0.002, 80], log-normal training
    sigma (P_mean = -1.2, P_std = 1.2) and ``model_time = c_noise = log(sigma) / 4``.
    Use it with ``prediction="edm"`` for the paper's preconditioning (whose ``sigma_data`` belongs to
    the prediction, :class:`~difflab.predictions.EDMPrecond`).
    """

    name = "edm"
    default_t_distribution = "log_normal"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        super().__init__(sigma_min, sigma_max)

    def _model_time(self, t: Tensor) -> Tensor:
        return 0.25 * (self.sigma_max * t).log()


# ------------------------------------------------------------------------------------------
# Rectified flow
# ------------------------------------------------------------------------------------------
class Flow(Process):
    """Rectified flow / flow matching: alpha = 1 - s, sigma = s (Liu et al. 2023; Lipman et al. 2023).

    ``s = shift * t / (1 + (shift - 1) t)`` is the time shift of SD3 (Esser et al. 2024, Sec. 5.3.2),
    which moves sampling and training toward more noise at higher resolution; ``shift = 1`` is
    plain rectified flow. The network is fed ``time_scale * s`` (1000 s, as SD3 and Flux).
    """

    name = "flow"
    default_t_distribution = "uniform"

    def __init__(self, shift: float = 1.0, *, t_min: float = 1e-3, time_scale: float = 1000.0):
        if not shift > 0:
            raise ValueError(f"shift must be positive, got {shift}")
        self.shift, self.t_min, self.time_scale = float(shift), float(t_min), float(time_scale)

    @classmethod
    def for_resolution(cls, num_pixels: int, base_pixels: int = 256 * 256, **kw: Any) -> Flow:
        """SD3's resolution-dependent shift: ``shift = sqrt(num_pixels / base_pixels)``."""
        return cls(shift=math.sqrt(num_pixels / base_pixels), **kw)

    @classmethod
    def for_sequence_length(
        cls, seq_len: int, base_len: int = 256, max_len: int = 4096,
        base_shift: float = 0.5, max_shift: float = 1.15, **kw: Any,
    ) -> Flow:
        """Flux's shift ``exp(mu)``, mu linear in the image token count."""
        mu = base_shift + (max_shift - base_shift) * (seq_len - base_len) / (max_len - base_len)
        return cls(shift=math.exp(mu), **kw)

    def config(self) -> dict[str, Any]:
        return {"shift": self.shift, "t_min": self.t_min, "time_scale": self.time_scale}

    def _s(self, t: Tensor) -> Tensor:
        return self.shift * t / (1 + (self.shift - 1) * t)

    def _alpha(self, t: Tensor) -> Tensor:
        return 1 - self._s(t)

    def _sigma(self, t: Tensor) -> Tensor:
        return self._s(t)

    def _logsnr(self, t: Tensor) -> Tensor:
        s = self._s(t)
        return 2.0 * (torch.log1p(-s) - s.log())

    def _t_from_logsnr(self, logsnr: Tensor) -> Tensor:
        s = torch.sigmoid(-0.5 * logsnr)
        return s / (self.shift - (self.shift - 1) * s)

    def _model_time(self, t: Tensor) -> Tensor:
        return self.time_scale * self._s(t)


# ------------------------------------------------------------------------------------------
# registry: one namespace of process kinds, and named presets that are configs of those kinds
# ------------------------------------------------------------------------------------------
REGISTRY: Registry[type[Process]] = Registry("process")
REGISTRY.add("discrete_vp", DiscreteVP, "Ho et al. 2020, Denoising Diffusion Probabilistic Models")
REGISTRY.add("continuous_vp", ContinuousVP, "Song et al. 2021, Score-Based Generative Modeling through SDEs")
REGISTRY.add("ve", VE, "Song et al. 2021, Score-Based Generative Modeling through SDEs")
REGISTRY.add("edm", EDM, "Karras et al. 2022, Elucidating the Design Space of Diffusion-Based Generative Models")
REGISTRY.add("flow", Flow, "Liu et al. 2023 (rectified flow); Esser et al. 2024 (SD3 time shift)")

#: short names for common settings; each is a config of a registered kind
PRESETS: dict[str, dict[str, Any]] = {
    "linear": {"kind": "discrete_vp", "beta_schedule": "linear"},
    "scaled_linear": {"kind": "discrete_vp", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                      "beta_end": 0.012},  # Stable Diffusion's
    "squaredcos_cap_v2": {"kind": "discrete_vp", "beta_schedule": "squaredcos_cap_v2"},
    "vp_linear": {"kind": "continuous_vp", "schedule": "linear"},
    "vp_cosine": {"kind": "continuous_vp", "schedule": "cosine"},
}


def available() -> list[str]:
    """The process kinds (see :data:`PRESETS` for the short names of common settings)."""
    return REGISTRY.available()


def from_config(config: dict[str, Any]) -> Process:
    """Rebuild a process from :meth:`Process.to_config` (``kind`` plus that kind's settings; a
    preset name may stand for the kind, and missing settings take their defaults)."""
    config = dict(config)
    kind = config.pop("kind", None)
    if kind in PRESETS:
        config = {**PRESETS[kind], **config}
        kind = config.pop("kind")
    cls = REGISTRY.get(kind)
    try:
        if cls is DiscreteVP:
            if "alphas_cumprod" in config:
                return DiscreteVP(torch.tensor(config.pop("alphas_cumprod"), dtype=torch.float64), **config)
            if "beta_schedule" not in config:  # the kind alone: Stable Diffusion's betas
                config = {**PRESETS["scaled_linear"], **config}
                config.pop("kind")
            return DiscreteVP.from_schedule(config.pop("beta_schedule"), config.pop("num_train_steps", 1000), **config)
        return cls(**config)
    except TypeError as err:
        raise ValueError(f"process {kind!r}: {err}; its settings are those of {cls.__name__}") from err


def get(name: str | Process, **kwargs: Any) -> Process:
    """A process by kind or preset name (``"scaled_linear"``, ``"flow"``, ``"edm"``, ...) with
    settings, or passed through."""
    if isinstance(name, Process):
        return name
    if name not in REGISTRY and name not in PRESETS:
        raise ValueError(f"unknown process {name!r}; choose a kind ({', '.join(REGISTRY)}) "
                         f"or a preset ({', '.join(PRESETS)})")
    return from_config({"kind": name, **kwargs})
