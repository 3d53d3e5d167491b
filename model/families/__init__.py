"""The family registry: family name -> spec, HF architecture -> family name.

Adding a family: a module here with its :class:`model.spec.Family`, listed in ``_ALL``."""
from __future__ import annotations

from model.spec import Family

from .deepseek_v2 import DEEPSEEK_V2
from .deepseek_v3 import DEEPSEEK_V3
from .gemma import GEMMA2, GEMMA3
from .llama import LLAMA, QWEN2
from .mixtral import MIXTRAL
from .phi3 import PHI3, REFUSED as PHI3_REFUSED
from .qwen3 import QWEN3
from .qwen_moe import QWEN2_MOE, QWEN3_MOE

_ALL = (LLAMA, QWEN2, MIXTRAL, QWEN3, GEMMA3, GEMMA2, PHI3, DEEPSEEK_V2, DEEPSEEK_V3, QWEN2_MOE, QWEN3_MOE)

FAMILIES: dict[str, Family] = {f.name: f for f in _ALL}
#: HF architecture (config.json ``architectures[0]``) -> family name
ARCHITECTURES: dict[str, str] = {a: f.name for f in _ALL for a in f.architectures}
#: HF architecture -> why it is refused (a sibling of a supported family, with the way out; one
#: line, before any work)
REFUSED_ARCHITECTURES: dict[str, str] = dict(PHI3_REFUSED)
