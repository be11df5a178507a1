"""The Jargon File (public domain, Debian package ``jargon-text``) as term -> definition pairs.

The text is found in this order: an explicit path, the installed Debian package, this library's cache, and finally
``apt-get download jargon-text`` + ``dpkg-deb -x`` into the cache (no root needed for the download itself).
"""

from __future__ import annotations

import gzip
import logging
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from lightning_qlora._atomic import atomic_directory, cache_lock
from lightning_qlora._paths import cache_dir
from lightning_qlora.app.data.examples import Example
from lightning_qlora.errors import QLoRAError

log = logging.getLogger(__name__)

DEBIAN_PACKAGE = "jargon-text"
_PACKAGE_FILE = Path("usr/share/doc/jargon-text/jargon.txt.gz")
_ENTRY = re.compile(r"^   :(?P<term>[^:]+):(?P<rest>.*)$")
_BRACES = re.compile(r"\{([^{}]*)\}")
PROMPT_TEMPLATE = 'What does the hacker jargon term "{term}" mean?'


class JargonUnavailableError(QLoRAError, FileNotFoundError):
    """The Jargon File could not be found or fetched; the message says how to get it."""


def find_jargon_file(path: str | os.PathLike | None = None, fetch: bool = True) -> Path:
    """Locate ``jargon.txt(.gz)``, fetching the Debian package into the cache when it is nowhere else.

    Raises:
        JargonUnavailableError: when the file is missing and cannot be fetched (the message has the commands).
    """
    if path is not None:
        candidate = Path(path).expanduser()
        if not candidate.is_file():
            raise JargonUnavailableError(
                f"data.path={str(path)!r} does not exist. Point it at jargon.txt or jargon.txt.gz, or leave it unset "
                f"to use the Debian package {DEBIAN_PACKAGE}."
            )
        return candidate
    for candidate in (Path("/") / _PACKAGE_FILE, cache_dir() / "jargon" / _PACKAGE_FILE):
        if candidate.is_file():
            return candidate
    if not fetch:
        raise JargonUnavailableError(_missing_message("fetching is disabled"))
    target = cache_dir() / "jargon"
    with cache_lock(target):  # several processes may ask at once: one fetches, the others wait and read its copy
        if (target / _PACKAGE_FILE).is_file():
            return target / _PACKAGE_FILE
        return _fetch_debian_package(target)


def load_jargon(path: str | os.PathLike | None = None) -> list[Example]:
    """Parse the Jargon File into one :class:`Example` per lexicon entry (about 2,300)."""
    file = find_jargon_file(path)
    opener = gzip.open if file.suffix == ".gz" else open
    with opener(file, "rt", encoding="utf-8", errors="replace") as handle:
        text = handle.read()
    examples = parse_jargon(text, source=str(file))
    if not examples:
        raise ValueError(
            f"{file}: found no lexicon entries (lines like '   :term: /pronunciation/, n.'). "
            "Is this the plain-text Jargon File (jargon.txt)?"
        )
    return examples


def parse_jargon(text: str, source: str = "jargon.txt", max_paragraphs: int = 2) -> list[Example]:
    """Turn the lexicon part of the Jargon File into term -> definition examples.

    Each entry starts with a line ``   :term: pronunciation, part of speech`` and runs until the next entry or the next
    line that is not indented by exactly three spaces (section headings). Cross-reference braces are removed, an
    etymology-only first paragraph (``[...]``) is dropped, and at most ``max_paragraphs`` paragraphs are kept.
    """
    examples: list[Example] = []
    seen: set[str] = set()
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = _ENTRY.match(lines[i])
        if not match:
            i += 1
            continue
        term, start = match.group("term").strip(), i + 1
        body: list[str] = []
        i += 1
        while i < len(lines) and not _ENTRY.match(lines[i]) and (not lines[i].strip() or _indent(lines[i]) == 3):
            body.append(lines[i].strip())
            i += 1
        definition = _definition(body, max_paragraphs)
        if term and definition and term.lower() not in seen:
            seen.add(term.lower())
            examples.append(Example(PROMPT_TEMPLATE.format(term=term), definition, f"{source}:{start}"))
    return examples


def _definition(body: list[str], max_paragraphs: int) -> str:
    paragraphs: list[str] = []
    current: list[str] = []
    for line in [*body, ""]:
        if line:
            current.append(line)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    paragraphs = [_BRACES.sub(r"\1", p) for p in paragraphs]
    if len(paragraphs) > 1 and paragraphs[0].startswith("[") and paragraphs[0].endswith("]"):
        paragraphs = paragraphs[1:]
    return "\n\n".join(paragraphs[:max_paragraphs]).strip()


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _fetch_debian_package(target: Path) -> Path:
    apt_get, dpkg_deb = shutil.which("apt-get"), shutil.which("dpkg-deb")
    if not apt_get or not dpkg_deb:
        raise JargonUnavailableError(_missing_message("apt-get/dpkg-deb are not available on this machine"))
    log.info("Fetching the Jargon File (Debian package %s) into %s", DEBIAN_PACKAGE, target)
    with tempfile.TemporaryDirectory() as tmp:
        result = _run([apt_get, "download", DEBIAN_PACKAGE], cwd=tmp)
        if result.returncode != 0 and os.geteuid() == 0:
            # A fresh machine may have no package lists yet.
            _run([apt_get, "update", "-qq"], cwd=tmp)
            result = _run([apt_get, "download", DEBIAN_PACKAGE], cwd=tmp)
        debs = sorted(Path(tmp).glob(f"{DEBIAN_PACKAGE}_*.deb"))
        if result.returncode != 0 or not debs:
            raise JargonUnavailableError(_missing_message(f"apt-get download failed: {result.stderr.strip()[-300:]}"))
        with atomic_directory(target) as staging:  # a half-extracted package is never seen as the cache
            extracted = _run([dpkg_deb, "-x", str(debs[0]), str(staging)], cwd=tmp)
            if extracted.returncode != 0 or not (staging / _PACKAGE_FILE).is_file():
                raise JargonUnavailableError(_missing_message(f"dpkg-deb -x failed: {extracted.stderr.strip()}"))
    return target / _PACKAGE_FILE


def _run(cmd: list[str], cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, check=False)


def _missing_message(reason: str) -> str:
    return (
        f"The Jargon File is not available ({reason}). Install it with `apt-get install {DEBIAN_PACKAGE}` "
        f"(or `apt-get download {DEBIAN_PACKAGE} && dpkg-deb -x {DEBIAN_PACKAGE}_*.deb DIR`) and pass "
        "data.path=DIR/usr/share/doc/jargon-text/jargon.txt.gz, or use data=jsonl data.path=FILE."
    )
