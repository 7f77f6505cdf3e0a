"""Ship a trained student: ``esr export CKPT --out DIR [--merge] [--dtype ...] [--push-to-hub REPO]``.

``source`` picks and verifies the checkpoint, ``folder`` writes weights (merged or the adapter), tokenizer, chat
template and generation config, ``card`` the model card, ``hub`` the upload. The folder loads with
``transformers.AutoModelForCausalLM.from_pretrained`` (or peft's ``AutoPeftModelForCausalLM`` for an adapter) and is
served by vLLM, without esr.
"""

from esr.export.folder import DTYPES, Exported, export_checkpoint
from esr.export.hub import push_folder
from esr.export.source import ExportError, Source, pick_checkpoint

__all__ = ["DTYPES", "ExportError", "Exported", "Source", "export_checkpoint", "pick_checkpoint", "push_folder"]
