"""The decomposable projections of a Hugging Face causal LM, found from its module tree.

Decomposable = every `nn.Linear` and every GPT-2 style `transformers.pytorch_utils.Conv1D`
inside the decoder blocks (the `nn.ModuleList` of `config.num_hidden_layers` identical
blocks). Embeddings, norms and the LM head lie outside the blocks and are never listed. Nothing
here names a model family: LLaMA, GPT-2 and other decoder-only models with linear projections
all go through the same walk.

`module_type` is the module's path inside its block (`self_attn.q_proj`, `mlp.down_proj`,
`attn.c_attn`, `mlp.c_proj`): unique within a layer (GPT-2 has two `c_proj`), and its first
part says attention or MLP for the per-layer report.

Conv1D stores its weight as (d_in, d_out), the transpose of nn.Linear's (d_out, d_in);
`weight_matrix` gives the (d_out, d_in) view of either, so SPD code can treat both alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor, nn

from scalespd.config import HFCausalLMTargetConfig
from scalespd.targets.models import ModuleInfo

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def _conv1d_type() -> type[nn.Module]:
    from transformers.pytorch_utils import Conv1D  # noqa: PLC0415  (heavy import)

    return Conv1D


@dataclass(frozen=True)
class LMModule:
    """One decomposable projection: where it is, what it is, and how its weight is stored.

    `d_in`, `d_out`: the projection maps (..., d_in) -> (..., d_out). `transposed`: its
    `.weight` is stored (d_in, d_out) (Conv1D) instead of nn.Linear's (d_out, d_in)."""

    path: str
    layer: int
    module_type: str
    d_in: int
    d_out: int
    transposed: bool

    @property
    def info(self) -> ModuleInfo:
        """The (path, layer, module_type) record the other stages use."""
        return ModuleInfo(self.path, self.layer, self.module_type)


def is_projection(module: nn.Module) -> bool:
    """True for nn.Linear and GPT-2's Conv1D (a linear map with a transposed weight)."""
    return isinstance(module, (nn.Linear, _conv1d_type()))


def weight_matrix(module: nn.Module) -> Tensor:
    """The weight as (d_out, d_in) for nn.Linear and Conv1D alike; for Conv1D a transposed
    view sharing its storage (so writes and gradients reach the module's own parameter)."""
    if isinstance(module, nn.Linear):
        return module.weight
    weight = getattr(module, "weight", None)
    if isinstance(module, _conv1d_type()) and isinstance(weight, Tensor):
        return weight.t()
    raise TypeError(f"{type(module).__name__} is not an nn.Linear or Conv1D projection")


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted path, ModuleList) of the decoder blocks: the first ModuleList (in module order)
    of `config.num_hidden_layers` blocks of one class; without such a config, the longest
    ModuleList of blocks of one class. ValueError when there is none."""
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = [
        (name, mod) for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) > 0
        and len({type(block) for block in mod}) == 1
        and any(is_projection(m) for m in mod[0].modules())
    ]
    if n_layers is not None:
        exact = [c for c in candidates if len(c[1]) == n_layers]
        if exact:
            return exact[0]
    if not candidates:
        raise ValueError(f"{type(model).__name__} has no list of decoder blocks with linear "
                         "projections (an nn.ModuleList of identical blocks)")
    return max(candidates, key=lambda c: len(c[1]))


def lm_modules(model: nn.Module) -> list[LMModule]:
    """Every decomposable projection of a causal LM, layer by layer, each layer's modules in
    registration order (the forward order for LLaMA: q, k, v, o, gate, up, down; GPT-2: c_attn,
    attn.c_proj, c_fc, mlp.c_proj). Works on a model on the meta device (shapes only)."""
    prefix, blocks = decoder_blocks(model)
    conv1d = _conv1d_type()
    out: list[LMModule] = []
    for layer, block in enumerate(blocks):
        for name, mod in block.named_modules():
            if not name or not is_projection(mod):
                continue
            transposed = isinstance(mod, conv1d)
            rows, cols = mod.weight.shape
            d_in, d_out = (rows, cols) if transposed else (cols, rows)
            out.append(LMModule(f"{prefix}.{layer}.{name}", layer, name, int(d_in), int(d_out),
                                transposed))
    return out


def target_model_config(cfg: HFCausalLMTargetConfig) -> PretrainedConfig:
    """The transformers config of the target: the one saved at cfg.path, or the default
    model's LlamaConfig (path None). ConfigError naming target.path when it cannot be read."""
    from scalespd.targets.lm.hf import load_hf_config  # noqa: PLC0415
    from scalespd.targets.lm.training import default_model_config  # noqa: PLC0415

    return default_model_config(cfg) if cfg.path is None else load_hf_config(cfg.path)


def target_modules(cfg: HFCausalLMTargetConfig) -> list[LMModule]:
    """`lm_modules` of the target described by cfg, from its config alone (no weights read:
    the module tree is built on the meta device)."""
    from scalespd.targets.lm.hf import skeleton  # noqa: PLC0415

    return lm_modules(skeleton(target_model_config(cfg)))
