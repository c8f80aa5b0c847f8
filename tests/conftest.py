"""Shared fixtures: the real Qwen1.5 tokenizer files, a tiny random-weight checkout, and its GGUF files.

The tiny model goes through the same entry point as `make models` (`python -m convert all`), so every
test that uses `tiny_models` also exercises the pipeline. The llama-cpp-python sdist that carries the
tokenizer is downloaded once into `.cache/vocab/` (git-ignored).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tinymodel import build_checkout, fetch_vocab  # noqa: E402

from convert.pipeline import DEFAULT_TYPES  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("ALLINONE_TEST_CACHE", ROOT / ".cache"))
PROXY_MODEL = Path(os.environ.get("ALLINONE_PROXY_MODEL",
                                  Path.home() / ".cache/qwen-proxy/qwen2.5-coder-0.5b-instruct-Q4_K_M.gguf"))
# `make test` sets this when it made (or was given) the stand-in: then a missing file fails the slow tests
# instead of skipping them, so CI cannot go green without running them.
REQUIRE_PROXY = os.environ.get("ALLINONE_REQUIRE_PROXY") == "1"
QUANTS = DEFAULT_TYPES  # the files `python -m convert all` makes


def ctrl_c_reaches_it() -> None:
    """preexec_fn of a subprocess a test sends SIGINT to: SIGINT at its default disposition, as a terminal's Ctrl-C
    finds it. A runner that starts the tests in the background of a script (no job control) leaves SIGINT ignored;
    the child inherits that and Python then never raises KeyboardInterrupt (2026-12-07: `bash .ci/run` started
    with `( ... &)` failed the two tests that send it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_convert(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m convert ARGS` as a user runs it; output captured as text."""
    return subprocess.run([sys.executable, "-m", "convert", *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=600)


def convert_all(checkout: Path, out: Path) -> dict[str, Path]:
    """{quant: path} of the files `python -m convert all CHECKOUT --out OUT` writes, as `make models` runs it."""
    r = run_convert("all", str(checkout), "--out", str(out))
    assert r.returncode == 0, r.stderr
    return {q: out / checkout.name / f"{checkout.name}-{q}.gguf" for q in QUANTS}


def assert_one_line_error(result: subprocess.CompletedProcess, out_dir: Path, *words: str) -> None:
    """A command failed with exit status 1 and one `error: ...` line naming `words`, leaving no GGUF behind."""
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for w in words:
        assert w in lines[0], lines[0]
    assert not any(out_dir.rglob("*.gguf")) and not any(out_dir.rglob("*.tmp"))


class FakeRuntime:
    """Base of every test's fake model. Subclasses write only the behaviour they need, and each public method they
    define must take its arguments as `AllInOne`'s method of that name does (the same names, in the same order,
    a subset): a fake that drifts from the real signature fails at import, not in production."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        import inspect

        from allinone_gguf import AllInOne
        for name, fake in vars(cls).items():
            real = getattr(AllInOne, name, None)
            if name.startswith("_") or not callable(fake) or not callable(real):
                continue
            kinds = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
            ours = [p for p in inspect.signature(fake).parameters if p != "self"
                    and inspect.signature(fake).parameters[p].kind not in kinds]
            theirs = [p for p, v in inspect.signature(real).parameters.items() if p != "self" and v.kind not in kinds]
            takes_options = any(v.kind == inspect.Parameter.VAR_KEYWORD
                                for v in inspect.signature(real).parameters.values())
            order = [theirs.index(p) for p in ours if p in theirs]
            unknown = [p for p in ours if p not in theirs]
            if order != sorted(order) or (unknown and not takes_options):
                raise TypeError(f"{cls.__name__}.{name}{inspect.signature(fake)} does not match "
                                f"AllInOne.{name}{inspect.signature(real)}")


REFERENCE_PYTHON = Path(os.environ.get("ALLINONE_REFERENCE_PYTHON", ROOT / ".venv-ref/bin/python"))


def need(path: Path, what: str, target: str) -> None:
    """Skip the test when an optional environment is missing, with the command that builds it; under
    `make test`, which builds them all, fail instead: a golden test never goes green by not running."""
    if path.exists():
        return
    message = f"no {what} at {path}: run `make {target}`"
    if REQUIRE_PROXY:
        pytest.fail(f"{message} (make test builds it, so its absence is a failure)", pytrace=False)
    pytest.skip(message)


@pytest.fixture
def reference_python() -> Path:
    """The Python of the reference environment (torch + transformers: llama.cpp's own converters)."""
    need(REFERENCE_PYTHON, "reference environment", "reference-env")
    return REFERENCE_PYTHON


@pytest.fixture(scope="session")
def vocab_dir() -> Path:
    return fetch_vocab(CACHE / "vocab")


@pytest.fixture(scope="session")
def tiny_checkout(vocab_dir, tmp_path_factory) -> Path:
    return build_checkout(vocab_dir, tmp_path_factory.mktemp("hf") / "tiny-qwen1.5")


@pytest.fixture(scope="session")
def tiny_models(tiny_checkout, tmp_path_factory) -> dict[str, Path]:
    """{"F16": path, "Q8_0": path, "Q4_K_M": path} of the tiny model, made by `python -m convert all`."""
    return convert_all(tiny_checkout, tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def proxy_model() -> Path:
    if not PROXY_MODEL.is_file():
        reason = (f"proxy model not found at {PROXY_MODEL}; run ../shared/tools/proxy-model.sh "
                  "or set ALLINONE_PROXY_MODEL")
        if REQUIRE_PROXY:
            pytest.fail(f"ALLINONE_REQUIRE_PROXY=1 but the {reason}", pytrace=False)
        pytest.skip(reason)
    return PROXY_MODEL


@pytest.fixture(scope="session")
def tiny_qwen3_checkout(vocab_dir, tmp_path_factory) -> Path:
    """A tiny random-weight Qwen3-0.6B-style checkout: Qwen3ForCausalLM, tied, bf16, head_dim 128 (not
    hidden_size / heads), q/k norms, the real tokenizer with Qwen3's added tokens and chat template."""
    return build_checkout(vocab_dir, tmp_path_factory.mktemp("hf-qwen3") / "tiny-qwen3", flavour="qwen3")


@pytest.fixture(scope="session")
def tiny_qwen3_models(tiny_qwen3_checkout, tmp_path_factory) -> dict[str, Path]:
    """{"F16": path, "Q8_0": path, "Q4_K_M": path} of the tiny Qwen3 model, made by `python -m convert all`."""
    return convert_all(tiny_qwen3_checkout, tmp_path_factory.mktemp("models-qwen3"))
