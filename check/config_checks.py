"""The config.json fields TensorRT-LLM 1.x needs before it declares any parameter, each problem in
the words it fails with (``models/modeling_utils.py`` ``PretrainedConfig.from_dict`` /
``__init__``, ``mapping.py`` ``Mapping``, ``layers/moe.py`` ``MixtureOfExperts.__init__``, the
model classes in ``check/model_classes.py``)."""
from __future__ import annotations

from .declared import Layout
from .findings import Finding, NotChecked
from .model_classes import MODEL_CLASSES, PRETRAINED_REQUIRED, model_class


def config_problems(config: dict) -> list:
    if "architecture" not in config:
        return [Finding("config", "KeyError: 'architecture' (PretrainedConfig.from_dict looks up "
                                  "MODEL_MAP[config['architecture']]): config.json has no "
                                  "\"architecture\"", name="architecture")]
    mc = model_class(config["architecture"])
    if mc is None:
        raise NotChecked(f"architecture {config['architecture']!r}: check models "
                        f"{', '.join(MODEL_CLASSES)} only; not checked")
    out = []
    missing = [k for k in PRETRAINED_REQUIRED if config.get(k) is None]
    if missing:
        args = ", ".join(f"'{k}'" for k in missing)
        out.append(Finding("config", f"TypeError: __init__() missing {len(missing)} required "
                                     f"keyword-only argument(s): {args} (PretrainedConfig)",
                           name=missing[0]))
    for key, why in mc.needs:
        if not config.get(key):
            out.append(Finding("config", f"config.json has no \"{key}\" for {mc.trtllm_class}: {why}",
                               name=key))
    for key, allowed in mc.values:
        if config.get(key) and config[key] not in allowed:
            out.append(Finding("config", f"config.json's {key} {config[key]!r}: {mc.trtllm_class} "
                                         f"then builds another layout than {config['architecture']}'s "
                                         f"({', '.join(allowed)})", name=key))
    return out or _layout_problems(config, mc)


def _layout_problems(config: dict, mc) -> list:
    lay, m = Layout.of(config), config.get("mapping") or {}
    out = []
    if int(m.get("world_size", lay.world)) != lay.world:
        out.append(Finding("config", f"mapping: world_size {m.get('world_size')} != tp_size "
                                     f"{lay.tp} x pp_size {lay.pp} (Mapping)", name="mapping"))
    if lay.pp > int(config["num_hidden_layers"]):
        out.append(Finding("config", f"mapping: pp_size {lay.pp} > num_hidden_layers "
                                     f"{config['num_hidden_layers']}: a stage without layers",
                           name="mapping"))
    if not mc.moe:
        return out
    experts = int(config["moe"].get("num_experts", 0))
    inter = int(config.get("moe_inter_size") or config.get(mc.inter_key) or 0)
    if lay.moe_tp * lay.moe_ep != lay.tp:
        out.append(Finding("config", f"mapping: moe_tp_size {lay.moe_tp} x moe_ep_size {lay.moe_ep} "
                                     f"!= tp_size {lay.tp} (Mapping)", name="mapping"))
    if experts % lay.moe_ep:
        out.append(Finding("config", f"ValueError: MixtureOfExperts - Number of experts {experts} is "
                                     f"not a multiple of EP size {lay.moe_ep}", name="moe"))
    if inter % lay.moe_tp:
        out.append(Finding("config", f"ValueError: MixtureOfExperts - FFN Hidden Size {inter} is not "
                                     f"a multiple of TP size {lay.moe_tp}", name="moe"))
    return out
