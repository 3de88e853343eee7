"""Registry names and plug-in syntax, checked without importing torch: what ``data.name`` and
``model.name`` may be (training.plugins resolves the plug-ins themselves)."""
from __future__ import annotations

import difflib
import re
from typing import Any, Optional

from training.typed import ConfigError, _check

# The registries' keys, written out here so that validating a config never imports torch.
# tests/training/test_plugins.py checks each against its registry (training.models.MODELS,
# training.data.DATASETS), as it checks the optim.name / schedule.name Literals against theirs.
MODEL_NAMES = ("mlp", "small_cnn", "resnet18", "resnet50")
DATASET_NAMES = ("digits", "mnist1d", "cifar10", "imagefolder", "synthetic")

_DOTTED = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
_PLUGIN_FORMS = {   # kind -> (syntax of the whole name, how the error message writes it)
    "timm": (re.compile(r"timm:([\w.\-]+)"), "timm:<architecture>"),
    "torchvision": (re.compile(r"torchvision:(\w+)"), "torchvision:<name>"),
    "callable": (re.compile(rf"({_DOTTED}:{_DOTTED})"), "package.module:callable"),
}
MODEL_PLUGINS = ("timm", "torchvision", "callable")
DATA_PLUGINS = ("torchvision", "callable")
# Keyword arguments schedtune passes itself, so model.args / data.args may not set them.
RESERVED_ARGS = {
    ("model", "timm"): ("num_classes", "in_chans", "drop_rate", "drop_path_rate", "pretrained", "img_size"),
    ("model", "torchvision"): ("num_classes", "weights", "progress"),
    ("model", "callable"): ("num_classes", "input_shape"),
    ("data", "torchvision"): ("root", "train", "download", "transform", "target_transform"),   # split: see plugins
    ("data", "callable"): ("root", "download", "val_fraction", "seed", "num_samples", "image_size"),
}


def plugin_form(name: str) -> Optional[tuple[str, str]]:
    """``(kind, target)`` when ``name`` has a plug-in's syntax, else None; nothing is imported.

    ``timm:resnet18`` -> ("timm", "resnet18"); ``torchvision:MNIST`` -> ("torchvision", "MNIST");
    ``mypkg.models:make`` -> ("callable", "mypkg.models:make"). Whether the target exists is
    training.plugins.check_resolvable's question.
    """
    for kind, (syntax, _) in _PLUGIN_FORMS.items():
        m = syntax.fullmatch(name)
        if m:
            return kind, m.group(1)
        if kind != "callable" and name.startswith(kind + ":"):
            return None   # "timm:" with a malformed architecture is not a module path either
    return None


def _check_name(name: str, registry: tuple[str, ...], kinds: tuple[str, ...]) -> None:
    """``name`` is a registry key or a plug-in of one of ``kinds``; a typo gets the closest key."""
    form = plugin_form(name)
    if name in registry or (form is not None and form[0] in kinds):
        return
    near = difflib.get_close_matches(name, registry, n=1, cutoff=0.6)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    forms = ", ".join(_PLUGIN_FORMS[k][1] for k in kinds)
    raise ConfigError("name", name, f"one of {list(registry)}, or a plug-in: {forms}{hint}")


def _check_args(section: str, name: str, args: dict[str, Any]) -> None:
    """``args`` (keyword arguments of a plug-in) only with a plug-in name, as identifiers schedtune does not pass."""
    form = plugin_form(name)
    if form is None:
        kinds = MODEL_PLUGINS if section == "model" else DATA_PLUGINS
        _check(not args, "args", args, f"{{}} for the registry entry {name!r} (args are keyword arguments "
               f"of a plug-in: {', '.join(_PLUGIN_FORMS[k][1] for k in kinds)})")
        return
    for k in args:
        _check(k.isidentifier(), "args", args, f"keys that are Python identifiers (keyword arguments), not {k!r}")
        reserved = RESERVED_ARGS[(section, form[0])]
        _check(k not in reserved, f"args.{k}", args[k],
               f"not set: schedtune passes {', '.join(reserved)} itself"
               + (f" (set {section}.{k} instead)" if section == "data" and form[0] == "callable" else ""))
