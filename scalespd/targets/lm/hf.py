"""Resolving `target.path` to a Hugging Face config, tokenizer and model, with errors that name
the field (`scalespd.errors.ConfigError`) instead of the hub client's tracebacks.

`target.path` is either a local directory written with `save_pretrained` or a hub name. A
string that exists on disk, or looks like a file-system path (absolute, `./`, `../`, `~`, more
than one `/`), is local; anything else is tried on the hub, which needs internet or the hub
cache (HF_HUB_OFFLINE=1 allows only the cache; it is also honoured when set after the hub
client was imported, by passing local_files_only). A folder at an fsspec URL (`s3://...`,
`memory://...`, as a run directory on an object store holds its trained target) is loaded from
a local copy (`scalespd.storage.local_copy`): transformers reads only local folders.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from scalespd import storage
from scalespd.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

CONFIG_FILE = "config.json"  # what save_pretrained writes for every model


def hub_offline() -> bool:
    """Whether the hub client refuses network access (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    from huggingface_hub import constants  # noqa: PLC0415

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return bool(constants.HF_HUB_OFFLINE) or any(
        f is not None and f.upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def _looks_local(path: str) -> bool:
    return (path.startswith(("/", "./", "../", "~", "."))
            or path.count("/") > 1 or os.sep != "/" and os.sep in path)


def is_url(path: str) -> bool:
    """True for an fsspec URL of a non-local folder (s3://, gs://, memory://, ...)."""
    return "://" in path and not storage.is_local(path)


@contextmanager
def local_model_dir(path: str, field: str = "target.path") -> Iterator[str]:
    """`path` itself, or for a folder at a URL a local copy of it (for transformers), with the
    same ConfigErrors as `resolve_model_path` for a missing folder or one without a model."""
    if not is_url(path):
        yield path
        return
    remote = storage.as_path(path)
    if not remote.is_dir():
        raise ConfigError(f"{field}: the model directory {path} does not exist")
    if not (remote / CONFIG_FILE).is_file():
        raise ConfigError(f"{field}: {path} holds no Hugging Face model ({CONFIG_FILE} is "
                          "missing); expected a directory written with save_pretrained")
    with storage.local_copy(remote) as local:
        yield str(local)


def resolve_model_path(path: str, field: str = "target.path") -> str:
    """The local directory (absolute, as a string) or the hub name that `path` means.

    ConfigError (naming `field`) for a local path that is missing, a file, or a directory
    without a saved model; a hub name is returned as is (reaching it is checked on load)."""
    local = Path(path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ConfigError(f"{field}: {path} is a file; expected a directory written with "
                              "save_pretrained (model and tokenizer)")
        if not (local / CONFIG_FILE).is_file():
            raise ConfigError(f"{field}: {path} holds no Hugging Face model ({CONFIG_FILE} is "
                              "missing); expected a directory written with save_pretrained")
        return str(local.resolve())
    if _looks_local(path):
        raise ConfigError(f"{field}: the model directory {path} does not exist; fix the path, "
                          "or remove it to train the offline default model")
    return path


def _unreachable(field: str, path: str, what: str, err: BaseException) -> ConfigError:
    why = ("HF_HUB_OFFLINE=1 is set and it is not in the hub cache" if hub_offline()
           else "it could not be downloaded")
    return ConfigError(f"{field}: cannot load the {what} of {path!r}: it is not a local "
                       f"directory and {why} ({type(err).__name__}: {err}). Point {field} at a "
                       "directory saved with save_pretrained, or remove it to train the "
                       "offline default model")


def load_hf_config(path: str, field: str = "target.path") -> PretrainedConfig:
    """The model's configuration (config.json) only: cheap, no weights read."""
    with local_model_dir(path, field) as local:
        return _load_hf_config(local, path, field)


def _load_hf_config(local: str, path: str, field: str) -> PretrainedConfig:
    from transformers import AutoConfig  # noqa: PLC0415

    where = resolve_model_path(local, field)
    try:
        return AutoConfig.from_pretrained(where, local_files_only=hub_offline())
    except Exception as err:  # the hub client raises many types (HTTP, offline, not found)
        if Path(where).is_dir():
            raise ConfigError(f"{field}: {path}/{CONFIG_FILE} is not a valid model "
                              f"configuration: {err}") from None
        raise _unreachable(field, path, "model configuration", err) from None


def load_tokenizer(path: str, field: str = "target.path") -> PreTrainedTokenizerBase:
    """The tokenizer saved next to the model (save_pretrained writes both)."""
    with local_model_dir(path, field) as local:
        return _load_tokenizer(local, path, field)


def _load_tokenizer(local: str, path: str, field: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer  # noqa: PLC0415

    where = resolve_model_path(local, field)
    try:
        return AutoTokenizer.from_pretrained(where, local_files_only=hub_offline())
    except Exception as err:
        if Path(where).is_dir():
            raise ConfigError(f"{field}: {path} holds no usable tokenizer ({err}); save the "
                              "tokenizer with save_pretrained into the model directory") from None
        raise _unreachable(field, path, "tokenizer", err) from None


def n_positions(config: PretrainedConfig) -> int | None:
    """The model's maximum sequence length (max_position_embeddings, or GPT-2's n_positions;
    GPT2Config maps one to the other); None when the config has none (no limit known)."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_tokenizer_fits(tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig,
                         field: str = "target.path") -> None:
    """ConfigError when the tokenizer can emit ids the model's embedding has no row for."""
    n_tokens = len(tokenizer)  # base vocabulary plus added tokens
    n_rows = int(getattr(config, "vocab_size", 0) or 0)
    if n_tokens > n_rows:
        raise ConfigError(f"{field}: the tokenizer has {n_tokens} tokens but the model's "
                          f"embedding has only {n_rows} rows (config vocab_size); ids >= "
                          f"{n_rows} would fail. Use the tokenizer the model was trained with")


def check_seq_len(seq_len: int, config: PretrainedConfig, field: str = "target.seq_len") -> None:
    """ConfigError when sequences would be longer than the model's maximum positions."""
    limit = n_positions(config)
    if limit is not None and seq_len > limit:
        raise ConfigError(f"{field}: {seq_len} tokens per sequence is longer than the model's "
                          f"maximum of {limit} positions; use at most {limit}")


def skeleton(config: PretrainedConfig, field: str = "target.path") -> PreTrainedModel:
    """The causal LM of `config` on the meta device: its module tree and shapes, no memory and
    no initialisation (for module discovery)."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except ValueError as err:
        raise ConfigError(f"{field}: model type {config.model_type!r} is not a causal "
                          f"language model transformers knows: {err}") from None


def load_model(path: str, field: str = "target.path", **kwargs: Any) -> PreTrainedModel:
    """The causal LM with its weights, float32, in eval mode (no dropout)."""
    with local_model_dir(path, field) as local:
        return _load_model(local, path, field, **kwargs)


def _load_model(local: str, path: str, field: str, **kwargs: Any) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM  # noqa: PLC0415
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    where = resolve_model_path(local, field)
    # Its "Loading weights" progress bar would interleave with the stage log (and repeat in
    # every Ray worker); the stage logs what it loads.
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            where, dtype=torch.float32, local_files_only=hub_offline(), **kwargs)
    except Exception as err:
        if Path(where).is_dir():
            raise ConfigError(f"{field}: cannot load the model saved in {path}: {err}") from None
        raise _unreachable(field, path, "model", err) from None
    return model.eval()
