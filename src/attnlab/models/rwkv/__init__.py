"""RWKV, the recurrent family, in one package: the models and the WKV operators they are built on.

- ``v4.py``: ``RWKVLM`` (RWKV-4: token shift, time mixing with the WKV sums, channel mixing);
- ``v7.py``: ``RWKV7LM`` (RWKV-7: the generalised delta rule on an N x N state per head);
- ``wkv4.py`` / ``wkv7.py``: each version's WKV operator, chunked (training, prompts) and recurrent (decoding),
  the same numbers up to float rounding.

The WKV operators are RWKV's token mixing, the counterpart of an attention kernel, but no other model uses
them and they are not interchangeable with the kernels of ``attention/``, so they sit beside the models that
call them. The family's cache, ``RWKVState``, sits with the other caches in ``inference/rwkv_state.py``
(re-exported here); the Hugging Face name table with the other tables in ``interop/hf_rwkv.py``.
``build_model`` picks ``RWKVLM`` or ``RWKV7LM`` from ``cfg.rwkv_version``.
"""

from attnlab.inference.rwkv_state import RWKVState
from attnlab.models.rwkv.v4 import RWKVLM
from attnlab.models.rwkv.v7 import RWKV7LM
from attnlab.models.rwkv.wkv4 import wkv_chunked, wkv_step
from attnlab.models.rwkv.wkv7 import wkv7_chunked, wkv7_step

__all__ = ["RWKV7LM", "RWKVLM", "RWKVState", "wkv7_chunked", "wkv7_step", "wkv_chunked", "wkv_step"]
