"""Models: the registry (mlp, small_cnn, resnet18/50), plug-ins (timm:, torchvision:,
package.module:callable), pretrained weights and transfer-learning modes.

Every model is a :class:`StagedModel` (base.py): ``model.stages()`` lists its blocks from input to
output, the last one being the classifier head, and together the stages hold every parameter
exactly once. Transfer learning only ever looks at stages. One file per member:

- base.py: StagedModel and the checks every builder shares
- small.py: mlp and small_cnn
- resnet.py: the registry's torchvision-based ResNets (imported only when one is built)
- external.py: plug-in models wrapped as PluginModel (contracts: training.plugins)
- pretrained.py: load_pretrained (local state_dict files)
- transfer.py: apply_transfer (full, finetune_last_n, linear_probe)
- registry.py: MODELS and build_model
"""
from training.models.base import StagedModel
from training.models.external import PluginModel
from training.models.pretrained import load_pretrained
from training.models.registry import MODELS, ModelBuilder, build_model
from training.models.small import MLP, SmallCNN
from training.models.transfer import apply_transfer

__all__ = ["MLP", "MODELS", "ModelBuilder", "PluginModel", "SmallCNN", "StagedModel", "apply_transfer",
           "build_model", "load_pretrained"]
