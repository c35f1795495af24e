"""Rank-one subcomponents of a frozen target model (digest §2.1, reference §1.1-1.2).

Each decomposed ``nn.Linear`` with weight W (d_out, d_in) gets C subcomponents stored as
V (d_in, C) and U (C, d_out), so that W ~ (V U)^T and subcomponent c is the rank-one matrix
U[c]^T V[:, c]^T. ``ComponentModel`` wraps the target with forward hooks that either cache
module inputs (for the CI functions) or replace module outputs by the masked component output

    out = ((x V) * m) U  +  m_delta * (x W^T - (x V) U)  +  b
        = ((x V) * (m - m_delta)) U  +  m_delta * (y - b)  +  b,

where y = x W^T + b is the module's own output (the hook receives it for free), m (..., C) the
component masks and m_delta (...) the optional delta-component mask. The second form is the same
as the reference's ``m_delta * x (W - (VU)^T)^T`` (gradients to U and V included) but needs one
matmul with U and no extra matmul with the full weight. Per-sample weight matrices are never
formed.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

from scalespd.train.ci_fns import CIFunction
from scalespd.train.sigmoids import lower_fn, upper_fn

if TYPE_CHECKING:
    from scalespd.config import DecomposeConfig


class ModuleInfoLike(Protocol):
    """What we need of `scalespd.targets.ModuleInfo` (path, layer, module_type)."""

    @property
    def path(self) -> str: ...
    @property
    def layer(self) -> int: ...
    @property
    def module_type(self) -> str: ...


def decomposable_modules(target: nn.Module, target_cfg: Any) -> list[Any]:
    """ModuleInfo of the target's decomposable modules in forward order: for a language model
    read from the loaded model itself (the truth, whatever its config says), for a toy from its
    config."""
    if getattr(target_cfg, "kind", None) == "hf_causal_lm":
        from scalespd.targets.lm.modules import lm_modules  # noqa: PLC0415

        return [m.info for m in lm_modules(target)]
    from scalespd.targets import module_info  # noqa: PLC0415

    return list(module_info(target_cfg))


def match_modules(specs: Sequence[tuple[str, int]], paths: Sequence[str]) -> dict[str, int]:
    """Expand fnmatch patterns with a C each over the target's decomposable module paths.

    Returns {path: C} in the order of `paths` (the target's forward order, which is also the
    global column order of the profiles). Raises ValueError naming a pattern that matches
    nothing, a module matched by two patterns, or a C that is not a positive integer."""
    out: dict[str, int] = {}
    owner: dict[str, str] = {}
    for pattern, C in specs:
        if not isinstance(C, int) or isinstance(C, bool) or C <= 0:
            raise ValueError(f"pattern {pattern!r}: C must be a positive integer, got {C!r}")
        hits = [p for p in paths if fnmatch.fnmatchcase(p, pattern)]
        if not hits:
            raise ValueError(
                f"pattern {pattern!r} matches no decomposable module; available: {list(paths)}"
            )
        for p in hits:
            if p in owner:
                raise ValueError(
                    f"module {p!r} is matched by two patterns ({owner[p]!r} and {pattern!r})"
                )
            owner[p] = pattern
            out[p] = C
    return {p: out[p] for p in paths if p in out}


class LinearComponents(nn.Module):
    """C rank-one subcomponents of one linear map: V (d_in, C), U (C, d_out).

    Init as the reference: V ~ N(0, 1/d_in), U ~ N(0, 1/C)."""

    def __init__(self, d_in: int, d_out: int, C: int, *,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.d_in, self.d_out, self.C = d_in, d_out, C
        self.V = nn.Parameter(torch.empty(d_in, C).normal_(0, 1 / math.sqrt(d_in),
                                                           generator=generator))
        self.U = nn.Parameter(torch.empty(C, d_out).normal_(0, 1 / math.sqrt(C),
                                                            generator=generator))

    def weight(self) -> Tensor:
        """Sum of all subcomponents in nn.Linear layout (d_out, d_in)."""
        return (self.V @ self.U).T

    def inner(self, x: Tensor) -> Tensor:
        """Inner activations h = x V: (..., d_in) -> (..., C)."""
        return x @ self.V

    def masked_output(
        self,
        inner: Tensor,
        y: Tensor,
        bias: Tensor | None,
        mask: Tensor,
        delta_mask: Tensor | None,
    ) -> Tensor:
        """Output of the masked subcomponents (+ delta) for inner acts (..., C), the target
        module's output y (..., d_out), component mask (..., C), delta mask (...) or None."""
        if delta_mask is None:
            out = (inner * mask) @ self.U
            return out if bias is None else out + bias
        d = delta_mask.unsqueeze(-1)
        y_nobias = y if bias is None else y - bias
        out = (inner * (mask - d)) @ self.U + d * y_nobias
        return out if bias is None else out + bias


class TransposedComponents(LinearComponents):
    """The subcomponents of a module whose target weight is the transpose of another decomposed
    module's (TMS tied weights, linear2.weight = linear1.weight^T): V = base.U^T, U = base.V^T,
    so subcomponent c here is exactly the transpose of the base's subcomponent c. It owns no
    parameters; the base's one (V, U) pair is used twice and gets one optimiser state."""

    base: LinearComponents

    def __init__(self, base: LinearComponents) -> None:
        nn.Module.__init__(self)  # no parameters of its own
        self.d_in, self.d_out, self.C = base.d_out, base.d_in, base.C
        # Not registered as a submodule: the base is already registered under its own path.
        self.__dict__["base"] = base

    @property
    def V(self) -> Tensor:  # type: ignore[override]
        return self.base.U.T

    @property
    def U(self) -> Tensor:  # type: ignore[override]
        return self.base.V.T


def projection_weight(module: nn.Module) -> Tensor:
    """The (d_out, d_in) weight of a decomposable projection: nn.Linear's own, or a transposed
    view of a GPT-2 Conv1D's (d_in, d_out) weight. ValueError for anything else."""
    if isinstance(module, nn.Linear):
        return module.weight
    if type(module).__name__ == "Conv1D":  # transformers' Conv1D; imported only when met
        from scalespd.targets.lm.modules import weight_matrix  # noqa: PLC0415

        return weight_matrix(module)
    raise ValueError(f"{type(module).__name__} is not an nn.Linear or Conv1D projection")


def _is_transpose_of(w: Tensor, src: Tensor) -> bool:
    """True when w is a transposed view of src (same storage), as for TMS tied weights."""
    return (
        w.dim() == 2 and src.dim() == 2 and w.shape == src.shape[::-1]
        and w.data_ptr() == src.data_ptr() and w.stride() == src.stride()[::-1]
    )


@dataclass
class Mask:
    """Masks for one module in one forward pass: component mask (..., C), optional
    delta-component mask (...) and optional routing (...) bool: where False, the module keeps
    the target's own output at that position (the reference's subset routing)."""

    component: Tensor
    delta: Tensor | None = None
    routing: Tensor | None = None


@dataclass
class ForwardCache:
    """A target forward with its decomposed modules' inputs (..., d_in) and, once CI has been
    computed, the inner activations x V (..., C) (with grad to V)."""

    output: Tensor
    inputs: dict[str, Tensor]
    inner: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class CausalImportance:
    """Per-module CI, each (..., C): `lower` bounds masks/recon, `upper` feeds the minimality
    loss, `pre` is the raw CI-function output."""

    lower: dict[str, Tensor]
    upper: dict[str, Tensor]
    pre: dict[str, Tensor]


@dataclass
class _PassState:
    """What the hooks do during one forward of the wrapped target."""

    cache_inputs: dict[str, Tensor] | None = None
    masks: dict[str, Mask] | None = None
    # Inputs/inner acts of the unmasked target forward; valid for a module as long as no masked
    # module has run before it in this pass (then its input is exactly the target's input).
    reuse: ForwardCache | None = None
    upstream_changed: bool = False
    seen: set[str] = field(default_factory=set)
    # Leading (position) shape of the forward's input, (B, T) for token ids: a module that sees
    # its positions flattened (OPT's MLP reads (B * T, d)) is viewed with this shape, so every
    # module's inputs, CIs and masks share it.
    positions: torch.Size | None = None


def _key(path: str) -> str:
    return path.replace(".", "-")  # ModuleDict keys cannot contain dots


# ci_fns key of the one CI function of `global_shared_mlp` (no module path maps to it: paths
# never start with a dash).
GLOBAL_CI_KEY = "-global"


class ComponentModel(nn.Module):
    """A frozen target plus C rank-one subcomponents and a CI function per decomposed module.

    Attributes: ``module_paths`` (decomposed modules, target forward order), ``C`` {path: C},
    ``module_info`` (ModuleInfo of the decomposed modules, same order), ``components`` and
    ``ci_fns`` (ModuleDicts keyed by path with '.' -> '-'), ``target``."""

    def __init__(
        self,
        target: nn.Module,
        module_C: dict[str, int],
        module_info: Sequence[ModuleInfoLike],
        cfg: DecomposeConfig,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        known = {mi.path for mi in module_info}
        missing = [p for p in module_C if p not in known]
        if missing:
            raise ValueError(f"modules {missing} are not decomposable modules of the target "
                             f"(known: {sorted(known)})")
        self.target = target.requires_grad_(False)
        # A Hugging Face causal LM (called with input_ids, returns an output with .logits).
        self.is_lm = getattr(target, "main_input_name", None) == "input_ids"
        self.module_info = [mi for mi in module_info if mi.path in module_C]
        self.module_paths = [mi.path for mi in self.module_info]
        self.C = {p: int(module_C[p]) for p in self.module_paths}
        self.sampling = cfg.sampling
        self._lower = lower_fn(cfg.sigmoid, cfg.lower_leaky, cfg.leak)
        self._upper = upper_fn(cfg.sigmoid, cfg.leak)

        named = dict(target.named_modules())
        self._targets: dict[str, nn.Module] = {}
        # {module: earlier module} whose components it reuses transposed (see tie_components).
        self.tied: dict[str, str] = {}
        comps: dict[str, LinearComponents] = {}
        for p in self.module_paths:
            mod = named.get(p)
            if mod is None:
                raise ValueError(f"the target has no module {p!r}")
            try:
                weight = projection_weight(mod)
            except ValueError:
                raise ValueError(f"module {p!r} must be an nn.Linear (or a GPT-2 Conv1D) to be "
                                 f"decomposed, got {type(mod).__name__}") from None
            self._targets[p] = mod
            src = next((q for q in self._targets if q != p
                        and _is_transpose_of(weight, self.target_weight(q))), None)
            if cfg.tie_components and src is not None:
                if self.C[src] != self.C[p]:
                    raise ValueError(f"modules {src!r} and {p!r} have tied weights, so their "
                                     f"components are tied too and need the same C (got "
                                     f"{self.C[src]} and {self.C[p]}); set equal C or "
                                     f"decompose.tie_components: false")
                self.tied[p] = src
                comps[_key(p)] = TransposedComponents(comps[_key(src)])
            else:
                d_out, d_in = weight.shape
                comps[_key(p)] = LinearComponents(int(d_in), int(d_out), self.C[p],
                                                  generator=generator)
        self.components = nn.ModuleDict(comps)
        self.ci_fns = nn.ModuleDict(self._build_ci_fns(cfg, generator))

        self._pass: _PassState | None = None

    def _build_ci_fns(self, cfg: DecomposeConfig,
                      generator: torch.Generator | None) -> dict[str, CIFunction]:
        """One CI function per module, or for `global_shared_mlp` one under GLOBAL_CI_KEY that
        reads every module's inner activations (concatenated in module order) and outputs all
        modules' CIs."""
        if cfg.ci_fn == "global_shared_mlp":
            total = sum(self.C.values())
            return {GLOBAL_CI_KEY: CIFunction(cfg.ci_fn, total, total, list(cfg.ci_hidden),
                                              generator=generator)}
        return {_key(p): CIFunction(cfg.ci_fn, self.comp_dims(p)[0], self.C[p],
                                    list(cfg.ci_hidden), generator=generator)
                for p in self.module_paths}

    # ---------------------------------------------------------------------------------------
    # Access
    # ---------------------------------------------------------------------------------------

    def comp_dims(self, path: str) -> tuple[int, int]:
        """(d_in, d_out) of a decomposed module."""
        d_out, d_in = self.target_weight(path).shape
        return int(d_in), int(d_out)

    def comp(self, path: str) -> LinearComponents:
        return self.components[_key(path)]  # type: ignore[return-value]

    def ci_fn(self, path: str) -> CIFunction:
        """The CI function of one module (not for global_shared_mlp: see `raw_ci`)."""
        return self.ci_fns[_key(path)]  # type: ignore[return-value]

    @property
    def global_ci(self) -> bool:
        """Whether one CI function serves all modules (ci_fn global_shared_mlp)."""
        return GLOBAL_CI_KEY in self.ci_fns

    def target_weight(self, path: str) -> Tensor:
        """The frozen target weight (d_out, d_in) (a transposed view for Conv1D)."""
        return projection_weight(self._targets[path])

    def component_parameters(self) -> list[nn.Parameter]:
        return list(self.components.parameters())

    def ci_parameters(self) -> list[nn.Parameter]:
        return list(self.ci_fns.parameters())

    def weight_deltas(self) -> dict[str, Tensor]:
        """W_target - (V U)^T per module (d_out, d_in), with grad to U and V."""
        return {p: self.target_weight(p) - self.comp(p).weight() for p in self.module_paths}

    # ---------------------------------------------------------------------------------------
    # Hooked forwards
    # ---------------------------------------------------------------------------------------

    def _make_hook(self, path: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
            state = self._pass
            if state is None:
                return None
            if path in state.seen:
                raise RuntimeError(f"decomposed module {path!r} ran twice in one forward; "
                                   f"modules used more than once are not supported")
            state.seen.add(path)
            if len(args) != 1 or not isinstance(args[0], Tensor):
                raise RuntimeError(f"decomposed module {path!r} must take one tensor input")
            x = args[0]
            out_shape = output.shape
            lead = state.positions
            if (lead is not None and x.shape[:-1] != lead
                    and x.shape[:-1].numel() == lead.numel()):
                x = x.reshape(*lead, x.shape[-1])
                output = output.reshape(*lead, output.shape[-1])
            if state.cache_inputs is not None:
                state.cache_inputs[path] = x
            if state.masks is None or path not in state.masks:
                return None
            comp = self.comp(path)
            reuse = state.reuse
            if reuse is not None and not state.upstream_changed and path in reuse.inner:
                inner = reuse.inner[path]
            else:
                inner = comp.inner(x)
            state.upstream_changed = True
            m = state.masks[path]
            bias = getattr(self._targets[path], "bias", None)
            out = comp.masked_output(inner, output, bias, m.component, m.delta)
            if m.routing is not None:  # positions not routed keep the target's output
                out = torch.where(m.routing.unsqueeze(-1), out, output)
            return out.reshape(out_shape)

        return hook

    def _run(self, x: Tensor, state: _PassState) -> Tensor:
        # Hooks live only for this call (as in the reference): a copied or pickled model never
        # carries hooks bound to another instance, and the plain target stays hook-free.
        handles = [mod.register_forward_hook(self._make_hook(p))
                   for p, mod in self._targets.items()]
        state.positions = x.shape if self.is_lm else x.shape[:-1]
        self._pass = state
        try:
            return self._call_target(x)
        finally:
            self._pass = None
            for h in handles:
                h.remove()

    def forward_cached(self, x: Tensor) -> ForwardCache:
        """Target forward (no grad) caching every decomposed module's input."""
        inputs: dict[str, Tensor] = {}
        with torch.no_grad():
            out = self._run(x, _PassState(cache_inputs=inputs))
        return ForwardCache(output=out, inputs=inputs)

    def forward_masked(
        self, x: Tensor, masks: dict[str, Mask], cache: ForwardCache | None = None
    ) -> Tensor:
        """Target forward with the modules in `masks` replaced by their masked components.

        With `cache` (from `forward_cached` on the same x, after `ci_from_cache`), modules that
        run before any replaced module reuse the cached inner activations instead of x V."""
        return self._run(x, _PassState(masks=masks, reuse=cache))

    def _call_target(self, x: Tensor) -> Tensor:
        """The target's output tensor: a toy's output, or a Hugging Face causal LM's logits
        (B, T, vocab) for token ids x (B, T) (no KV cache: every forward is a whole sequence)."""
        if self.is_lm:
            return self.target(input_ids=x, use_cache=False).logits
        return self.target(x)

    def forward(self, x: Tensor) -> Tensor:
        """The plain target forward."""
        return self._call_target(x)

    # ---------------------------------------------------------------------------------------
    # Causal importance
    # ---------------------------------------------------------------------------------------

    def raw_ci(self, inputs: dict[str, Tensor], inner: dict[str, Tensor]) -> dict[str, Tensor]:
        """Raw CI-function outputs {path: (..., C)} from each module's input (..., d_in) and
        inner activations (..., C)."""
        if self.global_ci:
            z = self.ci_fns[GLOBAL_CI_KEY](None, torch.cat([inner[p] for p in self.module_paths],
                                                           dim=-1))
            return dict(zip(self.module_paths, z.split(list(self.C.values()), dim=-1),
                            strict=True))
        return {p: self.ci_fn(p)(inputs[p], inner[p]) for p in self.module_paths}

    def ci_from_cache(self, cache: ForwardCache,
                      generator: torch.Generator | None = None) -> CausalImportance:
        """CI of every decomposed module (with grad). Fills `cache.inner`. For binomial
        sampling the lower CI reads 1.05 z - 0.05 u, u ~ U(0, 1) (reference §1.3)."""
        for p in self.module_paths:
            cache.inner[p] = self.comp(p).inner(cache.inputs[p])
        pre = self.raw_ci(cache.inputs, cache.inner)
        lower, upper = {}, {}
        for p, z in pre.items():
            upper[p] = self._upper(z)
            if self.sampling == "binomial":
                u = torch.rand(z.shape, device=z.device, dtype=z.dtype, generator=generator)
                lower[p] = self._lower(1.05 * z - 0.05 * u)
            else:
                lower[p] = self._lower(z)
        return CausalImportance(lower=lower, upper=upper, pre=pre)

    @torch.no_grad()
    def causal_importances(self, x: Tensor) -> dict[str, Tensor]:
        """Activation profiles: g in [0, 1] per module, (..., C), without gradients (for a
        language model x is (B, T) token ids and each g is (B, T, C)).

        Computed from the raw CI-function output with the lower bounding function and clamped
        to [0, 1] (no binomial noise)."""
        cache = self.forward_cached(x)
        inner = {p: self.comp(p).inner(cache.inputs[p]) for p in self.module_paths}
        return {p: self._lower(z).clamp(0.0, 1.0)
                for p, z in self.raw_ci(cache.inputs, inner).items()}
