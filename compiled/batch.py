"""The flat batch every forward pass takes (DESIGN.md "A batch")."""
from dataclasses import dataclass

import torch


@dataclass
class Batch:
    input_ids: torch.Tensor        # [T] int64, new tokens of all sequences back to back
    positions: torch.Tensor        # [T] int64
    slot_mapping: torch.Tensor     # [T] int64, flat KV slot of each token; -1 for padding
    query_start_loc: torch.Tensor  # [S+1] int32
    seq_lens: torch.Tensor         # [S] int32, context length including the new tokens; 0 for padding
    block_tables: torch.Tensor     # [S, max_blocks] int32
    logits_indices: torch.Tensor   # [N] int64, rows of the tokens whose next-token logits are wanted
