"""Writing a repository: paths as the serving host sees them, the tokenizer, packaged
templates, and the validate-then-rename of the whole directory."""
from __future__ import annotations

import posixpath
import shutil
from pathlib import Path

from builders.triton.tokens import generation_config
from builders.triton.validate import validate_repo
from common.atomic import write_text
from common.errors import UserError, naming
from common.staged import StagedOutput

TEMPLATES = Path(__file__).resolve().parent.parent / "triton_templates"
ENSEMBLE, PREPROCESSING, TENSORRT_LLM, POSTPROCESSING, BLS = (
    "ensemble", "preprocessing", "tensorrt_llm", "postprocessing", "tensorrt_llm_bls")
LAUNCH_SCRIPT = "launch_triton.sh"
REPO_INFO = "triton_repo.json"

# Files a tokenizer directory may need (AutoTokenizer falls back to config.json's model_type when
# tokenizer_config.json names no class); weights are never copied.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
                    "tokenizer.model", "spiece.model", "chat_template.jinja",
                    "chat_template.json", "generation_config.json", "config.json")
_TOKENIZER_SUFFIXES = (".tiktoken",)


class ServePaths:
    """Maps local paths to what the serving host sees (see the module docstring)."""

    def __init__(self, out_dir: Path, model_root: str | None):
        self.build_root = out_dir.parent.resolve()
        self.out_dir = out_dir
        self.model_root = (model_root.rstrip("/") or "/") if model_root else None
        self.external: list[str] = []

    def serve(self, path) -> str:
        """``path`` as the server sees it; a path outside the build output directory (a tokenizer
        in the HF model dir) is listed in ``external``: a copy of the output alone lacks it."""
        p = Path(path).expanduser().resolve()
        try:
            rel = p.relative_to(self.build_root)
        except ValueError:
            if str(p) not in self.external:
                self.external.append(str(p))
            return str(p)
        if self.model_root is None:
            return str(p)
        return posixpath.join(self.model_root, rel.as_posix()) if rel.parts else self.model_root

    @property
    def repo(self) -> str:
        return self.serve(self.out_dir)


def check_tokenizer(tokenizer_dir, vocab_size: int | None = None,
                     what: str = "--tokenizer-dir") -> Path:
    if tokenizer_dir is None:
        raise UserError("the Triton repository needs a tokenizer: pass --tokenizer-dir (the HF "
                        "model dir that the checkpoint was made from)")
    d = Path(tokenizer_dir).expanduser()
    if not d.is_dir():
        raise UserError(f"{what} {d}: not a directory")
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(d))
    except Exception as e:  # noqa: BLE001 - any loader failure is the user's directory
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{what} {d}: transformers cannot load a tokenizer from it ({first}); "
                        f"pass --tokenizer-dir") from None
    generation_config(d)  # its token ids, read by the repository's writer: refused here
    if vocab_size and len(tok) > int(vocab_size):
        raise UserError(f"{what} {d}: the tokenizer has {len(tok)} tokens but the model's "
                        f"vocab_size is {vocab_size}; is it the tokenizer of this model?")
    return d


def copy_tokenizer(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    copied = 0
    for f in sorted(src.iterdir()):
        if f.is_file() and (f.name in _TOKENIZER_FILES or f.suffix in _TOKENIZER_SUFFIXES):
            with naming(dst / f.name):
                shutil.copy2(f, dst / f.name)
            copied += 1
    if not copied:
        raise UserError(f"--tokenizer-dir {src}: no tokenizer files found to copy")


# --- writers ------------------------------------------------------------------------------------


def write_atomically(out_dir, options, build) -> Path:
    """Run ``build(stage_dir)``, validate, and put the stage in place of ``out_dir``."""
    out_dir = Path(out_dir).expanduser().absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if out_dir.exists() and not options.force:
        raise UserError(f"{out_dir} already exists; pass --force to replace it")
    staged = StagedOutput.private(out_dir)  # nothing to resume: a repository is quick to write
    try:
        build(staged.stage)
        validate_repo(staged.stage)
        staged.promote()
    except BaseException:
        staged.discard()
        raise
    return out_dir


def write_file(path: Path, text: str, executable: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, text, executable=executable)


def copy_template(rel: str, dst: Path) -> None:
    src = TEMPLATES / rel
    if not src.is_file():
        raise RuntimeError(f"packaged template {src} is missing (broken install?)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    with naming(dst):
        shutil.copyfile(src, dst)


