"""Fetch the files a conversion needs from the Hugging Face hub (or a mirror), or accept a local checkout.

    python -m convert download Qwen/Qwen1.5-0.5B-Chat            # prints the local snapshot folder
    HF_ENDPOINT=https://hf-mirror.example python -m convert download Qwen/Qwen1.5-0.5B-Chat

Only the files the converter reads are downloaded (config, safetensors and index, tokenizer files, chat
template, generation config, model card). huggingface-hub does the work: it resumes interrupted downloads,
keeps a cache (HF_HOME), honours HF_ENDPOINT and HF_TOKEN, and falls back to the cache when the network is
gone.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

NEEDED_FILES = [
    "config.json", "generation_config.json", "model.safetensors", "model-*.safetensors",
    "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
    "chat_template.jinja", "chat_template.json",   # newer repos keep the chat template beside tokenizer_config
    "README.md",
]
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class DownloadError(RuntimeError):
    """The model could not be fetched; the message says why and what to do instead."""


@dataclass(frozen=True)
class Source:
    checkout: Path             # local folder holding the files
    name: str                  # repository or folder name, used for output file names
    origin: str                # the hub id or the absolute local path the user gave
    revision: str | None       # hub commit hash, None for a local folder


def resolve(src: str, revision: str | None = None, progress: bool = True) -> Source:
    """A local checkout as it is, or a hub id downloaded into the huggingface-hub cache."""
    path = Path(src).expanduser()
    if path.is_dir():
        return Source(path.resolve(), path.resolve().name, str(path.resolve()), None)
    if path.exists():
        raise DownloadError(f"{src}: not a folder; pass a Hugging Face checkout folder or a hub id like Qwen/Qwen1.5-0.5B-Chat")
    if not _REPO_ID.match(src):
        raise DownloadError(f"{src}: no such folder, and not a hub id like Qwen/Qwen1.5-0.5B-Chat")
    return download(src, revision, progress)


def download(repo_id: str, revision: str | None = None, progress: bool = True) -> Source:
    # Imported here: huggingface-hub reads HF_ENDPOINT when it is first imported.
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    (enable_progress_bars if progress else disable_progress_bars)()
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=NEEDED_FILES)
    except RepositoryNotFoundError:
        raise DownloadError(f"{repo_id}: no such model repository at {endpoint} (or it needs HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise DownloadError(f"{repo_id}: no revision {revision!r} at {endpoint}") from None
    except Exception as e:  # network, offline mode, proxy, TLS: all mean the same thing to the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DownloadError(
            f"cannot download {repo_id} from {endpoint} ({first}). Without network, pass a local checkout: "
            f"make models SRC=/path/to/{repo_id.split('/')[-1]} (or set HF_ENDPOINT to a reachable mirror)"
        ) from None
    folder = Path(folder)
    # snapshot folders are named after the commit they hold: .../snapshots/<sha>
    return Source(folder, repo_id.split("/")[-1], repo_id, folder.name)
