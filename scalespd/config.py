"""Every configuration model of a scalespd run.

One YAML file describes a whole run (target -> decompose -> profiles -> graph -> spectral ->
report).
All models are frozen and reject unknown keys, so a typo in a YAML key is an error that names the
field instead of a silently ignored setting. `RunConfig()` with no arguments *is* the built-in
default run: a small TMS 5-2 decomposition that shows every stage on a laptop CPU in minutes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from scalespd.errors import ConfigError  # noqa: F401  (re-exported: stages raise it)

# Scalars are strict: YAML's `true` is not the integer 1, 1.5 is not an integer, and the string
# "yes" is not a boolean. (An integer is still accepted where a float is expected.)
Int = Annotated[int, Field(strict=True)]
Bool = Annotated[bool, Field(strict=True)]
PosInt = Annotated[int, Field(gt=0, strict=True)]
NonNegInt = Annotated[int, Field(ge=0, strict=True)]
PosFloat = Annotated[float, Field(gt=0, strict=True)]
NonNegFloat = Annotated[float, Field(ge=0, strict=True)]
Fraction = Annotated[float, Field(ge=0, le=1, strict=True)]
Probability = Annotated[float, Field(gt=0, le=1, strict=True)]


class Cfg(BaseModel):
    """Base of all config models: frozen, unknown keys rejected. Each field's docstring is its
    description (`--show-config`, docs/config.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


# --------------------------------------------------------------------------------------------
# Optimisation schedules (shared by target training and SPD)
# --------------------------------------------------------------------------------------------


class ScheduleConfig(Cfg):
    """Learning-rate schedule: warm-up over `warmup_pct` of the steps, then `fn` from `lr` down
    to `lr * final_frac` (the SPD reference's `get_scheduled_value`)."""

    lr: PosFloat
    """Peak learning rate (reached after the warm-up)."""
    fn: Literal["constant", "linear", "cosine"] = "constant"
    """Shape of the decay after the warm-up: constant, linear or cosine down to lr * final_frac."""
    warmup_pct: Annotated[float, Field(ge=0, lt=1, strict=True)] = 0.0
    """Fraction of the steps spent warming up linearly from 0 to lr."""
    final_frac: Fraction = 1.0
    """Learning rate at the last step as a fraction of lr (1.0 for a constant schedule)."""

    @model_validator(mode="after")
    def _constant_has_no_decay(self) -> ScheduleConfig:
        if self.fn == "constant" and self.final_frac != 1.0:
            raise ValueError("final_frac must be 1.0 for a constant schedule")
        return self


class TargetTrainConfig(Cfg):
    """Recipe for training a toy target model (digest §1.3)."""

    steps: PosInt
    """Optimisation steps of target training."""
    batch_size: PosInt
    """Samples per training step."""
    schedule: ScheduleConfig
    """Learning-rate schedule of target training (AdamW)."""
    weight_decay: NonNegFloat = 0.01
    """AdamW weight decay of target training."""


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------


class TMSTargetConfig(Cfg):
    """Toy model of superposition: x_hat = ReLU(W^T [I ...] W x + b).

    Modules: `linear1` (W, no bias), `hidden_layers.{i}` (fixed identities, no bias),
    `linear2` (W^T when tied, with bias)."""

    kind: Literal["tms"] = "tms"
    """Selects this target type."""
    n_features: PosInt = 5
    """Number of sparse input features (the toy's n)."""
    n_hidden: PosInt = 2
    """Width of the bottleneck (the toy's m < n)."""
    n_identity_layers: NonNegInt = 0
    """Fixed identity matrices inserted in the bottleneck (the "TMS + identity" variants); each is
    a decomposable module `hidden_layers.{i}`."""
    tied_weights: Bool = True
    """Use W^T as the decoder (`linear2`), as in the papers' TMS."""
    init_bias_to_zero: Bool = True
    """Start the output bias b at 0. The reference recipe uses torch's default bias init
    (U(+-1/sqrt(n_hidden))) for 5-2 and zero for 40-10; with the default init, features whose
    bias starts negative never switch on (measured: 9 of 10 seeds of TMS 5-2 end with dead
    features), so zero is the default here for every size. Set false for the exact recipe."""
    feature_probability: Probability = 0.05
    """Probability that each feature is active in a training sample (values uniform in [0, 1])."""
    seed: Int = 0
    """Seed of the target's initialisation and training data."""
    path: Path | None = None
    """Load a trained target from this directory (as written by the target stage) instead of
    training one."""
    train: TargetTrainConfig = TargetTrainConfig(
        steps=10_000, batch_size=1024, schedule=ScheduleConfig(lr=5e-3)
    )
    """Training recipe of the target."""


class ResidMLPTargetConfig(Cfg):
    """Residual MLP toy ("compressed computation"): r0 = W_E x; r += W_out act(W_in r);
    y_hat = W_U r with a fixed random unit-norm embedding and W_U = W_E^T.

    Modules: `layers.{i}.mlp_in`, `layers.{i}.mlp_out`."""

    kind: Literal["resid_mlp"] = "resid_mlp"
    """Selects this target type."""
    n_features: PosInt = 100
    """Number of sparse input features, each to be computed by the MLPs."""
    d_embed: PosInt = 1000
    """Width of the residual stream."""
    d_mlp: PosInt = 50
    """Hidden width of each layer's MLP (fewer neurons than features: compressed computation)."""
    n_layers: PosInt = 1
    """Number of residual MLP layers."""
    act: Literal["relu", "gelu"] = "relu"
    """Activation of the MLPs."""
    in_bias: Bool = False
    """Give `mlp_in` a bias."""
    out_bias: Bool = False
    """Give `mlp_out` a bias."""
    feature_probability: Probability = 0.01
    """Probability that each feature is active in a training sample (values uniform in [-1, 1])."""
    seed: Int = 0
    """Seed of the target's initialisation (embedding included) and training data."""
    path: Path | None = None
    """Load a trained target from this directory (as written by the target stage) instead of
    training one."""
    train: TargetTrainConfig = TargetTrainConfig(
        steps=1000,
        batch_size=2048,
        schedule=ScheduleConfig(lr=3e-3, fn="cosine", final_frac=0.0),
    )
    """Training recipe of the target."""


class HFCausalLMTargetConfig(Cfg):
    """A Hugging Face causal language model and the text it reads (scalespd/targets/lm/).

    `path` set: that model and its tokenizer are loaded. `path` None: the target stage trains
    the offline default, a LLaMA-style model of the shape below (default: the SimpleStories-1.25M
    shape, 1.25 M parameters) with its own byte-level BPE tokenizer, on `dataset`, and saves both
    with save_pretrained in run_dir/target/ (itself a directory `path` can point at).

    Modules: every nn.Linear / GPT-2 Conv1D inside the decoder blocks, e.g.
    `model.layers.{i}.self_attn.{q,k,v,o}_proj` and `model.layers.{i}.mlp.{gate,up,down}_proj`
    (LLaMA), `transformer.h.{i}.attn.c_attn`, `...attn.c_proj`, `...mlp.c_fc`, `...mlp.c_proj`
    (GPT-2); embeddings and the LM head are not decomposable."""

    kind: Literal["hf_causal_lm"] = "hf_causal_lm"
    """Selects this target type."""
    path: str | None = None
    """A local Hugging Face causal-LM directory (model and tokenizer saved with save_pretrained,
    e.g. another run's target/ folder) or a hub name such as SimpleStories/SimpleStories-1.25M
    (needs internet or the hub cache; HF_HUB_OFFLINE=1 refuses it). None: train the offline
    default; the shape fields below are used only then."""
    n_layers: PosInt = 4
    """Decoder blocks of the default model (path None)."""
    d_model: PosInt = 128
    """Residual width of the default model (path None); a multiple of n_heads."""
    n_heads: PosInt = 4
    """Attention (query) heads of the default model (path None)."""
    n_kv_heads: PosInt = 2
    """Key/value heads of the default model (path None; grouped-query attention), dividing
    n_heads."""
    d_mlp: PosInt = 341
    """Hidden width of the default model's SwiGLU MLP (gate_proj, up_proj; path None)."""
    vocab_size: Annotated[int, Field(ge=257, strict=True)] = 4096
    """Vocabulary of the default model's byte-level BPE tokenizer and embedding (path None): 256
    byte tokens, the <|endoftext|> separator and the learned merges."""
    max_seq_len: PosInt = 512
    """Maximum positions of the default model (path None); seq_len may not exceed it."""
    tie_embeddings: Bool = True
    """The default model's LM head is its token embedding transposed, as in SimpleStories-1.25M
    (its 1.25 M parameters count the embedding once)."""
    dataset: str | None = None
    """Text to train and evaluate on: None for the bundled corpus (42 works of Shakespeare, 5.05
    M characters, public domain; scalespd/targets/lm/corpus/), a local text / JSON(L) / CSV /
    parquet file or folder, or a hub dataset name (needs internet or the hub cache). Read with
    datasets.load_dataset."""
    dataset_split: str = "train"
    """Split of `dataset` to read (local files have only "train")."""
    text_column: str = "text"
    """Column of `dataset` that holds the text."""
    text_sample_by: Literal["line", "paragraph", "document"] = "paragraph"
    """For plain-text files: one document per line, per blank-line-separated paragraph, or per
    file. Documents are joined with the tokenizer's end-of-text token before packing."""
    seq_len: PosInt = 128
    """Tokens per packed sequence; at most the model's maximum positions."""
    max_sequences: PosInt | None = None
    """Stop tokenizing once this many sequences are filled (None: the whole dataset)."""
    heldout_fraction: Annotated[float, Field(gt=0, lt=1, strict=True)] = 0.1
    """Fraction of the packed sequences held out from training (a seeded random choice): the
    target's evaluation loss is measured on them, and later stages can draw from them. On the
    bundled corpus: 1,289 of 12,887 sequences of 128 tokens."""
    seed: Int = 0
    """Seed of the default model's initialisation, the held-out split and the training batches."""
    train: TargetTrainConfig = TargetTrainConfig(
        steps=500,
        batch_size=32,
        schedule=ScheduleConfig(lr=3e-3, fn="cosine", warmup_pct=0.05, final_frac=0.1),
        weight_decay=0.1,
    )
    """Training recipe of the default model (path None): AdamW, `batch_size` sequences of
    seq_len tokens per step, gradient norm clipped at 1. The default (500 steps of 32 x 128
    tokens, 1.4 passes over the bundled corpus) was measured on 2 CPU cores: 0.4 s/step on an
    idle machine, 296 s in all with other jobs running; loss 8.32 at the first step, 4.35
    nats/token on the held-out sequences at the end (perplexity 77)."""

    @model_validator(mode="after")
    def _default_shape_is_valid(self) -> HFCausalLMTargetConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads "
                             f"({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads ({self.n_kv_heads}) must divide n_heads "
                             f"({self.n_heads})")
        if self.path is None and self.seq_len > self.max_seq_len:
            raise ValueError(f"seq_len ({self.seq_len}) is longer than max_seq_len "
                             f"({self.max_seq_len}), the model's maximum positions")
        return self


AnyTargetConfig = TMSTargetConfig | ResidMLPTargetConfig | HFCausalLMTargetConfig
# The toy targets: sparse features, one-hot probes, known ground truth.
ToyTargetConfig = TMSTargetConfig | ResidMLPTargetConfig
# The papers' one-hot probe: x_f = 0.75 on feature f alone, for CI heatmaps, target checks and
# the toys' ground truth.
ONE_HOT_VALUE = 0.75
# The `target` section: the `kind` field selects the model.
TargetConfig = Annotated[AnyTargetConfig, Field(discriminator="kind")]


# --------------------------------------------------------------------------------------------
# SPD decomposition
# --------------------------------------------------------------------------------------------


class ModuleSpec(Cfg):
    """Decompose every module whose dotted path matches `pattern` (fnmatch) into C rank-one
    subcomponents."""

    pattern: str = Field(min_length=1)
    """fnmatch pattern over the target's dotted module paths (e.g. `layers.*.mlp_in`)."""
    C: PosInt
    """Number of rank-one subcomponents of each matching module."""


class LossConfig(Cfg):
    """Loss coefficients (SPD paper §2.7: faithfulness, beta1, beta2, beta3) and the L_p
    importance-minimality exponent with optional linear p-annealing."""

    faithfulness: NonNegFloat = 0.0
    """Coefficient of the faithfulness loss (sum of the subcomponents vs. the target weights); 0
    with the delta component, which makes it exact."""
    stochastic_recon: NonNegFloat = 1.0
    """Coefficient of the stochastic reconstruction loss, all modules masked at once (beta1)."""
    stochastic_recon_layerwise: NonNegFloat = 1.0
    """Coefficient of the layer-wise stochastic reconstruction loss, one module masked at a time
    (beta2). Costs one forward pass per decomposed module and mask sample."""
    stochastic_recon_subset: NonNegFloat = 0.0
    """Coefficient of the subset stochastic reconstruction loss (the reference's language-model
    loss): per position, k ~ Uniform{1..L} of the L decomposed modules, chosen at random, use
    their masked subcomponents and the others the target's own output. One forward pass per
    mask sample, whatever L, so it replaces the layer-wise loss on models with many modules."""
    importance_minimality: NonNegFloat = 3e-3
    """Coefficient of the importance-minimality loss, sum of (g + eps)^p (beta3)."""
    p: PosFloat = 1.0
    """Exponent p of the importance-minimality loss (at the start of annealing)."""
    p_anneal_final: PosFloat | None = None
    """If set, p is annealed linearly to this value between the two fractions below."""
    p_anneal_start_frac: Fraction = 1.0
    """Fraction of the steps at which p-annealing starts."""
    p_anneal_end_frac: Fraction = 1.0
    """Fraction of the steps at which p-annealing ends."""
    eps: PosFloat = 1e-12
    """Added to the importances before the power p (keeps the gradient finite at 0 for p < 1)."""
    output: Literal["mse", "kl"] = "mse"
    """Distance between the masked and the target outputs: MSE (toys) or KL (language models)."""

    @model_validator(mode="after")
    def _anneal_order(self) -> LossConfig:
        if self.p_anneal_end_frac < self.p_anneal_start_frac:
            raise ValueError("p_anneal_end_frac must be >= p_anneal_start_frac")
        return self


class DecomposeConfig(Cfg):
    """SPD training (digest §2). Defaults: the reference TMS 5-2 config (C = 20 per matrix, mlp
    CI [16], beta3 = 3e-3, p = 1, cosine schedule, faithfulness warm-up 200 @ lr 0.01 wd 0.1,
    delta component) with a CPU-fast optimisation: batch 512, lr 1e-2, 2000 steps instead of
    batch 4096, lr 1e-3, 10k steps. Measured on 7 TMS 5-2 / 5-2+ID target/SPD seed pairs, that
    recovers the ground truth in every run (usually by step 1000) in ~12-18 s of one CPU core."""

    modules: list[ModuleSpec] = Field(
        default=[ModuleSpec(pattern="linear1", C=20), ModuleSpec(pattern="linear2", C=20)],
        min_length=1,
    )
    """Which modules of the target to decompose, and into how many rank-one subcomponents each."""
    ci_fn: Literal["mlp", "vector_mlp", "shared_mlp", "global_shared_mlp"] = "mlp"
    """Causal-importance function: `mlp` = one scalar MLP per subcomponent reading its own inner
    activation (the SPD paper); `vector_mlp` = one MLP per subcomponent reading the module
    input; `shared_mlp` = one MLP per module with C outputs; `global_shared_mlp` = one MLP for
    all modules, reading every module's inner activations (sum of C inputs and outputs; the
    reference's language-model choice)."""
    ci_hidden: list[PosInt] = [16]
    """Hidden widths of the CI function MLPs (GELU between layers)."""
    sigmoid: Literal["leaky_hard", "hard"] = "leaky_hard"
    """`leaky_hard`: lower-leaky hard sigmoid for masks, upper-leaky for the minimality loss;
    `hard`: clamp(x, 0, 1) for both."""
    lower_leaky: Literal["straight_through", "forward"] = "straight_through"
    """Lower-leaky variant: the reference code's clamp forward with a straight-through leaky
    backward, or the SPD paper's forward leak 0.01x below 0 (digest §2.4 [!])."""
    leak: PosFloat = 0.01
    """Slope of the leaky part of the leaky hard sigmoids."""
    sampling: Literal["continuous", "binomial"] = "continuous"
    """How stochastic masks are drawn from the importances: continuous m = g + (1 - g) u with u ~
    U(0, 1), or binomial."""
    n_mask_samples: PosInt = 1
    """Mask samples per step for the stochastic reconstruction losses (S)."""
    use_delta_component: Bool = True
    """Add the residual W - sum(subcomponents) as an extra, stochastically masked component, so
    that the faithfulness loss can be dropped."""
    tie_components: Bool = True
    """A module whose target weight is the transpose of another decomposed module's (TMS tied
    weights: linear2 = linear1^T) reuses that module's subcomponents transposed (one V, U pair
    used twice, as the reference ties them), keeping its own CI function, so each matrix still
    has its own C subcomponents and alive count. Measured on TMS 5-2 (batch 1024, 3000 steps): 3
    of 3 tied runs recovered the ground truth; both untied runs (lr 1e-3, 3e-3) were left with
    linear1 subcomponents that mix features. False: decompose both independently."""
    faithfulness_warmup_steps: NonNegInt = 200
    """Steps that fit the subcomponents to the target weights (faithfulness only) before SPD
    training."""
    faithfulness_warmup_lr: PosFloat = 0.01
    """Learning rate of the faithfulness warm-up."""
    faithfulness_warmup_weight_decay: NonNegFloat = 0.1
    """Weight decay of the faithfulness warm-up."""
    loss: LossConfig = LossConfig()
    """Loss coefficients and the importance-minimality exponent."""
    steps: PosInt = 2000
    """SPD optimisation steps."""
    batch_size: PosInt = 512
    """Global batch size (samples; for a language model, sequences of target.seq_len tokens);
    each of `num_workers` DDP ranks draws batch_size / num_workers."""
    schedule: ScheduleConfig = ScheduleConfig(lr=1e-2, fn="cosine", final_frac=0.0)
    """Learning-rate schedule of SPD training (AdamW)."""
    weight_decay: NonNegFloat = 0.0
    """AdamW weight decay of SPD training."""
    grad_clip_norm: PosFloat | None = None
    """Clip the global gradient norm to this value (None: no clipping)."""
    seed: Int = 0
    """Seed of the subcomponent and CI-function initialisation, the training batches and the
    masks."""
    log_every: PosInt = 100
    """Log (and report to Ray Train) every this many steps."""
    save_every: PosInt = 1000
    """Evaluate and checkpoint every this many steps (resume granularity)."""
    ci_alive_threshold: Fraction = 0.1
    """Threshold for alive counts / CI-L0 in the decomposition metrics."""
    eval_batch_size: PosInt = 4096
    """Size of the fixed evaluation batch of the decomposition metrics (for a language model:
    held-out sequences, at most as many as there are)."""
    num_workers: PosInt = 1
    """Ray Train workers (DDP ranks); each draws batch_size / num_workers samples per step."""
    use_gpu: Bool = False
    """Give every Ray Train worker one GPU."""
    cpus_per_worker: PosInt = 1
    """CPUs each Ray Train worker reserves, and its torch threads. 1 by default: toy models are too
    small for intra-op parallelism, and extra threads on a busy CPU slow them down a lot."""
    max_failures: Int = Field(default=0, ge=-1)
    """Worker-group restarts Ray Train may make after a worker fails (-1: unlimited); each restart
    resumes from the newest checkpoint."""

    @model_validator(mode="after")
    def _batch_divides(self) -> DecomposeConfig:
        if self.batch_size % self.num_workers:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be divisible by num_workers "
                f"({self.num_workers})"
            )
        patterns = [m.pattern for m in self.modules]
        if len(set(patterns)) != len(patterns):
            raise ValueError(f"modules: duplicate patterns in {patterns}")
        return self


# --------------------------------------------------------------------------------------------
# Profiles, graph, spectral, report
# --------------------------------------------------------------------------------------------


class ProfilesConfig(Cfg):
    """Harvest of the (M, N) causal-importance matrix into chunked zarr."""

    n_samples: PosInt = 4096
    """Rows M of the profile matrix: inputs (toys) the CIs are recorded on."""
    dataset: Literal["train", "structured"] = "train"
    """"train": inputs from the target's data distribution; "structured": the clustering paper's
    TMS evaluation set (a block of `samples_per_feature` rows per feature)."""
    samples_per_feature: PosInt = 200
    """Rows per feature block of the `structured` dataset."""
    chunk_rows: PosInt = 4096
    """Rows per chunk of ci.zarr (and inputs.zarr)."""
    chunk_cols: PosInt = 1024
    """Columns per chunk of a dense ci.zarr."""
    block_rows: PosInt = 4096
    """Rows per harvest task; a multiple of chunk_rows so writers own whole chunks."""
    dtype: Literal["float16", "float32"] = "float32"
    """Storage dtype of ci.zarr."""
    storage: Literal["sparse", "dense"] = "sparse"
    """Layout of ci.zarr. "sparse": a CSR row block per harvest block (indptr / indices /
    values; only values >= zero_below are stored), read back as scipy CSR by the graph stage's
    co-activation path; a language model's CI is ~2-5% non-zero. "dense": one (M, N) array
    chunked (chunk_rows, chunk_cols). Both hold the same values; every stage reads either."""
    zero_below: Annotated[float, Field(ge=0, lt=1, strict=True)] = 1e-3
    """CI values below this floor are stored as exact zeros (both layouts), so "co-active" means
    both values >= zero_below. 1e-3 keeps every value a correlation can notice (on the
    lm_tiny run it zeroes 0.07% of the non-zeros) while CI
    functions' tiny leaks stop counting as activity. 0 keeps every non-zero value."""
    tau: Fraction = 0.1
    """Alive filter: a subcomponent is alive iff max_x g(x) > tau."""
    seed: Int = 1
    """Seed of the harvested inputs' random stream (1 by default so that it differs from
    decompose.seed's default 0, whose stream feeds SPD training)."""
    max_concurrency: PosInt | None = None
    """Parallel harvest tasks at once (None: one per available CPU / GPU)."""
    batch_rows: PosInt = 4096
    """Rows per forward pass inside a block (bounds activation memory for big models)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the CI forward runs: "auto" picks CUDA when torch sees a GPU."""
    executor: Literal["auto", "ray", "local"] | None = None
    """Where the harvest runs (None: ray.executor). "ray": blocks run on Ray actors that keep
    the model loaded; "local": in this process; "auto": Ray when a cluster is configured, or
    when more than one block and >= 2**26 CI values are left to compute (actor start-up costs
    seconds that toy-sized harvests do not repay), else local."""
    compression_level: Annotated[int, Field(ge=1, le=22, strict=True)] = 1
    """zstd level of ci.zarr. On CI-like data (95% exact zeros) level 1 wrote ~7% faster than level
    3 and compressed better (14.5x vs 13.0x; bench/profiles_harvest.py data)."""
    save_inputs: Bool = True
    """Store each row's input in profiles/inputs.zarr (toys: the input vector; LMs: token ids,
    sequence ids and positions)."""

    @model_validator(mode="after")
    def _floor_below_tau(self) -> ProfilesConfig:
        if self.zero_below > self.tau:
            raise ValueError(f"zero_below ({self.zero_below}) must not exceed tau ({self.tau}): "
                             "a floor above the alive threshold would hide activity")
        return self

    @model_validator(mode="after")
    def _blocks_hold_whole_chunks(self) -> ProfilesConfig:
        if self.block_rows % self.chunk_rows:
            raise ValueError(
                f"block_rows ({self.block_rows}) must be a multiple of chunk_rows "
                f"({self.chunk_rows}) so that each writer owns whole chunks"
            )
        return self


class GraphConfig(Cfg):
    """Tiled Pearson correlation -> running top-k -> k-NN graph (relative, mutual or union) ->
    components."""

    k: PosInt = 10
    """Candidate neighbours per node: each node's k most correlated columns (above the edge
    threshold) are the pairs that can become edges."""
    neighbours: Literal["relative", "mutual", "union"] = "relative"
    """Which candidate pairs become edges. "relative" (default): a pair from either node's top-k
    list is kept when its correlation is at least `relative_strength` times the strongest
    correlation of *each* of its two nodes. A hub (a subcomponent active with many mechanisms:
    ResidMLP's mlp_out, TMS identity, a language model's frequent subcomponents) correlates
    weakly with every member of the mechanisms it serves, and those members correlate strongly
    with each other, so the hub's links fall below its partners' strongest ones and are dropped;
    a member of a mechanism larger than k keeps all its mates' links (no k-mutual-picks limit).
    "mutual": the paper's mutual k-NN (both in each other's top-k; fragments every mechanism of
    more than ~k members); "union": either node's top-k (hubs join everything they serve). The
    paper's exact procedure: neighbours "mutual", edge_threshold 0 and
    spectral.always_on_fraction null (README "Clustering default")."""
    relative_strength: Probability = 0.7
    """The factor of "relative": an edge needs at least this fraction of both endpoints'
    strongest correlations. Measured 0.5-0.8 (README "Clustering default"): 0.5 lets lone
    features join resid_mlp1's mlp_out hub (82 of 100 features), 0.8 splits resid_mlp2's dense
    mlp_out (41 of 51 in one cluster); 0.6-0.7 do neither."""

    @model_validator(mode="before")
    @classmethod
    def _mutual_was_renamed(cls, data: Any) -> Any:
        # A clear message for configs written before `neighbours` replaced `mutual`.
        if isinstance(data, dict) and "mutual" in data:
            raise ValueError("graph.mutual was replaced by graph.neighbours: use neighbours: "
                             "mutual (was mutual: true), union (mutual: false) or relative "
                             "(the default)")
        return data

    edge_threshold: Annotated[float, Field(ge=0, lt=1, strict=True)] | Literal["auto"] = "auto"
    """Edges with correlation <= threshold are dropped before the k-NN selection. "auto": derived
    from the data (chance level for this M and N, see scalespd/graph/threshold.py); 0.0: the
    paper's plain ReLU clamp."""
    null_alpha: Probability = 0.01
    """Family-wise false-positive rate the automatic threshold allows over all N^2/2 pairs."""
    null_model: Literal["bennett", "bennett_pairwise", "gaussian"] = "bennett_pairwise"
    """Tail model of a null (independent columns) correlation used by "auto".
    "bennett_pairwise" (default): each pair gets its own Bennett bound on the row-permutation
    null at level null_alpha / n_pairs, from its two columns' largest |z| — the same
    family-wise guarantee as one threshold for all pairs, and each pair's is at most that one,
    so no real edge is lost to the spikiest column elsewhere (resid_mlp1: one threshold of 0.69
    left no edge at all, the dense mlp_out correlate at ~0.27). "bennett": one threshold for all
    pairs from the largest |z| of any column, falling back to per-pair thresholds when it is
    vacuous (1); "gaussian" assumes normal data (t-test quantile) and under-estimates the tail
    of sparse profiles."""
    null_perm_cols: NonNegInt = 1024
    """"auto" never goes below the largest correlation among this many randomly chosen columns
    after shuffling each column's rows independently (an empirical floor; 0 turns it off)."""
    null_seed: Int = 0
    """Seed of the row permutations of the empirical null floor."""
    tile_cols: PosInt = 4096
    """Columns per tile (panel width). Memory per tile task ~ 2*row_chunk*tile_cols*4 B (panels) +
    a few tile_cols^2*4 B (tile and its top-k scratch)."""
    row_chunk: PosInt = 16384
    """Rows read (and z-scored) at once; tiles accumulate over row chunks when M is larger."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the correlation tiles are computed: `auto` uses CUDA (CuPy) when available."""
    correlation: Literal["auto", "dense", "sparse"] = "auto"
    """How the correlations are computed. "dense": tiled GEMM over all rows (cost 2*M*N^2 flops).
    "sparse": exact, from co-activations only — two columns never non-zero on the same row have
    rho <= 0, so every positive edge is a co-active pair; sums over the non-zero entries (sparse
    X^T X per column tile, frequent columns as sparse x dense products), far cheaper when most
    columns fire on few rows. It needs non-negative profiles (CI profiles are). Both give the same
    top-k lists, ties included. "auto": sparse when the profiles are non-negative and the column
    densities measured in the statistics pass make it the cheaper one, else dense."""


class SpectralConfig(Cfg):
    """Spectral clustering of each connected component (or of the largest one)."""

    k_max: PosInt = 12
    """Largest number of clusters the eigengap may choose per connected component."""
    mode: Literal["per_component", "largest_component"] = "per_component"
    """`per_component`: cluster every connected component; `largest_component`: the paper's §4
    variant (cluster the largest component, assign every other alive node to the cluster it
    correlates with most)."""
    recursive_split: Bool = True
    """When the eigengap picks K_max itself, cluster each resulting cluster again."""
    max_depth: PosInt = 8
    """Deepest level of recursive splits."""
    eigengap_lookahead: NonNegInt = 12
    """Extra eigenvalues beyond the K_max + 1 the eigengap needs, used only to notice components
    with more than K_max clusters (their largest gap lies past K_max; with exactly K_max + 1
    eigenvalues it hides among noise-sized gaps): those get K = K_max and a recursive split. 0 =
    the paper's rule alone."""
    assign_labels: Literal["cluster_qr", "kmeans"] = "cluster_qr"
    """How nodes get their cluster from the spectral embedding (the first K eigenvectors).
    "cluster_qr" (default): column-pivoted QR (Damle, Minden & Ying 2019) — deterministic, so
    the clustering does not depend on `seed` (lm_tiny: seed ARI 1.0 vs 0.86 with k-means; the
    same toy and planted results); "kmeans": k-means with `kmeans_n_init` restarts (the
    paper's)."""
    kmeans_n_init: PosInt = 10
    """k-means restarts on the spectral embedding (assign_labels "kmeans")."""
    dense_max_nodes: PosInt = 100
    """Components up to this size use a dense eigensolver (CPU); larger ones ARPACK shift-invert,
    which on these sparse graphs is already faster from ~100 nodes on (bench/spectral_bench.py)."""
    min_task_seconds: PosFloat = 0.05
    """Small components are packed into Ray tasks of at least this much estimated work."""
    always_on_fraction: Probability | None = 0.5
    """Subcomponents active (CI > tau) on more than this fraction of inputs *and* without a
    partner (strongest correlation with any other alive subcomponent below
    `always_on_max_corr`) form the always-on group. Such subcomponents (TMS identity: active on
    73-84% of inputs, strongest correlation 0.19-0.41) correlate weakly with everything and
    otherwise get spread over the feature clusters (the paper's TMS+ID failure case). None: no
    group (the paper's setting)."""
    always_on_max_corr: Fraction = 0.5
    """A frequent subcomponent whose strongest correlation reaches this has a partner and is
    clustered like any other (TMS features active on up to 60% of the structured inputs have
    partners at 0.71 and above); 1: every frequent subcomponent is always-on."""
    always_on_grouping: Literal["join", "join_all", "single", "connected"] = "join"
    """How the always-on subcomponents are grouped. "join" (default): each always-on
    subcomponent without an edge to another always-on one is linked to every other always-on
    subcomponent (at the median edge weight) and all are clustered with everything else, so the
    unlinked ones (TMS identity: correlations with each other from -0.36 to 0.17) form one
    cluster, while always-on subcomponents already linked to each other keep only their own
    links: two groups held together by their own correlations stay apart (planted many-small:
    20 hubs active on 63-94% of the rows next to a separate always-on group; ARI 0.96 with
    "join_all", 0.996 with "join"). "join_all": every pair of them is linked (the previous
    default); "single": taken out of the graph as one cluster of all of them; "connected": taken
    out, one cluster per connected set of them in the k-NN graph (isolated ones become
    singletons)."""
    edge_mass_ratio: Annotated[float, Field(ge=1, strict=True)] | None = 4.0
    """Containment test: an edge is dropped before clustering when the second moments E[x^2] of
    its two subcomponents' profiles (their importance mass, from the graph's column mean and
    std) differ by more than this factor. Members of one mechanism fire on the same inputs, so
    their masses differ only by their levels (at most 3.4x on every toy run, although TMS
    encoder/decoder pairs differ 13-25x in firing *rate*); a hub that serves many mechanisms
    carries several times the mass of each member whose inputs it contains and correlates with
    it as strongly as with other hubs (resid_mlp1's feature-to-mlp_out links: 4.9-58x; planted
    lone-to-hub links: 2-17x). Measured 2.5-8: 3 splits TMS 40-10 pairs (32 of 40); 4-8 keep
    every toy and planted target (README "Clustering default"). None: keep every edge (the
    paper's setting)."""
    alternative_always_on_fraction: Probability | None = 0.5
    """"Report both": the graph is clustered a second time with the other always-on setting
    (spectral/clusters_alternative.csv) when some alive subcomponent is always-on under either
    setting, and the report scores both. If always_on_fraction is None, the alternative groups
    the subcomponents active on more than this fraction; if it is set, the alternative is the
    paper's setting (no group). None: no second clustering."""
    seed: Int = 0
    """Seed of k-means and the eigensolver's start vector."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where large components are solved: `auto` uses CUDA (CuPy, cuML if installed) when
    available."""
    gpu_min_nodes: PosInt = 512
    """On a GPU, components with at least this many nodes are solved there (eigensolver and
    k-means); smaller ones stay on the CPU, where their solve costs less than a transfer."""
    quality_rows: PosInt = 20_000
    """Cluster quality (spectral/quality.json): profile rows (the first ones) on which each
    non-singleton cluster's coherence, the mean pairwise Pearson correlation of its members, is
    computed."""
    quality_resamples: NonNegInt = 1
    """Cluster quality: times the profile rows are split into two random halves, each half's
    graph built and clustered with the same settings, and the two clusterings compared (ARI, and
    each cluster's best Jaccard overlap in the halves); each costs two graph builds and two
    clusterings. 0 = off."""
    quality_seeds: NonNegInt = 4
    """Cluster quality: the same graph clustered again with seeds seed+1 .. seed+this, and the
    pairwise ARI between these and the configured clustering reported. 0 = off."""


class ReportConfig(Cfg):
    """The HTML report and summary.json."""

    max_heatmap_nodes: PosInt = 2000
    """Alive components shown in the correlation heatmap (largest clusters first); the same columns
    give the within/between-cluster mean correlation, so this also bounds that cost."""
    max_profile_rows: PosInt = 20_000
    """Profile rows read for those correlations (the first rows of ci.zarr)."""
    n_spectra: PosInt = 6
    """Eigenvalue spectra plotted, for the largest connected components."""
    max_table_rows: PosInt = 300
    """Rows of the cluster table in index.html (largest clusters first); summary.json has all."""
    max_members_listed: PosInt = 40
    """Member names listed per cluster in the HTML table."""
    gt_tau: Fraction | None = None
    """Ground truth (toys): a subcomponent "serves" a one-hot input when its CI there (recorded
    by the evaluate stage) exceeds this (None: profiles.tau)."""
    dense_fraction: Fraction = 0.5
    """Served by more than this fraction of the one-hot inputs -> "dense" (TMS identity, ResidMLP
    mlp_out), not assigned to one feature."""
    tie_tol: NonNegFloat = 1e-3
    """Best and second-best one-hot CI closer than this -> a tie: no single feature assigned."""


class EvaluateConfig(Cfg):
    """Work on the trained model after clustering, written for the report to read (toys: the
    causal importances on one-hot inputs and the ground truth; language models: the token
    strings and the ablation test of the largest clusters, scalespd/evaluate/ablation.py)."""

    ablation_clusters: NonNegInt = 20
    """Language models: the largest non-singleton clusters put to the ablation test (0: none)."""
    ablation_random_sets: PosInt = 100
    """Random sets of alive subcomponents (same size and per-layer mix as the cluster) each
    cluster is compared with; its percentile among them is reported."""
    ablation_sequences: PosInt = 64
    """Held-out sequences the ablation test runs on (the first ones: the profiled tokens)."""
    ablation_batch: PosInt = 32
    """Sequences per forward pass of the ablation test (memory: batch x seq_len x vocab)."""
    seed: Int = 0
    """Seed of the random sets."""
    onehot_value: PosFloat = ONE_HOT_VALUE
    """Value x_f of the one-hot inputs on which the causal importances are recorded (the SPD
    papers' CI-heatmap convention)."""


class RayConfig(Cfg):
    """How `python -m scalespd.run` reaches Ray.

    address None: use $RAY_ADDRESS when set (as inside `ray job submit`), else start Ray
    in-process on this node."""

    address: str | None = None
    """Address of a Ray cluster (host:port, `auto` or ray://host:port)."""
    num_cpus: PosInt | None = None
    """CPUs of a local Ray (None: all of this machine's)."""
    num_gpus: NonNegInt | None = None
    """GPUs of a local Ray (None: all visible ones)."""
    object_store_memory: PosInt | None = 500_000_000
    """Object store bytes of a local Ray (None: Ray's default, a share of the memory)."""
    executor: Literal["auto", "local", "ray"] = "auto"
    """Where the profiles, graph and spectral stages run their work (scalespd/executor.py):
    "local" in this process, "ray" as Ray tasks / actors, "auto" Ray when a cluster is
    configured (address or $RAY_ADDRESS) or the stage's work repays starting Ray workers, and
    only when there is more than one piece of work. SPD training always runs under Ray Train."""
    gpus_per_task: Annotated[float, Field(gt=0, le=1, strict=True)] = 1.0
    """GPUs each Ray task of the graph and spectral stages reserves when it runs on CUDA (and
    each harvest actor on CUDA, at most its share of the cluster's GPUs); below 1, tasks share a
    GPU."""


class RunConfig(Cfg):
    """A whole run. `RunConfig()` is the built-in default (TMS 5-2, every stage, CPU)."""

    name: str = Field(default="default", pattern=r"^[A-Za-z0-9_.\-]+$")
    """Name of the run; the default run directory is runs/<name>."""
    target: TargetConfig = TMSTargetConfig()
    """The model to decompose (`kind` selects the type)."""
    decompose: DecomposeConfig = DecomposeConfig()
    """SPD training."""
    profiles: ProfilesConfig = ProfilesConfig()
    """Harvest of the causal-importance profiles."""
    graph: GraphConfig = GraphConfig()
    """Correlation k-NN graph."""
    spectral: SpectralConfig = SpectralConfig()
    """Spectral clustering."""
    evaluate: EvaluateConfig = EvaluateConfig()
    """Work on the model after clustering (one-hot CI and ground truth for toys)."""
    report: ReportConfig = ReportConfig()
    """Report and summary."""
    ray: RayConfig = RayConfig()
    """How to reach Ray."""


# --------------------------------------------------------------------------------------------
# Loading and saving
# --------------------------------------------------------------------------------------------


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not a field of this section)"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def parse_config(data: dict[str, Any] | None, source: str = "<dict>") -> RunConfig:
    """Validate a mapping as a RunConfig; errors name every offending field."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {source}: expected a mapping at the top level")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


class _StrictLoader(yaml.SafeLoader):
    """YAML with the 1.2 core schema's scalars and no duplicate keys.

    PyYAML follows YAML 1.1: `yes`/`no`/`on`/`off` are booleans and `1e-3` (no dot) is a
    string. Here only `true`/`false` are booleans and `1e-3` is a float, so that strict config
    fields neither coerce nor reject what a user means. A key given twice in one mapping is an
    error instead of silently keeping the last value."""


# Drop 1.1's bool and float resolvers (keyed by first character), add the 1.2 core ones.
_StrictLoader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers
         if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"))
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode,
                                deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (lines {seen[key]} and {line})",
                key_node.start_mark)
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                              _mapping_without_duplicates)


def read_yaml(text: str) -> Any:
    """Parse YAML text with the strict rules of `_StrictLoader`."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]
                    ) -> dict[str, Any]:
    """`data` with each `section.field=VALUE` override set (VALUE is parsed as YAML, so `15` is
    a number, `null` is None and `[32, 32]` a list; an integer part indexes a list, as in
    `decompose.modules.0.C=30`). Unknown fields are left for validation to name."""
    import copy  # noqa: PLC0415

    out = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"--set {item!r}: expected section.field=VALUE "
                              "(e.g. graph.k=15)")
        try:
            value = read_yaml(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({err})") from None
        node: Any = out
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {item!r}: {where} is not an index of a list of "
                                      f"{len(node)}")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[:depth])} is a value, "
                                  "not a section")
    return out


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()
                ) -> RunConfig:
    """Load a YAML run config (`None`: the built-in default) with `--set` overrides applied.

    An empty file is an error (it would silently run the default), as is a duplicate key."""
    if path is None:
        data: Any = {}
        source = "(built-in default)"
    else:
        path = Path(path)
        source = str(path)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a directory; expected a YAML file")
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"config file {path} cannot be read ({err})") from None
        try:
            data = read_yaml(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if data is None:
            raise ConfigError(f"config file {path} is empty; write the fields to change (or "
                              "run without a config file for the built-in default)")
        if not isinstance(data, dict):
            raise ConfigError(f"invalid config {path}: expected a mapping at the top level")
    if overrides:
        # Overrides apply to the resolved config (defaults filled in), so that one field of a
        # list entry or of a section the file leaves out can be set.
        data = parse_config(data, source=source).model_dump(mode="json")
        source += " with --set " + " ".join(overrides)
        data = apply_overrides(data, overrides)
    return parse_config(data, source=source)


def config_to_yaml(cfg: Cfg) -> str:
    """The resolved config as YAML (every field, defaults included)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def save_config(cfg: Cfg, path: str | Path) -> None:
    Path(path).write_text(config_to_yaml(cfg))
