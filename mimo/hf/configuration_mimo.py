# MiMo configuration for transformers (trust_remote_code), written by mimo (MIT). Xiaomi's published MiMo-7B
# checkpoints ship a configuration of the same name and shape: Qwen2's configuration plus the number of
# multi-token-prediction (MTP) layers.
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config


class MiMoConfig(Qwen2Config):
    """Qwen2's configuration plus `num_nextn_predict_layers`, the number of MTP layers stored as
    `model.mtp_layers.{k}` (vLLM and SGLang draft from them with their MiMo MTP speculative method)."""

    model_type = "mimo"

    def __init__(self, *args, num_nextn_predict_layers=0, **kwargs):
        self.num_nextn_predict_layers = num_nextn_predict_layers
        super().__init__(*args, **kwargs)
