"""The codes tensor `[B, 1 + n_q, T]`: its special token ids and the one validator every entry point uses.

Rows (docs/design.md §1): 0 is the text stream, `1..dep_q` the system's audio codebooks, `dep_q + 1..n_q` the
user's. Valid inputs are the zero token -1 ("no input") or `0..text_card - 1` (text) / `0..card - 1` (audio); the
initial tokens `text_card` / `card` are the model's own and never an input.
"""

from __future__ import annotations

import torch

ZERO_TOKEN_ID = -1  # "no input": embeds to exactly 0 and carries no loss
UNGENERATED_TOKEN_ID = -2  # moshi's marker for "no output yet" (a slot warming up or paused)


def row_name(config, row: int) -> str:
    """What row `row` of the codes holds, for error messages: `"row 2 (system audio codebook 1)"`."""
    if row == 0:
        return "row 0 (text)"
    if row <= config.dep_q:
        return f"row {row} (system audio codebook {row - 1})"
    return f"row {row} (user audio codebook {row - 1 - config.dep_q})"


def check_codes(
    codes: torch.Tensor,
    config=None,
    *,
    name: str = "codes",
    first_row: int = 0,
    num_rows: int | None = None,
    frames: int | None = None,
    batched: bool = True,
    device: torch.device | None = None,
    check_values: bool = True,
) -> torch.Tensor:
    """Validate codes `[B, num_rows, T]` (rows `first_row..` of the model's layout) and return them as int64.

    Value errors name the place as `name[b, row, t]` (`name[row, t]` for unbatched codes).

    Args:
        codes: the tensor to check.
        config: a `MoshiUserPredConfig`, for the number of rows and every row's vocabulary; without it only the
            structure and the lower bound (-1) are checked.
        name: how the message names the tensor.
        first_row, num_rows: which rows of the layout `codes` holds (default: all `1 + n_q`).
        frames: the required `T` (e.g. 1 for one streaming frame).
        batched: False for one sequence `[num_rows, T]` (a dialogue of a dataset).
        device: where the codes must already be.
        check_values: also check every value; it is the one check that reads the tensor (a host sync on a GPU), so
            the per-step training forward skips it and the data pipeline checks the values on the CPU instead.

    Raises:
        ValueError: naming the first problem (type, dtype, shape, device, or the first bad value with its place).
    """
    if num_rows is None and config is not None:
        num_rows = config.num_codebooks - first_row
    rows = "K" if num_rows is None else str(num_rows)
    if config is not None and first_row == 0 and num_rows == config.num_codebooks:
        rows = f"1 + n_q = {num_rows}"
    elif config is not None and first_row == 1 + config.dep_q and num_rows == config.n_q - config.dep_q:
        rows = f"n_q - dep_q = {num_rows}"
    layout = f"[{'B, ' if batched else ''}{rows}, {'T' if frames is None else frames}]"
    if not isinstance(codes, torch.Tensor):
        raise ValueError(f"{name} must be an integer tensor {layout}, got {type(codes).__name__}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {codes.dtype}")
    shape = tuple(codes.shape)
    batch = codes if batched else codes[None]
    if codes.dim() != (3 if batched else 2) or (num_rows is not None and batch.shape[1] != num_rows) or (
            frames is not None and batch.shape[2] != frames):
        raise ValueError(f"{name} must have shape {layout}, got {shape}")
    if batch.shape[0] == 0 or batch.shape[2] == 0:
        what = "one sequence and one frame" if batched else "one frame"
        raise ValueError(f"{name} must have at least {what}, got shape {shape}")
    if device is not None and codes.device != device:
        raise ValueError(f"{name} are on {codes.device} but the model is on {device}: "
                         f"move them with {name}.to(model.device)")
    codes = codes.long()
    if not check_values:
        return codes
    batch = codes if batched else codes[None]
    if config is not None:
        vocab = [config.text_card] + [config.card] * config.n_q
        upper = torch.tensor(vocab[first_row : first_row + batch.shape[1]], device=codes.device)
        bad = (batch < ZERO_TOKEN_ID) | (batch >= upper.view(1, -1, 1))
    else:
        bad = batch < ZERO_TOKEN_ID
    if bad.any():
        b, row, t = bad.nonzero()[0].tolist()
        value = batch[b, row, t].item()
        place = f"{b}, {row}, {t}" if batched else f"{row}, {t}"
        if config is None:
            valid = "-1 (zero token) or above"
            where = f"row {row}"
        else:
            valid = f"-1 (zero token) or 0..{vocab[first_row + row] - 1}"
            where = row_name(config, first_row + row)
        raise ValueError(f"{name}[{place}] = {value} is out of range for {where} at time step {t}: "
                         f"valid values are {valid}")
    return codes


__all__ = ["UNGENERATED_TOKEN_ID", "ZERO_TOKEN_ID", "check_codes", "row_name"]
