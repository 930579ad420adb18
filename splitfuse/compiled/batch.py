"""The flat batch every forward pass takes: a step's sequences, their tokens laid end to end."""
from dataclasses import dataclass

import torch


@dataclass
class Batch:
    # Integers are int32 or int64: the runner passes int32 (one flat buffer, one copy per step).
    input_ids: torch.Tensor        # [T], new tokens of all sequences back to back
    positions: torch.Tensor        # [T]
    slot_mapping: torch.Tensor     # [T], flat KV slot of each token; -1 for padding
    query_start_loc: torch.Tensor  # [S+1]
    seq_lens: torch.Tensor         # [S], context length including the new tokens; 0 for padding
    block_tables: torch.Tensor     # [S, max_blocks]
    logits_indices: torch.Tensor   # [N], rows of the tokens whose next-token logits are wanted, then -1 (padding)

    def used(self) -> torch.Tensor:
        """[1]: how many rows hold tokens; the rows after them pad the step to its shape."""
        return self.query_start_loc[-1:]
