"""How token ids are stored on disk (kept free of torch, so data preparation starts fast and stays small)."""

import numpy as np

from gptrain.errors import UserError

TOKEN_DTYPES = ("uint8", "uint16", "uint32")


def smallest_token_dtype(vocab_size: int) -> str:
    """The narrowest unsigned integer type that holds every id in 0..vocab_size-1."""
    for name in TOKEN_DTYPES:
        if vocab_size - 1 <= np.iinfo(name).max:
            return name
    raise UserError(f"a vocabulary of {vocab_size} ids does not fit in uint32")
