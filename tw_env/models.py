"""The one module that loads models and tokenizers: hub ids by default, local directories in tests.

Nothing here runs at import. ``trust_remote_code`` is never enabled: only architectures that
transformers ships are loaded, and weights come from safetensors files.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import urllib.request
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
from transformers import AutoConfig, AutoTokenizer, GenerationMixin, PreTrainedModel, PreTrainedTokenizerBase

from tw_env.families import family_of
from tw_env.model_family import UnsupportedModelError as UnsupportedModelError  # raised by load_model

OFFLINE_HINT = (
    "Expected a directory written by save_pretrained (config.json and safetensors weights) or a hub id. "
    "If the Hugging Face Hub cannot be reached from this machine, download the model elsewhere "
    "(`huggingface-cli download <hub id> --local-dir DIR`) and pass the local directory instead, "
    "e.g. gym.make(..., {role}='DIR')."
)


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """``"float32"``/``"bfloat16"``/``"float16"`` or a torch dtype; None means float32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or a torch.dtype, got {dtype!r}")
    return _DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/None picks CUDA when available, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _looks_like_path(name: str) -> bool:
    # A hub id is "name" or "owner/name"; anything else that is not on disk was meant as a path.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep in name.replace("/", "")


HUB_PROBE_TIMEOUT_S = 3.0  # one TCP connect to the hub endpoint (or its proxy), once per process
_TRUE = {"1", "ON", "YES", "TRUE"}  # what huggingface_hub reads as a true environment variable


@cache
def _can_connect(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _probe_target() -> tuple[str, int]:
    """The host and port a hub request connects to: the endpoint's, or its proxy's when one is set."""
    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    host, scheme = url.hostname or "huggingface.co", url.scheme or "https"
    proxy = urllib.request.getproxies().get(scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_url = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if proxy_url.hostname:
            return proxy_url.hostname, proxy_url.port or (443 if proxy_url.scheme == "https" else 80)
    return host, url.port or (443 if scheme == "https" else 80)


def hub_reachable() -> bool:
    """Whether the hub endpoint (``huggingface_hub.constants.ENDPOINT``) accepts a TCP connection within
    HUB_PROBE_TIMEOUT_S; probed once per process."""
    return _can_connect(*_probe_target())


def hub_unavailable_reason(extra_offline_vars: tuple[str, ...] = ()) -> str | None:
    """Why hub ids cannot be downloaded now, ``"offline (...)"`` or ``"unreachable (...)"``, or None."""
    from huggingface_hub import constants

    flags = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", *extra_offline_vars)
    set_flags = [v for v in flags if os.environ.get(v, "").upper() in _TRUE]
    if constants.HF_HUB_OFFLINE or set_flags:
        set_flags = set_flags or ["HF_HUB_OFFLINE"]
        return f"offline ({' and '.join(set_flags)} {'is' if len(set_flags) == 1 else 'are'} set)"
    if not hub_reachable():
        host, port = _probe_target()
        return f"unreachable ({constants.ENDPOINT}, {host}:{port}, did not answer within {HUB_PROBE_TIMEOUT_S:g} s)"
    return None


def in_hub_cache(repo_id: str, filenames: tuple[str, ...] = ("config.json",), repo_type: str = "model") -> bool:
    """Whether a hub repository is in the local cache, so that it loads without the hub.

    Models and tokenizers: one of ``filenames`` in the huggingface_hub cache. Datasets: a prepared
    copy in the datasets cache (what ``datasets`` falls back to offline).
    """
    try:
        if repo_type == "dataset":
            import glob

            from datasets import config as datasets_config

            try:  # how datasets names its cache folders ("EdinburghNLP/xsum" -> "EdinburghNLP___xsum")
                from datasets.utils.py_utils import camelcase_to_snakecase
            except ImportError:
                camelcase_to_snakecase = str

            parts = repo_id.split("/")
            parts[-1] = camelcase_to_snakecase(parts[-1])
            root = Path(datasets_config.HF_DATASETS_CACHE).expanduser() / "___".join(parts)
            return any(Path(p).is_dir() for p in glob.glob(str(root / "*" / "*" / "*")))
        from huggingface_hub import try_to_load_from_cache

        return any(isinstance(try_to_load_from_cache(repo_id, f, repo_type=repo_type), str) for f in filenames)
    except Exception:  # an invalid repo id, an unreadable cache: not cached
        return False


def _is_hub_id(source: str) -> bool:
    return not Path(source).expanduser().exists() and not _looks_like_path(source)


def _check_source(name: str, role: str, cache_files: tuple[str, ...] = ("config.json",)) -> str:
    """The local path, or the hub id when the hub can be used (or the id is cached); raises at once otherwise."""
    path = Path(name).expanduser()
    if path.exists():
        return str(path)
    if _looks_like_path(name):
        raise FileNotFoundError(
            f"{role} not found: no directory or file at '{name}'. Expected a local directory written by "
            f"save_pretrained (config.json plus weights) or a hub id such as 'google/flan-t5-small'."
        )
    reason = hub_unavailable_reason()
    if reason is not None and not in_hub_cache(name, cache_files):
        raise OSError(
            f"cannot load the {role} '{name}': it is a hub id, the Hugging Face Hub is {reason} and "
            "it is not in the local cache.\n"
            + OFFLINE_HINT.format(name=name, role=role)
        )
    return name


def _offline_kwargs(source: str) -> dict[str, bool]:
    # A cached hub id while the hub cannot be used: read the cache only, without retrying the network.
    return {"local_files_only": True} if _is_hub_id(source) and hub_unavailable_reason() is not None else {}


def load_model(
    name_or_path: str | os.PathLike[str] | PreTrainedModel,
    role: str = "model",
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype | None = None,
    device_map: str | dict[str, Any] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
) -> PreTrainedModel:
    """Load a teacher or student LM in eval mode from a hub id or a local directory.

    The model's family (:mod:`tw_env.families`) is read from its config first and decides the auto
    class; safetensors weights only, never remote code. A loaded model is moved and returned.

    ``device_map`` spreads a model too large for one device over several (``"auto"``,
    ``"balanced"``, or a ``{module: device}`` dict): transformers' big-model loading through
    Accelerate (``pip install 'training-wheels[multi-device]'``). The model then stays where the
    map put it (``device`` is ignored); its inputs go to its first device and the env moves its
    logits back (``tw_env.incremental``). Modules mapped to ``"disk"`` are kept in
    ``offload_folder`` and loaded as they run.
    """
    if isinstance(name_or_path, PreTrainedModel):
        if device_map is not None:
            raise ValueError(f"device_map applies when the {role} is loaded; got an already loaded model: "
                             "load it with from_pretrained(..., device_map=...) yourself, or pass its name")
        model = name_or_path
    else:
        source = _check_source(str(name_or_path), role)
        if device_map is not None:
            _check_device_map(device_map, role)
        try:
            offline = _offline_kwargs(source)
            config = AutoConfig.from_pretrained(source, trust_remote_code=False, **offline)
            placement: dict[str, Any] = {} if device_map is None else {"device_map": device_map}
            if offload_folder is not None:
                placement["offload_folder"] = str(offload_folder)
            model = family_of(config).load(source, resolve_dtype(dtype), **offline, **placement)
        except UnsupportedModelError:
            raise  # already says what was loaded and what is expected
        except (OSError, ValueError) as err:  # transformers raises ValueError for a folder without a model
            raise OSError(
                f"could not load the {role} '{source}': {err}\n" + OFFLINE_HINT.format(name=source, role=role)
            ) from err
        if device_map is not None:
            return model.eval()
    # transformers decorates PreTrainedModel.to with functools.wraps(torch.nn.Module.to), which
    # typeshed types as the unbound Module.to (self missing); the call is the ordinary bound one.
    moved: PreTrainedModel = model.to(device=resolve_device(device), dtype=resolve_dtype(dtype))  # type: ignore[call-arg]
    return moved.eval()


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _check_device_map(device_map: str | dict[str, Any], role: str) -> None:
    if isinstance(device_map, str) and device_map not in DEVICE_MAP_STRATEGIES:
        raise ValueError(f"{role}_device_map must be one of {list(DEVICE_MAP_STRATEGIES)} or a {{module: device}} "
                         f"dict, got {device_map!r}")
    if importlib.util.find_spec("accelerate") is None:
        raise ImportError(f"{role}_device_map needs Accelerate (transformers' big-model loading): "
                          "pip install 'training-wheels[multi-device]'")


def load_tokenizer(
    name_or_path: str | os.PathLike[str] | PreTrainedTokenizerBase, role: str = "tokenizer"
) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a hub id or a local directory."""
    if isinstance(name_or_path, PreTrainedTokenizerBase):
        return name_or_path
    source = _check_source(str(name_or_path), role, cache_files=("tokenizer_config.json", "config.json"))
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=False, **_offline_kwargs(source))
    except OSError as err:
        raise OSError(
            f"could not load the {role} '{source}': {err}\n" + OFFLINE_HINT.format(name=source, role=role)
        ) from err


def generation_model(model: PreTrainedModel) -> GenerationMixin:
    """``model`` as the class that defines ``generate`` (every ``...ForConditionalGeneration`` or
    ``...ForCausalLM`` LM is one)."""
    if not isinstance(model, GenerationMixin):
        raise TypeError(f"{type(model).__name__} has no generate(): expected an LM with a generation head")
    return model


def output_vocab_size(model: PreTrainedModel) -> int:
    """V: the number of rows of the model's output layer (32,128 for FLAN-T5, not the 32,100 tokenizer entries)."""
    return int(model.get_output_embeddings().weight.shape[0])


def check_same_vocabulary(teacher: PreTrainedModel, student_vocab_size: int, student_name: str = "student") -> int:
    """Refuse a teacher and a student whose output layers differ: the action space is shared."""
    teacher_v = output_vocab_size(teacher)
    if teacher_v != student_vocab_size:
        raise ValueError(
            f"teacher and {student_name} vocabularies differ: the teacher's output layer has {teacher_v} rows, "
            f"the {student_name} has {student_vocab_size}. Training Wheels needs one shared vocabulary "
            "(e.g. FLAN-T5-small with FLAN-T5-XL, both 32,128)."
        )
    return teacher_v


def lm_head_logits(model: PreTrainedModel, decoder_hidden: torch.Tensor) -> torch.Tensor:
    """Apply the model's LM head to final decoder states exactly as its own forward does: its family's
    :meth:`~tw_env.model_family.ModelFamily.lm_head_logits` (T5 with tied embeddings rescales the decoder
    output by d_model^-0.5 before the head; a causal LM applies its head as is, tied or not)."""
    return family_of(model).lm_head_logits(model, decoder_hidden)
