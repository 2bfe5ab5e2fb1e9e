"""RMSNorm: a Triton forward and backward (``rms_norm``) and its torch oracle (``rms_norm_reference``)."""

from moba_cp.ops.rms_norm.naive import rms_norm_reference
from moba_cp.ops.rms_norm.triton_rms_norm import rms_norm

__all__ = ["rms_norm", "rms_norm_reference"]
