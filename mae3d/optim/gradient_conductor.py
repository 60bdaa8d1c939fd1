"""GradientConductor (GCond, arXiv 2509.07252): multi-loss gradient accumulation, pairwise conflict
resolution and (Lion-style, trust-ratio) momentum; the result is written into ``p.grad`` so any
torch optimizer applies it (reference notes, section 1; public code: AlevLab-dev/GCond,
``grad_conductor.py``).

Use::

    gc = GradientConductor(model.parameters(), ["l2", "lcs"], accumulation_steps=4)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)         # applies p.grad as written
    for _ in range(gc.accumulation_steps):
        out = model(next(batches))
        gc.accumulate({k: LOSSES[k](out) for k in gc.next_losses()})
    stats = gc.step()                                       # writes p.grad
    opt.step()

Per step: (1) for every loss k, ``g_k = sum over its micro-batches of w_k * grad(loss_k) / n_k``
(n_k = its micro-batch count; ``stochastic=True``, the published default, computes one loss per
micro-batch: the first n/K micro-batches the first loss, the next n/K the second, ...); (2) with
>= 2 losses, optionally each g_k is scaled to norm <= ``norm_cap``, then conflicts are resolved
pair by pair (``mode`` "smooth" or the legacy "zones"; the arbitrator below), and the g_k are
summed in fp32; (3) bias-corrected momentum ``m = beta m + (1 - beta) g``,
``m_hat = m / (1 - beta^t)``; the update is ``m_hat``, or with ``lion=True``, per parameter
tensor, ``sign(m_hat) * lion_lr * min(||p|| / ||m_hat||, trust_clip)`` (ratio 1 when either norm
< eps); (4) it is written into ``p.grad``.

Arbitrator (who wins a conflict): if the last ``dominance_window`` conflicts (over all pairs and
steps) were all won by one of the two losses, the other one wins this one; otherwise the higher
score ``w_s * max(0, cos(g_k, g_k of the previous step)) + w_n * r_k / (r_a + r_b)`` wins,
``r_k = ||g_k|| / EMA||g_k||`` (ties: the earlier loss). Every arbitrated conflict (smooth mode;
the main and critical zones in zones mode) appends its winner to that history.

The published BertsWin run registers ONE loss (LCS): step (2) never runs and the rule is Lion-style
sign momentum with the per-tensor trust ratio (beta 0.9, trust clip 10), 5 micro-batches,
``lion_lr`` set to the scheduled lr before every step, the written update clipped to total norm 10
and applied by ``SGD(lr=1)``. ``mae3d.optim.bertswin_recipe`` builds exactly that.

Defaults are the published class's. Deliberate differences from the public ``grad_conductor.py``:

+------------------+--------------------------+------------------------+---------------------------+
| aspect           | published                | here                   | why; published switch     |
+==================+==========================+========================+===========================+
| who runs the     | the conductor: data      | the caller:            | any model, forward, loss  |
| forward          | provider,                | accumulate() is handed | or autocast; call         |
|                  | functional_call;         | the losses             | model.eval() yourself for |
|                  | model.eval() while       |                        | freeze_bn's effect        |
|                  | accumulating (freeze_bn) |                        |                           |
+------------------+--------------------------+------------------------+---------------------------+
| buffer dtype     | bf16 accumulators,       | fp32 (fp64 for fp64    | bf16 rounds every summed  |
|                  | momentum and update      | parameters)            | micro-batch and the       |
|                  |                          |                        | momentum to 8 significant |
|                  |                          |                        | bits                      |
+------------------+--------------------------+------------------------+---------------------------+
| stability        | the previous step's      | the previous step's    | a loss that lost the last |
| reference of the | resolved (projected,     | raw accumulated g_k    | conflict would look       |
| arbitrator       | capped) g_k              |                        | unstable and lose again;  |
|                  |                          |                        | stability_ref="resolved"  |
|                  |                          |                        | is the published rule     |
+------------------+--------------------------+------------------------+---------------------------+
| norm EMA start   | 1.0; updated only with   | the first observed     | scale-free: with 1.0 the  |
|                  | >= 2 losses              | norm                   | strength score depends on |
|                  |                          |                        | the loss's units for ~20  |
|                  |                          |                        | steps; norm_ema_init=1.0  |
|                  |                          |                        | is published              |
+------------------+--------------------------+------------------------+---------------------------+
| multi-rank sync  | average the final update | average each g_k       | every rank computes the   |
|                  | ("avg"; "broadcast"      | before resolution      | update one process would  |
|                  | sums)                    | (sync="grads")         | on the whole batch;       |
|                  |                          |                        | sync="update" is "avg"    |
+------------------+--------------------------+------------------------+---------------------------+
| zero-gradient    | ||g||^2 < eps, i.e.      | ||g|| < eps            | real losses reach ||g|| < |
| skip in the pair | ||g|| < 1e-4             |                        | 1e-4 late in training and |
| search           |                          |                        | would silently stop       |
|                  |                          |                        | taking part               |
+------------------+--------------------------+------------------------+---------------------------+
| what counts as a | cos < weak               | cos < weak -           | a critical-zone           |
| conflict         |                          | conflict_tol (1e-6)    | projection leaves the     |
|                  |                          |                        | pair orthogonal up to     |
|                  |                          |                        | rounding; the published   |
|                  |                          |                        | rule may count that as    |
|                  |                          |                        | another conflict and      |
|                  |                          |                        | record a winner in the    |
|                  |                          |                        | dominance history;        |
|                  |                          |                        | conflict_tol=0 is         |
|                  |                          |                        | published                 |
+------------------+--------------------------+------------------------+---------------------------+
| eps in formulas  | added to every           | guards: a zero norm    | equal unless a norm is    |
|                  | denominator              | gives cos 0 and ratio  | ~eps                      |
|                  |                          | 1                      |                           |
+------------------+--------------------------+------------------------+---------------------------+
| max_iters=0      | means the default 2 *    | no conflict resolution | 0 iterations is a setting |
|                  | #losses (0 is falsy)     |                        | one asks for on purpose;  |
|                  |                          |                        | None gives the default    |
+------------------+--------------------------+------------------------+---------------------------+
| raw-gradient     | return_raw_grad=True     | beta=0 with lion off   | the same p.grad           |
| output           |                          |                        |                           |
+------------------+--------------------------+------------------------+---------------------------+
| logged           | loss/<k>: sum of the w_k | loss/<k>: mean of the  | readable; logging only    |
| statistics       | / n_k scaled micro-batch | raw losses over its    |                           |
|                  | losses; raw_norm/<k>,    | micro-batches;         |                           |
|                  | min_cosine_sim,          | norm/<k>, min_cos,     |                           |
|                  | final_grad_norm          | update_norm            |                           |
+------------------+--------------------------+------------------------+---------------------------+

Published names: ``momentum_beta`` = ``beta``, ``use_lion`` = ``lion``, ``trust_ratio_coef`` =
``lion_lr``, ``trust_ratio_clip`` = ``trust_clip``, ``projection_max_iters`` = ``max_iters``,
``tie_breaking_weights`` = ``arbiter_weights``, ``use_smooth_logic`` = ``mode == "smooth"``,
``stochastic_accumulation`` = ``stochastic``, ``lambdas`` = ``weights``. Pass the plain module's
parameters, not a DDP wrapper's reduced gradients.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["GradientConductor", "conflict_angle"]


def conflict_angle(cos: float, thresholds: Sequence[float] = (-0.8, -0.5, 0.0),
                   power: float = 2.0) -> float:
    """Smooth mode's conflict angle alpha(cos) in [0, pi] for thresholds (critical, main, weak):
    0 at cos >= weak, linear up to pi/2 at cos = main, then pi/2 + pi/2 * t^power with
    t = (cos - main) / (critical - main), pi at cos <= critical."""
    crit, main, weak = thresholds
    if cos >= main:
        t = 1.0 if weak == main else min(max((cos - main) / (weak - main), 0.0), 1.0)
        return math.pi / 2 * (1.0 - t)
    if cos > crit:
        return math.pi / 2 * (1.0 + ((cos - main) / (crit - main)) ** power)
    return math.pi


def _dot(a: list[Tensor], b: list[Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))


def _check_int(name: str, v, low: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    return v


class GradientConductor:
    """Combines the gradients of several losses into one update written into ``p.grad``.

    Args (defaults: the published class's):
        params: parameters (or an ``nn.Module``); those with ``requires_grad`` are conducted.
        loss_names: the losses, in a fixed order (ties in the arbitrator go to the earlier one).
        accumulation_steps: micro-batches per ``step()``.
        weights: lambda_k per loss (default 1.0 each).
        stochastic: one loss per micro-batch, the losses in blocks of steps / #losses
            micro-batches (needs steps divisible by #losses); False: every loss every micro-batch.
        mode: "smooth" (angle-modulated projection) or "zones" (legacy 4-zone rules).
        conflict_thresholds: cosines (critical, main, weak); resolution stops once the worst pair
            has cos >= weak - conflict_tol.
        conflict_tol: cosines within this of ``weak`` count as agreement (0: the published
            rule). A critical-zone projection leaves the pair orthogonal up to rounding (|cos|
            ~ 1e-7 in fp32), which the published rule may count as a new conflict.
        max_iters: resolution iterations per step (default 2 * #losses; 0 disables it).
        norm_cap: scale each loss's gradient to norm <= norm_cap before resolution (>= 2 losses).
        dominance_window: after one loss wins this many conflicts in a row, the next conflict it
            takes part in goes to the other loss (0 disables it).
        remap_power: smooth mode's exponent between main and critical.
        arbiter_weights: (stability, strength) weights of the arbitrator score.
        norm_ema_beta: EMA factor of each loss's gradient norm.
        norm_ema_init: the EMA's start; None = the first observed norm (published: 1.0).
        stability_ref: "raw" (the previous step's accumulated gradient) or "resolved" (the
            previous step's gradient after resolution, as published).
        beta: momentum factor in [0, 1); 0 gives the resolved gradient itself (plain accumulation).
        lion: sign momentum with the per-tensor trust ratio.
        lion_lr: coefficient multiplying the Lion update (trust_ratio_coef of the public code;
            BertsWin sets it to the scheduled lr before every step).
        trust_clip: upper clip of the trust ratio.
        eps: norms below it count as zero.
        sync: "grads" (average per-loss gradients across ranks), "update" (average the final
            update), "none". Active only when ``torch.distributed`` is initialised with > 1 rank.
        process_group: the group for ``sync``.
    """

    def __init__(
        self,
        params,
        loss_names: Sequence[str],
        accumulation_steps: int = 1,
        *,
        weights: Mapping[str, float] | None = None,
        stochastic: bool = True,
        mode: str = "smooth",
        conflict_thresholds: tuple[float, float, float] = (-0.8, -0.5, 0.0),
        conflict_tol: float = 1e-6,
        max_iters: int | None = None,
        norm_cap: float | None = None,
        dominance_window: int = 3,
        remap_power: float = 2.0,
        arbiter_weights: tuple[float, float] = (0.8, 0.2),
        norm_ema_beta: float = 0.95,
        norm_ema_init: float | None = None,
        stability_ref: str = "raw",
        beta: float = 0.85,
        lion: bool = False,
        lion_lr: float = 1e-4,
        trust_clip: float = 100.0,
        eps: float = 1e-8,
        sync: str = "grads",
        process_group=None,
    ) -> None:
        if isinstance(params, torch.nn.Module):
            params = params.parameters()
        self.params: list[Tensor] = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("params has no tensor with requires_grad=True")
        names = list(loss_names) if not isinstance(loss_names, str) else [loss_names]
        if not names or len(set(names)) != len(names) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"loss_names must be one or more distinct strings, got {loss_names!r}")
        _check_int("accumulation_steps", accumulation_steps, 1)
        if stochastic and accumulation_steps % len(names):
            raise ValueError(
                f"stochastic mode needs accumulation_steps ({accumulation_steps}) divisible by "
                f"the number of losses ({len(names)}); pass stochastic=False to compute every "
                "loss on every micro-batch"
            )
        weights = dict(weights or {})
        if set(weights) - set(names):
            raise ValueError(f"weights has unknown losses {sorted(set(weights) - set(names))}")
        if mode not in ("smooth", "zones"):
            raise ValueError(f"mode must be 'smooth' or 'zones', got {mode!r}")
        crit, main, weak = (float(t) for t in conflict_thresholds)
        if not -1.0 <= crit <= main <= weak <= 1.0:
            raise ValueError(
                "conflict_thresholds must satisfy -1 <= critical <= main <= weak <= 1, got "
                f"{conflict_thresholds!r}"
            )
        if not 0.0 <= conflict_tol < 1.0:
            raise ValueError(f"conflict_tol must be in [0, 1), got {conflict_tol!r}")
        if max_iters is not None:
            _check_int("max_iters", max_iters, 0)
        _check_int("dominance_window", dominance_window, 0)
        if norm_cap is not None and not norm_cap > 0:
            raise ValueError(f"norm_cap must be None or > 0, got {norm_cap!r}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta!r}")
        if not 0.0 <= norm_ema_beta < 1.0:
            raise ValueError(f"norm_ema_beta must be in [0, 1), got {norm_ema_beta!r}")
        if norm_ema_init is not None and not norm_ema_init > 0:
            raise ValueError(f"norm_ema_init must be None or > 0, got {norm_ema_init!r}")
        if stability_ref not in ("raw", "resolved"):
            raise ValueError(f"stability_ref must be 'raw' or 'resolved', got {stability_ref!r}")
        if remap_power <= 0:
            raise ValueError(f"remap_power must be > 0, got {remap_power!r}")
        if len(arbiter_weights) != 2 or min(arbiter_weights) < 0 or sum(arbiter_weights) <= 0:
            raise ValueError(f"arbiter_weights must be two non-negative numbers, got "
                             f"{arbiter_weights!r}")
        if not (trust_clip > 0 and lion_lr > 0):
            raise ValueError(f"trust_clip and lion_lr must be > 0, got {trust_clip}, {lion_lr}")
        if sync not in ("grads", "update", "none"):
            raise ValueError(f"sync must be 'grads', 'update' or 'none', got {sync!r}")
        self.loss_names = names
        self.accumulation_steps = accumulation_steps
        self.weights = {n: float(weights.get(n, 1.0)) for n in names}
        self.stochastic = bool(stochastic)
        self.mode = mode
        self.thresholds = (crit, main, weak)
        self.conflict_tol = float(conflict_tol)
        self.max_iters = 2 * len(names) if max_iters is None else max_iters
        self.norm_cap = None if norm_cap is None else float(norm_cap)
        self.dominance_window = dominance_window
        self.remap_power = float(remap_power)
        self.arbiter_weights = (float(arbiter_weights[0]), float(arbiter_weights[1]))
        self.norm_ema_beta = float(norm_ema_beta)
        self.norm_ema_init = None if norm_ema_init is None else float(norm_ema_init)
        self.stability_ref = stability_ref
        self.beta = float(beta)
        self.lion = bool(lion)
        self.lion_lr = float(lion_lr)
        self.trust_clip = float(trust_clip)
        self.eps = float(eps)
        self.sync = sync
        self.process_group = process_group

        def zeros() -> list[Tensor]:  # fp32 at least (fp64 parameters keep fp64)
            return [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32))
                    for p in self.params]

        self._acc = {n: zeros() for n in names}
        self._momentum = zeros()
        multi = len(names) > 1
        self._prev = {n: zeros() for n in names} if multi else {}
        self._norm_ema: dict[str, float | None] = {n: self.norm_ema_init for n in names}
        self._history: deque[str] = deque(maxlen=dominance_window)
        self._loss_sum = {n: 0.0 for n in names}
        self._micro = 0
        self._t = 0

    # ------------------------------------------------------------------ accumulation
    def next_losses(self) -> list[str]:
        """Names the next ``accumulate`` call expects: all of them, or one (stochastic mode:
        the first loss for the first steps / #losses micro-batches, then the next, ...)."""
        if self.stochastic:
            per = self.accumulation_steps // len(self.loss_names)
            return [self.loss_names[min(self._micro // per, len(self.loss_names) - 1)]]
        return list(self.loss_names)

    def _count(self, name: str) -> int:
        if self.stochastic:
            return self.accumulation_steps // len(self.loss_names)
        return self.accumulation_steps

    def _check_micro(self, given) -> list[str]:
        if self._micro >= self.accumulation_steps:
            raise RuntimeError(f"all {self.accumulation_steps} micro-batches are accumulated; "
                               "call step() first")
        expected = self.next_losses()
        if set(given) != set(expected):
            raise ValueError(f"micro-batch {self._micro} expects losses {expected}, got "
                             f"{sorted(given)}")
        return expected

    def accumulate(self, losses: Mapping[str, Tensor]) -> None:
        """Adds ``w_k * grad(loss_k) / n_k`` for one micro-batch; ``losses`` maps each name of
        ``next_losses()`` to a scalar tensor (they may share one forward graph)."""
        expected = self._check_micro(losses)
        for i, name in enumerate(expected):
            loss = losses[name]
            if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
                raise ValueError(f"losses[{name!r}] must be a scalar tensor that requires grad")
            grads = torch.autograd.grad(loss.reshape(()), self.params,
                                        retain_graph=i < len(expected) - 1, allow_unused=True)
            self._add(name, grads)
            self._loss_sum[name] += float(loss.detach())
        self._micro += 1

    def accumulate_grads(self, grads: Mapping[str, Sequence[Tensor | None]]) -> None:
        """Like ``accumulate`` with gradients already computed: grads[k] lists one tensor (or
        None) per conducted parameter, in ``self.params`` order."""
        self._check_micro(grads)
        for name, g in grads.items():
            if len(g) != len(self.params):
                raise ValueError(f"grads[{name!r}] has {len(g)} tensors for {len(self.params)} "
                                 "parameters")
            self._add(name, g)
        self._micro += 1

    def _add(self, name: str, grads: Sequence[Tensor | None]) -> None:
        scale = self.weights[name] / self._count(name)
        with torch.no_grad():
            for acc, g in zip(self._acc[name], grads):
                if g is not None:
                    acc.add_(g.to(acc.dtype), alpha=scale)

    # ------------------------------------------------------------------ the step
    def _world(self) -> int:
        dist = torch.distributed
        if self.sync == "none" or not dist.is_available() or not dist.is_initialized():
            return 1
        return dist.get_world_size(self.process_group)

    def _all_average(self, tensors: list[Tensor]) -> None:
        flat = torch.cat([t.reshape(-1) for t in tensors])
        torch.distributed.all_reduce(flat, group=self.process_group)
        flat /= self._world()
        offset = 0
        for t in tensors:
            t.copy_(flat[offset: offset + t.numel()].view_as(t))
            offset += t.numel()

    @torch.no_grad()
    def step(self) -> dict[str, float]:
        """Resolves, applies momentum, writes ``p.grad``; returns statistics for logging
        (step, proj_iters, min_cos, norm/<k>, loss/<k> mean over its micro-batches, update_norm)."""
        if self._micro != self.accumulation_steps:
            raise RuntimeError(f"step() after {self._micro} of {self.accumulation_steps} "
                               "micro-batches")
        world = self._world()
        if world > 1 and self.sync == "grads":
            for name in self.loss_names:
                self._all_average(self._acc[name])
        grads = {n: [t.clone() for t in self._acc[n]] for n in self.loss_names}
        stats: dict[str, float] = {}
        for n in self.loss_names:
            norm = math.sqrt(_dot(grads[n], grads[n]))
            stats[f"norm/{n}"] = norm
            ema = self._norm_ema[n]
            b = self.norm_ema_beta
            self._norm_ema[n] = norm if ema is None else b * ema + (1 - b) * norm
        if len(self.loss_names) > 1:
            if self.norm_cap is not None:
                for n in self.loss_names:
                    if stats[f"norm/{n}"] > self.norm_cap:
                        for t in grads[n]:
                            t.mul_(self.norm_cap / stats[f"norm/{n}"])
            stats.update(self._resolve(grads))
            ref = grads if self.stability_ref == "resolved" else self._acc
            for n in self.loss_names:
                for prev, g in zip(self._prev[n], ref[n]):
                    prev.copy_(g)
        else:
            stats.update({"proj_iters": 0.0, "min_cos": 1.0})
        total = grads[self.loss_names[0]]
        for n in self.loss_names[1:]:
            for a, b in zip(total, grads[n]):
                a.add_(b)
        update = self._momentum_update(total)
        if world > 1 and self.sync == "update":
            self._all_average(update)
        for p, u in zip(self.params, update):
            if p.grad is None:
                p.grad = u.to(p.dtype)
            else:
                p.grad.copy_(u)
        stats["update_norm"] = math.sqrt(_dot(update, update))
        stats["step"] = float(self._t)
        for n in self.loss_names:
            stats[f"loss/{n}"] = self._loss_sum[n] / self._count(n)
            for acc in self._acc[n]:
                acc.zero_()
            self._loss_sum[n] = 0.0
        self._micro = 0
        return stats

    def _momentum_update(self, g: list[Tensor]) -> list[Tensor]:
        self._t += 1
        correction = 1.0 - self.beta ** self._t
        out = []
        for m, gi, p in zip(self._momentum, g, self.params):
            m.mul_(self.beta).add_(gi, alpha=1.0 - self.beta)
            m_hat = m / correction
            if not self.lion:
                out.append(m_hat)
                continue
            p_norm, m_norm = float(p.detach().to(m.dtype).norm()), float(m_hat.norm())
            ratio = 1.0 if p_norm < self.eps or m_norm < self.eps else p_norm / m_norm
            out.append(m_hat.sign() * (self.lion_lr * min(ratio, self.trust_clip)))
        return out

    # ------------------------------------------------------------------ conflict resolution
    def _arbitrate(self, a: str, b: str, g: dict[str, list[Tensor]]) -> tuple[str, str]:
        """(winner, loser). A loss that won each of the last ``dominance_window`` conflicts
        loses this one; otherwise score_k = w_s * max(0, cos(g_k, previous g_k)) + w_n * r_k /
        (r_a + r_b), r_k = ||g_k|| / EMA||g_k||, and ties go to ``a`` (the earlier loss)."""
        w = self.dominance_window
        if w and len(self._history) == w:
            if all(h == a for h in self._history):
                return b, a
            if all(h == b for h in self._history):
                return a, b
        ws, wn = self.arbiter_weights
        ratio, stab = {}, {}
        for k in (a, b):
            norm = math.sqrt(_dot(g[k], g[k]))
            prev_norm = math.sqrt(_dot(self._prev[k], self._prev[k]))
            cos = _dot(g[k], self._prev[k]) / (norm * prev_norm) if norm * prev_norm > 0 else 0.0
            stab[k] = max(0.0, cos)
            ratio[k] = norm / max(self._norm_ema[k] or 0.0, self.eps)
        denom = ratio[a] + ratio[b]
        score = {k: ws * stab[k] + wn * (ratio[k] / denom if denom > 0 else 0.5) for k in (a, b)}
        return (b, a) if score[b] > score[a] else (a, b)

    def _resolve(self, g: dict[str, list[Tensor]]) -> dict[str, float]:
        """Repeatedly resolves the pair with the lowest cosine, in place, until it is >= weak -
        conflict_tol or ``max_iters`` iterations ran. Gradients with norm < eps take no part."""
        crit, main, weak = self.thresholds
        names = self.loss_names
        stats = {"proj_iters": 0.0, "min_cos": 1.0}
        for it in range(self.max_iters):
            sq = {k: _dot(g[k], g[k]) for k in names}
            worst = None
            for i, a in enumerate(names):
                for b in names[i + 1:]:
                    if sq[a] < self.eps ** 2 or sq[b] < self.eps ** 2:
                        continue
                    dot = _dot(g[a], g[b])
                    cos = dot / math.sqrt(sq[a] * sq[b])
                    if worst is None or cos < worst[0]:
                        worst = (cos, a, b, dot)
            if worst is None or worst[0] >= weak - self.conflict_tol:
                if it == 0 and worst is not None:
                    stats["min_cos"] = worst[0]
                break
            cos, a, b, dot = worst
            if it == 0:
                stats["min_cos"] = cos
            stats["proj_iters"] = float(it + 1)
            if self.mode == "zones" and cos >= main:  # weak conflict: symmetric projection
                ca, cb = dot / sq[b], dot / sq[a]
                ga = [x.clone() for x in g[a]]
                for x, y in zip(g[a], g[b]):
                    x.sub_(y, alpha=ca)
                for y, x0 in zip(g[b], ga):
                    y.sub_(x0, alpha=cb)
                continue
            w, l = self._arbitrate(a, b, g)
            if self.dominance_window:
                self._history.append(w)
            if self.mode == "zones":
                if cos < crit:  # critical: the loser is dropped
                    for y in g[l]:
                        y.zero_()
                else:  # main: PCGrad projection of the loser onto the winner's normal plane
                    for y, x in zip(g[l], g[w]):
                        y.sub_(x, alpha=dot / sq[w])
                continue
            alpha = conflict_angle(cos, self.thresholds, self.remap_power)
            cw = math.sin(alpha) * dot / sq[l]
            cl = math.sin(min(alpha, math.pi / 2)) * dot / sq[w]
            gw = [x.clone() for x in g[w]]  # both updates use the original vectors
            for x, y in zip(g[w], g[l]):
                x.sub_(y, alpha=cw)
            for y, x0 in zip(g[l], gw):
                y.sub_(x0, alpha=cl)
        return stats

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        """Momentum, previous per-loss gradients, norm EMAs, the winners' history and the step
        count (copies). Only between steps: a half-accumulated step is not saved."""
        if self._micro:
            raise RuntimeError(f"state_dict() in the middle of an accumulation ({self._micro} of "
                               f"{self.accumulation_steps} micro-batches); call it after step()")
        return {
            "loss_names": list(self.loss_names),
            "step": self._t,
            "momentum": [m.clone() for m in self._momentum],
            "prev": {k: [t.clone() for t in v] for k, v in self._prev.items()},
            "norm_ema": dict(self._norm_ema),
            "history": list(self._history),
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restores ``state_dict()`` output; loss names and parameter shapes must match. The
        hyper-parameters (lion_lr, beta, ...) are the constructor's, not part of the state."""
        if list(state["loss_names"]) != self.loss_names:
            raise ValueError(f"state has losses {state['loss_names']}, this conductor has "
                             f"{self.loss_names}")
        shapes = [tuple(p.shape) for p in self.params]
        if [tuple(m.shape) for m in state["momentum"]] != shapes:
            raise ValueError("state momentum shapes do not match the conducted parameters")
        history = [h for h in state.get("history", []) if h in self.loss_names]
        with torch.no_grad():
            for m, s in zip(self._momentum, state["momentum"]):
                m.copy_(s)
            for k, v in self._prev.items():
                for t, s in zip(v, state["prev"][k]):
                    t.copy_(s)
        self._norm_ema = {k: state["norm_ema"][k] for k in self.loss_names}
        self._history = deque(history, maxlen=self.dominance_window)
        self._t = int(state["step"])
        for v in self._acc.values():
            for t in v:
                t.zero_()
        self._loss_sum = {n: 0.0 for n in self.loss_names}
        self._micro = 0
